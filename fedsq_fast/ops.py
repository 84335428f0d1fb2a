"""fedsq_fast ops: the public, validated API over ``torch.ops.fedsq_fast``.

The ops are always registered under the ``fedsq_fast`` namespace: by the
compiled library (csrc/, CPU and CUDA kernels) when it loads, otherwise by the
pure-PyTorch reference below. Fake (meta) kernels and autograd formulas are
registered here once, in Python, for both, so torch.compile and autograd see
the same ops whichever implementation runs (pytorch/extension-cpp's pattern).

Every public function validates its arguments before any work and raises
TypeError/ValueError naming the argument.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from . import _loader
from . import reference as ref

__all__ = [
    "backend",
    "backend_info",
    "pack_mask",
    "apply_mask",
    "gate",
    "struct_epilogue",
    "weighted_average",
    "StreamingAverage",
    "sq_dist",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_COMPILED = _loader.load()

# One schema list: the C++ library defines the same strings (csrc/ops.cpp);
# the reference registration below uses them when the library is absent.
SCHEMAS = {
    "pack_mask": "pack_mask(Tensor z_s) -> Tensor",
    "apply_mask": "apply_mask(Tensor z_q, Tensor bits) -> Tensor",
    "apply_mask_out": "apply_mask_out(Tensor z_q, Tensor bits, Tensor(a!) y) -> ()",
    "gate": "gate(Tensor z_q, Tensor z_s) -> (Tensor, Tensor)",
    "gate_out": "gate_out(Tensor z_q, Tensor z_s, Tensor(a!) y, Tensor(b!) bits) -> ()",
    "struct_epilogue": "struct_epilogue(Tensor z_s, Tensor? scale, Tensor? shift) -> (Tensor, Tensor)",
    "struct_epilogue_": "struct_epilogue_(Tensor(a!) z_s, Tensor? scale, Tensor? shift, Tensor(b!) bits) -> ()",
    "weighted_sum_out": "weighted_sum_out(Tensor[] xs, float[] weights, Tensor(a!) out) -> ()",
    "accumulate_": "accumulate_(Tensor(a!) acc, Tensor x, float weight) -> ()",
    # Many tensors per client in one dispatch (xs client-major: xs[k*L + j]).
    "weighted_sum_list_out": "weighted_sum_list_out(Tensor[] xs, float[] weights, Tensor(a!)[] outs) -> ()",
    # Integer and bool tensors, exactly: round_half_even(sum_k q_k x_k / sum_k q_k), integer q_k.
    "int_weighted_sum_list_out": "int_weighted_sum_list_out(Tensor[] xs, int[] weights, Tensor(a!)[] outs) -> ()",
    "accumulate_list_": "accumulate_list_(Tensor(a!)[] acc, Tensor[] x, float weight) -> ()",
    # sum_j ||xs[j] - refs[j]||^2 in one pass, no temporaries (drift metrics).
    "sq_dist_list": "sq_dist_list(Tensor[] xs, Tensor[] refs) -> float",
}


# --------------------------------------------------------------------------
# Reference implementations of the op schemas (used when not compiled, and for
# CUDA tensors when the library was built without CUDA kernels).
def _ref_pack_mask(z_s):
    return ref.pack_mask(z_s)


def _ref_apply_mask(z_q, bits):
    return ref.apply_mask(z_q, bits)


def _ref_apply_mask_out(z_q, bits, y):
    y.copy_(ref.apply_mask(z_q, bits))


def _ref_gate(z_q, z_s):
    return ref.gate(z_q, z_s)


def _ref_gate_out(z_q, z_s, y, bits):
    yy, bb = ref.gate(z_q, z_s)
    y.copy_(yy)
    bits.copy_(bb)


def _ref_struct_epilogue(z_s, scale, shift):
    return ref.struct_epilogue(z_s, scale, shift)


def _ref_struct_epilogue_(z_s, scale, shift, bits):
    h, bb = ref.struct_epilogue(z_s, scale, shift)
    z_s.copy_(h)
    bits.copy_(bb)


def _ref_weighted_sum_out(xs, weights, out):
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    acc = torch.zeros(out.shape, dtype=acc_dtype, device=out.device)
    for w, x in zip(weights, xs):
        acc.add_(x.to(acc_dtype), alpha=w)
    out.copy_(acc)


def _ref_accumulate_(acc, x, weight):
    acc.add_(x.to(acc.dtype), alpha=weight)


def _ref_weighted_sum_list_out(xs, weights, outs):
    n_out = len(outs)
    for j, out in enumerate(outs):
        _ref_weighted_sum_out([xs[k * n_out + j] for k in range(len(weights))], weights, out)


def _ref_int_weighted_sum_list_out(xs, weights, outs):
    n_out, total = len(outs), sum(weights)
    for j, out in enumerate(outs):
        tensors = [xs[k * n_out + j].to(torch.int64) for k in range(len(weights))]
        big = max((int(t.abs().max()) for t in tensors if t.numel()), default=0)
        if big * total < 2**63:  # int64 cannot overflow: torch arithmetic
            s = torch.zeros(out.shape, dtype=torch.int64, device=out.device)
            for q, t in zip(weights, tensors):
                if q:
                    s.add_(t, alpha=q)
            out.copy_(_round_div(s, total))
        else:  # Python integers (the reference is allowed to be slow)
            flat = [t.reshape(-1).tolist() for t in tensors]
            vals = [_round_div_int(sum(q * col[i] for q, col in zip(weights, flat)), total)
                    for i in range(out.numel())]
            out.copy_(torch.tensor(vals, dtype=torch.int64, device=out.device).reshape(out.shape))


def _round_div_int(s: int, q: int) -> int:
    """round-half-to-even(s / q) for Python ints, q > 0."""
    quot, rem = divmod(s, q)
    return quot + (2 * rem > q or (2 * rem == q and quot % 2 == 1))


def _ref_accumulate_list_(accs, xs, weight):
    for acc, x in zip(accs, xs):
        _ref_accumulate_(acc, x, weight)


def _ref_sq_dist_list(xs, refs):
    total = 0.0
    for x, r in zip(xs, refs):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        total += float(torch.linalg.vector_norm(x.to(acc) - r.to(acc), dtype=torch.float64)) ** 2
    return total


_REF_IMPLS = {
    "pack_mask": _ref_pack_mask,
    "apply_mask": _ref_apply_mask,
    "apply_mask_out": _ref_apply_mask_out,
    "gate": _ref_gate,
    "gate_out": _ref_gate_out,
    "struct_epilogue": _ref_struct_epilogue,
    "struct_epilogue_": _ref_struct_epilogue_,
    "weighted_sum_out": _ref_weighted_sum_out,
    "accumulate_": _ref_accumulate_,
    "weighted_sum_list_out": _ref_weighted_sum_list_out,
    "int_weighted_sum_list_out": _ref_int_weighted_sum_list_out,
    "accumulate_list_": _ref_accumulate_list_,
    "sq_dist_list": _ref_sq_dist_list,
}

if not _COMPILED:
    _LIB = torch.library.Library("fedsq_fast", "DEF")  # kept alive for the process
    for _name, _schema in SCHEMAS.items():
        _LIB.define(_schema)
        _LIB.impl(_name, _REF_IMPLS[_name], "CompositeExplicitAutograd")
elif not _loader.BACKEND_INFO["cuda_kernels"]:
    _LIB = torch.library.Library("fedsq_fast", "IMPL")
    for _name in SCHEMAS:
        _LIB.impl(_name, _REF_IMPLS[_name], "CUDA")


# --------------------------------------------------------------------------
# Fake kernels (shapes only) for torch.compile / meta tensors.
def _fake_bits(t):
    return t.new_empty(((t.numel() + 31) // 32) * 4, dtype=torch.uint8)


torch.library.register_fake("fedsq_fast::pack_mask")(lambda z_s: _fake_bits(z_s))
torch.library.register_fake("fedsq_fast::apply_mask")(lambda z_q, bits: torch.empty_like(z_q))
torch.library.register_fake("fedsq_fast::apply_mask_out")(lambda z_q, bits, y: None)
torch.library.register_fake("fedsq_fast::gate")(
    lambda z_q, z_s: (torch.empty_like(z_q), _fake_bits(z_q))
)
torch.library.register_fake("fedsq_fast::gate_out")(lambda z_q, z_s, y, bits: None)
torch.library.register_fake("fedsq_fast::struct_epilogue")(
    lambda z_s, scale, shift: (torch.empty_like(z_s), _fake_bits(z_s))
)
torch.library.register_fake("fedsq_fast::struct_epilogue_")(lambda z_s, scale, shift, bits: None)
torch.library.register_fake("fedsq_fast::weighted_sum_out")(lambda xs, weights, out: None)
torch.library.register_fake("fedsq_fast::accumulate_")(lambda acc, x, weight: None)
torch.library.register_fake("fedsq_fast::weighted_sum_list_out")(lambda xs, weights, outs: None)
torch.library.register_fake("fedsq_fast::int_weighted_sum_list_out")(lambda xs, weights, outs: None)
torch.library.register_fake("fedsq_fast::accumulate_list_")(lambda acc, x, weight: None)


# --------------------------------------------------------------------------
# Autograd: the gate's backward needs only the packed bits (1 bit / element).
def _in_layout(t: torch.Tensor, stride) -> torch.Tensor:
    """``t`` with the given strides (the bits index memory order)."""
    if tuple(t.stride()) == tuple(stride):
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _mask_setup(ctx, inputs, output):
    z_q, bits = inputs
    ctx.save_for_backward(bits)
    ctx.stride = tuple(z_q.stride())


def _mask_backward(ctx, grad_y):
    (bits,) = ctx.saved_tensors
    return torch.ops.fedsq_fast.apply_mask(_in_layout(grad_y, ctx.stride), bits), None


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
    return torch.ops.fedsq_fast.apply_mask(_in_layout(grad_y, ctx.stride), bits), None


torch.library.register_autograd("fedsq_fast::apply_mask", _mask_backward, setup_context=_mask_setup)
torch.library.register_autograd("fedsq_fast::gate", _gate_backward, setup_context=_gate_setup)


# --------------------------------------------------------------------------
def backend() -> str:
    """'compiled' when the C++/CUDA kernels run, 'reference' for the PyTorch fallback."""
    return _loader.BACKEND_INFO["backend"]


def backend_info() -> dict:
    """Which implementation runs, why the compiled one does not (if so), and build facts."""
    return {k: v for k, v in _loader.BACKEND_INFO.items() if not k.startswith("_")}


# --------------------------------------------------------------------------
# Validation helpers: fail before any work, naming the argument.
def _check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
        )


def _check_pair(a_name, a, b_name, b) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{b_name} must have the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"{b_name} must have the dtype of {a_name} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{b_name} must be on {a_name}'s device ({a.device}), got {b.device}")


def _check_bits(bits, like: torch.Tensor, name: str = "bits") -> None:
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


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Kernels walk memory linearly: dense layouts pass, anything else is copied."""
    return t if ref.is_dense(t) else t.contiguous()


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


