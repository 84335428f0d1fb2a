"""FedSQ gated layers and the per-site gate functions shared with ``dualcopy``.

A *gate site* is one activation call of the original network. The structural
(frozen) stream computes its activation and the packed regime bits in one pass
(``struct_epilogue``); the quantitative (trained) stream applies those bits
(``apply_mask``), so autograd keeps 1 bit per element.

Regime codes per activation kind (bits index the tensor's memory order):

* ``relu``:       1 bit, ``z_s > 0``;              y_q = z_q * on
* ``leaky_relu``: 1 bit, ``z_s > 0``;              y_q = slope*z_q + (1-slope)*(z_q*on)
* ``hardtanh``:   2 bits (ReLU6 is hardtanh(0, 6)): ``lin = lo < z_s < hi``,
  ``top = z_s >= hi``; y_q = z_q*lin + hi*top + lo*(neither) (the lo term is
  skipped when lo == 0). Strict bounds match PyTorch's hardtanh gradient.

Layers take a Tensor (both streams equal: the first layer) or a pair
``(x_q, x_s)`` and return a pair ``(y_q, y_s)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

__all__ = [
    "SiteMasks",
    "GatedConv2d",
    "GatedLinear",
    "GatedActivation",
    "GatedReLU",
    "DualMap",
    "struct_site",
    "quant_site",
]

KINDS = ("relu", "leaky_relu", "hardtanh")


class SiteMasks:
    """Packed regime bits of one gate site for one batch.

    ``bits``: tuple of 1-D uint8 tensors (1 for relu/leaky_relu, 2 for hardtanh);
    ``channels_last``: the memory order the bits index (4-D tensors only).
    """

    __slots__ = ("bits", "channels_last", "numel")

    def __init__(self, bits, channels_last=False, numel=None):
        self.bits = tuple(bits)
        self.channels_last = bool(channels_last)
        self.numel = numel  # elements the bits cover (the batch's activation)

    def nbytes(self) -> int:
        return sum(b.numel() for b in self.bits)

    def __repr__(self):
        return f"SiteMasks({len(self.bits)} x {self.bits[0].numel()} B, channels_last={self.channels_last})"


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """Contiguous or channels_last: both keep the batch outermost in memory,
    which the per-sample mask cache relies on."""
    if t.is_contiguous():
        return t
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _is_cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _affine(z, scale, shift):
    """t = z*scale[c] + shift[c] in float32 (the epilogue's precision), z's dtype out."""
    if scale is None and shift is None:
        return z
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    shape = [1] * z.dim()
    shape[1] = -1
    t = z.to(acc)
    if scale is not None:
        t = t * scale.to(acc).view(shape)
    if shift is not None:
        t = t + shift.to(acc).view(shape)
    return t.to(z.dtype)


@torch.no_grad()
def struct_site(z_s, scale=None, shift=None, kind="relu", p1=0.0, p2=0.0, inplace=False):
    """Structural side of a gate site: (activation output, SiteMasks).

    ``scale``/``shift`` are a folded eval BatchNorm and/or conv bias (per
    channel, dim 1). ``p1, p2``: negative_slope (leaky_relu) or min/max (hardtanh).
    ``inplace`` lets the epilogue overwrite z_s (only when nothing else reads it).
    """
    z_s = _canonical(z_s)
    if kind == "relu":
        h, on = ops.struct_epilogue(z_s, scale, shift, inplace=inplace)
        return h, SiteMasks((on,), _is_cl(h), h.numel())
    if kind == "hardtanh" and p1 == 0.0:
        # ReLU6 fast path: relu + bits in one pass, then one compare for the top.
        h, on = ops.struct_epilogue(z_s, scale, shift, inplace=inplace)
        below = ops.pack_mask(p2 - h)  # h < max  (a - b > 0 iff a > b in IEEE)
        lin, top = on & below, on & ~below
        return h.clamp_(max=p2), SiteMasks((lin, top), _is_cl(h), h.numel())
    t = _canonical(_affine(z_s, scale, shift))
    if kind == "leaky_relu":
        return F.leaky_relu(t, p1), SiteMasks((ops.pack_mask(t),), _is_cl(t), t.numel())
    if kind == "hardtanh":
        above = ops.pack_mask(t - p1)
        below = ops.pack_mask(p2 - t)
        return t.clamp(p1, p2), SiteMasks((above & below, above & ~below), _is_cl(t), t.numel())
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _match(z_q: torch.Tensor, m: SiteMasks) -> torch.Tensor:
    """z_q in the memory order the bits were packed in."""
    if m.channels_last:
        return z_q.contiguous(memory_format=torch.channels_last)
    return z_q.contiguous()


def quant_site(z_q, masks: SiteMasks, kind="relu", p1=0.0, p2=0.0):
    """Quantitative side of a gate site (differentiable in z_q)."""
    if not isinstance(masks, SiteMasks):
        raise TypeError(f"masks must be SiteMasks, got {type(masks).__name__}")
    z = _match(z_q, masks)
    if kind == "relu":
        return ops.apply_mask(z, masks.bits[0])
    if kind == "leaky_relu":
        return z * p1 + ops.apply_mask(z, masks.bits[0]) * (1.0 - p1)
    if kind == "hardtanh":
        lin, top = masks.bits
        y = ops.apply_mask(z, lin)
        y = y + ops.apply_mask(torch.full_like(z, p2), top)
        if p1 != 0.0:
            y = y + ops.apply_mask(torch.full_like(z, p1), ~(lin | top))
        return y
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def activation_kind(module: nn.Module):
    """(kind, p1, p2) for a supported activation module, else None."""
    if type(module) is nn.ReLU:
        return ("relu", 0.0, 0.0)
    if isinstance(module, nn.Hardtanh):  # includes ReLU6
        return ("hardtanh", float(module.min_val), float(module.max_val))
    if type(module) is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope), 0.0)
    return None


def _split(x, name="x"):
    if isinstance(x, torch.Tensor):
        return x, x
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x):
        return x[0], x[1]
    raise TypeError(f"{name} must be a Tensor or a pair (x_q, x_s) of Tensors, got {type(x).__name__}")


def _check_kind(activation, negative_slope, min_val, max_val):
    if activation not in ("relu", "relu6", "leaky_relu", "hardtanh"):
        raise ValueError(
            f"activation must be 'relu', 'relu6', 'leaky_relu' or 'hardtanh', got {activation!r}"
        )
    if activation == "relu":
        return ("relu", 0.0, 0.0)
    if activation == "relu6":
        return ("hardtanh", 0.0, 6.0)
    if activation == "leaky_relu":
        return ("leaky_relu", float(negative_slope), 0.0)
    if not float(min_val) < float(max_val):
        raise ValueError(f"min_val must be < max_val, got {min_val} and {max_val}")
    return ("hardtanh", float(min_val), float(max_val))


class GatedActivation(nn.Module):
    """Gated activation for models whose activations stand alone.

    ``forward((z_q, z_s)) -> (y_q, y_s)``: y_s = act(z_s) and y_q = z_q gated by
    z_s's regime (a Tensor counts as z_q = z_s). No parameters.
    """

    def __init__(self, activation="relu", *, negative_slope=0.01, min_val=-1.0, max_val=1.0):
        super().__init__()
        self.kind, self.p1, self.p2 = _check_kind(activation, negative_slope, min_val, max_val)
        self.activation = activation

    def forward(self, x):
        z_q, z_s = _split(x)
        y_s, m = struct_site(z_s.detach(), None, None, self.kind, self.p1, self.p2)
        return quant_site(z_q, m, self.kind, self.p1, self.p2), y_s

    def extra_repr(self):
        return f"activation={self.activation!r}"


class GatedReLU(GatedActivation):
    """``GatedActivation('relu')``."""

    def __init__(self):
        super().__init__("relu")


class _GatedAffine(nn.Module):
    """Shared part of GatedConv2d/GatedLinear: quantitative ``weight``/``bias``
    are Parameters; the structural copies are buffers (``weight_s``, ``scale_s``,
    ``shift_s``: conv bias and an optional folded eval BatchNorm), so they are
    frozen, never get gradients, and stay out of ``parameters()``."""

    def _init_gate(self, activation, negative_slope, min_val, max_val):
        if activation is None:
            self.kind = None
            self.activation = None
            return
        self.kind, self.p1, self.p2 = _check_kind(activation, negative_slope, min_val, max_val)
        self.activation = activation

    def _set_structural(self, weight, bias, bn):
        w = weight.detach().clone()
        scale, shift = None, None if bias is None else bias.detach().clone().float()
        if bn is not None:
            if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.running_var is None:
                raise TypeError("bn must be a BatchNorm1d/2d with running statistics")
            inv = torch.rsqrt(bn.running_var.float() + bn.eps)
            g = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
            b = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
            scale = g * inv
            base = -bn.running_mean.float() if shift is None else shift - bn.running_mean.float()
            shift = base * scale + b
        self.register_buffer("weight_s", w)
        self.register_buffer("scale_s", scale)
        self.register_buffer("shift_s", shift)

    def _pair(self, x, lin_q, lin_s):
        x_q, x_s = _split(x)
        with torch.no_grad():
            z_s = lin_s(x_s.detach())
        z_q = lin_q(x_q)
        if self.bn is not None:
            z_q = self.bn(z_q)
        if self.kind is None:  # no activation (e.g. a head): both streams affine
            with torch.no_grad():
                y_s = _affine(z_s, self.scale_s, self.shift_s)
            return z_q, y_s
        y_s, m = struct_site(z_s, self.scale_s, self.shift_s, self.kind, self.p1, self.p2, inplace=True)
        return quant_site(z_q, m, self.kind, self.p1, self.p2), y_s

    def structural_state(self):
        return {k: v for k, v in self.state_dict().items() if k.endswith("_s")}


class GatedConv2d(_GatedAffine):
    """Drop-in for ``nn.Conv2d`` followed by a ReLU (or ``activation``).

    ``forward(x | (x_q, x_s)) -> (y_q, y_s)``. Build from a pretrained conv with
    :meth:`from_conv` (both copies start equal). With ``bn`` the quantitative
    copy holds a trainable BatchNorm and the structural copy folds it (eval
    statistics) into its epilogue.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, activation="relu", negative_slope=0.01, min_val=-1.0,
                 max_val=1.0, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias)
        self.bn = nn.BatchNorm2d(out_channels) if bn else None
        self._init_gate(activation, negative_slope, min_val, max_val)
        self._set_structural(self.conv.weight, self.conv.bias, self.bn.eval() if bn else None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **gate_kw):
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        self = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, conv.bias is not None, bn=bn is not None, **gate_kw)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)
            if bn is not None:
                self.bn.load_state_dict(bn.state_dict())
        self._set_structural(conv.weight, conv.bias, bn)
        return self

    def forward(self, x):
        c = self.conv
        return self._pair(
            x, c,
            lambda t: F.conv2d(t, self.weight_s, None, c.stride, c.padding, c.dilation, c.groups),
        )


