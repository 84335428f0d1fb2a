"""Soft gates (``dualcopy(soft_gates=True)``, beyond the paper): SiLU, GELU, Hardswish, Mish as
``y_q = z_q * g(z_s)``, squeeze-excitation Sigmoid/Hardsigmoid as ``y_q = g(s_s)``.

Oracles, none of them fedsq_fast code: the original network in eval mode (at conversion the
DualCopy model computes what it computes), two copies of it with forward hooks that multiply
the quantitative pre-activation by the structural copy's gate written by hand and detached
(outputs and gradients of every quantitative parameter), and hand-written forwards for models
whose activations are functions."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsq_fast as fs
from fedsq_fast.layers import quant_site, struct_site
from tests.conftest import draw_seed

# the gates written out by hand (the library's come from torch's activations)
G = {
    "silu": lambda z: 1.0 / (1.0 + torch.exp(-z)),
    "sigmoid": lambda z: 1.0 / (1.0 + torch.exp(-z)),
    "gelu": lambda z: 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3))),
    "hardswish": lambda z: torch.clamp(z / 6.0 + 0.5, 0.0, 1.0),
    "hardsigmoid": lambda z: torch.clamp(z / 6.0 + 0.5, 0.0, 1.0),
    "mish": lambda z: torch.tanh(torch.log1p(torch.exp(z))),
}
SE = ("sigmoid", "hardsigmoid")


def _kind_of(m):
    """The soft kind of an activation module (timm's GELU module included), 'relu' or None."""
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    name = type(m).__name__
    if name == "GELU" and type(m).__module__.startswith("timm"):
        return "gelu"
    return {nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Mish: "mish", nn.Sigmoid: "sigmoid",
            nn.Hardsigmoid: "hardsigmoid"}.get(type(m))


class HookOracle(nn.Module):
    """FedSQ with soft gates from two copies and hooks: the eval structural copy records
    g(z_s) (hand-written) at each activation module's input, the quantitative copy replaces
    each activation's output by z_q * g (or g for a squeeze-excitation gate), detached."""

    def __init__(self, model):
        super().__init__()
        self.struct = copy.deepcopy(model).eval()
        for p in self.struct.parameters():
            p.requires_grad_(False)
        self.quant = copy.deepcopy(model)
        self.gates, self.i = [], 0
        for net, hook in ((self.struct, self._record), (self.quant, self._apply)):
            for m in net.modules():
                if _kind_of(m) is not None:
                    if hasattr(m, "inplace"):
                        m.inplace = False
                    m.register_forward_hook(hook)

    def _record(self, m, inp, out):
        z = inp[0].double()
        k = _kind_of(m)
        self.gates.append((z > 0).to(inp[0].dtype) if k == "relu" else G[k](z).to(inp[0].dtype))

    def _apply(self, m, inp, out):
        g = self.gates[self.i].detach()
        self.i += 1
        return g if _kind_of(m) in SE else inp[0] * g

    def forward(self, x):
        self.gates, self.i = [], 0
        with torch.no_grad():
            self.struct(x)
        y = self.quant(x)
        assert self.i == len(self.gates)
        return y


def _randomise(model, scale=0.3):
    """Random BatchNorm statistics and affine, and layer scales of order 1 (ConvNeXt's 1e-6
    would hide every block behind the residual)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, scale)
                m.running_var.uniform_(0.5, 1.5)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, scale)
        for n, p in model.named_parameters():
            if p.numel() and float(p.abs().max()) <= 1e-5 and p.dim() <= 3:
                p.uniform_(0.3, 1.0)  # layer scale / zero-initialised heads
            if n.endswith("heads.head.weight") or (n.endswith("head.weight") and float(p.abs().max()) == 0):
                p.normal_(0, 0.05)
    return model


def _kinds(dc):
    out = {}
    for s in dc.sites:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


def _grads(params):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in params}


def _check_against_oracle(model, x, rtol=1e-4, atol=1e-5):
    """dc(x) == model(x) in eval mode, and dc's quantitative gradients == the hook oracle's."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.models.TrainModeGateWarning)
        dc = fs.dualcopy(model, soft_gates=True).eval()
    oracle = HookOracle(model).eval()
    with torch.no_grad():
        ref = model(x)
    y = dc(x)
    scale = float(ref.abs().max()) + 1e-6
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol * scale)
    y_o = oracle(x)
    torch.testing.assert_close(y, y_o, rtol=rtol, atol=atol * scale)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_o * w).sum().backward()
    mine, theirs = dict(dc.quantitative.named_parameters()), dict(oracle.quant.named_parameters())
    assert mine.keys() == theirs.keys()
    checked = 0
    for n in mine:
        a, b = mine[n].grad, theirs[n].grad
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * (float(b.abs().max()) + 1e-6), msg=n)
            checked += 1
    assert checked > 0
    return dc


