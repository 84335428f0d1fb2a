"""FedSQ with soft gates through the engine (config key ``soft_gates``): a small SiLU network
with a squeeze-excitation gate federates on digits and learns; workers = 1 and 2 give the same
global model bit for bit (the in-process run is the oracle, as in test_workers.py); the mask
cache steps aside; without the key the model is refused as before."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config
from torch import nn

from fedsq_fast.federation import Federation, InputSpec, WorkerPoolTransport, prepare_data

torch.set_num_threads(1)


class SiluSE(nn.Module):
    """conv-BN-SiLU twice, a squeeze-excitation gate (Sigmoid, ReLU inside), a GELU hidden layer."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.c1, self.bn1, self.act = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se1, self.se2, self.gate = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Sigmoid()
        self.fc, self.head = nn.LazyLinear(48), nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.act(self.bn1(self.c1(x)))
        x = self.act(self.bn2(self.c2(x)))
        x = x * self.gate(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        return self.head(F.gelu(self.fc(x.flatten(1))))


def silu_se():  # module level: workers unpickle it
    m = SiluSE()
    m(torch.zeros(1, 1, 8, 8))  # digits are 8x8: materialise the lazy layer
    return m


def _cfg(**kw):
    return small_config(**{**dict(methods=["fedsq"], rounds=2, num_clients=4, checkpoint=False, lr=0.1,
                                  batch_size=32, soft_gates=True), **kw})


@pytest.mark.slow
def test_fedsq_soft_learns_and_workers_agree(bundle):
    cfg = _cfg()
    data = prepare_data(cfg, bundle, input_spec=InputSpec(1))
    fed = Federation(cfg, "fedsq", data, model_fn=silu_se, quiet=True)
    ref = fed.run()
    info = ref.summary["model"]
    assert info["kind"] == "dualcopy" and info["soft_gate_sites"] == 4 and info["gate_sites"] == 5
    assert ref.model.config["soft_gates"] is True
    # the engine's caches stepped aside: nothing stored, the structural copy ran every batch
    cache = getattr(ref.model, "mask_cache", None)
    assert cache is None or (cache.stepped_aside is not None and len(cache) == 0)
    acc = [h["val_acc"] for h in ref.history[1:]]
    assert acc[-1] > 0.3, acc  # 10 classes: chance is 0.1
    gc = ref.history[-1]["gate_change"]
    assert math.isfinite(gc) and 0 < gc < 1  # mean |g - g_0| over the sites, moved by training
    pool = WorkerPoolTransport(2, threads=1)
    try:
        got = Federation(cfg.replace(workers=2), "fedsq", data, model_fn=silu_se, quiet=True, transport=pool).run()
    finally:
        pool.close()
    sa, sb = ref.model.state_dict(), got.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(ref.history, got.history, strict=True):
        for k in ("val_acc", "val_loss", "train_loss", "gate_change"):
            assert x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])), k


def test_without_the_key_a_silu_model_is_refused_naming_it(bundle):
    cfg = _cfg(rounds=1).replace(soft_gates=False)
    data = prepare_data(cfg, bundle, input_spec=InputSpec(1))
    with pytest.raises(ValueError, match="could not be converted.*soft_gates=True"):
        Federation(cfg, "fedsq", data, model_fn=silu_se, quiet=True)


def test_the_key_is_checked():
    from fedsq_fast.federation.config import ConfigError, validate

    with pytest.raises(ConfigError, match="soft_gates: must be true or false"):
        validate(small_config(soft_gates="yes"))
