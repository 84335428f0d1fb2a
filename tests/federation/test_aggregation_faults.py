"""Aggregation faults: a hostile or broken client never sinks a round (issue 16, part).
Finite but implausible replies are rejected with the reason, a non-finite aggregate is rolled
back with the server optimizer state, and the robust aggregators (coordinate-wise median,
trimmed mean) equal numpy/scipy."""
import re

import numpy as np
import pytest
import torch
from conftest import small_config, draw_seed, model_state, assert_same_state

from fedsq_fast.federation import Federation, from_mapping, make_strategy, prepare_data
from fedsq_fast.federation.strategy import AggregateStats

torch.set_num_threads(1)


def _bn_state(gen, n=6):
    return {"conv.weight": torch.randn(n, 3, generator=gen), "bn.running_mean": torch.randn(n, generator=gen),
            "bn.running_var": torch.rand(n, generator=gen) + 0.5, "bn.num_batches_tracked": torch.tensor(40)}


@pytest.mark.parametrize("poison, match", [
    (("bn.running_var", 3e37), "implausible against the global model"),
    (("bn.running_var", -1.0), "negative variance"),
    (("conv.weight", 1e30), "implausible against the global model"),
    (("bn.num_batches_tracked", 2**62), r"integer values in \[4611686018427387904"),
    (("bn.num_batches_tracked", -5), r"integer values in \[-5"),
])
def test_one_absurd_finite_reply_is_rejected_and_the_others_averaged(poison, match):
    gen = torch.Generator().manual_seed(int(np.random.default_rng(draw_seed(2**31)).integers(1 << 30)))
    g = _bn_state(gen)
    clients = [_bn_state(gen) for _ in range(4)]
    key, val = poison
    bad = {k: t.clone() for k, t in clients[2].items()}
    if bad[key].dtype.is_floating_point:
        bad[key].view(-1)[int(torch.randint(0, bad[key].numel(), (), generator=gen))] = val
    else:
        bad[key] = torch.tensor(val)
    stats = AggregateStats()
    out = make_strategy("fedavg").aggregate(g, [(0, clients[0], 10), (1, clients[1], 20), (2, bad, 30),
                                                (3, clients[3], 40)], stats)
    assert [c for c, _ in stats.rejected] == [2] and re.search(match, stats.rejected[0][1])
    ref = {k: sum(c[k].double() * w for c, w in zip((clients[0], clients[1], clients[3]), (10, 20, 40))) / 70
           for k in g}
    for k in g:
        if g[k].dtype.is_floating_point:
            torch.testing.assert_close(out[k].double(), ref[k], rtol=1e-6, atol=1e-6)
        else:
            assert int(out[k]) == 40


