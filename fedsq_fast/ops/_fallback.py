"""The reference implementation of every compiled op, with the op's signature.

The schemas exist only in C++ (csrc/ops.cpp). When the library is not loaded there is
no ``torch.ops.fedsq_fast`` at all: the wrappers call the functions here instead
(``REFERENCE``), and when it is loaded without CUDA kernels they serve CUDA tensors
(registered for the CUDA key, ``RAW``). The semantics are reference.py's; the
exact-integer average is _exact.py's, the one rule of both averaging entry points.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import reference as ref
from . import _exact
from ._checks import in_layout


def pack_mask(z_s):
    return ref.pack_mask(z_s)


def apply_mask(z_q, bits):
    return ref.apply_mask(z_q, bits)


def apply_mask_out(z_q, bits, y):
    y.copy_(ref.apply_mask(z_q, bits))


def gate(z_q, z_s):
    return ref.gate(z_q, z_s)


def gate_out(z_q, z_s, y, bits):
    yy, bb = ref.gate(z_q, z_s)
    y.copy_(yy)
    bits.copy_(bb)


def soft_gate_apply(z_q, z_s, kind):
    return ref.soft_gate_apply(z_q, z_s, kind)


def soft_gate_apply_out(z_q, z_s, kind, y):
    y.copy_(ref.soft_gate_apply(z_q, z_s, kind))


def struct_epilogue(z_s, scale, shift):
    return ref.struct_epilogue(z_s, scale, shift)


def struct_epilogue_(z_s, scale, shift, bits):
    h, bb = ref.struct_epilogue(z_s, scale, shift)
    z_s.copy_(h)
    bits.copy_(bb)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum_out(xs, weights, out):
    acc = torch.zeros(out.shape, dtype=_acc_dtype(out.dtype), device=out.device)
    for w, x in zip(weights, xs):
        acc.add_(x.to(acc.dtype), alpha=w)
    out.copy_(acc)


def accumulate_(acc, x, weight):
    acc.add_(x.to(acc.dtype), alpha=weight)


def weighted_sum_list_out(xs, weights, outs):
    n = len(outs)  # xs is client-major: xs[k * n + j]
    for j, out in enumerate(outs):
        weighted_sum_out([xs[k * n + j] for k in range(len(weights))], weights, out)


def int_weighted_sum_list_out(xs, weights, outs):
    n = len(outs)
    for j, out in enumerate(outs):
        out.copy_(_exact.int_weighted_sum([xs[k * n + j] for k in range(len(weights))], list(weights)))


def accumulate_list_(accs, xs, weight):
    for acc, x in zip(accs, xs):
        accumulate_(acc, x, weight)


def sq_dist_list(xs, refs):
    """A 0-dim float64 tensor on the inputs' device (CPU for no inputs), like the kernels."""
    total = torch.zeros((), dtype=torch.float64, device=xs[0].device if len(xs) else "cpu")
    for x, r in zip(xs, refs):
        d = (x.to(_acc_dtype(x.dtype)) - r.to(_acc_dtype(x.dtype))).double()
        total = total + (d * d).sum()
    return total


def reply_stats_list(xs, refs, in_total):
    """(K + 1, 4) float64 on the CPU, like the kernel: per tensor (min and max over the non-NaN
    values, NaN/Inf count, squared distance), last row (0, 0, 0, squared distance over the
    tensors with in_total[j])."""
    out = torch.zeros(len(xs) + 1, 4, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for j, (x, r) in enumerate(zip(xs, refs)):
        xa = x.to(_acc_dtype(x.dtype))
        fin = torch.isfinite(xa)
        vals = xa[~torch.isnan(xa)]
        out[j, 0] = vals.min().double() if vals.numel() else float("inf")
        out[j, 1] = vals.max().double() if vals.numel() else float("-inf")
        out[j, 2] = float(x.numel() - int(fin.sum()))
        d = (xa - r.to(_acc_dtype(x.dtype))).double()
        sq = (d * d).sum().cpu()
        out[j, 3] = sq
        if in_total[j]:
            total = total + sq
    out[len(xs), 3] = total
    return out


def fold_stats_list_(accs, xs, ws, zero, refs, in_total):
    """K clients (xs client-major) folded into accs in order (zeroed first if ``zero``); with
    refs, each client's reply_stats_list rows against them first: (K, L + 1, 4) float64, or
    (0, L + 1, 4) without refs, like the kernel."""
    L, K = len(accs), len(ws)
    out = torch.zeros(K if len(refs) else 0, L + 1, 4, dtype=torch.float64)
    for k in range(K if len(refs) else 0):
        out[k] = reply_stats_list(xs[k * L:(k + 1) * L], refs, in_total)
    if zero:
        for a in accs:
            a.zero_()
    for k in range(K):
        accumulate_list_(accs, xs[k * L:(k + 1) * L], ws[k])
    return out


# Every op of csrc/ops.cpp's TORCH_LIBRARY except cpu_isa and cpu_cache (switches, not ops).
RAW = {f.__name__: f for f in (
    pack_mask, apply_mask, apply_mask_out, gate, gate_out, soft_gate_apply, soft_gate_apply_out,
    struct_epilogue, struct_epilogue_,
    weighted_sum_out, accumulate_, weighted_sum_list_out, int_weighted_sum_list_out,
    accumulate_list_, sq_dist_list, reply_stats_list, fold_stats_list_)}
# Ops the compiled library implements on the CPU only: CUDA tensors run the reference.
CPU_ONLY = ("reply_stats_list", "fold_stats_list_")


# Autograd of the reference gate: the same contract as the compiled one (only the
# packed bits are saved, 1 bit per element; the backward is one apply_mask).
class _ApplyMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_q, bits):
        ctx.save_for_backward(bits)
        ctx.stride = tuple(z_q.stride())  # the bits index z_q's memory order
        return apply_mask(z_q, bits)

    @staticmethod
    def backward(ctx, grad_y):
        (bits,) = ctx.saved_tensors
        return REFERENCE.apply_mask(in_layout(grad_y, ctx.stride), bits), None


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_q, z_s):
        y, bits = gate(z_q, z_s)
        ctx.save_for_backward(bits)
        ctx.stride = tuple(z_q.stride())
        ctx.mark_non_differentiable(bits)
        ctx.set_materialize_grads(False)
        return y, bits

    @staticmethod
    def backward(ctx, grad_y, grad_bits):
        if grad_y is None:
            return None, None
        (bits,) = ctx.saved_tensors
        return REFERENCE.apply_mask(in_layout(grad_y, ctx.stride), bits), None


class _SoftGateApply(torch.autograd.Function):
    """The compiled op's contract: z_s is saved (not g) and g recomputed in the backward,
    grad_z_q = grad_y * g(z_s); z_s (frozen) gets no gradient."""

    @staticmethod
    def forward(ctx, z_q, z_s, kind):
        ctx.save_for_backward(z_s)
        ctx.kind = kind
        return soft_gate_apply(z_q, z_s, kind)

    @staticmethod
    def backward(ctx, grad_y):
        (z_s,) = ctx.saved_tensors
        return soft_gate_apply(grad_y, z_s, ctx.kind), None, None


def _differentiable(fn, name):
    def op(*args):
        return fn.apply(*args)
    op.__name__ = name
    return op


REFERENCE = SimpleNamespace(**RAW)
REFERENCE.apply_mask = _differentiable(_ApplyMask, "apply_mask")
REFERENCE.gate = _differentiable(_Gate, "gate")
REFERENCE.soft_gate_apply = _differentiable(_SoftGateApply, "soft_gate_apply")
