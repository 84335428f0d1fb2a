"""dualcopy(): conversion invariant, gradients vs a naive two-model reference,
parameter hygiene, state, options, errors, zoo and the stability probe."""
import copy
import os
import shutil
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsq_fast as fs
from fedsq_fast.models import build_model, gate_stability


# --------------------------------------------------------------------------
# Independent oracle: two models, forward hooks, masks as float tensors.
from _oracles import NaiveDualCopy  # noqa: E402


def _close(a, b, rel=1e-4):
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


# --------------------------------------------------------------------------
ARCHS = [("resnet18", 64), ("resnet34", 64), ("resnet50", 64), ("alexnet", 64), ("vgg11", 64),
         ("vgg11_bn", 64), ("vgg16", 64), ("vgg16_bn", 64), ("mobilenet_v2", 64)]


def _randomize_bn(model):
    """Random-init BN is the identity; give it statistics so folding is really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("name,px", ARCHS)
def test_conversion_invariant_torchvision(name, px):
    model = build_model(name, num_classes=10).eval()
    _randomize_bn(model)
    dc = fs.dualcopy(model).eval()
    x = torch.randn(1, 3, px, px)
    with torch.no_grad():
        ref, out = model(x), dc(x)
    _close(out, ref)
    kinds = {s.kind for s in dc.sites}
    assert kinds == ({"hardtanh"} if name == "mobilenet_v2" else {"relu"})
    # the structural graph is cut after the last gate: no classifier head in it
    assert not any(m.weight.shape[0] == 10 for m in dc.structural.modules() if isinstance(m, nn.Linear))


class UserCNN(nn.Module):
    """Functional relus, a reused ReLU module, ReLU6, LeakyReLU and Hardtanh."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.r6 = nn.ReLU6()
        self.lk = nn.LeakyReLU(0.1)
        self.fc1 = nn.Linear(8 * 4 * 4, 13)
        self.fc2 = nn.Linear(13, 5)

    def forward(self, x):
        x = self.act(self.b1(self.c1(x)))
        y = F.relu(self.c2(x))
        x = self.act(x + y)                      # reused module: a second gate site
        x = self.lk(self.r6(self.c3(x)) - 1.0)
        x = F.max_pool2d(x, 2)
        x = F.hardtanh(x, -0.5, 2.0)
        x = torch.flatten(x, 1)
        return self.fc2(self.fc1(x).relu())


def test_user_cnn_sites_and_invariant():
    model = UserCNN().eval()
    _randomize_bn(model)
    dc = fs.dualcopy(model).eval()
    assert [s.name for s in dc.sites] == ["act", "relu", "act#1", "r6", "lk", "hardtanh", "relu_1"]
    assert [s.kind for s in dc.sites] == ["relu", "relu", "relu", "hardtanh", "leaky_relu", "hardtanh", "relu"]
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        _close(dc(x), model(x))