# ---------------------------------------------------------------------------
# the gate functions and the store
@pytest.mark.parametrize("kind", sorted(G))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sites_compute_z_q_times_detached_gate(kind, dtype):
    torch.manual_seed(draw_seed(2**31))
    shape = (3, 5, 7, 9)
    z_s = (torch.randn(shape) * 4).to(dtype)
    z_q = (z_s.float() + 0.5 * torch.randn(shape)).to(dtype).requires_grad_()
    y_s, m = struct_site(z_s, kind=kind)
    assert m.bits == () and m.gate.dtype == dtype and m.gate.shape == shape
    assert m.nbytes() == z_s.numel() * z_s.element_size()  # one value per element (vs 1 bit)
    g = G[kind](z_s.double())
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.gate.double(), g, **tol)
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
           "hardswish": F.hardswish, "mish": F.mish, "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}[kind]
    assert torch.equal(y_s, act(z_s))  # the structural output is the original activation
    y = quant_site(z_q, m, kind)
    if kind in SE:
        assert torch.equal(y, m.gate) and not y.requires_grad  # the gate itself: no gradient
        return
    ref = z_q * m.gate
    assert torch.equal(y, ref)
    w = torch.randn(shape, dtype=dtype)
    (gq,) = torch.autograd.grad((y * w).sum(), z_q)
    assert torch.equal(gq, w * m.gate)  # d y / d z_q = g(z_s): nothing through g


def test_autograd_saves_only_the_store():
    """The store of a z * g(z) site is its structural pre-activation (g is recomputed from it,
    exactly, in the fused op's backward): autograd saves that tensor and nothing else."""
    z_s, z_q = torch.randn(4, 6, 5), torch.randn(4, 6, 5, requires_grad=True)
    _, m = struct_site(z_s, kind="silu")
    assert m.pre is z_s and m.gate_kind == "sigmoid"  # no affine: the input itself, no copy
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        quant_site(z_q, m, "silu")
    assert len(saved) == 1 and saved[0].data_ptr() == m.pre.data_ptr()
    # written in place after the site stored it: refused, not gated with stale values
    z_s.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        quant_site(z_q, m, "silu")


