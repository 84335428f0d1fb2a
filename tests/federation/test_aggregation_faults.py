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
def test_a_non_finite_aggregate_is_rolled_back_with_the_server_state(name, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    g = _bn_state(gen)
    g["bn.running_mean"] = g["bn.running_mean"] * 0 + 1e37  # a bound that lets 3e38 through ...
    strat = make_strategy(name)
    ok = {k: t.clone() for k, t in g.items()}
    strat.aggregate(g, [(0, ok, 1)], AggregateStats())  # one normal round: FedAdam has state now
    before = strat.state_dict()
    c = {k: t.clone() for k, t in g.items()}
    c["bn.running_mean"].fill_(3.0e38)  # ... two of them used to overflow float32 in the average (issue 24)
    stats = AggregateStats()
    out = strat.aggregate(g, [(0, c, 1), (1, {k: t.clone() for k, t in c.items()}, 1)], stats)
    assert stats.rolled_back is None and torch.equal(out["bn.running_mean"], c["bn.running_mean"])  # 3e38: kept
    # no finite replies make a non-finite average now; one that is not finite (a custom aggregation,
    # a server update) is still rolled back with the server optimizer's state
    from fedsq_fast.federation import strategy as S

    real = S.stream_average
    monkeypatch.setattr(S, "stream_average", lambda *a, **k: {**real(*a, **k), "bn.running_mean": g["bn.running_mean"] * float("inf")})
    strat.load_state_dict(before)
    stats = AggregateStats()
    out = strat.aggregate(g, [(0, ok, 1), (1, {k: t.clone() for k, t in ok.items()}, 1)], stats)
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
    mean = make_strategy("fedavg", norm_bound=None).aggregate(g, replies)
    med = make_strategy("fedavg", aggregator="median").aggregate(g, replies)
    w = g["conv.weight"]
    assert float((med["conv.weight"] - w).abs().max()) < 0.05 < float((mean["conv.weight"] - w).abs().max())
    stats = AggregateStats()  # the default mean refuses it too: its update is far outside the cohort's
    bounded = make_strategy("fedavg").aggregate(g, replies, stats)
    assert [c for c, _ in stats.rejected] == [9] and "the cohort median" in stats.rejected[0][1]
    assert float((bounded["conv.weight"] - w).abs().max()) < 0.05
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

    for w in (1e39, 1e-46, 1.7e308, 10**400):  # outside float32's range: folded on a power-of-two scale
        sa = StreamingAverage()
        sa.add(torch.tensor([1.0, -3.0]), w)
        sa.add(torch.tensor([3.0, 5.0]), w)
        torch.testing.assert_close(sa.result(), torch.tensor([2.0, 1.0]), rtol=2**-21, atol=0)  # float32 rounding
    for w, err in ((-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("3", TypeError)):
        with pytest.raises(err, match="weight must be "):
            StreamingAverage().add(torch.ones(2), w)
    with pytest.raises(TypeError, match="weight must be a real number"):
        StreamingAverage().add(torch.ones(2), "3")
    # -2**63 itself fits the int64 accumulator (client #0); a second one would not
    for vals, ws, bad in (([2**62], [3, 1], 0), ([-2**63], [1, 1], 1)):
        sa = StreamingAverage()
        with pytest.raises(ValueError, match=rf"client #{bad}\['tensor'\]: integer values up to .* overflow the int64"):
            for w in ws:
                sa.add(torch.tensor(vals), w)
    sa = StreamingAverage()
    sa.add(torch.tensor([7, 8]), 3)
    sa.add(torch.tensor([9, 10]), 1)
    assert sa.result().tolist() == [8, 8]  # 7.5 and 8.5, rounded half to even
    with pytest.raises(TypeError, match="out must have the structure of a client"):
        sa.result(out="x")


# ---------------------------------------------------------------- cohort norm bound
def _norm_oracle(g, states, ns, batch, bound):
    """Which replies the norm bound refuses, computed in float64 numpy: ||state - g|| over the
    floating parameters (BatchNorm statistics aside) per local batch, against bound x median."""
    keys = [k for k, t in g.items() if t.dtype.is_floating_point and not k.endswith(("running_mean", "running_var"))]
    per = np.array([np.sqrt(sum(((s[k].double() - g[k].double()).numpy() ** 2).sum() for k in keys))
                    / max(1, -(-n // batch)) for s, n in zip(states, ns)])
    if len(states) < 3 or np.median(per) == 0:
        return set()
    return {i for i, p in enumerate(per) if p > bound * np.median(per)}


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean"])
def test_norm_bound_refuses_exactly_the_updates_far_outside_the_cohort(aggregator):
    """Random cohorts: honest updates that grow with a client's local batches (sizes 1..500),
    a minority boosted by a random factor on either side of the bound. The refused set is the
    float64 oracle's; the aggregate is the aggregator's over the others (oracle: the same
    aggregator with the bound off, given only the others)."""
    rng = np.random.default_rng(draw_seed(2**31))
    for _ in range(6):
        k, batch, bound = int(rng.integers(3, 12)), int(rng.integers(1, 70)), float(rng.uniform(2, 20))
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        g = _bn_state(gen)
        ns = [int(rng.integers(1, 500)) for _ in range(k)]
        states = []
        for i, n in enumerate(ns):
            step = 1e-3 * max(1, -(-n // batch)) * float(rng.uniform(0.5, 2))
            if i < (k - 1) // 2 and rng.random() < 0.7:  # a minority, boosted below or above the bound
                step *= float(rng.choice([rng.uniform(1, 0.5 * bound), rng.uniform(3 * bound, 1e4)]))
            d = {kk: (t + step * torch.randn(t.shape, generator=gen) if t.dtype.is_floating_point else t + 3)
                 for kk, t in g.items()}
            d["bn.running_var"] = d["bn.running_var"].abs()
            states.append(d)
        order = rng.permutation(k)
        replies = [(int(c), states[c], ns[c]) for c in order]
        stats = AggregateStats()
        out = make_strategy("fedavg", aggregator=aggregator, norm_bound=bound, batch_size=batch).aggregate(g, replies, stats)
        refused = _norm_oracle(g, states, ns, batch, bound)
        assert {c for c, _ in stats.rejected} == refused
        assert all("x the cohort median" in r and f"norm_bound {bound:g}" in r for _, r in stats.rejected)
        assert stats.num_clients == k - len(refused) and stats.num_samples == sum(n for i, n in enumerate(ns) if i not in refused)
        kept = [r for r in replies if r[0] not in refused]
        ref = make_strategy("fedavg", aggregator=aggregator, norm_bound=None).aggregate(g, kept)
        assert_same_state(out, ref)


def test_norm_bound_on_with_nobody_refused_is_bit_identical_to_streaming():
    """Holding the replies keeps their order: the bound costs memory, never a bit of the result."""
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    g = _bn_state(gen, n=37)
    replies = [(c, {k: (t + 0.01 * torch.randn(t.shape, generator=gen)).abs() if t.dtype.is_floating_point else t
                    for k, t in g.items()}, int(n)) for c, n in enumerate(torch.randint(1, 99, (7,), generator=gen))]
    stats = AggregateStats()
    on = make_strategy("fedavg").aggregate(g, replies, stats)
    assert not stats.rejected and stats.num_clients == 7
    assert_same_state(on, make_strategy("fedavg", norm_bound=None).aggregate(g, replies))


def test_norm_bound_needs_three_replies_and_a_nonzero_median():
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    g = _bn_state(gen)
    big = {k: (t * 50 if k == "conv.weight" else t) for k, t in g.items()}
    for replies in ([(0, g, 10), (1, big, 10)],  # two: no median to speak of
                    [(0, g, 10), (1, g, 10), (2, big, 10)]):  # the median update is zero
        stats = AggregateStats()
        make_strategy("fedavg", norm_bound=1.0).aggregate(g, replies, stats)
        assert not stats.rejected and stats.num_clients == len(replies)


@pytest.mark.parametrize("bad", [0.5, 0, -3, float("inf"), float("nan"), True, "10"])
def test_norm_bound_values_are_checked(bad):
    with pytest.raises(ValueError, match="norm_bound must be a finite number >= 1 or None"):
        make_strategy("fedavg", norm_bound=bad)
    from fedsq_fast.federation import validate
    with pytest.raises(ValueError, match="norm_bound"):
        validate(from_mapping({"norm_bound": bad}))


def test_recorded_configs_without_norm_bound_reproduce_unbounded():
    from fedsq_fast.federation.config import config_differences
    cfg = small_config(norm_bound=None)
    recorded = {k: v for k, v in cfg.to_dict().items() if k != "norm_bound"}
    assert "norm_bound" not in config_differences(cfg, recorded)
    assert "norm_bound" in config_differences(small_config(), recorded)
    assert from_mapping({"norm_bound": "none"}).norm_bound is None


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
@pytest.mark.parametrize("workers", [1, 2])
def test_robust_aggregators_in_the_engine_use_every_clients_update(bundle, aggregator, workers):
    """Regression: in process a reply aliases the worker model, so holding replies without a
    copy made the 'median' the last client's model. Oracle: each client trained alone from
    the same global model, combined coordinate-wise in float64 numpy."""
    import scipy.stats as sps
    from fedsq_fast.federation import WorkerPoolTransport
    from fedsq_fast.federation.adapter import payload_state
    cfg = small_config(rounds=1, num_clients=5, fraction=1.0, aggregator=aggregator, checkpoint=False,
                       **({"trim_fraction": 0.2} if aggregator == "trimmed_mean" else {}))
    data = prepare_data(cfg, bundle)
    fed = Federation(cfg, "fedsq", data, quiet=True)
    glob = {k: v.clone() for k, v in payload_state(fed.model).items()}
    alone = [{k: v.clone() for k, v in fed.train_client(1, c, glob)[0].items()} for c in range(5)]
    pool = WorkerPoolTransport(2, threads=1) if workers == 2 else None
    try:
        run = Federation(cfg, "fedsq", data, quiet=True, transport=pool)
        run.run_round(1)
        got = payload_state(run.model)
    finally:
        if pool is not None:
            pool.close()
    for k, t in glob.items():
        if not t.dtype.is_floating_point:
            continue
        x = np.stack([a[k].double().numpy() for a in alone])
        ref = np.median(x, 0) if aggregator == "median" else sps.trim_mean(x, 0.2, axis=0)
        np.testing.assert_allclose(got[k].double().numpy(), ref, rtol=1e-6, atol=1e-7, err_msg=k)


def test_a_boosted_client_in_the_engine_is_refused_and_logged(bundle, caplog):
    """A client that scales its update by 100 (finite, inside plausible_scale: what model
    replacement attacks send) is refused by the default norm bound, named in the round's
    record; the round is the FedAvg of the others (oracle: float64 weighted mean)."""
    from fedsq_fast.federation.adapter import payload_state
    cfg = small_config(rounds=1, num_clients=6, fraction=1.0, checkpoint=False)
    data = prepare_data(cfg, bundle)
    seen, glob = {}, {}

    def boost(rnd, cid, state):
        seen[cid] = {k: v.clone() for k, v in state.items()}
        if cid == 3:
            return {k: (glob[k] + 100 * (v - glob[k]) if v.dtype.is_floating_point and "running" not in k else v)
                    for k, v in state.items()}
        return state
    fed = Federation(cfg, "fedavg", data, quiet=True, client_hook=boost)
    glob.update({k: v.clone() for k, v in payload_state(fed.model).items()})
    with caplog.at_level("WARNING"):
        rec = fed.run_round(1)
    assert [c for c, _ in rec["clients_dropped"]] == [3] and "cohort median" in rec["clients_dropped"][0][1]
    assert "client 3 update rejected" in caplog.text and rec["clients_ok"] == 5
    ns = {c: len(data.parts[c]) for c in seen}
    got = payload_state(fed.model)
    for k, t in glob.items():
        if t.dtype.is_floating_point:
            ref = sum(seen[c][k].double() * ns[c] for c in seen if c != 3) / sum(ns[c] for c in seen if c != 3)
            torch.testing.assert_close(got[k].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregator", ["mean", "median"])
@pytest.mark.parametrize("kind", ["meta", "sparse", "numpy", "list", "complex", "other device"])
def test_a_reply_of_the_wrong_kind_of_tensor_is_rejected_not_fatal(aggregator, kind):
    """Meta and sparse tensors used to abort the aggregation (Tensor.item() on meta, aminmax
    on sparse): every such reply is refused with its key and what was expected, and the
    round is the average of the others (float64 oracle)."""
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    g = _bn_state(gen)
    good = [{k: (t + 0.01 * torch.randn(t.shape, generator=gen)).abs() if t.dtype.is_floating_point else t
             for k, t in g.items()} for _ in range(3)]
    bad = dict(good[0])
    w = bad["conv.weight"]
    if kind == "other device" and not torch.cuda.is_available():
        kind_t = w.to("meta")  # the only other device here
    else:
        kind_t = {"meta": lambda: w.to("meta"), "sparse": w.to_sparse, "numpy": w.numpy, "list": w.tolist,
                  "complex": lambda: w.to(torch.complex64), "other device": lambda: w.cuda()}[kind]()
    bad["conv.weight"] = kind_t
    stats = AggregateStats()
    out = make_strategy("fedavg", aggregator=aggregator).aggregate(
        g, [(0, good[0], 5), (1, bad, 5), (2, good[1], 5), (3, good[2], 5)], stats)
    assert [c for c, _ in stats.rejected] == [1] and stats.rejected[0][1].startswith("conv.weight: ")
    ref = make_strategy("fedavg", aggregator=aggregator).aggregate(g, [(0, good[0], 5), (2, good[1], 5), (3, good[2], 5)])
    assert_same_state(out, ref)