class GatedLinear(_GatedAffine):
    """Drop-in for ``nn.Linear`` followed by a ReLU (or ``activation``);
    ``activation=None`` gives an ungated pair-passing layer (a head)."""

    def __init__(self, in_features, out_features, bias=True, *, activation="relu",
                 negative_slope=0.01, min_val=-1.0, max_val=1.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias)
        self.bn = None
        self._init_gate(activation, negative_slope, min_val, max_val)
        self._set_structural(self.linear.weight, self.linear.bias, None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **gate_kw):
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls(linear.in_features, linear.out_features, linear.bias is not None, **gate_kw)
        self.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)
        self._set_structural(linear.weight, linear.bias, None)
        return self

    def forward(self, x):
        return self._pair(x, self.linear, lambda t: F.linear(t, self.weight_s))


class DualMap(nn.Module):
    """Applies a parameter-free module (pooling, flatten, dropout-free glue) to
    both streams: ``DualMap(nn.MaxPool2d(2))((x_q, x_s)) -> (pool(x_q), pool(x_s))``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if any(True for _ in module.parameters()):
            raise ValueError("module must have no parameters (the two streams would share them)")
        self.module = module

    def forward(self, x):
        x_q, x_s = _split(x)
        with torch.no_grad():
            y_s = self.module(x_s)
        return self.module(x_q), y_s
