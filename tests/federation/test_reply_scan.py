"""The server's one-read reply scan (issue 28) against the separate checks it replaces
(implausible, count_problem, _sq_dist): the same verdict, reason and squared norm, bit for
bit, on ordinary and hostile replies."""
import math

import numpy as np
import pytest
import torch

from fedsq_fast.federation import strategy as S
from fedsq_fast.ops._registry import COMPILED
from tests.conftest import draw_seed


def _state(rng, scale=1.0):
    return {
        "conv.weight": torch.from_numpy(rng.standard_normal((8, 3, 3, 3))).float() * scale,
        "conv.bias": torch.from_numpy(rng.standard_normal(8)).float() * scale,
        "bn.weight": torch.from_numpy(rng.standard_normal(8)).float(),
        "bn.bias": torch.from_numpy(rng.standard_normal(8)).float(),
        "bn.running_mean": torch.from_numpy(rng.standard_normal(8)).float(),
        "bn.running_var": torch.from_numpy(rng.uniform(0.5, 2, 8)).float(),
        "bn.num_batches_tracked": torch.tensor(int(rng.integers(0, 1000))),
        "fc.weight": torch.from_numpy(rng.standard_normal((5, 8000))).half().float(),
        "fc.bias": torch.zeros(5),
    }


HOSTILE = [
    ("conv.weight", float("nan")), ("fc.weight", float("inf")), ("bn.running_var", -1.0), ("bn.running_var", 3e37),
    ("conv.bias", 1e30), ("fc.weight", -float("inf")), ("bn.running_mean", float("nan")), ("fc.weight", 3e38),
    ("bn.num_batches_tracked", 2**62), ("bn.num_batches_tracked", -5),
]


@pytest.mark.skipif(not COMPILED, reason="the fused scan runs on the compiled kernels")
@pytest.mark.parametrize("scale", [S.PLAUSIBLE_SCALE, None])
def test_fused_scan_equals_the_separate_checks(scale):
    rng = np.random.default_rng(draw_seed(2**31))
    glob = _state(rng)
    fused, separate = S.ReplyScan(glob, scale), S.ReplyScan(glob, scale)
    separate.fused = False
    assert fused.fused
    cases = [_state(rng) for _ in range(3)]
    for key, value in HOSTILE:
        upd = _state(rng)
        flat = upd[key].view(-1)
        for i in rng.integers(0, flat.numel(), 2):
            flat[int(i)] = value
        cases.append(upd)
    for upd in cases:
        for count in (int(rng.integers(1, 500)), 0, float("nan"), "12", None):
            a, b = fused.scan(upd, count), separate.scan(upd, count)
            if isinstance(b, float):
                assert isinstance(a, float) and (a == b or (math.isnan(a) and math.isnan(b))), (a, b)
            else:
                assert isinstance(a, str) and a.split(":")[0] == b.split(":")[0], (a, b)
    # without a count check (the default), a clean reply gives _sq_dist's number bit for bit
    assert fused.scan(cases[0]) == S._sq_dist(cases[0], glob)


