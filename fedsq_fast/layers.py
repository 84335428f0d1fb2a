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

Soft gates (opt-in, beyond the paper: ``dualcopy(..., soft_gates=True)``): a
``z * g(z)`` site stores its structural pre-activation ``z_s`` (``SiteMasks.pre``, one
value per element in the activation's dtype, against 1 bit for a binary gate) and the
quantitative side computes ``z_q * g(z_s)`` with the fused op ``ops.soft_gate_apply``,
whose backward recomputes ``g`` from ``z_s`` (exact; see docs/models.md, "Soft gates",
for why this store and not ``g`` itself); a squeeze-excitation site stores ``g`` (its
structural output):

* ``silu`` (g = sigmoid), ``gelu`` (g = Phi), ``gelu_tanh`` (g = 0.5*(1 + tanh(
  sqrt(2/pi)*(z + 0.044715 z^3)))), ``hardswish`` (g = hardsigmoid), ``mish``
  (g = tanh(softplus)): each activation is z * g(z), and y_q = z_q * g(z_s);
* ``sigmoid``, ``hardsigmoid`` (a squeeze-excitation gate, whose output multiplies
  a feature map): y_q = g(s_s), the structural gate value itself, so nothing
  reaches the quantitative side branch that computed s_q.

No gradient flows through g: autograd saves z_s alone (the gate is recomputed from it).

Layers take a Tensor (both streams equal: the first layer) or a pair
``(x_q, x_s)`` and return a pair ``(y_q, y_s)``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from . import reference as _ref

__all__ = [
    "SiteMasks",
    "GatedConv1d",
    "GatedConv2d",
    "GatedConv3d",
    "GatedLinear",
    "GatedActivation",
    "GatedReLU",
    "DualMap",
    "struct_site",
    "quant_site",
]

BINARY_KINDS = ("relu", "leaky_relu", "hardtanh")
# y = z * g(z): the quantitative copy computes z_q * g(z_s)
MULT_KINDS = ("silu", "gelu", "gelu_tanh", "hardswish", "mish")
# y = g(s), a gate that multiplies a feature map (squeeze-excitation): y_q = g(s_s)
SE_KINDS = ("sigmoid", "hardsigmoid")
SOFT_KINDS = MULT_KINDS + SE_KINDS
KINDS = BINARY_KINDS + SOFT_KINDS

# the gate function (ops.SOFT_GATE_KINDS) of each soft kind
GATE_OF = {
    "silu": "sigmoid",
    "gelu": "phi",
    "gelu_tanh": "phi_tanh",
    "hardswish": "hardsigmoid",
    "mish": "tanh_softplus",
    "sigmoid": "sigmoid",
    "hardsigmoid": "hardsigmoid",
}
# the activation itself, as the original network computes it (the structural output)
_ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "hardswish": F.hardswish,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
}


def soft_gate(z: torch.Tensor, kind: str) -> torch.Tensor:
    """The gate ``g(z)`` of a soft kind (see the module docstring), in ``z``'s dtype
    (computed in float32 for float16/bfloat16). ``kind`` in :data:`SOFT_KINDS`."""
    if kind not in GATE_OF:
        raise ValueError(f"kind must be one of {SOFT_KINDS}, got {kind!r}")
    return _ref.soft_gate_values(z, GATE_OF[kind])


