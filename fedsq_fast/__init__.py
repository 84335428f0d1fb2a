"""fedsq_fast: federated fine-tuning with fixed gating (FedSQ), fast.

Ops (packed 1-bit gates, fused gate/backward, structural epilogue, weighted
averaging) live in :mod:`fedsq_fast.ops`; ``backend()`` tells whether the
compiled C++/CUDA kernels or the pure-PyTorch reference run.
"""
import os as _os

# Runs that share a machine (seeds side by side, a suite's parallel cells, workers): OpenMP
# threads that spin while waiting for work take the cores the other runs need (two README
# main jobs on 2 cores took 4.4x one alone instead of 2x). Waiting passively costs a run
# alone little (benchmarks/RESULTS.md, "Runs sharing a machine"). Set before torch loads its
# OpenMP runtime (importing fedsq_fast first, as the CLI does); a value you set wins
# (OMP_WAIT_POLICY=ACTIVE for the old behaviour). docs/federation.md, "Threads".
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .ops import (  # noqa: F401,E402
    StreamingAverage,
    apply_mask,
    backend,
    backend_info,
    gate,
    pack_mask,
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
