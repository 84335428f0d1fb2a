"""Pure-PyTorch reference of every fedsq_fast op.

This module is two things at once: the fallback that runs when the compiled
library is missing (or disabled with FEDSQ_FAST_BACKEND=reference; ops/_fallback.py
gives it the ops' signatures), and the oracle the tests compare the kernels against. It is written for clarity, not
speed, and uses only documented torch semantics.

Bit format (shared by every backend): element i of a tensor, taken in the
tensor's *memory order* (see ``memory_order_flat``), sets bit ``i % 8`` of byte
``i // 8`` (LSB first). The result is a 1-D uint8 tensor padded with zero bits
to a multiple of 4 bytes (one 32-bit word), so its first ceil(n/8) bytes equal
``numpy.packbits(mask_in_memory_order, bitorder='little')``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "num_bit_bytes",
    "memory_order_flat",
    "from_memory_order_flat",
    "pack_bits",
    "unpack_bits",
    "pack_mask",
    "apply_mask",
    "gate",
    "struct_epilogue",
    "SOFT_GATE_KINDS",
    "soft_gate_values",
    "soft_gate_apply",
    "weighted_average_tensors",
]


def num_bit_bytes(numel: int) -> int:
    """Bytes of a packed mask for ``numel`` elements: 1 bit each, padded to 32-bit words."""
    return 4 * ((numel + 31) // 32)


def is_dense(t: torch.Tensor) -> bool:
    """True if ``t``'s elements fill a block of memory exactly once in some dim
    order (contiguous, channels_last, any permutation of a contiguous tensor)."""
    if t.is_contiguous():  # the common case, answered in C++ (a state dict's tensors: per tensor, per round)
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: t.stride(d)):
        size = t.size(d)
        if size == 0:
            return True
        if size == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= size
    return True


def _dense_permutation(t: torch.Tensor):
    """Dims from outermost to innermost in memory if ``t`` is dense and
    non-overlapping (contiguous, channels_last, any permutation); else None.
    Size-1 dims go innermost: their stride is arbitrary and they do not change
    the order."""
    if t.is_contiguous():
        return list(range(t.dim()))
    if not is_dense(t):
        return None
    return sorted(range(t.dim()), key=lambda d: -t.stride(d) if t.size(d) != 1 else 1)


def memory_order_flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` as a 1-D tensor in the order they sit in memory.

    Dense tensors (contiguous, channels_last, permuted) give their storage
    order; any other tensor gives its logical row-major order (the compiled
    ops make such tensors contiguous first, so both agree).
    """
    perm = _dense_permutation(t)
    if perm is None:
        return t.reshape(-1)
    return t.permute(perm).reshape(-1)


def from_memory_order_flat(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``memory_order_flat``: a tensor shaped and strided like ``like``."""
    perm = _dense_permutation(like)
    if perm is None:
        return flat.reshape(like.shape)
    permuted_shape = [like.size(d) for d in perm]
    out = flat.reshape(permuted_shape)
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i
    return out.permute(inv)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (memory order) into the fedsq_fast bit format."""
    flat = memory_order_flat(mask).to(torch.uint8)
    n = flat.numel()
    nbytes = num_bit_bytes(n)
    padded = torch.zeros(nbytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = flat
    weights = (2 ** torch.arange(8, device=mask.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(nbytes, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Boolean mask shaped and strided like ``like`` from packed ``bits``."""
    n = like.numel()
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    flat = ((bits.view(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()
    return from_memory_order_flat(flat, like)


def pack_mask(z_s: torch.Tensor) -> torch.Tensor:
    """bits of ``z_s > 0`` (a real compare: +0.0, -0.0 and NaN give 0)."""
    return pack_bits(z_s > 0)


def apply_mask(z_q: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """y = z_q * mask, multiply semantics (NaN/Inf in z_q propagate, -x*0 = -0.0)."""
    mask = unpack_bits(bits, z_q)
    return z_q * mask.to(z_q.dtype)


def gate(z_q: torch.Tensor, z_s: torch.Tensor):
    """(z_q * (z_s > 0), packed bits of z_s > 0), bits in z_q's memory order."""
    mask = z_s > 0
    return z_q * mask.to(z_q.dtype), pack_bits(_like(mask, z_q))


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` copied into ``like``'s memory layout (same shape required)."""
    if t.stride() == like.stride() or like.numel() == 0:
        return t
    out = torch.empty_like(like, dtype=t.dtype)
    out.copy_(t)
    return out


def _channel_view(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-channel vector (channels = dim 1) broadcastable against ``ref``."""
    shape = [1] * ref.dim()
    shape[1] = -1
    return v.reshape(shape)


def struct_epilogue(z_s: torch.Tensor, scale=None, shift=None):
    """Structural epilogue of a frozen layer, computed in float32 (float64 for
    float64 inputs): t = z_s * scale[c] + shift[c] (c = dim 1; either may be None),
    returns (relu(t) in z_s's dtype, packed bits of t > 0 in z_s's memory order).
    """
    acc = torch.float64 if z_s.dtype == torch.float64 else torch.float32
    t = z_s.to(acc)
    if scale is not None:
        t = t * _channel_view(scale.to(acc), t)
    if shift is not None:
        t = t + _channel_view(shift.to(acc), t)
    t = _like(t, z_s)
    return torch.relu(t).to(z_s.dtype), pack_bits(t > 0)


# The gates g of soft gate sites (docs/models.md, "Soft gates"), named by the function:
# sigmoid (SiLU, squeeze-excitation), phi = Phi (GELU), phi_tanh (GELU's tanh form),
# hardsigmoid (Hardswish), tanh_softplus (Mish).
SOFT_GATE_KINDS = ("sigmoid", "phi", "phi_tanh", "hardsigmoid", "tanh_softplus")
_SQRT_2_OVER_PI = 0.7978845608028654
_SOFT_GATE_FNS = {
    "sigmoid": torch.sigmoid,
    # 0.5 * erfc(-z / sqrt 2): Phi without the cancellation of 1 + erf for negative z
    "phi": lambda z: 0.5 * torch.erfc(z * -0.7071067811865476),
    "phi_tanh": lambda z: 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z))),
    "hardsigmoid": F.hardsigmoid,
    "tanh_softplus": lambda z: torch.tanh(F.softplus(z)),
}


def soft_gate_values(z_s: torch.Tensor, kind: str) -> torch.Tensor:
    """The gate ``g(z_s)`` of a soft kind (:data:`SOFT_GATE_KINDS`), computed in float32
    (float64 for float64) with torch's functions and rounded to ``z_s``'s dtype (the
    gate a half-precision site stores)."""
    if kind not in _SOFT_GATE_FNS:
        raise ValueError(f"kind must be one of {SOFT_GATE_KINDS}, got {kind!r}")
    acc = z_s if z_s.dtype in (torch.float32, torch.float64) else z_s.float()
    return _SOFT_GATE_FNS[kind](acc).to(z_s.dtype)


def soft_gate_apply(z_q: torch.Tensor, z_s: torch.Tensor, kind: str) -> torch.Tensor:
    """y = z_q * g(z_s) with ``g`` as :func:`soft_gate_values` gives it (multiply semantics:
    NaN/Inf propagate; for half types the product is computed in float and rounded)."""
    return z_q * soft_gate_values(z_s, kind)


def weighted_average_tensors(tensors, weights) -> torch.Tensor:
    """sum_k w_k x_k / sum_k w_k in float64 (the oracle), returned as float64."""
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    total = w.sum()
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for wk, x in zip(w.tolist(), tensors):
        acc += (wk / float(total)) * x.to(torch.float64)
    return acc
