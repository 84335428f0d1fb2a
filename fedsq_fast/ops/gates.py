"""The gate ops: packed 1-bit masks, the fused gate and the structural epilogue.

Thin wrappers over the compiled ops (or their reference, _registry.OPS): they check
their arguments, bring tensors to a layout the kernels walk linearly, and leave the
work to one op call. ``gate``/``apply_mask`` are differentiable in z_q through the
autograd registered in _registry (the reference has the same contract).
"""
from __future__ import annotations

import torch

from .. import reference as ref
from ._checks import (
    check_bits,
    check_float_tensor,
    check_out_not_differentiable,
    check_out_overlap,
    check_pair,
    dense,
    in_layout,
    require_layout,
)
from ._registry import OPS

__all__ = ["pack_mask", "apply_mask", "gate", "soft_gate_apply", "struct_epilogue", "SOFT_GATE_KINDS"]

SOFT_GATE_KINDS = ref.SOFT_GATE_KINDS


def pack_mask(z_s: torch.Tensor) -> torch.Tensor:
    """Packed bits of ``z_s > 0``: 1 bit per element, LSB first in memory order.

    Returns a 1-D uint8 tensor of 4*ceil(n/32) bytes (zero padding); its first
    ceil(n/8) bytes equal ``numpy.packbits((z_s > 0).ravel(), bitorder='little')``
    for a contiguous ``z_s``.
    """
    check_float_tensor("z_s", z_s)
    return OPS.pack_mask(dense(z_s).detach())


def apply_mask(z_q: torch.Tensor, bits: torch.Tensor, *, out: torch.Tensor | None = None):
    """y = z_q * mask, mask unpacked from ``bits`` in z_q's memory order.

    Multiply semantics: NaN/Inf in z_q propagate through a 0 gate (as NaN) and a
    negative z_q gives -0.0, exactly as eager ``z_q * mask.to(z_q.dtype)``.
    Differentiable in z_q; ``out=`` (preallocated, z_q's layout) is not.
    """
    check_float_tensor("z_q", z_q)
    check_bits(bits, z_q)
    z_q = dense(z_q)
    if out is None:
        return OPS.apply_mask(z_q, bits)
    check_float_tensor("out", out)
    check_pair("z_q", z_q, "out", out)
    check_out_not_differentiable("apply_mask", z_q)
    require_layout("out", out, z_q)
    check_out_overlap("out", out, [("z_q", z_q)])
    check_out_overlap("out", out, [("bits", bits)], allow_full=False)
    OPS.apply_mask_out(z_q, bits, out)
    return out


def gate(z_q: torch.Tensor, z_s: torch.Tensor, *, out=None):
    """Fused gate: returns ``(z_q * (z_s > 0), bits)`` in one pass.

    ``bits`` index z_q's memory order (z_s is brought to z_q's layout if they
    differ). Autograd saves only the bits: 1 bit per element.
    ``out=(y, bits)`` writes into preallocated tensors (not differentiable).
    """
    check_float_tensor("z_q", z_q)
    check_float_tensor("z_s", z_s)
    check_pair("z_q", z_q, "z_s", z_s)
    z_q = dense(z_q)
    z_s = in_layout(z_s.detach(), z_q.stride())
    if out is None:
        return OPS.gate(z_q, z_s)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a pair (y, bits) of preallocated tensors")
    y, bits = out
    check_float_tensor("out[0]", y)
    check_pair("z_q", z_q, "out[0]", y)
    check_bits(bits, z_q, "out[1]")
    check_out_not_differentiable("gate", z_q)
    require_layout("out[0]", y, z_q)
    check_out_overlap("out[0]", y, [("z_q", z_q), ("z_s", z_s)])
    check_out_overlap("out[1]", bits, [("z_q", z_q), ("z_s", z_s), ("out[0]", y)], allow_full=False)
    OPS.gate_out(z_q, z_s, y, bits)
    return y, bits


