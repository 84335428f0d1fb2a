"""Which implementation runs, and what torch knows about the compiled ops.

The op schemas are written once, in C++ (csrc/ops.cpp, ``TORCH_LIBRARY``). When that
library loads, this module adds what torch needs on top, in Python, as
pytorch/extension-cpp does: a fake kernel for every op (shapes only, for
torch.compile and meta tensors) and the autograd formulas of the differentiable ones
(``gate``, ``apply_mask``, ``soft_gate_apply``, ``sq_dist_list``). When it does not load, nothing is
registered: ``OPS`` is the reference namespace (_fallback.py) and the wrappers call
that instead, with the same signatures.
"""
from __future__ import annotations

import torch

from .. import _loader
from . import _fallback
from ._checks import in_layout

COMPILED: bool = _loader.load()
# The ops the wrappers call: torch.ops.fedsq_fast (compiled) or the reference functions.
OPS = torch.ops.fedsq_fast if COMPILED else _fallback.REFERENCE


def _library_schemas() -> dict:
    """name -> schema (without the namespace) of every op the C++ library defines."""
    if not COMPILED:
        return {}
    out = {}
    for name in _fallback.RAW:
        schema = str(getattr(torch.ops.fedsq_fast, name).default._schema)
        out[name] = schema.split("::", 1)[1]
    return out


SCHEMAS = _library_schemas()  # read from the library: C++ is the only place they are written


def backend() -> str:
    """'compiled' when the C++/CUDA kernels run, 'reference' for the PyTorch fallback."""
    return _loader.BACKEND_INFO["backend"]


def backend_info() -> dict:
    """Which implementation runs, why the compiled one does not (if so), and build facts."""
    return {k: v for k, v in _loader.BACKEND_INFO.items() if not k.startswith("_")}


# --------------------------------------------------------------------------
# Fake kernels (shapes only): one per op.
def _fake_bits(t):
    return t.new_empty(((t.numel() + 31) // 32) * 4, dtype=torch.uint8)


def _fake_sq_dist_list(xs, refs):
    return xs[0].new_empty((), dtype=torch.float64) if len(xs) else torch.empty((), dtype=torch.float64)


FAKES = {
    "pack_mask": lambda z_s: _fake_bits(z_s),
    "apply_mask": lambda z_q, bits: torch.empty_like(z_q),
    "apply_mask_out": lambda z_q, bits, y: None,
    "gate": lambda z_q, z_s: (torch.empty_like(z_q), _fake_bits(z_q)),
    "gate_out": lambda z_q, z_s, y, bits: None,
    "soft_gate_apply": lambda z_q, z_s, kind: torch.empty_like(z_q),
    "soft_gate_apply_out": lambda z_q, z_s, kind, y: None,
    "struct_epilogue": lambda z_s, scale, shift: (torch.empty_like(z_s), _fake_bits(z_s)),
    "struct_epilogue_": lambda z_s, scale, shift, bits: None,
    "weighted_sum_out": lambda xs, weights, out: None,
    "accumulate_": lambda acc, x, weight: None,
    "weighted_sum_list_out": lambda xs, weights, outs: None,
    "int_weighted_sum_list_out": lambda xs, weights, outs: None,
    "accumulate_list_": lambda acc, x, weight: None,
    "sq_dist_list": _fake_sq_dist_list,
    "reply_stats_list": lambda xs, refs, in_total: torch.empty(len(xs) + 1, 4, dtype=torch.float64),
    "fold_stats_list_": lambda accs, xs, ws, zero, refs, in_total: torch.empty(
        len(ws) if len(refs) else 0, len(accs) + 1, 4, dtype=torch.float64),
}


# --------------------------------------------------------------------------
# Autograd: the gate's backward needs only the packed bits (1 bit / element).
def _mask_setup(ctx, inputs, output):
    z_q, bits = inputs
    ctx.save_for_backward(bits)
    ctx.stride = tuple(z_q.stride())


def _mask_backward(ctx, grad_y):
    (bits,) = ctx.saved_tensors
    return torch.ops.fedsq_fast.apply_mask(in_layout(grad_y, ctx.stride), bits), None


def _gate_setup(ctx, inputs, output):
    z_q, _ = inputs
    _, bits = output
    ctx.save_for_backward(bits)  # not z_s, not a float/bool mask
    ctx.stride = tuple(z_q.stride())
    # The bits output has no gradient: without this autograd would allocate
    # and zero-fill one for it on every backward (n/8 bytes and a kernel).
    ctx.set_materialize_grads(False)


def _gate_backward(ctx, grad_y, grad_bits):
    if grad_y is None:  # y did not reach the loss
        return None, None
    (bits,) = ctx.saved_tensors
    return torch.ops.fedsq_fast.apply_mask(in_layout(grad_y, ctx.stride), bits), None


# Soft gate: the backward is the same op on grad_y (grad_z_q = grad_y * g(z_s)); z_s is
# saved and g recomputed: exact, and no second tensor besides z_s (docs/models.md).
def _soft_setup(ctx, inputs, output):
    z_q, z_s, kind = inputs
    ctx.save_for_backward(z_s)
    ctx.kind = kind
    ctx.stride = tuple(z_q.stride())


def _soft_backward(ctx, grad_y):
    (z_s,) = ctx.saved_tensors
    return torch.ops.fedsq_fast.soft_gate_apply(in_layout(grad_y, ctx.stride), z_s, ctx.kind), None, None


def _sq_dist_setup(ctx, inputs, output):
    xs, refs = inputs
    ctx.save_for_backward(*xs, *refs)
    ctx.n = len(xs)


def _sq_dist_backward(ctx, grad):
    saved = ctx.saved_tensors
    xs, refs = saved[: ctx.n], saved[ctx.n:]
    dx = [(2 * (x - r)) * grad.to(x.dtype) for x, r in zip(xs, refs)]  # d/dx ||x - r||^2
    return dx, [-d for d in dx]


AUTOGRAD = {
    "apply_mask": (_mask_backward, _mask_setup),
    "gate": (_gate_backward, _gate_setup),
    "soft_gate_apply": (_soft_backward, _soft_setup),
    "sq_dist_list": (_sq_dist_backward, _sq_dist_setup),
}

if COMPILED:
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"fedsq_fast::{_name}")(_fake)
    for _name, (_backward, _setup) in AUTOGRAD.items():
        torch.library.register_autograd(f"fedsq_fast::{_name}", _backward, setup_context=_setup)
    # Built without CUDA kernels: CUDA tensors run the reference under the same schemas (with
    # them: only the ops that have no CUDA kernel yet).
    _CUDA_LIB = torch.library.Library("fedsq_fast", "IMPL")  # kept alive for the process
    for _name, _impl in _fallback.RAW.items():
        if not _loader.BACKEND_INFO["cuda_kernels"] or _name in _fallback.CPU_ONLY:
            _CUDA_LIB.impl(_name, _impl, "CUDA")
