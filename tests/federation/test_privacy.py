"""Client-level DP (federation/privacy.py, docs/privacy.md). Oracles: dp-accounting's own
reference values and accountant, the exact privacy curve of the Gaussian mechanism (Balle &
Wang 2018), float64 clipping and averaging written out here, chi-square intervals for the
noise's standard deviation, a hand computation of the adaptive clip, the in-process run for
the worker pool."""
import csv
import logging
import math

import numpy as np
import pytest
import torch
from conftest import draw_seed, small_config
from scipy import stats as sps

dpa = pytest.importorskip("dp_accounting")

from fedsq_fast.federation import Federation, WorkerPoolTransport, prepare_data  # noqa: E402
from fedsq_fast.federation.callbacks import round_line  # noqa: E402
from fedsq_fast.federation.client import derive_seed  # noqa: E402
from fedsq_fast.federation.config import ConfigError, from_mapping, validate  # noqa: E402
from fedsq_fast.federation.privacy import (DPAggregator, DPSettings, calibrate_noise, clip_update,  # noqa: E402
                                           poisson_clients, privatize_update, settings_from_config)
from fedsq_fast.federation.seeds import DP_COUNT, DP_NOISE  # noqa: E402
from fedsq_fast.federation.strategy import AggregateStats  # noqa: E402

torch.set_num_threads(1)


def _settings(**kw):
    base = dict(mode="central", clip=1.0, noise_multiplier=1.0, sampling="poisson", num_clients=100, cohort=10,
                rate=0.1, delta=1e-5, rounds=10, seed=0)
    base.update(kw)
    return DPSettings(**base)


# ------------------------------------------------------------------ the accountant
def test_poisson_event_matches_the_librarys_reference_rdp():
    """dp-accounting's own test values (rdp_privacy_accountant_test.py,
    test_compute_rdp_poisson_sampled_gaussian): q = 0.01, z = 2.5, 50 rounds. (Its order 1.5
    value, 6.5007e-04, is left out: dp-accounting 0.6.0 computes 6.7058e-04 there, its
    fractional-order series having changed since that test was written.)"""
    s = _settings(noise_multiplier=2.5, rate=0.01)
    acct = dpa.rdp.RdpAccountant(orders=[2.5, 5, 50, 100, np.inf])
    acct.compose(s.event(), 50)
    np.testing.assert_allclose(acct._rdp, [1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e+02, np.inf], rtol=1e-4)


def test_gaussian_reference_epsilon():
    """The library's test value: z = 4.530877117 gives exactly (1, 1e-6)-DP for one
    unsampled Gaussian release; our default orders reach it to 1e-6."""
    s = _settings(noise_multiplier=4.530877117, rate=1.0, delta=1e-6)
    assert s.epsilon(1) == pytest.approx(1.0, abs=1e-5)


def _exact_gaussian_delta(eps, mu):
    """delta(eps) of the Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018, Thm 8)."""
    return sps.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * sps.norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("z,rounds", [(0.8, 1), (1.3, 10), (3.0, 50), (10.0, 200)])