def soft_gate_apply(z_q: torch.Tensor, z_s: torch.Tensor, kind: str, *, out: torch.Tensor | None = None):
    """Fused soft gate: ``y = z_q * g(z_s)`` in one pass, ``g`` named by ``kind``:
    'sigmoid' (SiLU, squeeze-excitation), 'phi' (GELU: Phi(z) = (1 + erf(z/sqrt 2))/2),
    'phi_tanh' (GELU's tanh form), 'hardsigmoid' (Hardswish), 'tanh_softplus' (Mish).

    ``g`` is computed in float32 (float64 for float64 inputs) and rounded to the dtype
    before the multiply, so half-precision results are ``z_q * g`` as eager computes it
    for a stored half gate. Compiled CPU kernels use vectorised float32 approximations
    within the bound that docs/models.md ("Soft gates") states of torch's functions.
    Differentiable in z_q: the backward is this op on grad_y (grad_z_q = grad_y * g(z_s)),
    recomputing ``g`` from the saved ``z_s`` (exact; nothing else saved). ``z_s`` is a
    frozen structural tensor: it takes no gradient. ``out=`` (preallocated, z_q's layout)
    is not differentiable. Any layout; z_s is brought to z_q's.
    """
    if not isinstance(kind, str) or kind not in SOFT_GATE_KINDS:
        raise ValueError(f"kind must be one of {SOFT_GATE_KINDS}, got {kind!r}")
    check_float_tensor("z_q", z_q)
    check_float_tensor("z_s", z_s)
    check_pair("z_q", z_q, "z_s", z_s)
    z_q = dense(z_q)
    z_s = in_layout(z_s.detach(), z_q.stride())
    if out is None:
        return OPS.soft_gate_apply(z_q, z_s, kind)
    check_float_tensor("out", out)
    check_pair("z_q", z_q, "out", out)
    check_out_not_differentiable("soft_gate_apply", z_q)
    require_layout("out", out, z_q)
    check_out_overlap("out", out, [("z_q", z_q), ("z_s", z_s)])
    OPS.soft_gate_apply_out(z_q, z_s, kind, out)
    return out


def _epilogue_layout(z_s: torch.Tensor) -> torch.Tensor:
    """Layouts the epilogue kernels take: contiguous (channel runs of H*W) or
    channel-innermost (channels_last, or 2-D [N, C]); others are copied."""
    if z_s.is_contiguous() or (z_s.dim() >= 2 and ref.is_dense(z_s) and z_s.stride(1) == 1):
        return z_s
    return z_s.contiguous()


def _check_channel_vec(name, v, z_s):
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if z_s.dim() < 2:
        raise ValueError(f"{name} needs z_s with a channel dim (dim 1), got shape {tuple(z_s.shape)}")
    if v.dim() != 1 or v.numel() != z_s.size(1):
        raise ValueError(
            f"{name} must be 1-D with one value per channel ({z_s.size(1)}), got shape {tuple(v.shape)}"
        )
    if v.device != z_s.device:
        raise ValueError(f"{name} must be on {z_s.device}, got {v.device}")
    acc = torch.float64 if z_s.dtype == torch.float64 else torch.float32
    return v.detach().to(acc).contiguous()


def struct_epilogue(z_s: torch.Tensor, scale=None, shift=None, *, inplace: bool = False):
    """Epilogue of a frozen structural layer in one pass.

    t = z_s * scale[c] + shift[c] (c = dim 1, each optional: a folded eval-mode
    BatchNorm or a bias), computed in float32 (float64 for float64); returns
    ``(relu(t), bits of t > 0)``. With ``inplace=True`` relu(t) overwrites z_s.
    Structural tensors are frozen: no autograd.
    """
    check_float_tensor("z_s", z_s)
    scale = _check_channel_vec("scale", scale, z_s)
    shift = _check_channel_vec("shift", shift, z_s)
    with torch.no_grad():
        if inplace:
            if not (z_s.is_contiguous() or _epilogue_layout(z_s) is z_s):
                raise ValueError("inplace=True needs z_s contiguous or channels_last")
            bits = torch.empty(ref.num_bit_bytes(z_s.numel()), dtype=torch.uint8, device=z_s.device)
            OPS.struct_epilogue_(z_s, scale, shift, bits)
            return z_s, bits
        return OPS.struct_epilogue(_epilogue_layout(z_s.detach()), scale, shift)