class SiteMasks:
    """The gates of one gate site for one batch.

    ``bits``: tuple of 1-D uint8 tensors (1 for relu/leaky_relu, 2 for hardtanh;
    empty for a soft site); ``channels_last``: the memory order the bits index
    (4-D tensors only). A soft site holds one tensor of the activation's shape and
    dtype (one value per element, e.g. 4 bytes in float32, where a binary gate takes
    1 bit): ``pre``, the structural pre-activation z_s of a ``z * g(z)`` site, with
    ``gate_kind`` its gate function (ops.SOFT_GATE_KINDS), or the gate ``g(s_s)`` of a
    squeeze-excitation site. :attr:`gate` is ``g(z_s)`` for either (computed on access
    for a ``pre`` site, exactly as the fused op computes it).
    """

    __slots__ = ("bits", "channels_last", "numel", "shape", "_gate", "pre", "gate_kind", "_pre_version")

    def __init__(self, bits, channels_last=False, numel=None, shape=None, gate=None, pre=None, gate_kind=None):
        if pre is not None and gate_kind not in ops.SOFT_GATE_KINDS:
            raise ValueError(f"gate_kind must be one of {ops.SOFT_GATE_KINDS} with pre, got {gate_kind!r}")
        self.bits = tuple(bits)
        self.channels_last = bool(channels_last)
        self.numel = numel  # elements the gates cover (the batch's activation)
        self.shape = shape  # the structural activation's shape, where known
        self._gate = gate
        self.pre = pre
        self.gate_kind = gate_kind
        self._pre_version = _version(pre)

    @property
    def gate(self):
        """The soft gate ``g(z_s)`` (a tensor of the activation's shape and dtype), else None."""
        if self._gate is not None or self.pre is None:
            return self._gate
        with torch.no_grad():
            return ops.soft_gate_apply(torch.ones_like(self.pre), self.pre, self.gate_kind)

    @property
    def soft(self) -> bool:
        """True for a soft site (a gate or pre-activation tensor, no bits)."""
        return self._gate is not None or self.pre is not None

    def check_pre(self):
        """Raise if ``pre`` was written in place after the site stored it (its gates would be wrong)."""
        if self.pre is not None and self._pre_version is not None and _version(self.pre) != self._pre_version:
            raise RuntimeError("the structural pre-activation of a soft gate site was modified in place after the "
                               "site stored it (an in-place op on the activation's input in the structural copy); "
                               "its gates would be wrong")

    def nbytes(self) -> int:
        n = sum(b.numel() for b in self.bits)
        t = self._gate if self._gate is not None else self.pre
        return n if t is None else n + t.numel() * t.element_size()

    def __repr__(self):
        if self.pre is not None:
            return (f"SiteMasks(pre {tuple(self.pre.shape)} {self.pre.dtype}, gate {self.gate_kind}, "
                    f"{self.nbytes()} B)")
        if self._gate is not None:
            return f"SiteMasks(gate {tuple(self._gate.shape)} {self._gate.dtype}, {self.nbytes()} B)"
        return f"SiteMasks({len(self.bits)} x {self.bits[0].numel()} B, channels_last={self.channels_last})"


def _version(t):
    """The version counter of ``t`` (None for no tensor, or an inference tensor, which has none)."""
    if t is None or t.is_inference():
        return None
    return t._version


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


def _channel_dim(z: torch.Tensor, cdim: int) -> int:
    """The dim of ``z`` that per-channel parameters index: ``cdim`` >= 0 counts from the
    front (BatchNorm: dim 1), < 0 from the back (Linear: -1; ConvNd: -(N+1), which is dim 1
    for batched and dim 0 for unbatched input)."""
    d = cdim if cdim >= 0 else z.dim() + cdim
    if not 0 <= d < z.dim():
        raise ValueError(f"input of shape {tuple(z.shape)} has no channel dim {cdim} for its per-channel "
                         f"bias/BatchNorm (a {z.dim()}-D input to a layer that needs at least {abs(cdim)} dims?)")
    return d


def _check_channels(z, vecs, d):
    for name, v in vecs:
        if v is not None and v.numel() != z.shape[d]:
            raise ValueError(f"input of shape {tuple(z.shape)} has {z.shape[d]} channels on dim {d}, but the "
                             f"layer's {name} has {v.numel()} (the input does not fit this layer)")