def test_epsilon_is_a_sound_and_tight_bound_on_the_exact_gaussian_curve(z, rounds):
    """Every client every round (q = 1): T rounds are one Gaussian mechanism with
    mu = sqrt(T) / z, whose exact curve is known. RDP's epsilon must be an upper bound
    (the exact delta there <= the target) and not loose by more than a third."""
    delta = 1e-5
    eps = _settings(noise_multiplier=z, rate=1.0, delta=delta).epsilon(rounds)
    mu = math.sqrt(rounds) / z
    assert _exact_gaussian_delta(eps, mu) <= delta * (1 + 1e-9)
    lo, hi = 0.0, eps  # the exact epsilon, by bisection
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _exact_gaussian_delta(mid, mu) > delta else (lo, mid)
    assert hi <= eps <= 1.34 * hi


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_cached_curve_equals_the_library_accountant_composed(sampling, adaptive):
    rng = np.random.default_rng(draw_seed())
    n = int(rng.integers(20, 500))
    m = int(rng.integers(1, n))
    z = float(rng.uniform(0.5, 3.0))
    count_std = float(rng.uniform(z / 2 + 0.1, 5.0)) if adaptive else 0.0
    rate = m / n
    s = _settings(sampling=sampling, num_clients=n, cohort=m, rate=rate, noise_multiplier=z, adaptive=adaptive,
                  count_std=count_std)
    for r in (1, int(rng.integers(2, 300))):
        if sampling == "poisson":
            rel, sf = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, 1
        else:
            rel, sf = dpa.NeighboringRelation.REPLACE_ONE, 2
        zu = (z ** -2 - (2 * count_std) ** -2) ** -0.5 if adaptive else z
        parts = [dpa.GaussianDpEvent(zu / sf)] + ([dpa.GaussianDpEvent(2 * count_std / sf)] if adaptive else [])
        inner = dpa.ComposedDpEvent(parts)
        ev = (dpa.PoissonSampledDpEvent(rate, inner) if sampling == "poisson"
              else dpa.SampledWithoutReplacementDpEvent(n, m, inner))
        acct = dpa.rdp.RdpAccountant(neighboring_relation=rel)
        acct.compose(ev, r)
        assert s.epsilon(r) == pytest.approx(acct.get_epsilon(1e-5), rel=1e-9)
    if adaptive:  # the two queries together are the mechanism with multiplier z (Andrew et al. 2021)
        plain = _settings(sampling=sampling, num_clients=n, cohort=m, rate=rate, noise_multiplier=z)
        assert s.epsilon(7) == pytest.approx(plain.epsilon(7), rel=1e-6)


def test_fixed_sampling_accounts_twice_the_clip():
    """Replace-one adjacency: the sum moves by up to 2C, so z C of noise is a multiplier z / 2."""
    s = _settings(sampling="fixed", num_clients=100, cohort=10, rate=0.1, noise_multiplier=2.0)
    acct = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acct.compose(dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(1.0)), 20)
    assert s.epsilon(20) == pytest.approx(acct.get_epsilon(1e-5), rel=1e-9)
    assert s.epsilon(0) == 0.0


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_calibration_meets_the_target_and_is_near_minimal(sampling):
    rng = np.random.default_rng(draw_seed())
    target = float(rng.uniform(0.5, 10.0))
    rounds = int(rng.integers(1, 100))
    s = _settings(sampling=sampling, rate=0.1, num_clients=100, cohort=10)
    z = calibrate_noise(s, target, rounds)
    assert s.epsilon(rounds, z) <= target
    assert s.epsilon(rounds, z * (1 - 2e-3)) > target


# ------------------------------------------------------------------ clipping and noise
def _norm64(d):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in d.values()))


@pytest.mark.parametrize("scale", [0.0, 1e-30, 0.3, 1.0, 7.0, 1e30])
def test_clip_to_the_bound_against_float64(scale):
    rng = np.random.default_rng(draw_seed())
    shapes = [(int(rng.integers(1, 9)), int(rng.integers(1, 9))), (int(rng.integers(1, 300)),), (0,), ()]
    d = {f"k{i}": torch.from_numpy(rng.standard_normal(s)).float() for i, s in enumerate(shapes)}
    n0 = _norm64(d)
    d = {k: (t.double() * (scale / n0 if n0 else 0.0)).float() for k, t in d.items()}
    if scale == 0.0:
        d["k0"][0, 0] = -0.0
    clip = float(rng.uniform(0.5, 2.0))
    out, norm = clip_update(d, clip)
    assert norm == pytest.approx(_norm64(d), rel=1e-12)
    assert _norm64(out) <= clip * (1 + 1e-6)
    factor = min(1.0, clip / norm) if norm else 1.0
    for k in d:  # direction kept, magnitude min(1, C/||d||) (float64 oracle, float32 rounding)
        want = d[k].double() * factor
        assert torch.allclose(out[k].double(), want, rtol=1e-6, atol=1e-45), k
        assert out[k].dtype == d[k].dtype and out[k].shape == d[k].shape
    if norm <= clip:
        assert all(torch.equal(out[k], d[k]) for k in d)