@pytest.mark.parametrize("scale", [None, 1e3, 1e6])
def test_plausible_scale_sets_the_bound_and_none_averages_as_recorded_runs_did(scale):
    """The bound is scale x (1 + the global max |value|): a value just inside is averaged, just
    outside refused; ``None`` (recorded runs before the check) averages every finite reply,
    exactly as the plain float64 oracle says."""
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    g = _bn_state(gen)
    clients = [_bn_state(gen) for _ in range(3)]
    big = float(g["bn.running_var"].abs().max())
    bound = (scale or 1e6) * (1 + big)
    inside = {k: t.clone() for k, t in clients[1].items()}
    inside["bn.running_var"][0] = bound * 0.999
    outside = {k: t.clone() for k, t in clients[2].items()}
    outside["bn.running_var"][1] = bound * 1.001
    stats = AggregateStats()
    out = make_strategy("fedavg", plausible_scale=scale).aggregate(
        g, [(0, clients[0], 5), (1, inside, 7), (2, outside, 11)], stats)
    kept = [(clients[0], 5), (inside, 7)] + ([(outside, 11)] if scale is None else [])
    assert [c for c, _ in stats.rejected] == ([] if scale is None else [2])
    tot = sum(w for _, w in kept)
    for k in g:
        if g[k].dtype.is_floating_point:
            ref = sum(c[k].double() * w for c, w in kept) / tot
            torch.testing.assert_close(out[k].double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="plausible_scale must be a positive finite number or None"):
        make_strategy("fedavg", plausible_scale=0.0)


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_a_non_finite_aggregate_is_rolled_back_with_the_server_state(name):
    gen = torch.Generator().manual_seed(7)
    g = _bn_state(gen)
    g["bn.running_mean"] = g["bn.running_mean"] * 0 + 1e37  # a bound that lets 3e38 through ...
    strat = make_strategy(name)
    ok = {k: t.clone() for k, t in g.items()}
    strat.aggregate(g, [(0, ok, 1)], AggregateStats())  # one normal round: FedAdam has state now
    before = strat.state_dict()
    c = {k: t.clone() for k, t in g.items()}
    c["bn.running_mean"].fill_(3.0e38)  # ... but two of them overflow float32 in the average (statistics are not squared)
    stats = AggregateStats()
    out = strat.aggregate(g, [(0, c, 1), (1, {k: t.clone() for k, t in c.items()}, 1)], stats)
    assert stats.rolled_back and "not finite" in stats.rolled_back and stats.num_clients == 2
    assert all(torch.equal(out[k], g[k]) for k in g)
    after = strat.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_poisoned_client_never_sinks_the_run(tmp_path, bundle):
    cfg = small_config(rounds=3, num_clients=4, max_test_samples=100, batch_size=32, probe_size=8,
                       methods=["fedavg"])
    data = prepare_data(cfg, bundle)

    def hook(rnd, cid, state):  # client 1 sends an absurd but finite BatchNorm variance every round
        if cid == 1:
            k = next(k for k in state if k.endswith("running_var"))
            state[k] = state[k].clone().fill_(1e38)
        return state

    res = Federation(cfg, "fedavg", data, client_hook=hook, quiet=True, out_dir=tmp_path).run()
    clean = Federation(cfg, "fedavg", data, quiet=True,
                       client_hook=lambda r, c, s: (_ for _ in ()).throw(RuntimeError("x")) if c == 1 else s).run()
    for h in res.history[1:]:
        assert dict(h["clients_dropped"])[1].startswith("update rejected: ") and not h["rolled_back"]
    assert all(torch.isfinite(t).all() for t in res.model.state_dict().values() if t.dtype.is_floating_point)
    # the poisoned client is excluded exactly as a failed one: the same model
    assert_same_state(model_state(res.model), model_state(clean.model))