def _affine(z, scale, shift, d=1):
    """t = z*scale[c] + shift[c] (c = dim ``d``) in float32 (the epilogue's precision), z's dtype out."""
    if scale is None and shift is None:
        return z
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    shape = [1] * z.dim()
    shape[d] = -1
    t = z.to(acc)
    if scale is not None:
        t = t * scale.to(acc).view(shape)
    if shift is not None:
        t = t + shift.to(acc).view(shape)
    return t.to(z.dtype)


def _channels_at_dim1(z, d):
    """A view of ``z`` with dim ``d`` as dim 1 and the memory order kept (so packed bits
    index the same elements): (prod(before), C, prod(after)). ``z`` contiguous."""
    pre = post = 1
    for n in z.shape[:d]:
        pre *= n
    for n in z.shape[d + 1:]:
        post *= n
    return z.view(pre, z.shape[d], post)


def fold_bias_bn(bias, bn):
    """(scale, shift, split) of ``bias`` (or None) followed by an eval-mode BatchNorm ``bn``
    with running statistics (or None), in float32: ``t = z*scale + shift`` where the
    bias's and the BatchNorm's channels are the same dim; ``split`` keeps both apart
    (``(bias, bn_scale, bn_shift)``) for inputs where they are not."""
    shift = None if bias is None else bias.detach().float().clone()
    if bn is None:
        return None, shift, None
    inv = torch.rsqrt(bn.running_var.float() + bn.eps)
    g = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
    b = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
    scale = g * inv
    bn_shift = -bn.running_mean.float() * scale + b
    fused = bn_shift.clone() if shift is None else (shift - bn.running_mean.float()) * scale + b
    return scale, fused, (shift, scale.clone(), bn_shift)


def site_affine(z, scale, shift, cdim=1, split=None, inplace=False):
    """``(z', scale', shift', inplace')`` with ``z'`` a view of ``z`` whose dim 1 holds the
    channels that ``scale``/``shift`` index (memory order kept), or, where ``split`` must
    be applied apart, ``z`` with both affines applied and no parameters left (see
    :func:`struct_site`). Checks the channel count against the parameters."""
    if scale is None and shift is None:
        return z, None, None, inplace
    d = _channel_dim(z, cdim)
    if split is not None and d != 1:
        # the bias on dim d, then the BatchNorm on dim 1: apart, as the original does it
        bias, bn_scale, bn_shift = split
        _check_channels(z, (("bias", bias),), d)
        if z.dim() < 2:
            raise ValueError(f"input of shape {tuple(z.shape)}: its BatchNorm needs a channel dim 1")
        return _affine(_affine(z, None, bias, d), bn_scale, bn_shift, 1), None, None, True
    _check_channels(z, (("scale", scale), ("bias/shift", shift)), d)
    if d != 1:
        z = _channels_at_dim1(z.contiguous(), d)
    return z, scale, shift, inplace


@torch.no_grad()
def struct_site(z_s, scale=None, shift=None, kind="relu", p1=0.0, p2=0.0, inplace=False, cdim=1, split=None):
    """Structural side of a gate site: (activation output, SiteMasks).

    ``scale``/``shift`` are a folded eval BatchNorm and/or a conv/linear bias (per
    channel) on channel dim ``cdim`` (see :func:`_channel_dim`: 1, -1 for a Linear,
    -(N+1) for a ConvNd). ``split = (bias, bn_scale, bn_shift)`` where a BatchNorm
    (channels on dim 1) was folded after a layer whose channel dim is ``cdim``: for
    inputs where the two dims differ (a Linear on sequences, an unbatched conv) the two
    affines are applied one after the other, as the original computes them.
    ``p1, p2``: negative_slope (leaky_relu) or min/max (hardtanh). ``inplace`` lets
    the epilogue overwrite z_s (only when nothing else reads it). A soft ``kind``
    (:data:`SOFT_KINDS`) returns the activation and ``SiteMasks`` holding the gate
    tensor ``g(t)`` (``t``: z_s after the affine) instead of bits.
    """
    shape = z_s.shape
    z_s, scale, shift, inplace = site_affine(z_s, scale, shift, cdim, split, inplace)
    if kind in SOFT_KINDS:
        # soft site: the activation as the original computes it; a z * g(z) site keeps t
        # (the quantitative side recomputes g(t) in its fused op), a squeeze-excitation
        # site its output g(t)
        t = _affine(z_s, scale, shift)
        y = _ACT_FNS[kind](t)
        keep = t.view(shape) if t.shape != shape else t
        if kind in SE_KINDS:
            m = SiteMasks((), _is_cl(y), y.numel(), gate=y.view(shape) if y.shape != shape else y)
        else:
            m = SiteMasks((), _is_cl(t), t.numel(), pre=keep, gate_kind=GATE_OF[kind])
    else:
        y, m = _struct_site(_canonical(z_s), scale, shift, kind, p1, p2, inplace)
    if y.shape != shape:
        y = y.view(shape)
    m.shape = shape
    return y, m