def _check_out_overlap(out_name, out, inputs, allow_full=True) -> None:
    """An output may be exactly its input (each element is read before it is
    written); a shifted or partial view of an input would race."""
    for name, t in inputs:
        o = _overlap(out, t)
        if o == "partial" or (o == "full" and not allow_full):
            raise ValueError(
                f"{out_name} overlaps {name} in memory; an output may only be exactly its own input "
                "(the same tensor), not a shifted or partial view of it"
            )


def _check_out_not_differentiable(name, *tensors) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(f"{name}: out= is not differentiable; call it under torch.no_grad()")


# --------------------------------------------------------------------------
def pack_mask(z_s: torch.Tensor) -> torch.Tensor:
    """Packed bits of ``z_s > 0``: 1 bit per element, LSB first in memory order.

    Returns a 1-D uint8 tensor of 4*ceil(n/32) bytes (zero padding); its first
    ceil(n/8) bytes equal ``numpy.packbits((z_s > 0).ravel(), bitorder='little')``
    for a contiguous ``z_s``.
    """
    _check_float_tensor("z_s", z_s)
    return torch.ops.fedsq_fast.pack_mask(_dense(z_s).detach())


def apply_mask(z_q: torch.Tensor, bits: torch.Tensor, *, out: torch.Tensor | None = None):
    """y = z_q * mask, mask unpacked from ``bits`` in z_q's memory order.

    Multiply semantics: NaN/Inf in z_q propagate through a 0 gate (as NaN) and a
    negative z_q gives -0.0, exactly as eager ``z_q * mask.to(z_q.dtype)``.
    Differentiable in z_q; ``out=`` (preallocated, z_q's layout) is not.
    """
    _check_float_tensor("z_q", z_q)
    _check_bits(bits, z_q)
    z_q = _dense(z_q)
    if out is None:
        return torch.ops.fedsq_fast.apply_mask(z_q, bits)
    _check_float_tensor("out", out)
    _check_pair("z_q", z_q, "out", out)
    _check_out_not_differentiable("apply_mask", z_q)
    _require_layout("out", out, z_q)
    _check_out_overlap("out", out, [("z_q", z_q)])
    _check_out_overlap("out", out, [("bits", bits)], allow_full=False)
    torch.ops.fedsq_fast.apply_mask_out(z_q, bits, out)
    return out