def _train_steps(model, xs, ys, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    grads = []
    for step, (x, y) in enumerate(zip(xs, ys)):
        torch.manual_seed(step)  # same dropout draws in both models
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
    return grads


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_gradients_match_naive_reference_after_steps(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    _randomize_bn(model)
    dc = fs.dualcopy(model).train()
    naive = NaiveDualCopy(model).train()
    struct_before = {k: v.clone() for k, v in dc.structural.state_dict().items()}
    xs = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    ys = [torch.randint(0, 7, (4,)) for _ in range(3)]
    g_ours = _train_steps(dc, xs, ys)
    g_ref = _train_steps(naive, xs, ys)
    for step, (a, b) in enumerate(zip(g_ours, g_ref)):
        b = {k.removeprefix("quant."): v for k, v in b.items()}
        assert set(a) == {"quantitative." + k for k in b}
        for k, v in b.items():
            _close(a["quantitative." + k], v, rel=2e-3)
    for k, v in dc.structural.state_dict().items():
        assert torch.equal(v, struct_before[k]), k  # bit-identical
    assert all(v.grad is None for v in dc.structural.buffers())
    # parameter hygiene: only quantitative parameters, same count as the model
    assert all(n.startswith("quantitative.") for n, _ in dc.named_parameters())
    assert sum(p.numel() for p in dc.parameters()) == sum(p.numel() for p in naive.quant.parameters())
    assert not dc.structural.training


def test_quantitative_state_dict_and_cross_architecture_error(tmp_path):
    m = build_model("svhn_cnn")
    dc = fs.dualcopy(m)
    sd = dc.quantitative_state_dict()
    assert "features.0.1.running_mean" in sd and "features.0.1.num_batches_tracked" in sd
    assert set(sd) == set(m.state_dict())  # keyed as the original model
    assert not any("struct" in k for k in sd)
    dc2 = fs.dualcopy(build_model("svhn_cnn"))
    dc2.load_quantitative_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    dc.eval(), dc2.eval()
    with torch.no_grad():
        torch.testing.assert_close(dc2.quantitative(x, dc.structural_masks(x)), dc(x))
    other = fs.dualcopy(build_model("svhn_cnn", num_classes=4))
    with pytest.raises(ValueError, match=r"classifier\.4\.weight.*\(4, 256\)"):
        other.load_quantitative_state_dict(sd)
    r18 = fs.dualcopy(build_model("resnet18"))
    with pytest.raises(ValueError, match="another architecture"):
        r18.load_quantitative_state_dict(sd)
    with pytest.raises(TypeError):
        r18.load_quantitative_state_dict([1, 2])


def test_save_load_full_state_atomic(tmp_path):
    torch.manual_seed(1)
    dc = fs.dualcopy(build_model("svhn_cnn"))
    opt = torch.optim.SGD(dc.parameters(), lr=0.1)
    dc(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    path = tmp_path / "dc.safetensors"
    fs.save_dualcopy(dc, path)
    assert os.listdir(tmp_path) == ["dc.safetensors"]  # no temp file left behind
    fresh = fs.dualcopy(build_model("svhn_cnn"))
    fs.load_dualcopy(fresh, path)
    x = torch.randn(3, 3, 32, 32)
    dc.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), dc(x))
    with pytest.raises(ValueError, match="gate sites"):
        fs.load_dualcopy(fs.dualcopy(build_model("resnet18")), path)


def test_modes_dtypes_and_channels_last():
    model = build_model("svhn_cnn").eval()
    _randomize_bn(model)
    dc = fs.dualcopy(model)
    dc.train()
    assert dc.quantitative.training and not dc.structural.training
    dc.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        cl = copy.deepcopy(dc).to(memory_format=torch.channels_last)
        _close(cl(x.to(memory_format=torch.channels_last)), ref)
        bf = copy.deepcopy(dc).bfloat16()
        out = bf(x.bfloat16())
        assert out.dtype == torch.bfloat16
        _close(out.float(), ref, rel=5e-2)
    frozen = fs.dualcopy(model, quant_bn="frozen").train()
    assert not any(m.training for m in frozen.quantitative.modules() if isinstance(m, nn.BatchNorm2d))


def test_head_replacement_and_maxpool_option():
    model = build_model("svhn_cnn").eval()
    dc = fs.dualcopy(model, num_classes=3, gate_maxpool=True).eval()
    assert dc(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert sum(s.kind == "maxpool" for s in dc.sites) == 3
    dc2 = fs.dualcopy(model, gate_maxpool=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(dc2(x), model(x))
    # the quantitative pool takes the structural argmax: check one site against gather
    q = torch.randn(2, 4, 6, 6)
    s = torch.randn(2, 4, 6, 6)
    from fedsq_fast.models.trace import _quant_maxpool, _struct_maxpool
    _, m = _struct_maxpool(s, 2, 2, 0, 1, False)
    win = lambda t: t.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 4, 3, 3, 4)
    arg = win(s).argmax(-1, keepdim=True)
    assert torch.equal(_quant_maxpool(q, m), win(q).gather(-1, arg).squeeze(-1))


class GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GELU())

    def forward(self, x):
        return F.silu(self.block(self.c(x)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return F.relu(self.c(x))
        return self.c(x)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"GELU at 'block\.2'.*silu"):
        fs.dualcopy(GeluNet())
    gnet = GeluNet().eval()
    dc = fs.dualcopy(gnet, allow_ungated=True).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        _close(dc(x), gnet(x))
    with pytest.raises(ValueError, match="torch.fx"):
        fs.dualcopy(Untraceable())
    with pytest.raises(TypeError, match="model"):
        fs.dualcopy("resnet18")
    with pytest.raises(ValueError, match="gate"):
        fs.dualcopy(UserCNN(), gate=("relu", "gelu"))
    with pytest.raises(ValueError, match="quant_bn"):
        fs.dualcopy(UserCNN(), quant_bn="sync")
    with pytest.raises(ValueError, match="FedSQ needs ReLU-like gating"):
        fs.dualcopy(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(TypeError, match="pair"):
        dc((x, x, x))
    with pytest.raises(ValueError, match="MaskCache"):
        dc(x, sample_idx=[0])


def test_relu6_mobilenet_offline_weights_end_to_end():
    model = build_model("mobilenet_v2", weights="offline").eval()
    dc = fs.dualcopy(model).eval()
    assert sum(s.kind == "hardtanh" and s.p2 == 6.0 for s in dc.sites) == 35
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close(dc(x), model(x))
    # relu6 not gated: stays an ordinary activation in both copies
    with pytest.raises(ValueError, match="FedSQ needs ReLU-like gating"):
        fs.dualcopy(model, gate=("relu",))


def test_offline_weights_sha256(tmp_path):
    from fedsq_fast.models import zoo

    for name in ("svhn_cnn", "mobilenet_v2"):
        p = zoo.offline_weights_path(name)
        zoo.verify_sha256(p, zoo.OFFLINE_WEIGHTS[name][2])
        bad = tmp_path / f"{name}.pth"
        shutil.copy(p, bad)
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0x01
        bad.write_bytes(bytes(data))
        with pytest.raises(zoo.ChecksumError, match="sha256 mismatch"):
            zoo._load_offline(name, bad)
    m = build_model("svhn_cnn", weights="offline")
    sd = torch.load(zoo.offline_weights_path("svhn_cnn"), weights_only=True, map_location="cpu")
    assert torch.equal(m.features[2][3].weight, sd["features.2.3.weight"])
    assert m.input_size == 32 and m.input_channels == 3


def test_zoo_errors_and_download_failure(monkeypatch):
    assert set(fs.models.list_models()) >= {"resnet18", "alexnet", "vgg16_bn", "mobilenet_v2", "svhn_cnn"}
    with pytest.raises(ValueError, match="name"):
        build_model("resnet1000")
    with pytest.raises(ValueError, match="offline"):
        build_model("resnet18", weights="offline")
    with pytest.raises(ValueError, match="not a torchvision weights name"):
        build_model("resnet18", weights="NOPE")

    def no_net(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_net)
    with pytest.raises(RuntimeError, match="could not fetch torchvision weights"):
        build_model("resnet18", weights="IMAGENET1K_V1")


def _oracle_gates(model, x):
    """Regime of every ReLU/Hardtanh call (hooks), as integer codes."""
    codes = []

    def hook(m, inp, out):
        z = inp[0]
        if isinstance(m, nn.Hardtanh):
            codes.append((z > m.min_val).int() + (z >= m.max_val).int())
        else:
            codes.append((z > 0).int())

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.ReLU, nn.Hardtanh))]
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.Hardtanh)):
            m.inplace = False
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return codes