def _struct_site(z_s, scale, shift, kind, p1, p2, inplace):
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
    """Quantitative side of a gate site (differentiable in z_q): ``z_q`` gated by the
    structural regime bits, or for a soft kind ``z_q * g(z_s)`` (``silu``, ``gelu``, ...:
    the fused ``ops.soft_gate_apply`` on the site's ``masks.pre``) or ``g`` itself
    (``sigmoid``/``hardsigmoid``: a squeeze-excitation gate, which then takes no
    gradient); ``g`` is a constant of the structural copy."""
    if not isinstance(masks, SiteMasks):
        raise TypeError(f"masks must be SiteMasks, got {type(masks).__name__}")
    # the bits are padded to a 32-bit word: a z_q of another shape would still find bits
    if masks.shape is not None and z_q.shape != masks.shape:
        raise ValueError(f"quantitative activation of shape {tuple(z_q.shape)} does not match the structural "
                         f"one {tuple(masks.shape)} its gates come from: x_q and x_s must have the same shape")
    if masks.numel is not None and z_q.numel() != masks.numel:
        raise ValueError(f"quantitative activation has {z_q.numel()} elements, its gates cover {masks.numel}: "
                         "x_q and x_s must have the same shape")
    if kind in SOFT_KINDS:
        if not masks.soft:
            raise ValueError(f"masks of a {kind!r} site must hold a gate or pre-activation tensor, got bits")
        masks.check_pre()
        if kind not in SE_KINDS and masks.pre is not None and masks.pre.dtype == z_q.dtype:
            # one pass: y = z_q * g(z_s); autograd saves z_s alone, g is recomputed (exact)
            return ops.soft_gate_apply(z_q, masks.pre, masks.gate_kind)
        g = masks.gate  # a constant (no grad): g itself for a squeeze-excitation gate
        if g.dtype != z_q.dtype:
            g = g.to(z_q.dtype)
        return g if kind in SE_KINDS else z_q * g
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
        if x[0].shape != x[1].shape:
            raise ValueError(f"{name} = (x_q, x_s) must have the same shape, got {tuple(x[0].shape)} and "
                             f"{tuple(x[1].shape)}")
        return x[0], x[1]
    raise TypeError(f"{name} must be a Tensor or a pair (x_q, x_s) of Tensors, got {type(x).__name__}")


ACTIVATIONS = ("relu", "relu6", "leaky_relu", "hardtanh") + SOFT_KINDS


