"""Argument checks and layout helpers shared by the op wrappers: every public op
validates before any work and raises TypeError/ValueError naming the argument."""
from __future__ import annotations

import torch

from .. import reference as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def same_layout(t: torch.Tensor, stride) -> bool:
    """``t`` walks memory in the order of ``stride``: the strides agree in every dim of size > 1
    (a size-1 dim's stride is arbitrary; the kernels' check, csrc/ops.cpp same_layout)."""
    return len(t.stride()) == len(stride) and all(a == b for a, b, n in zip(t.stride(), stride, t.shape) if n > 1)


def in_layout(t: torch.Tensor, stride) -> torch.Tensor:
    """``t`` in the memory order of the given strides (bits and list kernels index memory order)."""
    if same_layout(t, stride):
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def dense(t: torch.Tensor) -> torch.Tensor:
    """Kernels walk memory linearly: dense layouts pass, anything else is copied."""
    return t if ref.is_dense(t) else t.contiguous()


def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
        )


def check_pair(a_name, a, b_name, b) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{b_name} must have the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"{b_name} must have the dtype of {a_name} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{b_name} must be on {a_name}'s device ({a.device}), got {b.device}")


def check_bits(bits, like: torch.Tensor, name: str = "bits") -> None:
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of packed bits, got {type(bits).__name__}")
    if bits.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor (from pack_mask/gate), got {bits.dtype}")
    want = ref.num_bit_bytes(like.numel())
    if bits.dim() != 1 or bits.numel() != want:
        raise ValueError(
            f"{name} must be a 1-D uint8 tensor of {want} bytes for {like.numel()} elements "
            f"(1 bit each, padded to 32-bit words), got shape {tuple(bits.shape)}"
        )
    if bits.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {bits.device}")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """How two dense tensors share memory: "no", "full" (the very same elements,
    in the same layout and dtype) or "partial" (anything else)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return "no"
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return "no"
        a0, b0 = a.data_ptr(), b.data_ptr()
    except (RuntimeError, NotImplementedError):  # fake tensors (tracing) have no memory: the op checks again
        return "no"
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    if a1 <= b0 or b1 <= a0:
        return "no"
    if (a0, a1, a.dtype, tuple(a.stride())) == (b0, b1, b.dtype, tuple(b.stride())):
        return "full"
    return "partial"


def check_out_overlap(out_name, out, inputs, allow_full=True) -> None:
    """An output may be exactly its input (each element is read before it is
    written); a shifted or partial view of an input would race."""
    for name, t in inputs:
        o = _overlap(out, t)
        if o == "partial" or (o == "full" and not allow_full):
            raise ValueError(
                f"{out_name} overlaps {name} in memory; an output may only be exactly its own input "
                "(the same tensor), not a shifted or partial view of it"
            )


def check_out_not_differentiable(name, *tensors) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(f"{name}: out= is not differentiable; call it under torch.no_grad()")


def require_layout(name, out, like):
    if tuple(out.stride()) != tuple(like.stride()):
        raise ValueError(
            f"{name} must have the memory layout (strides) of its input {tuple(like.stride())}, "
            f"got {tuple(out.stride())}"
        )
    return out