def _aminmax_oracle(t):
    """max |t| the separate way (torch.aminmax; NaN propagates), in float64."""
    lo, hi = torch.aminmax(t.double())
    return max(-lo.item(), hi.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_max_abs_each_equals_aminmax_per_tensor(dtype):
    """One reply_stats read of a whole state gives each tensor's max |value| as aminmax does:
    NaN where a NaN is (beside finite values, beside an Inf, or alone), Inf for an Inf."""
    rng = np.random.default_rng(draw_seed(2**31))
    cases = {"plain": rng.standard_normal(1000), "nan": rng.standard_normal(777), "inf": rng.standard_normal(33),
             "ninf": rng.standard_normal(64), "nan_inf": rng.standard_normal(4099), "all_nan": np.full(5, np.nan),
             "zeros": -np.zeros(7), "one": np.array([-2.5]), "big": rng.standard_normal(70001) * 1e4}
    cases["nan"][int(rng.integers(777))] = np.nan
    cases["inf"][int(rng.integers(33))] = np.inf
    cases["ninf"][int(rng.integers(64))] = -np.inf
    cases["nan_inf"][[int(rng.integers(4099)), int(rng.integers(4099))]] = [np.nan, np.inf]
    if cases["nan_inf"][np.isnan(cases["nan_inf"])].size == 0:  # both draws hit one index
        cases["nan_inf"][0] = np.nan
    state = {k: torch.from_numpy(v).to(dtype) for k, v in cases.items()}
    state["empty"] = torch.empty(0, dtype=dtype)
    state["count"] = torch.tensor(3)
    got = S._max_abs_each(state)
    assert list(got) == [k for k in state if k not in ("empty", "count")]
    for k, m in got.items():
        want = _aminmax_oracle(state[k])
        assert (math.isnan(m) and math.isnan(want)) or m == want, (k, m, want)
    assert S.nonfinite_key(state) == "nan"
    assert S.nonfinite_key({k: state[k] for k in ("plain", "zeros", "ninf", "big")}) == "ninf"
    assert S.nonfinite_key({k: state[k] for k in ("plain", "zeros", "empty", "count")}) is None


def _screened_then_added(glob, replies, stats, scale, norm_bound, batch_size, copy_held):
    """The held path as it was before add_many (the oracle): every reply screened on its own
    (ReplyScan.scan), the cohort bound applied, then the accepted ones added one at a time."""
    avg, sq_sum = S.StreamingAverage(), 0.0
    max_abs = S._plausible_max_abs(glob, scale)
    for cid, state, n, sq in S._screened(glob, replies, stats, scale, norm_bound, batch_size,
                                         copy_held=copy_held, with_cid=True):
        try:
            avg.add(state, n, max_abs=max_abs)
        except (ValueError, TypeError) as e:
            stats.num_clients -= 1
            stats.num_samples -= int(n)
            stats.rejected.append((cid, f"the average cannot take it: {e}"))
            continue
        sq_sum += S.count_as_float(n) * sq
    if avg.count == 0:
        return None
    result = avg.result(consume=True)
    S._record_drift(stats, result, glob, sq_sum)
    return result


def _bits_equal(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(torch.empty(a[k].shape, dtype=a[k].dtype).copy_(a[k]).reshape(-1).view(torch.uint8),
                        torch.empty(b[k].shape, dtype=b[k].dtype).copy_(b[k]).reshape(-1).view(torch.uint8))
        for k in a)


def _cohort(rng, glob, kinds):
    """Replies near ``glob``: 'ok', hostile values (HOSTILE), bad counts, malformed, far
    (an update 1000x the others: the cohort bound's), reordered keys."""
    out = []
    for i, kind in enumerate(kinds):
        upd = {k: (v + 0.01 * torch.from_numpy(rng.standard_normal(tuple(v.shape))).to(v.dtype)
                   if v.dtype.is_floating_point else v + 3) for k, v in glob.items()}
        n = int(rng.integers(1, 500))
        if kind == "hostile":
            key, value = HOSTILE[int(rng.integers(len(HOSTILE)))]
            upd[key].view(-1)[int(rng.integers(upd[key].numel()))] = value
        elif kind == "count":
            n = [0, -3, float("nan"), "12", None, float("inf")][int(rng.integers(6))]
        elif kind == "malformed":
            if rng.integers(2):
                del upd["fc.bias"]
            else:
                upd["conv.bias"] = upd["conv.bias"].double()
        elif kind == "far":
            upd = {k: glob[k] + 1000 * (v - glob[k]) if v.dtype.is_floating_point and not S.is_stat_key(k) else v
                   for k, v in upd.items()}
        elif kind == "reordered":
            upd = dict(reversed(list(upd.items())))
        out.append((f"c{i}", upd, n))
    return out


@pytest.mark.parametrize("copy_held", [False, True])
def test_held_average_equals_screening_each_reply_then_adding(copy_held, monkeypatch):
    """The norm bound's path (one read per reply for its checks and a speculative fold of the
    cohort) against screening each reply and adding the accepted ones one by one: the same
    average bit for bit, the same rejections with the same reasons in the same order, the same
    counts and drift; for clean cohorts, cohorts with hostile, malformed, miscounted, far and
    reordered replies, and cohorts that are all rejected."""
    calls = []
    add_many = S.StreamingAverage.add_many
    monkeypatch.setattr(S.StreamingAverage, "add_many", lambda self, *a, **k: calls.append(1) or add_many(self, *a, **k))
    rng = np.random.default_rng(draw_seed(2**31))
    glob = _state(rng)
    pools = [["ok"] * 6, ["ok"] * 2, ["ok", "ok", "ok", "far", "ok"], ["ok", "hostile", "ok", "count", "ok"],
             ["hostile", "hostile"], ["malformed", "ok", "ok", "ok", "reordered", "ok"], ["count", "malformed"]]
    pools += [list(rng.choice(["ok", "ok", "ok", "hostile", "count", "malformed", "far", "reordered"], 7))
              for _ in range(6)]
    for kinds in pools:
        for scale in (S.PLAUSIBLE_SCALE, None):
            replies = _cohort(rng, glob, kinds)
            got_stats, want_stats = S.AggregateStats(), S.AggregateStats()
            # copies: a hostile value written into one run's reply must not reach the other's
            twin = [(c, {k: v.clone() for k, v in u.items()}, n) for c, u, n in replies]
            got = S.stream_average(glob, iter(replies), got_stats, scale, S.NORM_BOUND, 32, copy_held)
            want = _screened_then_added(glob, iter(twin), want_stats, scale, S.NORM_BOUND, 32, copy_held)
            if kinds == ["ok"] * 6:  # a clean cohort is checked and folded in the one pass
                assert calls == [1]
            calls.clear()
            assert _bits_equal(got, want), kinds
            assert got_stats.rejected == want_stats.rejected, kinds
            assert (got_stats.num_clients, got_stats.num_samples) == (want_stats.num_clients, want_stats.num_samples)
            for a, b in ((got_stats.client_drift, want_stats.client_drift),
                         (got_stats.update_norm, want_stats.update_norm)):
                assert a == b or (math.isnan(a) and math.isnan(b)), kinds


def test_held_average_with_channels_last_models():
    """A channels_last model (3x3 and 1x1 convolutions; the 1x1 ones are 'contiguous' with other
    strides): the held path equals screening each reply then adding, and the drift is computed
    (the average is contiguous, the global model not: sq_dist used to refuse the 1x1 pair)."""
    rng = np.random.default_rng(draw_seed(2**31))

    def cl(state):
        return {k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in state.items()}

    flat = _state(rng)
    flat["down.weight"] = torch.from_numpy(rng.standard_normal((8, 3, 1, 1))).float()
    glob = cl(flat)
    for kinds in (["ok"] * 5, ["ok", "hostile", "far", "ok", "ok", "count"]):
        # built contiguous (a hostile value is written through a flat view), then converted
        replies = [(c, cl(u), n) for c, u, n in _cohort(rng, flat, kinds)]
        twin = [(c, {k: v.clone() for k, v in u.items()}, n) for c, u, n in replies]
        a, b = S.AggregateStats(), S.AggregateStats()
        got = S.stream_average(glob, iter(replies), a, S.PLAUSIBLE_SCALE, S.NORM_BOUND, 32, False)
        want = _screened_then_added(glob, iter(twin), b, S.PLAUSIBLE_SCALE, S.NORM_BOUND, 32, False)
        assert _bits_equal(got, want) and a.rejected == b.rejected, kinds
        assert a.client_drift == b.client_drift and math.isfinite(a.update_norm), kinds