@pytest.mark.parametrize("kind", sorted(set(G) - set(SE)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_site_kernel_against_reference(kind, dtype, layout):
    """The quantitative side runs the fused op (compiled kernels where loaded): its output and
    gradient against the reference z_q * g(z_s) with torch's functions (reference.py), to the
    kernels' stated gate bound (tests/ops/test_soft_gate.py) and the dtype's rounding."""
    torch.manual_seed(draw_seed(2**31))
    shape = (2, 6, 7, 5)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    z_s = (torch.randn(shape) * 3).to(dtype).contiguous(memory_format=fmt)
    z_q = (z_s.float() + 0.3 * torch.randn(shape)).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    _, m = struct_site(z_s, kind=kind)
    y = quant_site(z_q, m, kind)
    gk = fs.layers.GATE_OF[kind]
    want = fs.reference.soft_gate_apply(z_q.detach(), z_s, gk)
    tol = {torch.float32: dict(rtol=2e-6, atol=3e-7), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
           torch.float16: dict(rtol=2e-3, atol=1e-6)}[dtype]
    torch.testing.assert_close(y.detach(), want, **tol)
    assert y.stride() == z_q.stride()
    w = torch.randn(shape).to(dtype)
    (gq,) = torch.autograd.grad((y.float() * w.float()).sum(), z_q)
    torch.testing.assert_close(gq, fs.reference.soft_gate_apply(w, z_s, gk), **tol)


def test_gated_layers_take_soft_activations():
    torch.manual_seed(draw_seed(2**31))
    conv, bn = nn.Conv2d(3, 7, 3, padding=1), nn.BatchNorm2d(7)
    _randomise(nn.Sequential(bn))
    bn.eval()
    layer = fs.GatedConv2d.from_conv(conv, bn, activation="silu").eval()
    x = torch.randn(2, 3, 11, 13)
    y_q, y_s = layer(x)
    torch.testing.assert_close(y_q, F.silu(bn(conv(x))), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_s, F.silu(bn(conv(x))), rtol=1e-5, atol=1e-6)
    lin = nn.Linear(5, 6)
    g = fs.GatedLinear.from_linear(lin, activation="gelu_tanh")
    t = torch.randn(3, 4, 5)
    with torch.no_grad():
        g.linear.weight.add_(0.3 * torch.randn_like(g.linear.weight))  # the copies part
    y_q, _ = g(t)
    z_s = lin(t).detach()
    torch.testing.assert_close(y_q, g.linear(t) * G["gelu_tanh"](z_s), rtol=1e-5, atol=1e-6)
    a = fs.GatedActivation("hardsigmoid")
    s_q, s_s = torch.randn(2, 3, 1, 1, requires_grad=True), torch.randn(2, 3, 1, 1) * 4
    y_q, y_s = a((s_q, s_s))
    assert torch.equal(y_q, F.hardsigmoid(s_s)) and not y_q.requires_grad
    with pytest.raises(ValueError, match="activation"):
        fs.GatedActivation("tanh")


# ---------------------------------------------------------------------------
# models built here: every form a network writes its activations in
class SoftNet(nn.Module):
    """conv-BN-SiLU, conv-GELU(tanh) as functions, depthwise-Hardswish, Mish, a hand-written
    swish (x * sigmoid(x)), a squeeze-excitation block with Sigmoid (module) and one with
    F.hardsigmoid through view/expand_as, a Linear-GELU on tokens, odd sizes."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU()
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.dw, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6)
        self.hs = nn.Hardswish()
        self.c3 = nn.Conv2d(6, 5, 1)
        self.se1, self.se2, self.se_act, self.se_gate = nn.Conv2d(5, 3, 1), nn.Conv2d(3, 5, 1), nn.SiLU(), nn.Sigmoid()
        self.fc_se = nn.Linear(5, 5)
        self.tok = nn.Linear(5, 7)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        x = self.act1(self.bn1(self.c1(x)))
        x = F.gelu(self.c2(x), approximate="tanh")
        x = self.hs(self.bn2(self.dw(x)))
        x = F.mish(self.c3(x))
        x = x * torch.sigmoid(x)  # hand-written swish: the sigmoid is a gate of x
        s = self.se_gate(self.se2(self.se_act(self.se1(x.mean((2, 3), keepdim=True)))))
        x = x * s
        b, c = x.shape[:2]
        s2 = F.hardsigmoid(self.fc_se(x.mean((2, 3)))).view(b, c, 1, 1)
        x = x * s2.expand_as(x)
        t = F.gelu(self.tok(x.flatten(2).transpose(1, 2)))  # tokens (N, L, F): bias on the last dim
        return self.head(t.mean(1))


def test_user_model_every_form_exact_and_gradients_against_hand_oracle():
    torch.manual_seed(draw_seed(2**31))
    m = _randomise(SoftNet()).eval()
    x = torch.randn(3, 3, 11, 13)
    dc = fs.dualcopy(m, soft_gates=True).eval()
    assert _kinds(dc) == {"silu": 2, "gelu_tanh": 1, "hardswish": 1, "mish": 1, "sigmoid": 2, "hardsigmoid": 1,
                          "gelu": 1}
    with torch.no_grad():
        torch.testing.assert_close(dc(x), m(x), rtol=1e-5, atol=1e-6)
    # train mode, quantitative weights moved: the gates stay the structural copy's
    q = copy.deepcopy(m).train()
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.2 * torch.randn_like(p))
        dc.load_quantitative_state_dict(q.state_dict())
    dc.train()
    y = dc(x)
    # the oracle: the structural pass on m (eval) records g(z_s), the quantitative pass on
    # q (train mode: batch-statistics BatchNorm) multiplies by them, detached
    ref_m, gates = copy.deepcopy(q), []

    def record(kind, z):
        g = G[kind](z.double()).to(z.dtype)
        gates.append(g)
        return g if kind in SE else z * g

    def apply(kind, z):
        g = gates.pop(0).detach()
        return g if kind in SE else z * g

    with torch.no_grad():
        _run_softnet(m.eval(), x, record)
    ref = _run_softnet(ref_m.train(), x, apply)
    assert not gates
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (ref * w).sum().backward()
    mine, theirs = dict(dc.quantitative.named_parameters()), dict(ref_m.named_parameters())
    for n in theirs:
        a, b = mine[n].grad, theirs[n].grad
        assert (a is None) == (b is None), n
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6, msg=n)
    # the squeeze-excitation branches take no gradient: their gates are the structural copy's
    assert all(mine[n].grad is None for n in ("se1.weight", "se2.bias", "fc_se.weight"))
    assert mine["c3.weight"].grad is not None and float(mine["c3.weight"].grad.abs().sum()) > 0
    # and the moved quantitative copy is not the moved original: its gates would have moved
    with torch.no_grad():
        assert not torch.allclose(dc.eval()(x), q.eval()(x), rtol=1e-3, atol=1e-4)


def _run_softnet(m, x, gate_of):
    """SoftNet's forward written by hand, each activation through ``gate_of(kind, z)``."""
    x = gate_of("silu", m.bn1(m.c1(x)))
    x = gate_of("gelu_tanh", m.c2(x))
    x = gate_of("hardswish", m.bn2(m.dw(x)))
    x = gate_of("mish", m.c3(x))
    x = x * gate_of("sigmoid", x)
    h = gate_of("silu", m.se1(x.mean((2, 3), keepdim=True)))
    x = x * gate_of("sigmoid", m.se2(h))
    b, c = x.shape[:2]
    x = x * gate_of("hardsigmoid", m.fc_se(x.mean((2, 3)))).view(b, c, 1, 1)
    t = gate_of("gelu", m.tok(x.flatten(2).transpose(1, 2)))
    return m.head(t.mean(1))


def test_default_converts_as_before_and_refuses_smooth_models():
    m = _randomise(SoftNet()).eval()
    with pytest.raises(ValueError, match="FedSQ needs ReLU-like gating.*soft_gates=True") as e:
        fs.dualcopy(m)
    assert "allow_ungated" not in str(e.value)
    # a ReLU model: soft_gates=True gives the same sites and the same numbers bit for bit
    relu = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    relu(torch.randn(1, 3, 9, 7))
    _randomise(relu).eval()
    a, b = fs.dualcopy(relu).eval(), fs.dualcopy(relu, soft_gates=True).eval()
    x = torch.randn(2, 3, 9, 7)
    assert a.sites == b.sites and not any(s.soft for s in b.sites)
    assert torch.equal(a(x), b(x))
    with pytest.raises(TypeError, match="soft_gates"):
        fs.dualcopy(relu, soft_gates="yes")


def test_refusals_for_what_soft_gates_do_not_cover():
    class TanhNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return torch.tanh(self.d(F.silu(self.c(x)))).mean((2, 3))

    with pytest.raises(ValueError, match=r"1 activation\(s\) that FedSQ does not gate.*tanh.*not of that form"):
        fs.dualcopy(TanhNet(), soft_gates=True)
    m = TanhNet().eval()
    dc = fs.dualcopy(m, soft_gates=True, allow_ungated=True).eval()
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(dc(x), m(x))

    class SigmoidOut(nn.Module):  # a sigmoid output, not multiplied into anything: not a gate
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.sigmoid(F.gelu(self.c(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="sigmoid"):
        fs.dualcopy(SigmoidOut(), soft_gates=True)

    class InPlaceOnGate(nn.Module):  # g.mul_(x) would write over the gate: refused
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            x = F.silu(self.c(x))
            return torch.sigmoid(x.mean((2, 3), keepdim=True)).mul_(x).mean((2, 3))

    with pytest.raises(ValueError, match="sigmoid"):
        fs.dualcopy(InPlaceOnGate(), soft_gates=True)
    rows = fs.models.activation_sites(SoftNet(), soft_gates=True)
    assert len(rows) == 9 and all(g for _, _, g in rows)
    assert not any(g for _, _, g in fs.models.activation_sites(SoftNet()))


# ---------------------------------------------------------------------------
# torchvision and timm backbones (random init: no weights offline), 64x64 inputs
@pytest.mark.slow
@pytest.mark.parametrize("name, kinds", [
    ("efficientnet_b0", {"silu": 49, "sigmoid": 16}),
    ("mobilenet_v3_small", {"hardswish": 19, "relu": 14, "hardsigmoid": 9}),
    ("regnet_y_400mf", {"relu": 65, "sigmoid": 16}),
    ("convnext_tiny", {"gelu": 18}),
])
def test_torchvision_backbones(name, kinds):
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(draw_seed(2**31))
    m = _randomise(getattr(tv, name)(weights=None, num_classes=6))
    dc = _check_against_oracle(m, torch.randn(2, 3, 64, 64))
    assert _kinds(dc) == kinds


def test_small_vision_transformer():
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(draw_seed(2**31))
    m = _randomise(tv.VisionTransformer(image_size=40, patch_size=8, num_layers=3, num_heads=2, hidden_dim=14,
                                        mlp_dim=22, num_classes=5))
    dc = _check_against_oracle(m, torch.randn(3, 3, 40, 40))
    assert _kinds(dc) == {"gelu": 3}  # attention's softmax and LayerNorm stay ordinary


@pytest.mark.slow
@pytest.mark.parametrize("name, kinds", [("efficientnet_b0", {"silu": 49, "sigmoid": 16}),
                                         ("convnext_atto", {"gelu": 12})])
def test_timm_backbones(name, kinds):
    timm = pytest.importorskip("timm")
    torch.manual_seed(draw_seed(2**31))
    m = _randomise(timm.create_model(name, pretrained=False, num_classes=5))
    dc = _check_against_oracle(m, torch.randn(2, 3, 64, 64))
    assert _kinds(dc) == kinds


@pytest.mark.slow
def test_vit_b_16_exact_at_224():
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(draw_seed(2**31))
    m = _randomise(tv.vit_b_16(weights=None, num_classes=7)).eval()
    dc = fs.dualcopy(m, soft_gates=True).eval()
    assert _kinds(dc) == {"gelu": 12}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(dc(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.slow
def test_timm_backbones_that_needed_allow_ungated_are_fedsq_throughout():
    """mobilenetv3, ghostnet and rexnet converted only with allow_ungated before (issue 27):
    every activation is a gate site now, and the conversion is exact."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(draw_seed(2**31))
    want = {"mobilenetv3_small_100": {"hardswish": 19, "relu": 14, "hardsigmoid": 9},
            "ghostnet_100": {"relu": 42, "hardsigmoid": 7},
            "rexnet_100": {"silu": 17, "hardtanh": 16, "relu": 13, "sigmoid": 13}}
    x = torch.randn(2, 3, 64, 64)
    for name, kinds in want.items():
        m = _randomise(timm.create_model(name, pretrained=False, num_classes=5)).eval()
        dc = fs.dualcopy(m, soft_gates=True).eval()
        assert _kinds(dc) == kinds, name
        with torch.no_grad():
            ref = m(x)
            torch.testing.assert_close(dc(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=name)


# ---------------------------------------------------------------------------
# cache, stability, files
def test_mask_cache_steps_aside_for_soft_sites():
    torch.manual_seed(draw_seed(2**31))
    m = _randomise(SoftNet()).eval()
    dc = fs.dualcopy(m, soft_gates=True).eval()
    cache = fs.MaskCache(6)
    dc.attach_cache(cache)
    x = torch.randn(6, 3, 11, 13)
    with torch.no_grad():
        a = dc(x, sample_idx=torch.arange(6))
        b = dc(x, sample_idx=torch.arange(6))
        ref = m(x)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(a, b)
    assert "soft gate site" in cache.stepped_aside and "steps aside" in repr(cache)
    assert len(cache) == 0 and cache.hits == 0 and cache.misses == 12 and cache._rows is None
    # a soft-gated model with ReLU sites only caches as before
    relu = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    relu(x)
    d2 = fs.dualcopy(relu, soft_gates=True).attach_cache(fs.MaskCache(6))
    with torch.no_grad():
        d2(x, sample_idx=torch.arange(6))
    assert len(d2.mask_cache) == 6 and d2.mask_cache.stepped_aside is None


def test_gate_stability_soft_is_mean_absolute_gate_change():
    torch.manual_seed(draw_seed(2**31))
    m = _randomise(SoftNet()).eval()
    dc = fs.dualcopy(m, soft_gates=True)
    x = torch.randn(4, 3, 11, 13)
    # at conversion: rounding only (the structural copy folds BatchNorm into its epilogue)
    assert all(v < 1e-5 for v in fs.models.gate_stability(dc, None, x).values())
    with torch.no_grad():
        dc.quantitative.c1.weight.add_(0.5 * torch.randn_like(dc.quantitative.c1.weight))
    res = fs.models.gate_stability(dc, None, x)
    # the first site by hand: mean |g(z_q) - g(z_s)|, both pre-activations in eval mode
    q = dc.quantitative
    with torch.no_grad():
        z_q, z_s = q.bn1(q.c1(x)), m.bn1(m.c1(x))
    want = float((G["silu"](z_q.double()) - G["silu"](z_s.double())).abs().mean())
    assert res["act1"] == pytest.approx(want, rel=1e-4) and want > 0.01
    assert 0 < max(res.values()) <= 1
    # two versions: a DualCopy model and the plain original, probed with soft gates
    two = fs.models.gate_stability(dc, m, x)
    assert two["act1"] == pytest.approx(want, rel=1e-4)
    # the refresh ablation: the structural copy becomes the moved quantitative one, gates with it
    dc.set_structural_from_quantitative()
    assert all(v < 1e-5 for v in fs.models.gate_stability(dc, None, x).values())
    plain = copy.deepcopy(m)
    plain.load_state_dict(dc.quantitative_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dc.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-6)


def test_save_load_and_half_precision(tmp_path):
    torch.manual_seed(draw_seed(2**31))
    m = _randomise(SoftNet()).eval()
    dc = fs.dualcopy(m, soft_gates=True).eval()
    with torch.no_grad():
        for p in dc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fs.save_dualcopy(dc, tmp_path / "s.safetensors")
    other = fs.load_dualcopy(fs.dualcopy(_randomise(SoftNet()), soft_gates=True).eval(), tmp_path / "s.safetensors")
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        assert torch.equal(other(x), dc(x))
    assert other.config["soft_gates"] is True
    with pytest.raises(ValueError, match="gate sites"):  # binary-gated model of another net: sites differ
        fs.load_dualcopy(fs.dualcopy(nn.Sequential(nn.Linear(3, 3), nn.ReLU())), tmp_path / "s.safetensors")
    bf = copy.deepcopy(dc).bfloat16()
    masks = bf.structural_masks(x.bfloat16())
    assert all(mk.gate.dtype == torch.bfloat16 for mk in masks)
    with torch.no_grad():
        torch.testing.assert_close(bf(x.bfloat16()).float(), dc(x), rtol=0.1, atol=0.05)