def test_privatize_update_clips_noises_and_leaves_its_input():
    rng = np.random.default_rng(draw_seed())
    d = {"w": torch.from_numpy(rng.standard_normal((300, 301))).float(), "b": torch.zeros(7)}
    keep = {k: t.clone() for k, t in d.items()}
    gen = torch.Generator().manual_seed(draw_seed())
    out = privatize_update(d, 0.5, 0.0, gen)
    assert _norm64(out) == pytest.approx(0.5, rel=1e-6)
    out = privatize_update(d, 1e-30, 0.2, torch.Generator().manual_seed(draw_seed()))  # (almost) pure noise
    x = torch.cat([t.flatten().double() for t in out.values()]).numpy()
    _std_in_interval(x, 0.2)
    assert all(torch.equal(d[k], keep[k]) for k in d)
    with pytest.raises(ValueError, match="floating"):
        privatize_update({"n": torch.zeros(2, dtype=torch.int64)}, 1.0, 0.1, gen)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="clip"):
            privatize_update(d, bad, 0.1, gen)


def _std_in_interval(x, std, alpha=1e-4):
    """The sample standard deviation of zero-mean normal draws against ``std``: the
    two-sided chi-square interval of level 1 - alpha."""
    n = x.size
    s2 = float((x ** 2).sum())
    lo, hi = sps.chi2.ppf(alpha / 2, n), sps.chi2.ppf(1 - alpha / 2, n)
    assert lo <= s2 / std ** 2 <= hi, (math.sqrt(s2 / n), std)
    assert abs(x.mean()) < 6 * std / math.sqrt(n)


def _glob(rng):
    return {"w": torch.from_numpy(rng.standard_normal((64, 33))).float(),
            "bn.running_var": torch.from_numpy(rng.uniform(0.5, 2.0, 33)).float(),
            "bn.num_batches_tracked": torch.tensor(17, dtype=torch.int64)}


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_central_noise_has_the_calibrated_std(sampling):
    """Replies equal to the global model: the aggregate's change is the noise alone, with
    standard deviation z C / (expected cohort)."""
    rng = np.random.default_rng(draw_seed())
    glob = {"w": torch.zeros(400, 500), "b": torch.zeros(999)}
    z, clip = float(rng.uniform(0.5, 3)), float(rng.uniform(0.1, 3))
    s = _settings(sampling=sampling, noise_multiplier=z, clip=clip, seed=draw_seed(), num_clients=50, cohort=5,
                  rate=0.1)
    stats = AggregateStats()
    new = DPAggregator(s).aggregate(glob, [({k: v.clone() for k, v in glob.items()}, 10)] * 3, stats, rnd=3)
    x = torch.cat([(new[k].double() - glob[k].double()).flatten() for k in glob]).numpy()
    _std_in_interval(x, z * clip / s.expected_cohort)
    assert stats.dp["noise_std"] == pytest.approx(z * clip / s.expected_cohort)


def test_aggregate_is_the_unweighted_clipped_sum_over_the_expected_cohort():
    """Noise 1e-9: the aggregate against a float64 loop (clip each delta, sum, divide by q N,
    whatever the sample counts); integer buffers stay global; same noise for the same round."""
    rng = np.random.default_rng(draw_seed())
    glob = _glob(rng)
    s = _settings(noise_multiplier=1e-9, clip=float(rng.uniform(0.5, 5)), num_clients=40, rate=0.1,
                  seed=draw_seed())
    replies = []
    for i in range(int(rng.integers(2, 7))):
        st = {k: (v + torch.from_numpy(rng.standard_normal(v.shape)).float() * float(rng.uniform(0.01, 1))
                  if v.dtype.is_floating_point else v + 5) for k, v in glob.items()}
        replies.append((st, int(rng.integers(1, 10_000))))
    new = DPAggregator(s).aggregate(glob, replies, AggregateStats(), rnd=1)
    keys = ["w", "bn.running_var"]
    acc = {k: torch.zeros_like(glob[k], dtype=torch.float64) for k in keys}
    for st, _ in replies:
        d = {k: st[k].double() - glob[k].double() for k in keys}
        nrm = math.sqrt(sum(float((t ** 2).sum()) for t in d.values()))
        f = min(1.0, s.clip / nrm)
        for k in keys:
            acc[k] += d[k] * f
    for k in keys:
        want = (glob[k].double() + acc[k] / (0.1 * 40)).clamp(min=0) if k.endswith("var") else \
            glob[k].double() + acc[k] / (0.1 * 40)
        assert torch.allclose(new[k].double(), want, atol=1e-5), k
    assert torch.equal(new["bn.num_batches_tracked"], glob["bn.num_batches_tracked"])
    again = DPAggregator(s).aggregate(glob, replies, AggregateStats(), rnd=1)
    assert all(torch.equal(new[k], again[k]) for k in new)


