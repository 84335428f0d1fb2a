"""Robust aggregators beside median and trimmed mean (issue 24, hostile minorities): Multi-Krum,
the geometric median and centered clipping, each against an oracle written here in numpy/scipy
(float64), on random cohorts, ties and identical replies; their config keys; the engine (in
process and on 2 workers) and the Flower strategy against each client trained alone."""
import itertools

import numpy as np
import pytest
import torch
from conftest import draw_seed, small_config

from fedsq_fast.federation import Federation, from_mapping, make_strategy, prepare_data, validate
from fedsq_fast.federation.config import ConfigError
from fedsq_fast.federation.strategy import AggregateStats

torch.set_num_threads(1)
VECTOR = ("multi_krum", "geometric_median", "centered_clip")


def _rng():
    return np.random.default_rng(draw_seed(2**31))


def _state(rng, n=6, scale=1.0):
    return {"conv.weight": torch.from_numpy(scale * rng.standard_normal((n, 3))).float(),
            "conv.bias": torch.from_numpy(scale * rng.standard_normal(n)).half(),
            "bn.running_mean": torch.from_numpy(rng.standard_normal(n)).float(),
            "bn.running_var": torch.from_numpy(rng.random(n) + 0.5).float(),
            "bn.num_batches_tracked": torch.tensor(int(rng.integers(0, 100)))}


PARAMS = ("conv.weight", "conv.bias")  # what the vector methods act on (BatchNorm statistics aside)


def _vec(state):
    return np.concatenate([state[k].double().numpy().ravel() for k in PARAMS])


def _unvec(v, like):
    out, at = {}, 0
    for k in PARAMS:
        n = like[k].numel()
        out[k] = v[at:at + n].reshape(tuple(like[k].shape))
        at += n
    return out


def _krum_oracle(x, f, m):
    """Brute force Multi-Krum in float64: every pair's squared distance, each reply's score over
    its K - f - 2 nearest, the m lowest (ties: lower index), their plain mean."""
    k = len(x)
    d = {(i, j): float(((x[i] - x[j]) ** 2).sum()) for i, j in itertools.permutations(range(k), 2)}
    nb = max(0, k - f - 2)
    scores = [sum(sorted(d[i, j] for j in range(k) if j != i)[:nb]) for i in range(k)]
    chosen = sorted(sorted(range(k), key=lambda i: (scores[i], i))[:m])
    return chosen, x[chosen].mean(0), np.array(scores)