def _require_layout(name, out, like):
    if tuple(out.stride()) != tuple(like.stride()):
        raise ValueError(
            f"{name} must have the memory layout (strides) of its input {tuple(like.stride())}, "
            f"got {tuple(out.stride())}"
        )
    return out


def gate(z_q: torch.Tensor, z_s: torch.Tensor, *, out=None):
    """Fused gate: returns ``(z_q * (z_s > 0), bits)`` in one pass.

    ``bits`` index z_q's memory order (z_s is brought to z_q's layout if they
    differ). Autograd saves only the bits: 1 bit per element.
    ``out=(y, bits)`` writes into preallocated tensors (not differentiable).
    """
    _check_float_tensor("z_q", z_q)
    _check_float_tensor("z_s", z_s)
    _check_pair("z_q", z_q, "z_s", z_s)
    z_q = _dense(z_q)
    z_s = _in_layout(z_s.detach(), z_q.stride())
    if out is None:
        return torch.ops.fedsq_fast.gate(z_q, z_s)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a pair (y, bits) of preallocated tensors")
    y, bits = out
    _check_float_tensor("out[0]", y)
    _check_pair("z_q", z_q, "out[0]", y)
    _check_bits(bits, z_q, "out[1]")
    _check_out_not_differentiable("gate", z_q)
    _require_layout("out[0]", y, z_q)
    _check_out_overlap("out[0]", y, [("z_q", z_q), ("z_s", z_s)])
    _check_out_overlap("out[1]", bits, [("z_q", z_q), ("z_s", z_s), ("out[0]", y)], allow_full=False)
    torch.ops.fedsq_fast.gate_out(z_q, z_s, y, bits)
    return y, bits


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
    _check_float_tensor("z_s", z_s)
    scale = _check_channel_vec("scale", scale, z_s)
    shift = _check_channel_vec("shift", shift, z_s)
    with torch.no_grad():
        if inplace:
            if not (z_s.is_contiguous() or _epilogue_layout(z_s) is z_s):
                raise ValueError("inplace=True needs z_s contiguous or channels_last")
            bits = torch.empty(ref.num_bit_bytes(z_s.numel()), dtype=torch.uint8, device=z_s.device)
            torch.ops.fedsq_fast.struct_epilogue_(z_s, scale, shift, bits)
            return z_s, bits
        return torch.ops.fedsq_fast.struct_epilogue(_epilogue_layout(z_s.detach()), scale, shift)