def _check_kind(activation, negative_slope, min_val, max_val):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation in SOFT_KINDS:
        return (activation, 0.0, 0.0)
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
    z_s's regime (a Tensor counts as z_q = z_s). No parameters. ``activation``:
    'relu', 'relu6', 'leaky_relu', 'hardtanh', or a soft gate (beyond the paper):
    'silu', 'gelu', 'gelu_tanh', 'hardswish', 'mish' (y_q = z_q * g(z_s)),
    'sigmoid', 'hardsigmoid' (y_q = g(z_s): a squeeze-excitation gate).
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
    """Shared part of the gated conv and linear layers: quantitative ``weight``/``bias``
    are Parameters; the structural copies are buffers (``weight_s``, ``scale_s``,
    ``shift_s``: the bias and an optional folded eval BatchNorm; ``bias_s`` and
    ``bn_shift_s`` keep the two apart for input ranks where the layer's channel dim is
    not the BatchNorm's dim 1), so they are frozen, never get gradients, and stay out of
    ``parameters()``. ``_cdim``: the channel dim of the layer's output (see
    :func:`_channel_dim`): -1 for Linear, -(N+1) for ConvNd."""

    _cdim = 1
    _bn_types = ()

    def _init_gate(self, activation, negative_slope, min_val, max_val):
        if activation is None:
            self.kind = None
            self.activation = None
            return
        self.kind, self.p1, self.p2 = _check_kind(activation, negative_slope, min_val, max_val)
        self.activation = activation

    def _set_structural(self, weight, bias, bn):
        self.register_buffer("weight_s", weight.detach().clone())
        self._bn_batch_stats = bn is not None and bn.running_var is None
        if self._bn_batch_stats:
            # no running statistics: BatchNorm normalises with the batch's statistics in
            # eval mode too, so the structural copy runs it so (frozen affine), unfolded
            self.register_buffer("bias_s", None if bias is None else bias.detach().float().clone())
            self.register_buffer("bn_weight_s", None if bn.weight is None else bn.weight.detach().clone())
            self.register_buffer("bn_bias_s", None if bn.bias is None else bn.bias.detach().clone())
            self._bn_eps = bn.eps
            self.register_buffer("scale_s", None)
            self.register_buffer("shift_s", None)
            return
        scale, shift, split = fold_bias_bn(bias, bn)
        self.register_buffer("scale_s", scale)
        self.register_buffer("shift_s", shift)
        if split is not None:
            self.register_buffer("bias_s", split[0])
            self.register_buffer("bn_shift_s", split[2])

    def _check_bn(self, bn, name="bn"):
        if bn is not None and type(bn) not in self._bn_types:
            raise TypeError(f"{name} must be one of {', '.join(t.__name__ for t in self._bn_types)} "
                            f"(or None), got {type(bn).__name__}")

    def _split_affine(self):
        if getattr(self, "bn_shift_s", None) is None:
            return None
        return (self.bias_s, self.scale_s, self.bn_shift_s)

    def _pair(self, x, lin_q, lin_s):
        x_q, x_s = _split(x)
        with torch.no_grad():
            z_s = lin_s(x_s.detach())
            if self._bn_batch_stats:
                if self.bias_s is not None:
                    z_s = _affine(z_s, None, self.bias_s, _channel_dim(z_s, self._cdim))
                z_s = F.batch_norm(z_s, None, None, self.bn_weight_s, self.bn_bias_s, True, 0.0, self._bn_eps)
        z_q = lin_q(x_q)
        if self.bn is not None:
            z_q = self.bn(z_q)
        split = self._split_affine()
        if self.kind is None:  # no activation (e.g. a head): both streams affine
            with torch.no_grad():
                t, scale, shift, _ = site_affine(z_s, self.scale_s, self.shift_s, self._cdim, split)
                y_s = _affine(t, scale, shift).view(z_s.shape)
            return z_q, y_s
        y_s, m = struct_site(z_s, self.scale_s, self.shift_s, self.kind, self.p1, self.p2, inplace=True,
                             cdim=self._cdim, split=split)
        return quant_site(z_q, m, self.kind, self.p1, self.p2), y_s

    def structural_state(self):
        return {k: v for k, v in self.state_dict().items() if k.endswith("_s")}


_CONV = {1: (nn.Conv1d, F.conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, F.conv2d, nn.BatchNorm2d),
         3: (nn.Conv3d, F.conv3d, nn.BatchNorm3d)}