def test_adaptive_clip_update_by_hand():
    rng = np.random.default_rng(draw_seed())
    glob = {"w": torch.zeros(50)}
    clip, sigma_b, eta, gamma = 1.0, 0.7, 0.3, 0.6
    s = _settings(noise_multiplier=1.0, clip=clip, adaptive=True, count_std=sigma_b, clip_lr=eta,
                  target_quantile=gamma, num_clients=80, rate=0.1, seed=draw_seed())
    norms = rng.uniform(0.2, 2.0, 7)
    replies = []
    for nrm in norms:
        v = torch.from_numpy(rng.standard_normal(50)).double()
        replies.append(({"w": (v / v.norm() * nrm).float()}, 1))
    agg = DPAggregator(s)
    stats = AggregateStats()
    agg.aggregate(glob, replies, stats, rnd=4)
    true_norms = [float(r[0]["w"].double().norm()) for r in replies]
    xi = float(torch.randn((), generator=torch.Generator().manual_seed(derive_seed(s.seed, 4, DP_COUNT)),
                           dtype=torch.float64))
    frac = (sum((n <= clip) - 0.5 for n in true_norms) + sigma_b * xi) / 8.0 + 0.5
    assert stats.dp["unclipped_fraction"] == pytest.approx(frac, rel=1e-12)
    assert agg.clip == pytest.approx(clip * math.exp(-eta * (frac - gamma)), rel=1e-12)
    assert stats.dp["clip"] == clip
    assert agg.state_dict()["dp.clip"].item() == pytest.approx(agg.clip)
    # the update's noise takes what the count query leaves: z_u = (z^-2 - (2 sigma_b)^-2)^-1/2
    assert s.update_multiplier == pytest.approx((1.0 - (2 * sigma_b) ** -2) ** -0.5)
    assert DP_NOISE != DP_COUNT


def test_poisson_sampling_rate_and_determinism():
    seed = draw_seed()
    got = [poisson_clients(seed, r, 200, 0.15) for r in range(1, 201)]
    sizes = np.array([len(g) for g in got])
    assert abs(sizes.mean() - 30) < 6 * math.sqrt(200 * 0.15 * 0.85 / 200)
    assert got[0] == poisson_clients(seed, 1, 200, 0.15) and all(g == sorted(g) for g in got)
    assert poisson_clients(seed, 1, 200, 1.0) == list(range(200))


# ------------------------------------------------------------------ config: refusals before work
def _dp_cfg(**kw):
    base = dict(methods=["fedavg"], rounds=3, num_clients=20, fraction=0.5, checkpoint=False, lr=0.1, dp="central",
                dp_noise_multiplier=1.0, dp_delta=1e-3)
    base.update(kw)
    return small_config(**base)


@pytest.mark.parametrize("kw,key", [
    (dict(aggregator="median"), "aggregator"),
    (dict(norm_bound=5.0), "norm_bound"),
    (dict(dp="distributed"), "dp_sampling"),
    (dict(dp="distributed", dp_sampling="fixed", dp_adaptive_clip=True), "dp_adaptive_clip"),
    (dict(dp_delta=0.05), "dp_delta"),
    (dict(dp_noise_multiplier=None), "dp_noise_multiplier"),
    (dict(dp_clip=0.0), "dp_clip"),
    (dict(dp_clip=math.nan), "dp_clip"),
    (dict(dp="laplace"), "dp"),
    (dict(dp_sampling="shuffle"), "dp_sampling"),
    (dict(dp_clip_lr=0.5), "dp_clip_lr"),  # read only by adaptive clipping
    (dict(dp_target_epsilon=0.01), "dp_target_epsilon"),  # spent by round 1 at z = 1
    (dict(dp_noise_multiplier=None, dp_target_epsilon=2.0, dp_adaptive_clip=True), "dp_target_epsilon"),
    (dict(dp_adaptive_clip=True, dp_clip_count_std=0.4), "dp_noise_multiplier"),
    (dict(fraction=0.01), "fraction"),
    (dict(min_clients=3), "min_clients"),  # not read under poisson sampling
])
def test_refused_before_any_work_naming_the_key(kw, key):
    with pytest.raises(ConfigError) as e:
        validate(_dp_cfg(**kw))
    assert e.value.key == key and "\n" not in str(e.value)


