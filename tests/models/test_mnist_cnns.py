"""The zoo's MNIST-pretrained twins (mnist_cnn_silu / mnist_cnn_relu), the source models of the
soft-gate evidence suites (experiments/mnist_fmnist_soft_*.toml).

Oracles: the safetensors file read with safetensors itself (what the zoo loaded), the file's
sha256 computed here with hashlib, and the original network in eval mode (a DualCopy model
computes, at conversion, exactly what the network it came from computes)."""
import hashlib
import shutil

import pytest
import torch
from torch import nn

import fedsq_fast as fs
from fedsq_fast.federation import adapter
from fedsq_fast.federation.inputs import input_transform_for
from fedsq_fast.models import zoo
from fedsq_fast.models.zoo import build_model
from tests.conftest import draw_seed

# the hidden linear's activation follows a Dropout: dualcopy warns that train mode differs there (by design)
pytestmark = pytest.mark.filterwarnings("ignore::fedsq_fast.models.dualcopy.TrainModeGateWarning")

NAMES = ("mnist_cnn_silu", "mnist_cnn_relu")
ACT = {"mnist_cnn_silu": nn.SiLU, "mnist_cnn_relu": nn.ReLU}


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_loads_with_hash_check(name, tmp_path):
    from safetensors.torch import load_file

    assert name in fs.models.list_models() and name in adapter.list_models()
    p = zoo.offline_weights_path(name)
    assert hashlib.sha256(open(p, "rb").read()).hexdigest() == zoo.OFFLINE_WEIGHTS[name][2]
    m = build_model(name, weights="offline")
    sd = load_file(p)
    msd = m.state_dict()
    assert set(sd) == set(msd)
    for k, v in sd.items():
        assert torch.equal(msd[k], v), k
    # the activation is the one named, at every site (6 convs + the hidden linear)
    acts = [mod for mod in m.modules() if isinstance(mod, (nn.ReLU, nn.SiLU, nn.GELU))]
    assert len(acts) == 7 and all(type(a) is ACT[name] for a in acts)
    assert (m.input_channels, m.input_size) == (1, 32)
    tf = input_transform_for(name, data_channels=1)
    assert (tf.channels, tf.size, tf.mean, tf.std) == (1, 32, (0.1307,), (0.3081,))
    # the engine's "default" resolves to the same file
    e = adapter.build_model(name, 10, "default")
    for k, v in sd.items():
        assert torch.equal(e.state_dict()[k], v), k
    # a flipped bit anywhere is refused before the file is read
    bad = tmp_path / f"{name}.safetensors"
    shutil.copy(p, bad)
    data = bytearray(bad.read_bytes())
    data[draw_seed(len(data))] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(zoo.ChecksumError, match="sha256 mismatch"):
        zoo._load_offline(name, bad)


@pytest.mark.parametrize("name", NAMES)
def test_weight_names_refused_in_one_line(name):
    with pytest.raises(ValueError, match=f"weights for {name} must be None, 'offline' or a path"):
        build_model(name, weights="IMAGENET1K_V1")
    msg = adapter.weights_problem(name, "DEFAULT")
    assert msg is not None and name in msg and "\n" not in msg


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=g)
    x[0] = 0.0  # edge values: all zeros, -0.0, large finite
    if n > 1:
        x[1] = -0.0
    if n > 2:
        x[2] = x[2] * 1e3
    return x


@pytest.mark.parametrize("name", NAMES)
def test_dualcopy_exact_at_conversion(name):
    """Eval mode: FedSQ (soft gates on the SiLU twin, binary on the ReLU twin) computes the
    pretrained network's outputs; the pretrained SiLU model needs soft_gates=True."""
    model = build_model(name, weights="offline").eval()
    for n in (1, 3, 17):
        x = _inputs(n, draw_seed())
        with torch.no_grad():
            ref = model(x)
            dc = fs.dualcopy(model, soft_gates=True).eval()
            out = dc(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * (float(ref.abs().max()) + 1.0))
    rows = fs.models.activation_sites(model, soft_gates=True)
    assert len(rows) == 7 and all(gated for _, _, gated in rows)  # every site gated
    assert all(("silu" if name == "mnist_cnn_silu" else "relu") in act.lower() for _, act, _ in rows)
    if name == "mnist_cnn_silu":
        with pytest.raises(ValueError, match="FedSQ needs ReLU-like gating"):
            fs.dualcopy(model)
    else:  # binary gates: soft_gates changes nothing on a ReLU network
        x = _inputs(5, draw_seed())
        with torch.no_grad():
            torch.testing.assert_close(fs.dualcopy(model).eval()(x), fs.dualcopy(model, soft_gates=True).eval()(x),
                                       rtol=0, atol=0)