def _check_stats_are_coordinate_medians(out, states):
    x = np.stack([s["bn.running_mean"].double().numpy() for s in states])
    np.testing.assert_allclose(out["bn.running_mean"].double().numpy(), np.median(x, 0), rtol=1e-6)
    x = np.stack([s["bn.running_var"].double().numpy() for s in states])
    np.testing.assert_allclose(out["bn.running_var"].double().numpy(), np.median(x, 0), rtol=1e-6)
    ints = sorted(int(s["bn.num_batches_tracked"]) for s in states)
    assert int(out["bn.num_batches_tracked"]) == ints[(len(ints) - 1) // 2]  # lower median


def _assert_params(out, ref_vec, like, rtol=1e-6, atol=1e-6):
    ref = _unvec(ref_vec, like)
    for k in PARAMS:
        assert out[k].dtype == like[k].dtype
        tol = dict(rtol=1e-3, atol=1e-3) if like[k].dtype == torch.float16 else dict(rtol=rtol, atol=atol)
        np.testing.assert_allclose(out[k].double().numpy(), ref[k], **tol, err_msg=k)


# ---------------------------------------------------------------- Multi-Krum
def test_multi_krum_equals_the_brute_force_oracle_on_random_cohorts():
    """Random K, f (from 0 to the most K tolerates, or none: auto), m, and a minority placed far
    away or nearby; the chosen set and the average are the oracle's; statistics and counters are
    the coordinate-wise (lower) median of all replies."""
    from fedsq_fast.federation.robust import krum_scores, krum_select, pairwise_sq_dists

    rng = _rng()
    for _ in range(12):
        k = int(rng.integers(3, 13))
        f_max = (k - 3) // 2
        f = None if rng.random() < 0.3 else int(rng.integers(0, f_max + 1))
        f_eff = f_max if f is None else f
        m = None if rng.random() < 0.5 else int(rng.integers(1, k - f_eff + 1))
        g = _state(rng)
        states = [_state(rng, scale=0.1) for _ in range(k)]
        for i in rng.choice(k, f_eff, replace=False):  # Byzantine: far (x50) or close to one another
            states[i] = _state(rng, scale=float(rng.choice([0.1, 5.0])))
        stats = AggregateStats()
        out = make_strategy("fedavg", aggregator="multi_krum", krum_f=f, krum_m=m, norm_bound=None).aggregate(
            g, [(i, s, int(rng.integers(1, 500))) for i, s in enumerate(states)], stats)
        assert stats.num_clients == k and not stats.rejected and stats.rolled_back is None
        x = np.stack([_vec(s) for s in states])
        chosen, ref, scores = _krum_oracle(x, f_eff, k - f_eff if m is None else m)
        np.testing.assert_allclose(krum_scores(pairwise_sq_dists(x), f_eff), scores, rtol=1e-12)
        assert list(krum_select(x, f_eff, m)) == chosen
        _assert_params(out, ref, g)
        _check_stats_are_coordinate_medians(out, states)


def test_multi_krum_never_chooses_a_far_minority_that_the_mean_follows():
    rng = _rng()
    g = _state(rng)
    honest = [{k: (t + 0.01 * torch.from_numpy(rng.standard_normal(tuple(t.shape))).to(t.dtype))
               if t.dtype.is_floating_point else t for k, t in g.items()} for _ in range(7)]
    evil = [{k: (t + 3.0 if k in PARAMS else t) for k, t in g.items()} for _ in range(2)]
    replies = [(i, s, 10) for i, s in enumerate(honest + evil)]
    out = make_strategy("fedavg", aggregator="multi_krum", krum_f=2, norm_bound=None).aggregate(g, replies)
    x = np.stack([_vec(s) for s in honest])
    _, ref, _ = _krum_oracle(np.stack([_vec(s) for s in honest + evil]), 2, 7)
    np.testing.assert_allclose(ref, x.mean(0), rtol=1e-12)  # the oracle keeps exactly the honest seven
    _assert_params(out, x.mean(0), g)
    mean = make_strategy("fedavg", norm_bound=None).aggregate(g, replies)
    assert float((mean["conv.weight"] - g["conv.weight"]).abs().min()) > 0.5


def test_multi_krum_ties_and_identical_replies():
    """Identical replies: every score is 0, the first m in fold order are chosen, and every
    aggregator returns that reply itself."""
    from fedsq_fast.federation.robust import krum_select

    rng = _rng()
    g = _state(rng)
    s = _state(rng, scale=0.3)
    x = np.stack([_vec(s)] * 6)
    assert list(krum_select(x, 1, 3)) == [0, 1, 2] and list(krum_select(x, 1)) == [0, 1, 2, 3, 4]
    for agg in VECTOR + ("median", "trimmed_mean"):
        out = make_strategy("fedavg", aggregator=agg).aggregate(g, [(i, s, 7 + i) for i in range(6)])
        for k in g:
            assert torch.equal(out[k], s[k]), (agg, k)
    # two equal pairs with the same score: the lower index wins the one place
    y = np.array([[0.0], [1.0], [1.0], [5.0], [5.0], [10.0], [-10.0]])
    k_, f_ = len(y), 2
    chosen, _, _ = _krum_oracle(y, f_, 1)
    assert list(krum_select(y, f_, 1)) == chosen


@pytest.mark.parametrize("k", [3, 7])
def test_too_few_replies_for_krum_f_keep_the_global_model_naming_the_key(k):
    rng = _rng()
    g = _state(rng)
    f = (k - 3) // 2 + 1  # one more than K tolerates
    stats = AggregateStats()
    out = make_strategy("fedavg", aggregator="multi_krum", krum_f=f).aggregate(
        g, [(i, _state(rng, scale=0.1), 10) for i in range(k)], stats)
    assert stats.rolled_back == (f"krum_f = {f} needs at least {2 * f + 3} valid replies (2 krum_f + 3), got {k}: "
                                 "global model kept")
    assert all(torch.equal(out[key], g[key]) for key in g)


# ---------------------------------------------------------------- geometric median
def _gm_objective(x, z):
    return float(np.sqrt(((x - z) ** 2).sum(1)).sum())


def test_geometric_median_is_optimal_against_scipy_on_random_cohorts():
    """Random cohorts (a minority far away): the result satisfies the optimality condition
    (the sum of unit vectors from the replies is ~0) and no scipy minimiser finds a lower
    summed distance."""
    from scipy.optimize import minimize

    rng = _rng()
    for _ in range(6):
        k = int(rng.integers(3, 12))
        g = _state(rng)
        states = [_state(rng, scale=0.1) for _ in range(k)]
        for i in rng.choice(k, (k - 1) // 2, replace=False):
            states[i] = _state(rng, scale=float(rng.uniform(1, 20)))
        out = make_strategy("fedavg", aggregator="geometric_median", norm_bound=None).aggregate(
            g, [(i, s, 10) for i, s in enumerate(states)])
        x = np.stack([_vec(s) for s in states])
        z = np.concatenate([out[k_].double().numpy().ravel() for k_ in PARAMS])
        z64 = _gm_float64(g, states)
        diff = z64 - x
        grad = (diff / np.linalg.norm(diff, axis=1, keepdims=True)).sum(0)
        assert np.linalg.norm(grad) < 1e-6 * k
        best = minimize(lambda v: _gm_objective(x, v), x.mean(0), method="BFGS", options={"gtol": 1e-10})
        assert _gm_objective(x, z64) <= best.fun * (1 + 1e-9)
        np.testing.assert_allclose(z[:18], z64[:18], rtol=1e-6, atol=1e-6)  # float32 conv.weight: rounded
        _check_stats_are_coordinate_medians(out, states)


def _gm_float64(g, states):
    """The float64 geometric median the aggregator computes before rounding (conv.bias is
    float16 in these states, so the rounded result is too coarse for the optimality check)."""
    from fedsq_fast.federation.robust import geometric_median

    return geometric_median(np.stack([_vec(s) for s in states]))


def test_geometric_median_at_a_repeated_reply_meets_the_subgradient_condition():
    """A majority of identical replies: the geometric median is that reply, where optimality
    is ||sum of unit vectors from the other replies|| <= its multiplicity."""
    rng = _rng()
    g = _state(rng)
    same = _state(rng, scale=0.1)
    k_same = int(rng.integers(2, 5))
    others = [_state(rng, scale=float(rng.uniform(0.5, 3))) for _ in range(k_same)]
    states = [same] * k_same + others
    out = make_strategy("fedavg", aggregator="geometric_median", norm_bound=None).aggregate(
        g, [(i, s, 10) for i, s in enumerate(states)])
    x = np.stack([_vec(s) for s in others])
    z = _vec(same)
    units = ((z - x) / np.linalg.norm(z - x, axis=1, keepdims=True)).sum(0)
    assert np.linalg.norm(units) <= k_same
    _assert_params(out, z, g, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- centered clipping
def _cc_oracle(x, center, tau, iters=3):
    """Karimireddy et al.'s centered clipping written out in Python loops, float64."""
    v = np.zeros_like(center)
    for _ in range(iters):
        r = [xi - center - v for xi in x]
        norms = [float(np.sqrt((ri ** 2).sum())) for ri in r]
        t = float(np.median(norms)) if tau is None else tau
        v = v + sum(ri * min(1.0, t / n) if n > 0 else ri for ri, n in zip(r, norms)) / len(x)
    return center + v


@pytest.mark.parametrize("radius", [None, "small", "huge"])
def test_centered_clipping_equals_the_oracle_and_bounds_each_clients_pull(radius):
    rng = _rng()
    for _ in range(4):
        k = int(rng.integers(2, 11))
        g = _state(rng)
        states = [{kk: (t + 0.05 * torch.from_numpy(rng.standard_normal(tuple(t.shape))).to(t.dtype))
                   if kk in PARAMS else _state(rng)[kk] for kk, t in g.items()} for _ in range(k)]
        for i in rng.choice(k, (k - 1) // 2, replace=False):
            states[i] = {kk: (t * 100 if kk in PARAMS else t) for kk, t in states[i].items()}
        tau = {None: None, "small": float(rng.uniform(1e-3, 1e-2)), "huge": 1e9}[radius]
        stats = AggregateStats()
        out = make_strategy("fedavg", aggregator="centered_clip", clip_radius=tau, norm_bound=None).aggregate(
            g, [(i, s, 10) for i, s in enumerate(states)], stats)
        assert stats.num_clients == k
        x = np.stack([_vec(s) for s in states])
        center = _vec(g)
        ref = _cc_oracle(x, center, tau)
        _assert_params(out, ref, g, rtol=1e-5, atol=1e-5)
        if radius == "huge":  # nothing clipped: the plain unweighted mean
            np.testing.assert_allclose(ref, x.mean(0), rtol=1e-9, atol=1e-12)
        if radius == "small":  # each iteration moves by at most tau
            assert np.linalg.norm(ref - center) <= 3 * tau * (1 + 1e-9)
        _check_stats_are_coordinate_medians(out, states)


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("agg", VECTOR)
def test_the_result_does_not_depend_on_the_thread_count(agg):
    rng = _rng()
    g = {"w": torch.from_numpy(rng.standard_normal(200_000)).float(), "b": torch.zeros(3)}
    reps = [(i, {"w": g["w"] + torch.from_numpy(0.01 * rng.standard_normal(200_000)).float(),
                 "b": torch.from_numpy(rng.standard_normal(3)).float()}, 10) for i in range(7)]
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(make_strategy("fedavg", aggregator=agg).aggregate(g, reps))
    torch.set_num_threads(1)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in g)


# ---------------------------------------------------------------- options and config
def test_options_are_checked_naming_the_key():
    for kw, match in ((dict(krum_f=-1), "krum_f must be an integer >= 0 or None"),
                      (dict(krum_f=True), "krum_f must be an integer"), (dict(krum_m=0), "krum_m must be an integer >= 1"),
                      (dict(krum_m=2.0), "krum_m must be an integer"),
                      (dict(clip_radius=0.0), "clip_radius must be a positive finite number"),
                      (dict(clip_radius=float("inf")), "clip_radius must be a positive finite number")):
        with pytest.raises(ValueError, match=match):
            make_strategy("fedavg", aggregator="multi_krum", **kw)


@pytest.mark.parametrize("mapping, key, match", [
    ({"krum_f": 1}, "krum_f", "only aggregator = 'multi_krum' reads it"),
    ({"krum_m": 2, "aggregator": "median"}, "krum_m", "only aggregator = 'multi_krum' reads it"),
    ({"clip_radius": 1.0, "aggregator": "multi_krum"}, "clip_radius", "only aggregator = 'centered_clip' reads it"),
    ({"aggregator": "multi_krum", "krum_f": 4}, "krum_f",
     r"4 Byzantine clients need at least 11 replies a round \(2 krum_f \+ 3\), but a round samples 10 .*at most 3"),
    ({"aggregator": "multi_krum", "krum_f": 1, "fraction": 0.4}, "krum_f", "a round samples 4"),
    ({"aggregator": "multi_krum", "krum_f": 2, "krum_m": 9}, "krum_m", r"exceeds .* \(10 - 2 = 8\)"),
    ({"aggregator": "multi_krum", "krum_m": 8}, "krum_m", r"\(10 - 3 = 7\)"),
    ({"aggregator": "multi_krum", "krum_f": -1}, "krum_f", "must be >= 0"),
    ({"aggregator": "multi_krum", "krum_f": 1.5}, "krum_f", "must be an integer"),
    ({"aggregator": "centered_clip", "clip_radius": -2}, "clip_radius", "must be > 0"),
    ({"aggregator": "krum"}, "aggregator", "must be one of mean, median, trimmed_mean, multi_krum, geometric_median"),
])
def test_config_refuses_bad_robust_keys_in_one_line(mapping, key, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate(from_mapping({"num_clients": 10, **mapping}))
    msg = str(e.value)
    assert msg.startswith(f"{key}:") and "\n" not in msg


def test_config_accepts_the_keys_with_their_aggregator_and_recorded_configs_without_them():
    from fedsq_fast.federation.config import config_differences

    cfg = validate(from_mapping({"aggregator": "multi_krum", "krum_f": 3, "krum_m": 5, "num_clients": 9}))
    s = make_strategy("fedavg", aggregator=cfg.aggregator, krum_f=cfg.krum_f, krum_m=cfg.krum_m)
    assert (s.krum_f, s.krum_m) == (3, 5)
    validate(from_mapping({"aggregator": "centered_clip", "clip_radius": 0.5}))
    recorded = {k: v for k, v in small_config().to_dict().items() if k not in ("krum_f", "krum_m", "clip_radius")}
    assert not {"krum_f", "krum_m", "clip_radius"} & set(config_differences(small_config(), recorded))


# ---------------------------------------------------------------- every path
def _alone(fed, glob, n):
    return [{k: v.clone() for k, v in fed.train_client(1, c, glob)[0].items()} for c in range(n)]


def _oracle(agg, glob, alone):
    """The vector aggregate of each client trained alone, from the oracles above (float64)."""
    keys = [k for k, t in glob.items() if t.dtype.is_floating_point and not k.endswith(("running_mean", "running_var"))]
    x = np.stack([np.concatenate([a[k].double().numpy().ravel() for k in keys]) for a in alone])
    if agg == "multi_krum":
        f = (len(alone) - 3) // 2
        v = _krum_oracle(x, f, len(alone) - f)[1]
    elif agg == "geometric_median":  # Weiszfeld's fixed point, checked by its optimality condition
        from fedsq_fast.federation.robust import geometric_median

        v = geometric_median(x)
        diff = v - x
        assert np.linalg.norm((diff / np.linalg.norm(diff, axis=1, keepdims=True)).sum(0)) < 1e-6 * len(x)
    else:
        v = _cc_oracle(x, np.concatenate([glob[k].double().numpy().ravel() for k in keys]), None)
    out, at = {}, 0
    for k in keys:
        out[k] = v[at:at + glob[k].numel()].reshape(tuple(glob[k].shape))
        at += glob[k].numel()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("agg", VECTOR)
def test_the_engine_in_process_and_on_two_workers_equals_the_oracle(bundle, agg):
    """Each client trained alone from the same global model, combined by the float64 oracle:
    the engine's round in process and with 2 workers gives it (the geometric median to the
    optimality condition), and the two are bit-identical."""
    from fedsq_fast.federation import WorkerPoolTransport
    from fedsq_fast.federation.adapter import payload_state

    cfg = small_config(rounds=1, num_clients=5, fraction=1.0, aggregator=agg, checkpoint=False, methods=["fedsq"])
    data = prepare_data(cfg, bundle)
    fed = Federation(cfg, "fedsq", data, quiet=True)
    glob = {k: v.clone() for k, v in payload_state(fed.model).items()}
    ref = _oracle(agg, glob, _alone(fed, glob, 5))
    got = []
    for workers in (1, 2):
        pool = WorkerPoolTransport(2, threads=1) if workers == 2 else None
        try:
            run = Federation(cfg, "fedsq", data, quiet=True, transport=pool)
            run.run_round(1)
            got.append({k: v.clone() for k, v in payload_state(run.model).items()})
        finally:
            if pool is not None:
                pool.close()
    assert all(torch.equal(got[0][k], got[1][k]) for k in glob)
    for k, v in ref.items():
        np.testing.assert_allclose(got[0][k].double().numpy(), v, rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("agg", VECTOR)
def test_the_flower_strategy_aggregates_as_the_engine(agg):
    """FedSQStrategy.aggregate_train with a robust aggregator in the config: the engine's
    aggregate of the same replies, bit for bit (replies folded in partition order)."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsq_fast.flower import FedSQStrategy, arrays_to_state, state_to_arrays

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
    try:
        rng = _rng()
        g = _state(rng)
        states = [_state(rng, scale=0.1) for _ in range(7)]
        states[3] = _state(rng, scale=4.0)
        cfg = small_config(rounds=1, num_clients=7, methods=["fedsq"], aggregator=agg)
        strat = FedSQStrategy(cfg, "fedsq", min_train_nodes=1, min_available_nodes=1)
        assert strat.engine.aggregator == agg

        class Grid:
            def get_node_ids(self):
                return list(range(100, 107))

        msgs = list(strat.configure_train(1, state_to_arrays(g), ConfigRecord(), Grid()))
        replies = []
        for i in (4, 0, 6, 2, 5, 1, 3):  # arrival order shuffled
            m = msgs[i]
            m.metadata.__dict__["_message_id"] = f"m{i}"
            content = RecordDict({"metrics": MetricRecord({"num-examples": 10 + i, "partition-id": i}),
                                  "arrays": state_to_arrays(states[i])})
            replies.append(Message(content, reply_to=m))
        arrays, metrics = strat.aggregate_train(1, replies)
        ref = make_strategy("fedavg", aggregator=agg).aggregate(g, [(i, s, 10 + i) for i, s in enumerate(states)])
        out = arrays_to_state(arrays)
        assert metrics["clients-ok"] == 7 and all(torch.equal(out[k], ref[k]) for k in ref)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("agg", VECTOR)
def test_replies_on_a_gpu_give_the_cpu_result_on_the_gpu(agg):
    """The server aggregates where the model lives (device = cuda): the vector methods compute
    on the host in float64, so the result is the CPU one, bit for bit, placed on the GPU."""
    rng = _rng()
    g = _state(rng)
    reps = [(i, _state(rng, scale=0.1), 10) for i in range(7)]
    cpu = make_strategy("fedavg", aggregator=agg).aggregate(g, reps)
    dev = lambda s: {k: v.cuda() for k, v in s.items()}  # noqa: E731
    gpu = make_strategy("fedavg", aggregator=agg).aggregate(dev(g), [(i, dev(s), n) for i, s, n in reps])
    assert all(gpu[k].is_cuda and torch.equal(gpu[k].cpu(), cpu[k]) for k in g)


def test_the_attack_harness_sends_what_the_table_says():
    """benchmarks/tools/attacks.py (the attack x defence table): each attacker's reply against
    the formulas written out here in numpy, from the round's honest updates."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "tools" / "attacks.py"
    spec = importlib.util.spec_from_file_location("attacks_tool", path)
    A = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(A)
    rng = _rng()
    g = _state(rng)
    honest = {c: _state(rng, scale=0.2) for c in range(6)}
    attackers = [1, 4]
    benign = [0, 2, 3, 5]
    assert [len(A.attackers_for(f, 10)) for f in (0.1, 0.2, 0.3)] == [1, 2, 3]
    assert set(A.attackers_for(0.1, 10)) <= set(A.attackers_for(0.2, 10)) <= set(A.attackers_for(0.3, 10))
    d = {c: {k: honest[c][k].double().numpy() - g[k].double().numpy() for k in PARAMS} for c in honest}
    for attack in ("sign_flip", "scaling", "alie", "ipm", "free_rider"):
        bad = A.malicious_updates(attack, honest, attackers, g, list(PARAMS))
        assert sorted(bad) == attackers
        for c in attackers:
            for k in PARAMS:
                xs = np.stack([d[b][k] for b in benign])
                want = {"sign_flip": -4 * d[c][k], "scaling": 8 * d[c][k],
                        "alie": xs.mean(0) - xs.std(0, ddof=1), "ipm": -0.1 * xs.mean(0),
                        "free_rider": 0 * d[c][k]}[attack] + g[k].double().numpy()
                tol = 2e-3 if g[k].dtype == torch.float16 else 1e-5
                np.testing.assert_allclose(bad[c][k].double().numpy(), want, rtol=tol, atol=tol, err_msg=(attack, k))
            if attack == "free_rider":
                assert all(torch.equal(bad[c][k], g[k]) for k in g)