# --------------------------------------------------------------------------
# Weighted average of client tensors.
def _real(w, arg: str) -> float:
    """A weight as a float: real numbers only (a str such as "3" or a bool is refused, not
    read as a number)."""
    if isinstance(w, torch.Tensor) and w.numel() == 1 and not w.dtype.is_complex and w.dtype != torch.bool:
        return float(w)
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Real):
        raise TypeError(f"{arg} must be a real number, got {w!r}")
    return float(w)


def _check_weights(weights, k: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().reshape(-1).tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a sequence of {k} numbers, got {weights!r}")
    ws = [_real(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if len(ws) != k:
        raise ValueError(f"weights must have one entry per client ({k}), got {len(ws)}")
    for i, w in enumerate(ws):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] must be finite and >= 0, got {w}")
    if sum(ws) <= 0:
        raise ValueError("weights must not all be zero (their sum is the divisor)")
    return ws


def _as_client_lists(clients):
    """Normalise to (list of per-client tensor lists, names, rebuild(result_list))."""
    if isinstance(clients, torch.Tensor) or not isinstance(clients, Sequence):
        raise TypeError(
            "clients must be a sequence of K tensors, of K tensor sequences, or of K state dicts"
        )
    if len(clients) == 0:
        raise ValueError("clients must hold at least one client (K >= 1), got none")
    first = clients[0]
    if isinstance(first, torch.Tensor):
        for i, c in enumerate(clients):
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"clients[{i}] must be a tensor like clients[0], got {type(c).__name__}")
        return [[c] for c in clients], ["tensor"], lambda res: res[0]
    if isinstance(first, Mapping):
        keys = list(first.keys())
        lists = []
        for i, c in enumerate(clients):
            if not isinstance(c, Mapping):
                raise TypeError(f"clients[{i}] must be a mapping like clients[0], got {type(c).__name__}")
            if c.keys() != first.keys():  # compared as sets: the order of the keys does not matter
                missing, extra = sorted(set(keys) - set(c.keys())), sorted(set(c.keys()) - set(keys))
                raise ValueError(f"clients[{i}] must have the keys of clients[0]: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
            lists.append([c[k] for k in keys])
        return lists, keys, lambda res: dict(zip(keys, res))
    lists = []
    for i, c in enumerate(clients):
        if isinstance(c, torch.Tensor) or not isinstance(c, Sequence):
            raise TypeError(f"clients[{i}] must be a sequence of tensors, got {type(c).__name__}")
        if len(c) != len(first):
            raise ValueError(f"clients[{i}] has {len(c)} tensors, clients[0] has {len(first)}")
        lists.append(list(c))
    names = [str(j) for j in range(len(first))]
    return lists, names, lambda res: type(first)(res) if isinstance(first, tuple) else list(res)


def _check_clients(lists, names):
    ref_list = lists[0]
    for j, t0 in enumerate(ref_list):
        if not isinstance(t0, torch.Tensor):
            raise TypeError(f"clients[0][{names[j]!r}] must be a tensor, got {type(t0).__name__}")
    for i, lst in enumerate(lists[1:], start=1):
        for j, (t, t0) in enumerate(zip(lst, ref_list)):
            where = f"clients[{i}][{names[j]!r}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where} must be a tensor, got {type(t).__name__}")
            if t.shape != t0.shape:
                raise ValueError(
                    f"{where} has shape {tuple(t.shape)}, but clients[0] has {tuple(t0.shape)}"
                )
            if t.dtype != t0.dtype:
                raise TypeError(f"{where} has dtype {t.dtype}, but clients[0] has {t0.dtype}")
            if t.device != t0.device:
                raise ValueError(f"{where} is on {t.device}, but clients[0] is on {t0.device}")


def _integer_weights(ws: list[float]) -> list[int]:
    """Exact integer weights for integer tensors: the weights themselves when they
    are integers (sample counts), else a 2**30 fixed-point grid of w/sum(w)."""
    if all(w.is_integer() for w in ws) and sum(ws) < 2**53:
        return [int(w) for w in ws]
    total = sum(ws)
    return [round(w / total * 2**30) for w in ws]


def _round_div(s: torch.Tensor, q: int) -> torch.Tensor:
    """round-half-to-even(s / q) for int64 s and positive int q, exactly."""
    quot = torch.div(s, q, rounding_mode="floor")
    rem = s - quot * q
    up = (2 * rem > q) | ((2 * rem == q) & (quot % 2 == 1))
    return quot + up.to(quot.dtype)


_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


def _check_out(out_list, ref_list, names):
    if len(out_list) != len(ref_list):
        raise ValueError(f"out must hold {len(ref_list)} tensors like a client, got {len(out_list)}")
    for j, (o, t0) in enumerate(zip(out_list, ref_list)):
        where = f"out[{names[j]!r}]"
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{where} must be a tensor, got {type(o).__name__}")
        if o.shape != t0.shape or o.dtype != t0.dtype or o.device != t0.device:
            raise ValueError(
                f"{where} must match the clients' tensor ({tuple(t0.shape)}, {t0.dtype}, {t0.device}), "
                f"got ({tuple(o.shape)}, {o.dtype}, {o.device})"
            )


def weighted_average(clients, weights, out=None):
    """sum_k w_k x_k / sum_k w_k over K clients in one pass per tensor.

    ``clients``: K tensors of one shape, K sequences of tensors (per-client
    parameter lists) or K state dicts with the same keys. ``weights``: K
    non-negative numbers (e.g. sample counts; need not sum to 1).
    Floating tensors accumulate in float32 (float64 for float64) in client
    order, so the result does not depend on the thread count. Integer and
    bool tensors are averaged exactly in integers (round half to even; for
    bool that is the weighted majority, an exact tie giving False).
    ``out`` (same structure as one client) is written in place and returned.
    """
    lists, names, rebuild = _as_client_lists(clients)
    ws = _check_weights(weights, len(lists))
    _check_clients(lists, names)
    out_list = None
    if out is not None:
        out_list, _, _ = _as_client_lists([out])
        out_list = out_list[0]
        _check_out(out_list, lists[0], names)
    for j, t0 in enumerate(lists[0]):
        if not (t0.dtype.is_floating_point or t0.dtype in _INT_DTYPES):
            raise TypeError(
                f"clients[0][{names[j]!r}] has dtype {t0.dtype}; averaged are floating, "
                "int8/uint8/int16/int32/int64 and bool tensors"
            )
    total = sum(ws)
    if not math.isfinite(total):  # finite weights whose sum overflows (e.g. 1e308 x 3): same ratios
        top = max(ws)
        ws = [w / top for w in ws]
        total = sum(ws)
    norm = [w / total for w in ws]
    qs = _integer_weights(ws)
    if any(not t.dtype.is_floating_point for t in lists[0]) and sum(qs) <= 0:
        raise ValueError("weights too small to average integer tensors exactly (all round to 0)")
    results = [None] * len(lists[0])
    # One call per (kind, device): a state dict may be split across devices,
    # and a launch only ever sees pointers of its own device.
    groups: dict = {}
    copy_back = []
    with torch.no_grad():
        for j in range(len(lists[0])):
            tensors = [lst[j] for lst in lists]
            o = None if out_list is None else out_list[j]
            if o is None:
                o = torch.empty_like(tensors[0])  # dense layouts are kept
            # The kernels walk memory linearly: inputs take the target's layout.
            tgt = o if ref.is_dense(o) else torch.empty_like(o, memory_format=torch.contiguous_format)
            if tgt is not o:
                copy_back.append((tgt, o))
            g = groups.setdefault((tensors[0].dtype.is_floating_point, tgt.device), ([], []))
            g[0].append(tgt)
            g[1].append([_in_layout(x, tgt.stride()) for x in tensors])
            results[j] = o
        for (is_float, _), (targets, inputs) in groups.items():
            flat = [xs[k] for k in range(len(ws)) for xs in inputs]  # client-major
            if is_float:
                torch.ops.fedsq_fast.weighted_sum_list_out(flat, norm, targets)
            else:
                torch.ops.fedsq_fast.int_weighted_sum_list_out(flat, qs, targets)
        for tgt, o in copy_back:
            o.copy_(tgt)
    return rebuild(results)


def sq_dist(xs, refs) -> float:
    """sum_j ||xs[j] - refs[j]||^2 over two equally shaped tensor lists (e.g. a
    client's state and the global one), in one pass without temporaries on CPU.
    NaN/Inf in the inputs give a non-finite result. Tensors pair up by position
    and must match in shape, dtype and device."""
    xs, refs = list(xs), list(refs)
    if len(xs) != len(refs):
        raise ValueError(f"xs and refs must hold the same number of tensors, got {len(xs)} and {len(refs)}")
    for j, (x, r) in enumerate(zip(xs, refs)):
        _check_float_tensor(f"xs[{j}]", x)
        _check_pair(f"refs[{j}]", r, f"xs[{j}]", x)
    if not xs:
        return 0.0
    by_device: dict = {}  # one call (one sync on a GPU) per device, not per tensor
    with torch.no_grad():
        for x, r in zip(xs, refs):
            if not (x.stride() == r.stride() and ref.is_dense(x)):
                x, r = x.contiguous(), r.contiguous()
            g = by_device.setdefault(x.device, ([], []))
            g[0].append(x)
            g[1].append(r)
        return float(sum(torch.ops.fedsq_fast.sq_dist_list(a, b) for a, b in by_device.values()))


class StreamingAverage:
    """Weighted average folded in one client at a time: memory for one
    accumulator (float32 for float16/bfloat16/float32 tensors), not K clients.

    >>> avg = StreamingAverage()
    >>> for state, n in replies: avg.add(state, n)
    >>> global_state = avg.result()

    Clients are folded in the order they are added; the result is
    deterministic for that order. Integer tensors accumulate exactly in int64.
    """

    def __init__(self):
        self._names = None
        self._rebuild = None
        self._template = None
        self._acc = None
        self._total = 0.0
        self._int_scale = 1  # 1 while all weights are integers, else 2**20 fixed point
        self._int_total = 0
        self._consumed = False
        self.count = 0

    def _check_live(self) -> None:
        if self._consumed:
            raise RuntimeError("this StreamingAverage was consumed by result(consume=True); start a new one")

    def add(self, client, weight) -> None:
        """Fold one client (a tensor, a tensor sequence or a state dict) with its weight."""
        self._check_live()
        lists, names, rebuild = _as_client_lists([client])
        (lst,) = lists
        w = _real(weight, "weight")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be finite and >= 0, got {w}")
        if w > _F32_MAX or 0 < w < _F32_TINY:
            # the accumulators fold w in float32: outside its range w becomes Inf or 0
            raise ValueError(f"weight {w:g} is outside float32's range [{_F32_TINY:g}, {_F32_MAX:g}] that "
                             "StreamingAverage folds weights in; scale the weights (only their ratios matter)")
        if self._template is None:
            for j, t in enumerate(lst):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"client[{names[j]!r}] must be a tensor, got {type(t).__name__}")
            self._names, self._rebuild = names, rebuild
            self._template = [(t.shape, t.dtype, t.device) for t in lst]
            self._acc = [
                torch.zeros(
                    t.shape,
                    dtype=(torch.float64 if t.dtype == torch.float64 else torch.float32)
                    if t.dtype.is_floating_point
                    else torch.int64,
                    device=t.device,
                )
                for t in lst
            ]
        else:
            if names != self._names:
                raise ValueError(
                    f"client #{self.count} has tensors {names[:3]}..., expected {self._names[:3]}..."
                )
            for j, (t, (shape, dtype, device)) in enumerate(zip(lst, self._template)):
                where = f"client #{self.count}[{names[j]!r}]"
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{where} must be a tensor, got {type(t).__name__}")
                if t.shape != shape or t.dtype != dtype or t.device != device:
                    raise ValueError(
                        f"{where} is ({tuple(t.shape)}, {t.dtype}, {t.device}), "
                        f"expected ({tuple(shape)}, {dtype}, {device})"
                    )
        if self._int_scale == 1 and not w.is_integer():
            # Switch integer accumulators to fixed point; scaling keeps them exact.
            self._int_scale = 2**20
            self._int_total *= self._int_scale
            for a in self._acc:
                if not a.dtype.is_floating_point:
                    a.mul_(self._int_scale)
        q = round(w * self._int_scale) if self._int_scale != 1 else int(w)
        with torch.no_grad():
            accs, xs = [], []
            for j, (a, t) in enumerate(zip(self._acc, lst)):
                if a.dtype.is_floating_point:
                    accs.append(a)
                    xs.append(_in_layout(t, a.stride()))
                elif q and t.numel():
                    # int64 accumulation must not wrap: refuse, naming the tensor, before adding
                    lo, hi = (int(v) for v in torch.aminmax(t.to(torch.int64)))
                    alo, ahi = (int(v) for v in torch.aminmax(a))
                    if max(abs(lo), abs(hi)) * q + max(abs(alo), abs(ahi)) >= 2**63:
                        raise ValueError(f"client #{self.count}[{names[j]!r}]: integer values up to "
                                         f"{max(abs(lo), abs(hi))} x weight {q} overflow the int64 accumulator")
                    a.add_(t.to(torch.int64), alpha=q)
            if accs:
                torch.ops.fedsq_fast.accumulate_list_(accs, xs, w)
        self._total += w
        self._int_total += q
        self.count += 1

    def result(self, out=None, *, consume: bool = False):
        """The average so far (``out``: same structure as a client, written in place).

        ``consume=True`` divides the accumulators in place and returns them where their
        dtype is the client's (float32/float64 tensors): no second model-sized buffer
        (fresh memory is slow to first touch), but no more add() or result() after it.
        """
        self._check_live()
        if consume and out is not None:
            raise ValueError("out and consume=True exclude each other")
        if self.count == 0:
            raise ValueError("no client was added: call add(client, weight) first")
        if self._total <= 0:
            raise ValueError("the weights added so far sum to zero")
        out_list = None
        if out is not None:
            if isinstance(out, (str, bytes)) or not isinstance(out, (torch.Tensor, Sequence, Mapping)):
                raise TypeError(f"out must have the structure of a client (tensor, tensor sequence or state "
                                f"dict), got {type(out).__name__}")
            out_lists, _, _ = _as_client_lists([out])
            out_list = out_lists[0]
            fake_ref = [torch.empty(s, dtype=d, device="meta") for s, d, _ in self._template]
            if len(out_list) != len(fake_ref):
                raise ValueError(f"out must hold {len(fake_ref)} tensors, got {len(out_list)}")
        res = []
        with torch.no_grad():
            for j, (a, (shape, dtype, device)) in enumerate(zip(self._acc, self._template)):
                o = None if out_list is None else out_list[j]
                if o is not None and (o.shape != shape or o.dtype != dtype):
                    raise ValueError(f"out[{self._names[j]!r}] must be ({tuple(shape)}, {dtype})")
                if a.dtype.is_floating_point:
                    r = a.div_(self._total) if consume and a.dtype == dtype else (a / self._total).to(dtype)
                else:
                    if self._int_total <= 0:
                        raise ValueError("integer weights round to zero; cannot average integer tensors")
                    r = _round_div(a, self._int_total).to(dtype)
                if o is not None:
                    o.copy_(r)
                    r = o
                res.append(r)
        if consume:
            self._consumed, self._acc = True, None
        return self._rebuild(res)
