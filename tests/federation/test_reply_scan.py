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