def test_a_target_past_the_largest_noise_is_refused(monkeypatch):
    import fedsq_fast.federation.privacy as P

    monkeypatch.setattr(P, "MAX_NOISE_MULTIPLIER", 3.0)
    with pytest.raises(ConfigError, match="even noise multiplier 3 gives epsilon") as e:
        validate(_dp_cfg(dp_noise_multiplier=None, dp_target_epsilon=0.0123))
    assert e.value.key == "dp_target_epsilon"


def test_dp_keys_without_dp_are_refused_and_defaults_change_nothing():
    with pytest.raises(ConfigError, match="dp_clip"):
        validate(small_config(dp_clip=2.0))
    cfg = validate(small_config())
    assert cfg.dp == "none" and settings_from_config(cfg) is None


# ------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def central(bundle):
    cfg = validate(_dp_cfg(num_clients=12, fraction=0.5, rounds=2, dp_sampling="fixed", dp_delta=1e-3))
    data = prepare_data(cfg, bundle)
    return cfg, data, Federation(cfg, "fedavg", data, quiet=True).run()


def test_dp_runs_are_bit_identical_on_two_workers(bundle, central):
    """Central (fedavg) and distributed (fedsq) DP: the worker pool gives the in-process model."""
    cfg_c, data_c, ref_c = central
    cfg_d = validate(_dp_cfg(num_clients=12, fraction=0.5, rounds=2, dp="distributed", dp_sampling="fixed"))
    data_d = prepare_data(cfg_d, bundle)
    ref_d = Federation(cfg_d, "fedsq", data_d, quiet=True).run()
    pool = WorkerPoolTransport(2, threads=1)
    try:
        for cfg, data, ref, method in ((cfg_c, data_c, ref_c, "fedavg"), (cfg_d, data_d, ref_d, "fedsq")):
            got = Federation(cfg, method, data, quiet=True, transport=pool).run()
            sa, sb = ref.model.state_dict(), got.model.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), method
            for a, b in zip(ref.history[1:], got.history[1:], strict=True):
                assert a["dp_epsilon"] == b["dp_epsilon"] and a["val_acc"] == b["val_acc"]
                assert a["clients_ok"] == b["clients_ok"] == 6
    finally:
        pool.close()


def test_epsilon_is_recorded_per_round_in_json_csv_and_the_progress_line(central, tmp_path):
    cfg, data, res = central
    s = settings_from_config(cfg)
    eps = [h["dp_epsilon"] for h in res.history[1:]]
    assert eps == [s.epsilon(r) for r in (1, 2)] and eps[0] < eps[1]
    assert res.summary["dp_epsilon"] == eps[-1] and res.summary["dp_stopped"] is None
    fed = Federation(cfg.replace(rounds=1), "fedavg", data, quiet=True, out_dir=tmp_path)
    fed.run()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[1]["dp_epsilon"]) == pytest.approx(s.epsilon(1)) and rows[0]["dp_epsilon"] == ""
    line = round_line("fedavg", res.history[1], 2, 1, 1.0, 1.0)
    assert f"epsilon {eps[0]:.3g}" in line
    from fedsq_fast.experiments.report import table_report

    rows = table_report(tmp_path, echo=lambda *a: None)  # fedsq-fast report: the column and the plot
    assert rows[0]["dp_epsilon"] == pytest.approx(s.epsilon(1))
    assert f"epsilon {s.epsilon(1):.3g}" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "privacy.png").stat().st_size > 1000


