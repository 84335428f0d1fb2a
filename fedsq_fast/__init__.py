"""fedsq_fast: federated fine-tuning with fixed gating (FedSQ), fast.

Ops (packed 1-bit gates, fused gate/backward, structural epilogue, weighted
averaging) live in :mod:`fedsq_fast.ops`; ``backend()`` tells whether the
compiled C++/CUDA kernels or the pure-PyTorch reference run.
"""
import os as _os

# Runs that share a machine (seeds side by side, a suite's parallel cells, workers): OpenMP
# threads that spin while waiting for work take the cores the other runs need (two runs of
# the README's job on 2 cores: 1.4-1.8x the time of running them one after the other with
# libgomp's default spin, 1.6-2.0x with OMP_WAIT_POLICY=ACTIVE). A short spin (2000
# iterations) before sleeping brings the pair to 0.81x and costs a run alone 3.6%
# (benchmarks/RESULTS.md, "Runs sharing a machine"). Set before torch loads its OpenMP
# runtime (importing fedsq_fast first, as the CLI does), and only where you set neither
# OMP_WAIT_POLICY nor GOMP_SPINCOUNT yourself. docs/federation.md, "Threads".
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "2000"

from .ops import (  # noqa: F401,E402
    StreamingAverage,
    apply_mask,
    backend,
    backend_info,
    gate,
    pack_mask,
    soft_gate_apply,
    struct_epilogue,
    weighted_average,
)

__version__ = "0.1.0"

# FedSQ layers and DualCopy models (issue 3)
from .layers import (DualMap, GatedActivation, GatedConv1d, GatedConv2d, GatedConv3d, GatedLinear,  # noqa: F401,E402
                     GatedReLU)  # noqa: F401,E402
from . import models  # noqa: F401,E402
from .models import DualCopyModel, MaskCache, dualcopy, load_dualcopy, save_dualcopy  # noqa: F401,E402


def __getattr__(name):
    # fedsq_fast.federate: the one-call entry point for your own model and data, imported on
    # first use so that `import fedsq_fast` (the ops) stays light.
    if name == "federate":
        from .federation.runner import federate

        return federate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
