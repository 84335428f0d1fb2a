"""fedsq_fast ops: the public, validated API over the compiled kernels.

The op schemas live only in C++ (csrc/ops.cpp). ``_registry`` loads the library and
registers fake kernels and autograd for its ops, or, when it does not load, points
the wrappers at the pure-PyTorch reference with the same signatures (_fallback.py),
so every function here works either way:

- ``gates``:   pack_mask, apply_mask, gate, soft_gate_apply (soft gates), struct_epilogue
- ``average``: weighted_average, StreamingAverage, sq_dist, reply_stats (exact integers: ``_exact``)

Every public function validates its arguments before any work and raises
TypeError/ValueError naming the argument.
"""
from ._checks import FLOAT_DTYPES
from ._registry import SCHEMAS, backend, backend_info
from .average import StreamingAverage, reply_stats, sq_dist, weighted_average
from .gates import SOFT_GATE_KINDS, apply_mask, gate, pack_mask, soft_gate_apply, struct_epilogue

__all__ = [
    "backend",
    "backend_info",
    "pack_mask",
    "apply_mask",
    "gate",
    "struct_epilogue",
    "soft_gate_apply",
    "SOFT_GATE_KINDS",
    "weighted_average",
    "StreamingAverage",
    "sq_dist",
    "reply_stats",
    "FLOAT_DTYPES",
    "SCHEMAS",
]