def test_the_budget_stops_the_run_with_a_clear_message(bundle, caplog):
    base = _dp_cfg(rounds=6, dp_noise_multiplier=2.0)
    s = settings_from_config(validate(base))
    target = (s.epsilon(2) + s.epsilon(3)) / 2  # rounds 1-2 fit, round 3 does not
    cfg = validate(base.replace(dp_target_epsilon=target))
    with caplog.at_level(logging.WARNING, logger="fedsq_fast.federation"):
        res = Federation(cfg, "fedavg", prepare_data(cfg, bundle), quiet=True).run()
    assert [h["round"] for h in res.history] == [0, 1, 2]
    assert res.summary["dp_epsilon"] == s.epsilon(2) <= target
    msg = res.summary["dp_stopped"]
    assert "privacy budget spent" in msg and "round 3" in msg and "stopped after round 2 of 6" in msg
    assert msg in caplog.text and res.summary["complete"] and "test_acc" in res.summary


def test_no_round_is_skipped_under_dp(bundle):
    """A round with fewer replies than min_clients still releases its noised aggregate (the
    same config without DP skips them)."""
    kw = dict(rounds=3, num_clients=20, fraction=0.25, min_clients=5, failure_rate=0.6, dp_sampling="fixed")
    cfg = validate(_dp_cfg(**kw))
    res = Federation(cfg, "fedavg", prepare_data(cfg, bundle), quiet=True).run()
    assert any(h["clients_ok"] < 5 for h in res.history[1:])
    assert not any(h["round_skipped"] for h in res.history)
    assert all(h["clients_sampled"] == 5 for h in res.history[1:])
    plain = validate(small_config(**{k: v for k, v in kw.items() if k != "dp_sampling"}, methods=["fedavg"],
                                  checkpoint=False, lr=0.1))
    skipped = Federation(plain, "fedavg", prepare_data(plain, bundle), quiet=True).run()
    assert any(h["round_skipped"] for h in skipped.history)


def test_adaptive_clip_resumes_bit_for_bit(bundle, tmp_path):
    """The clip moves every round and is checkpointed: a run interrupted after round 1 and
    resumed ends with the straight run's model and clips."""
    cfg = validate(_dp_cfg(rounds=3, checkpoint=True, dp_noise_multiplier=0.8, dp_adaptive_clip=True,
                           dp_clip_count_std=2.0, dp_clip=0.05))
    data = prepare_data(cfg, bundle)
    straight = Federation(cfg, "fedavg", data, quiet=True).run()
    clips = [h["dp_clip"] for h in straight.history[1:]]
    assert len(set(clips)) == 3  # it moved
    Federation(cfg, "fedavg", data, quiet=True, out_dir=tmp_path).run(stop_after=1)
    resumed = Federation(cfg, "fedavg", data, quiet=True, out_dir=tmp_path).run(resume=True)
    assert [h["dp_clip"] for h in resumed.history[1:]] == clips
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_flowers_own_round_loop_is_refused_under_dp():
    """FedSQStrategy samples with Flower's sample_nodes, which the accountant cannot take."""
    pytest.importorskip("flwr")
    from fedsq_fast.flower.strategy import FedSQStrategy

    with pytest.raises(ValueError, match="^dp: Flower's own round loop samples nodes"):
        FedSQStrategy(validate(_dp_cfg()), "fedsq")
    FedSQStrategy(validate(small_config()), "fedsq")  # without DP: as before


# ------------------------------------------------------------------ a secure sum (SecAgg+) under distributed DP
def _secure_setup(rng):
    from fedsq_fast.federation.strategy import make_strategy

    m = int(rng.integers(3, 9))
    s = _settings(mode="distributed", sampling="fixed", num_clients=int(rng.integers(m, 3 * m)), cohort=m,
                  noise_multiplier=float(rng.uniform(0.3, 3)), clip=float(rng.uniform(0.1, 2)), seed=draw_seed())
    s = DPSettings(**{**s.__dict__, "rate": m / s.num_clients})
    strat = make_strategy("fedavg", norm_bound=None)
    strat.dp = DPAggregator(s)
    return s, strat, m