class _GatedConvNd(_GatedAffine):
    """Drop-in for ``nn.ConvNd`` followed by a ReLU (or ``activation``), batched or
    unbatched input as the conv takes it.

    ``forward(x | (x_q, x_s)) -> (y_q, y_s)``. Build from a pretrained conv with
    :meth:`from_conv` (both copies start equal). With ``bn`` the quantitative
    copy holds a trainable BatchNorm and the structural copy folds it (eval
    statistics) into its epilogue.
    """

    _dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, activation="relu", negative_slope=0.01, min_val=-1.0,
                 max_val=1.0, bn=False):
        super().__init__()
        conv_t, _, bn_t = _CONV[self._dims]
        self.conv = conv_t(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.bn = bn_t(out_channels) if bn else None
        self._init_gate(activation, negative_slope, min_val, max_val)
        self._set_structural(self.conv.weight, self.conv.bias, self.bn.eval() if bn else None)

    @property
    def _cdim(self):
        return -(self._dims + 1)

    @property
    def _bn_types(self):
        return (_CONV[self._dims][2],)

    @classmethod
    def from_conv(cls, conv, bn=None, **gate_kw):
        """The gated layer of a pretrained ``conv`` (and the BatchNorm after it, any
        affine / running-statistics setting), both copies equal to it."""
        conv_t = _CONV[cls._dims][0]
        if type(conv) is not conv_t:
            raise TypeError(f"conv must be an nn.{conv_t.__name__}, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        self = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, conv.bias is not None, **gate_kw)
        self._check_bn(bn)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)
        # the user's BatchNorm as it is (affine or not, running statistics or not)
        self.bn = None if bn is None else copy.deepcopy(bn).to(device=conv.weight.device)
        for k in ("weight_s", "scale_s", "shift_s", "bias_s", "bn_shift_s", "bn_weight_s", "bn_bias_s"):
            self._buffers.pop(k, None)
        self._set_structural(conv.weight, conv.bias, bn)
        return self

    def forward(self, x):
        c = self.conv
        conv_fn = _CONV[self._dims][1]
        return self._pair(
            x, c, lambda t: conv_fn(t, self.weight_s, None, c.stride, c.padding, c.dilation, c.groups),
        )


class GatedConv1d(_GatedConvNd):
    """Drop-in for ``nn.Conv1d`` followed by a ReLU (or ``activation``); see GatedConv2d."""

    _dims = 1


class GatedConv2d(_GatedConvNd):
    """Drop-in for ``nn.Conv2d`` followed by a ReLU (or ``activation``), on
    (N, C, H, W) or unbatched (C, H, W) input.

    ``forward(x | (x_q, x_s)) -> (y_q, y_s)``. Build from a pretrained conv with
    :meth:`from_conv` (both copies start equal). With ``bn`` the quantitative
    copy holds a trainable BatchNorm and the structural copy folds it (eval
    statistics) into its epilogue.
    """

    _dims = 2


class GatedConv3d(_GatedConvNd):
    """Drop-in for ``nn.Conv3d`` followed by a ReLU (or ``activation``); see GatedConv2d."""

    _dims = 3


class GatedLinear(_GatedAffine):
    """Drop-in for ``nn.Linear`` followed by a ReLU (or ``activation``), on input of any
    rank as ``nn.Linear`` takes it ((F,), (N, F), (N, L, F), ...: bias on the last dim);
    ``activation=None`` gives an ungated pair-passing layer (a head)."""

    _cdim = -1

    def __init__(self, in_features, out_features, bias=True, *, activation="relu",
                 negative_slope=0.01, min_val=-1.0, max_val=1.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias)
        self.bn = None
        self._init_gate(activation, negative_slope, min_val, max_val)
        self._set_structural(self.linear.weight, self.linear.bias, None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **gate_kw):
        """The gated layer of a pretrained ``linear``, both copies equal to it."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls(linear.in_features, linear.out_features, linear.bias is not None, **gate_kw)
        self.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)
        for k in ("weight_s", "scale_s", "shift_s"):
            self._buffers.pop(k, None)
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