def test_gate_stability_probe():
    torch.manual_seed(3)
    base = build_model("svhn_cnn").eval()
    _randomize_bn(base)
    x = torch.randn(4, 3, 32, 32)
    dc = fs.dualcopy(base)
    st = gate_stability(dc, None, x)
    assert list(st) == [s.name for s in dc.sites] and all(v == 0.0 for v in st.values())
    moved = copy.deepcopy(base)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expect = [(a != b).float().mean().item() for a, b in zip(_oracle_gates(base, x), _oracle_gates(moved, x))]
    got = gate_stability(base, moved, x)
    assert max(got.values()) > 0
    assert list(got.values()) == pytest.approx(expect, abs=1e-6)
    # DualCopy: structural gates vs the quantitative copy's own pre-activations,
    # which see gated inputs; oracle: the naive two-model reference with hooks.
    dc.load_quantitative_state_dict(moved.state_dict())
    naive = NaiveDualCopy(base)
    naive.quant.load_state_dict(moved.state_dict())
    q_codes = []
    for m in naive.quant.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda m, i, o: q_codes.append(i[0] > 0))
    with torch.no_grad():
        naive.eval()(x)
    expect_dc = [(a[0].bool() != b).float().mean().item() for a, b in zip(naive.masks, q_codes)]
    dc.train()
    got_dc = gate_stability(dc, None, x)
    assert list(got_dc.values()) == pytest.approx(expect_dc, abs=1e-6)
    assert got_dc[dc.sites[0].name] == pytest.approx(expect[0], abs=1e-6)
    assert dc.training  # mode restored
    with pytest.raises(ValueError, match="different gate sites"):
        gate_stability(base, build_model("resnet18"), x)


def test_set_structural_from_quantitative_rebuilds_gates():
    """After refresh the structural gates are those of the trained quantitative
    copy: the DualCopy model then computes what a plain model with the
    quantitative weights computes (the unfreeze/refresh ablation)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    dc = fs.dualcopy(model)
    before = {k: v.clone() for k, v in dc.structural.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD(dc.parameters(), lr=0.5)
    dc.train()
    for _ in range(2):
        opt.zero_grad()
        dc(x).square().mean().backward()
        opt.step()
    dc.eval()
    plain = copy.deepcopy(model)
    plain.load_state_dict(dc.quantitative_state_dict())
    assert not torch.allclose(dc(x), plain(x), atol=1e-4)  # gates still from the pretrained copy
    dc.set_structural_from_quantitative()
    torch.testing.assert_close(dc(x), plain(x), atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(before[k], v) for k, v in dc.structural.state_dict().items())
    assert all(not p.requires_grad for p in dc.structural.buffers())
    assert sum(1 for _ in dc.parameters()) == sum(1 for _ in plain.parameters())