def _server_noise(s, rnd, glob, keys):
    g = torch.Generator().manual_seed(derive_seed(s.seed, rnd, DP_NOISE))
    return {k: torch.randn(glob[k].shape, generator=g, dtype=torch.float32).double() for k in keys}


@pytest.mark.parametrize("trial", range(4))
def test_secure_sum_counts_as_its_clients_updates_and_the_missing_noise_is_added_back(trial):
    """A secure sum of K of the m sampled clients (the unweighted average of their noised
    updates, which is all the server sees) folds as K updates: global + (K (avg - global) +
    the noise share of the m - K missing, z C sqrt((m - K) / m)) / m, against float64 by
    hand; whatever the reply's sample count. Counted as one reply it would differ."""
    rng = np.random.default_rng(draw_seed(2**31))
    s, strat, m = _secure_setup(rng)
    glob = _glob(rng)
    keys = ["w", "bn.running_var"]
    k_in = int(rng.integers(1, m + 1))
    upd = {k: torch.from_numpy(rng.standard_normal(glob[k].shape) * 0.01) for k in keys}
    avg = {k: (glob[k].double() + upd[k]).float() if k in upd else glob[k].clone() for k in glob}
    rnd = int(rng.integers(1, 50))
    stats = AggregateStats()
    new = strat.aggregate(glob, [(-1, avg, int(rng.integers(1, 10**6)))], stats, rnd=rnd, secure={-1: k_in})
    noise = _server_noise(s, rnd, glob, keys)
    extra = s.noise_multiplier * s.clip * math.sqrt((m - k_in) / m)
    for k in keys:
        want = glob[k].double() + (k_in * (avg[k].double() - glob[k].double()) + extra * noise[k]) / m
        if k.endswith("var"):
            want = want.clamp(min=0)
        assert torch.allclose(new[k].double(), want, rtol=0, atol=2e-6), k
        if k == "w":  # not vacuous: one reply of m would be (avg - global + its noise) / m
            one = glob[k].double() + ((avg[k].double() - glob[k].double())
                                      + s.noise_multiplier * s.clip * math.sqrt((m - 1) / m) * noise[k]) / m
            assert k_in == 1 or float((new[k].double() - one).abs().max()) > 1e-3
    assert torch.equal(new["bn.num_batches_tracked"], glob["bn.num_batches_tracked"])
    assert stats.num_clients == 1 and stats.dp["noise_std"] == pytest.approx(s.noise_multiplier * s.clip / m)


def test_rejected_secure_sum_rejects_all_its_clients_and_the_whole_noise_is_added_back():
    """A non-finite secure sum is rejected as a reply; the server then adds the noise of all m
    (nothing arrived) and every client in the sum is counted as rejected with the reason."""
    from fedsq_fast.federation.server import Federation as F
    from fedsq_fast.federation.transport import Reply, SecureSum

    rng = np.random.default_rng(draw_seed(2**31))
    s, strat, m = _secure_setup(rng)
    glob = _glob(rng)
    for bad in (float("nan"), float("inf")):
        avg = {k: v.clone() for k, v in glob.items()}
        avg["w"][3, 4] = bad
        stats = AggregateStats()
        new = strat.aggregate(glob, [(-1, avg, 100)], stats, rnd=2, secure={-1: m})
        assert [c for c, _ in stats.rejected] == [-1] and stats.num_clients == 0
        noise = _server_noise(s, 2, glob, ["w"])["w"]
        want = glob["w"].double() + s.noise_multiplier * s.clip * noise / m
        assert torch.allclose(new["w"].double(), want, rtol=0, atol=1e-6)
        clients = sorted(int(c) for c in rng.choice(50, size=m, replace=False))
        F._count_secure([Reply(-1, secure=SecureSum(clients))], stats)
        assert [c for c, _ in stats.rejected] == clients
        assert all(why.startswith("the secure sum it is part of:") for _, why in stats.rejected)


def test_secure_sum_of_several_clients_refused_under_central_dp():
    rng = np.random.default_rng(draw_seed(2**31))
    glob = _glob(rng)
    with pytest.raises(ValueError, match="standing for 3 clients under dp = 'central'"):
        DPAggregator(_settings()).aggregate(glob, [(glob, 10, 3)], AggregateStats(), rnd=1)
