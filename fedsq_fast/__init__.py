"""fedsq_fast: federated fine-tuning with fixed gating (FedSQ), fast.

Ops (packed 1-bit gates, fused gate/backward, structural epilogue, weighted
averaging) live in :mod:`fedsq_fast.ops`; ``backend()`` tells whether the
compiled C++/CUDA kernels or the pure-PyTorch reference run.
"""
from .ops import (  # noqa: F401
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