# ------------------------------------------------------------ robust aggregators
@pytest.mark.parametrize("kind", ["median", "trimmed_mean"])
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_robust_aggregators_equal_numpy_and_scipy(kind, k):
    from scipy import stats as sps

    gen = torch.Generator().manual_seed(int(np.random.default_rng(draw_seed(2**31)).integers(1 << 30)))
    g = _bn_state(gen)
    g["half"] = torch.randn(7, generator=gen).half()
    clients = []
    for _ in range(k):
        c = _bn_state(gen)
        c["half"] = torch.randn(7, generator=gen).half()
        c["bn.num_batches_tracked"] = torch.randint(0, 100, (), generator=gen)
        clients.append(c)
    strat = make_strategy("fedavg", aggregator=kind, trim_fraction=0.25)
    stats = AggregateStats()
    out = strat.aggregate(g, [(i, c, int(torch.randint(1, 50, (), generator=gen))) for i, c in enumerate(clients)],
                          stats)
    assert stats.num_clients == k and not stats.rejected
    for key in g:
        x = np.stack([c[key].double().numpy() for c in clients])
        if g[key].dtype.is_floating_point:
            ref = np.median(x, 0) if kind == "median" else sps.trim_mean(x, 0.25, axis=0)
            assert torch.equal(out[key], torch.from_numpy(np.asarray(ref)).to(g[key].dtype)), key
        else:
            xs = np.sort(x.astype(np.int64), 0)
            ref = xs[(k - 1) // 2] if kind == "median" else np.round(sps.trim_mean(x, 0.25, axis=0))
            assert int(out[key]) == int(ref)


def test_median_ignores_a_large_but_plausible_minority():
    gen = torch.Generator().manual_seed(3)
    g = _bn_state(gen)
    honest = [{k: (t + 0.01 * torch.randn(t.shape, generator=gen)) if t.dtype.is_floating_point else t
               for k, t in g.items()} for _ in range(4)]
    evil = {k: (t * 1000 if t.dtype.is_floating_point else t) for k, t in g.items()}  # under the 1e6 bound
    replies = [(i, s, 10) for i, s in enumerate(honest)] + [(9, evil, 1000)]
    mean = make_strategy("fedavg").aggregate(g, replies)
    med = make_strategy("fedavg", aggregator="median").aggregate(g, replies)
    w = g["conv.weight"]
    assert float((med["conv.weight"] - w).abs().max()) < 0.05 < float((mean["conv.weight"] - w).abs().max())
    with pytest.raises(ValueError, match="aggregator must be one of mean, median, trimmed_mean"):
        make_strategy("fedavg", aggregator="krum")
    with pytest.raises(ValueError, match=r"trim_fraction must be a number in \[0, 0.5\)"):
        make_strategy("fedavg", aggregator="trimmed_mean", trim_fraction=0.5)


def test_the_config_chooses_the_aggregator_on_every_path(bundle):
    cfg = from_mapping(dict(dataset="digits", model="tiny_cnn", rounds=1, num_clients=4, val_size=200,
                            max_test_samples=100, batch_size=32, probe_size=8, min_partition_size=5, threads=1,
                            aggregator="trimmed_mean", trim_fraction=0.25, checkpoint=False))
    fed = Federation(cfg, "fedsq+fedadam", prepare_data(cfg, bundle), quiet=True)
    assert (fed.strategy.name, fed.strategy.aggregator, fed.strategy.trim_fraction) == ("fedadam", "trimmed_mean", 0.25)
    assert fed.run().summary["complete"]
    with pytest.raises(ValueError, match="aggregator: must be one of mean, median, trimmed_mean"):
        from fedsq_fast.federation import validate
        validate(from_mapping({"aggregator": "krum"}))


# ------------------------------------------------------------ averaging ops: inputs (issue 16, part)
def test_weighted_average_weights_are_real_numbers_and_may_be_huge():
    from fedsq_fast import weighted_average

    gen = torch.Generator().manual_seed(int(np.random.default_rng(draw_seed(2**31)).integers(1 << 30)))
    xs = [torch.randn(37, generator=gen) for _ in range(3)]
    ref = (xs[0].double() + xs[1].double() + xs[2].double()) / 3
    torch.testing.assert_close(weighted_average(xs, [1e308] * 3).double(), ref, rtol=1e-6, atol=1e-6)
    for bad, match in (("123", "weights must be a sequence of 3 numbers"), ([True, 1, 1], r"weights\[0\] must be a real"),
                       (["1", 2, 3], r"weights\[0\] must be a real"), (3, "weights must be a sequence")):
        with pytest.raises(TypeError, match=match):
            weighted_average(xs, bad)
    for ok in (np.array([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]), [np.float32(1), np.int64(2), 3]):
        torch.testing.assert_close(weighted_average(xs, ok).double(),
                                   (xs[0].double() + 2 * xs[1].double() + 3 * xs[2].double()) / 6, rtol=1e-6, atol=1e-6)


def test_state_dicts_match_by_key_set_not_order():
    from fedsq_fast import weighted_average

    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    b = {"b": torch.ones(2), "w": torch.full((3,), 3.0)}
    out = weighted_average([a, b], [1, 3])
    assert list(out) == ["w", "b"] and torch.equal(out["w"], torch.full((3,), 2.5)) and torch.equal(out["b"], torch.full((2,), 0.75))
    with pytest.raises(ValueError, match=r"clients\[1\] must have the keys of clients\[0\]: missing \['b'\], unexpected \['c'\]"):
        weighted_average([a, {"w": torch.ones(3), "c": torch.ones(2)}], [1, 1])


def test_streaming_average_refuses_what_it_cannot_fold_exactly():
    from fedsq_fast import StreamingAverage

    for w in (1e39, 1e-46):
        with pytest.raises(ValueError, match="outside float32's range"):
            StreamingAverage().add(torch.ones(2), w)
    with pytest.raises(TypeError, match="weight must be a real number"):
        StreamingAverage().add(torch.ones(2), "3")
    for vals, ws in (([2**62], [3, 1]), ([-2**63], [1, 1])):
        sa = StreamingAverage()
        with pytest.raises(ValueError, match=r"client #0\['tensor'\]: integer values up to .* overflow the int64"):
            for w in ws:
                sa.add(torch.tensor(vals), w)
    sa = StreamingAverage()
    sa.add(torch.tensor([7, 8]), 3)
    sa.add(torch.tensor([9, 10]), 1)
    assert sa.result().tolist() == [8, 8]  # 7.5 and 8.5, rounded half to even
    with pytest.raises(TypeError, match="out must have the structure of a client"):
        sa.result(out="x")
