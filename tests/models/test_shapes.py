"""Every input rank a torch layer takes, sizes that collide, and models beyond CNNs on
images: the gated layers and dualcopy against the original layers and networks
(issue 23). Inputs are fresh each session (conftest's seed)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsq_fast as fs
from tests.conftest import draw_seed

ACTS = {
    "relu": (dict(activation="relu"), F.relu),
    "relu6": (dict(activation="relu6"), F.relu6),
    "leaky_relu": (dict(activation="leaky_relu", negative_slope=0.1), lambda t: F.leaky_relu(t, 0.1)),
    "hardtanh": (dict(activation="hardtanh", min_val=-0.5, max_val=0.7), lambda t: F.hardtanh(t, -0.5, 0.7)),
    None: (dict(activation=None), lambda t: t),
}


def _rng():
    seed = draw_seed(2**31)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _random_bn(bn_t, c, **kw):
    bn = bn_t(c, **kw)
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.3, 3.0)
        if bn.weight is not None:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


def _check_pair(g, x, ref_fn, params=None):
    """Output of both streams and the gradients (input and weights) against the original."""
    xg = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    y_q, y_s = g(xg)
    ref = ref_fn(xr)
    torch.testing.assert_close(y_q, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_s, ref.detach(), rtol=1e-5, atol=1e-5)
    if not ref.numel():
        return
    gy = torch.randn_like(ref)
    grads = torch.autograd.grad(y_q, [xg] + list(g.parameters()), gy, allow_unused=True)
    refs = torch.autograd.grad(ref, [xr] + list(params or []), gy, allow_unused=True)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", list(ACTS))
def test_gated_linear_every_rank_and_collision(act):
    rng = _rng()
    kw, fn = ACTS[act]
    for rank in (1, 2, 3, 4):
        fin, fout = (int(v) for v in rng.integers(1, 9, 2))
        lead = [int(v) for v in rng.integers(1, 6, rank - 1)]
        if rank >= 2:
            lead[-1] = fout  # a sequence length equal to out_features: where dim 1 != channels
        lin = nn.Linear(fin, fout, bias=bool(rng.integers(2)) or rank == 3)
        g = fs.GatedLinear.from_linear(lin, **kw)
        x = torch.randn(*lead, fin) * 2
        _check_pair(g, x, lambda t: fn(lin(t)), lin.parameters())
    # empty leading dims
    g = fs.GatedLinear.from_linear(nn.Linear(3, 4), **kw)
    for shape in ((0, 3), (2, 0, 3)):
        y_q, y_s = g(torch.randn(shape))
        assert y_q.shape == shape[:-1] + (4,) and y_s.shape == y_q.shape


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bn", [None, "running", "affine_false", "batch_stats"])
def test_gated_conv_batched_unbatched_with_bn(dims, bn):
    rng = _rng()
    conv_t = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn_t = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layer_t = {1: fs.GatedConv1d, 2: fs.GatedConv2d, 3: fs.GatedConv3d}[dims]
    cin, cout = int(rng.integers(1, 6)), int(rng.integers(2, 6))  # batch statistics need 2+ values per channel
    k = int(rng.choice([1, 3]))  # odd: 'same' output size, so the collision holds after the conv
    conv = conv_t(cin, cout, k, padding=k // 2, bias=bool(rng.integers(2)))
    norm = None
    if bn == "running":
        norm = _random_bn(bn_t, cout)
    elif bn == "affine_false":
        norm = _random_bn(bn_t, cout, affine=False)
    elif bn == "batch_stats":
        norm = _random_bn(bn_t, cout, track_running_stats=False)
    g = layer_t.from_conv(conv, norm).eval()
    orig = (lambda t: F.relu(norm(conv(t)))) if norm is not None else (lambda t: F.relu(conv(t)))
    params = list(conv.parameters()) + (list(norm.parameters()) if norm is not None else [])
    spatial = [int(v) for v in rng.integers(2, 7, dims)]
    spatial[0] = cout  # a spatial size equal to the channel count
    _check_pair(g, torch.randn(2, cin, *spatial), orig, params)
    if norm is None or dims == 1:
        # unbatched: channels on dim 0 (BatchNorm2d/3d refuse unbatched input in torch too;
        # BatchNorm1d takes (C, L) as (N, C) and needs L == C: the collision above)
        _check_pair(g, torch.randn(cin, *spatial), orig, params)


def test_paired_inputs_must_match():
    g = fs.GatedLinear(3, 4)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\) and \(5, 3\)"):
        g((torch.randn(2, 3), torch.randn(5, 3)))
    c = fs.GatedConv2d(2, 3, 3)
    with pytest.raises(ValueError, match="same shape"):
        c((torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 6)))
    # the op level: masks of another activation (its bits pad to the same word) are refused
    _, m = fs.layers.struct_site(torch.randn(2, 3))
    with pytest.raises(ValueError, match="does not match the structural"):
        fs.layers.quant_site(torch.randn(3, 2), m)
    m.shape = None
    with pytest.raises(ValueError, match="6 elements|15 elements"):
        fs.layers.quant_site(torch.randn(5, 3), m)


def test_wrong_channel_count_names_the_cause():
    with pytest.raises(ValueError, match="channels on dim"):
        fs.layers.struct_site(torch.randn(2, 5, 3), shift=torch.zeros(4), cdim=-1)
    with pytest.raises(ValueError, match="channels on dim 1"):
        fs.layers.struct_site(torch.randn(2, 5, 3), shift=torch.zeros(4))


# ---------------------------------------------------------------------------
# dualcopy beyond CNNs on images
class TabularMLP(nn.Module):
    def __init__(self, f=30, h=16, classes=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(f, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(h, h), nn.ReLU(), nn.Linear(h, classes))

    def forward(self, x):
        return self.net(x)


class TokenEncoder(nn.Module):
    """Token ids (N, L) -> embedding -> TransformerEncoder (default ReLU) -> mean -> head."""

    def __init__(self, vocab=50, d=16, classes=3, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 24, dropout=0.1, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)  # both settings
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.emb(tokens)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h)
        return self.head(h.mean(1 if self.batch_first else 0))


class MixerBlock(nn.Module):
    """MLP-Mixer style: token mixing (Linear over L, on transposed input) and channel mixing."""

    def __init__(self, length, ch, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.tok = nn.Sequential(nn.Linear(length, hidden), nn.ReLU(), nn.Linear(hidden, length))
        self.chan = nn.Sequential(nn.Linear(ch, hidden), nn.ReLU(), nn.Linear(hidden, ch))

    def forward(self, x):  # (N, L, C)
        x = x + self.tok(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.chan(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, length=6, ch=6, hidden=6, classes=4):  # every size equal: collisions everywhere
        super().__init__()
        self.blocks = nn.Sequential(MixerBlock(length, ch, hidden), MixerBlock(length, ch, hidden))
        self.head = nn.Linear(ch, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


class SeqConv1d(nn.Module):
    """A Conv1d net over (N, C, L) feature sequences, BN before each ReLU, L == channels."""

    def __init__(self, cin=3, c=8, classes=5):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(cin, c, 3, padding=1), nn.BatchNorm1d(c)
        self.c2, self.b2 = nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu6(self.b2(self.c2(x)))
        return self.fc(x.amax(-1))


class SeqLinearBN(nn.Module):
    """Linear on (N, L, F) followed by BatchNorm1d over dim 1 (= L): the bias and the BN
    index different dims (needs L == out_features, the collision)."""

    def __init__(self, f=5, out=4):
        super().__init__()
        self.lin, self.bn, self.fc = nn.Linear(f, out), nn.BatchNorm1d(out), nn.Linear(out, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.lin(x))).mean(1))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return model


def _exact_eval(model, x, min_sites=1):
    """dualcopy(model) in eval mode equals model: outputs, and gradients of every
    quantitative parameter (keyed as the original's)."""
    model = _randomise_bn(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.models.TrainModeGateWarning)
        dc = fs.dualcopy(model).eval()
    assert sum(s.kind != "maxpool" for s in dc.sites) >= min_sites
    out, ref = dc(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(ref)
    out.backward(gy)
    ref.backward(gy)
    own = dict(dc.quantitative.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert own[name].grad is None or not own[name].grad.any(), name
            continue
        torch.testing.assert_close(own[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    return dc


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_default_relu(batch_first):
    rng = _rng()
    d = 8
    m = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=batch_first)
    n, length = int(rng.integers(1, 4)), 16  # L == dim_feedforward: the collision
    x = torch.randn((n, length, d) if batch_first else (length, n, d))
    dc = _exact_eval(m, x)
    assert [s.kind for s in dc.sites] == ["relu"]
    assert dc.random_fed_sites == ["relu"]  # attention/dropout noise reaches it in train mode


def test_token_transformer_mixer_conv1d_tabular():
    rng = _rng()
    _exact_eval(TokenEncoder(), torch.from_numpy(rng.integers(0, 50, (3, 7))), min_sites=2)
    _exact_eval(TokenEncoder(batch_first=False), torch.from_numpy(rng.integers(0, 50, (2, 5))), min_sites=2)
    _exact_eval(Mixer(), torch.randn(4, 6, 6), min_sites=4)
    _exact_eval(SeqConv1d(), torch.randn(3, 3, 8), min_sites=2)
    _exact_eval(TabularMLP(), torch.randn(5, 30), min_sites=2)
    _exact_eval(SeqLinearBN(), torch.randn(3, 4, 5))
    _exact_eval(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(3, 4, 6))


def test_train_mode_rule_and_random_fed_sites():
    """Train mode: every gated activation is z_q * gate(z_s) with z_s from the eval-mode
    structural copy (oracle: the original's modules run by hand); sites fed by dropout are
    reported and warned about, models without train-only randomness are not."""
    torch.manual_seed(draw_seed(2**31))
    m = _randomise_bn(TabularMLP())
    with pytest.warns(fs.models.TrainModeGateWarning, match="1 gate site"):
        dc = fs.dualcopy(m)
    assert dc.random_fed_sites == ["net.5"]
    dc.train()
    x = torch.randn(6, 30)
    torch.manual_seed(1)
    out = dc(x)
    # oracle: quantitative in train mode, gates from the eval model's pre-activations
    net = m.net
    with torch.no_grad():
        s1 = net[1].eval()(net[0](x))
        g1 = (s1 > 0).float()
        s2 = net[4](F.relu(s1))
        g2 = (s2 > 0).float()
    net.train()
    torch.manual_seed(1)
    h = net[1](net[0](x)) * g1
    h = net[3](h)
    h = net[4](h) * g2
    torch.testing.assert_close(out, net[6](h), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dc2 = fs.dualcopy(SeqConv1d())
    assert dc2.random_fed_sites == []


# ---------------------------------------------------------------------------
# refusals that name the real cause
class SiluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(12))
        self.act = nn.SiLU()

    def forward(self, x):
        for c in self.convs:
            x = self.act(c(x)) * torch.sigmoid(x)
        return x


def test_refusals_no_relu_like_gating():
    with pytest.raises(ValueError) as e:
        fs.dualcopy(SiluNet())
    msg = str(e.value)
    assert "FedSQ needs ReLU-like gating" in msg and "SiLU x12" in msg and "sigmoid x12" in msg
    assert "allow_ungated" not in msg  # it cannot help here
    assert "(+21 more)" in msg and msg.count(" at ") <= 4  # summarised, not 24 sites
    with pytest.raises(ValueError, match="FedSQ needs ReLU-like gating"):
        fs.dualcopy(SiluNet(), allow_ungated=True)
    rows = fs.models.activation_sites(SiluNet())
    assert len(rows) == 24 and not any(g for _, _, g in rows)


def test_refusal_mixed_suggests_allow_ungated_which_works():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GELU(), nn.Flatten(),
                      nn.LazyLinear(2))
    m(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"1 activation\(s\) that FedSQ does not gate.*allow_ungated=True"):
        fs.dualcopy(m)
    dc = fs.dualcopy(m.eval(), allow_ungated=True).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dc(x), m(x))


def test_forward_with_required_extra_inputs_refused():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x, y):
            return F.relu(self.l(x)) + y

    with pytest.raises(ValueError, match=r"needs inputs \['y'\]"):
        fs.dualcopy(TwoInputs())


# ---------------------------------------------------------------------------
# timm backbones (random init: no weights offline)
@pytest.mark.parametrize("name, kw", [
    ("resnet26d", {}), ("regnetx_002", {}), ("dla34", {}),
    ("mobilenetv3_small_100", dict(allow_ungated=True)), ("resnet26d", dict(drop_path_rate=0.2)),
])
def test_timm_backbones_exact_in_eval(name, kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(draw_seed(2**31))
    allow = kw.pop("allow_ungated", False)
    m = timm.create_model(name, pretrained=False, num_classes=5, **kw)
    _randomise_bn(m).eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dc = fs.dualcopy(m, allow_ungated=allow).eval()
    noisy = [x for x in w if issubclass(x.category, fs.models.TrainModeGateWarning)]
    assert bool(noisy) == bool(dc.random_fed_sites) == ("drop_path_rate" in kw)
    x = torch.randn(2, 3, 64, 64)  # dla34 needs >= 64 px (its own forward fails below)
    with torch.no_grad():
        torch.testing.assert_close(dc(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_atto"])
def test_timm_smooth_backbones_refused_honestly(name):
    timm = pytest.importorskip("timm")
    m = timm.create_model(name, pretrained=False, num_classes=5)
    with pytest.raises(ValueError) as e:
        fs.dualcopy(m, allow_ungated=True)
    assert "FedSQ needs ReLU-like gating" in str(e.value) and "allow_ungated" not in str(e.value)
