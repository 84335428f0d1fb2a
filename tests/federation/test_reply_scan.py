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
