"""reply_stats: every check of a reply in one read (issue 28), against a numpy float64 oracle
and against the separate checks it replaces (aminmax, isfinite, sq_dist), on every ISA the
CPU has, for any thread count."""
import numpy as np
import pytest
import torch

from fedsq_fast.ops import reply_stats, sq_dist
from tests.conftest import draw_seed
from tests.ops._isa import isa  # noqa: F401 (a fixture)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _hostile(rng, n, dtype):
    """Values of every kind: ordinary, huge finite, +-0, NaN, +-Inf, subnormal-ish."""
    x = torch.from_numpy(rng.standard_normal(n)).to(dtype)
    if n:
        big = torch.finfo(dtype).max
        k = int(rng.integers(0, max(1, n // 7)))
        pos = torch.from_numpy(rng.integers(0, n, k))
        choices = torch.tensor([float("nan"), float("inf"), -float("inf"), big, -big, 0.0, -0.0,
                                torch.finfo(dtype).tiny], dtype=torch.float64)
        x[pos] = choices[torch.from_numpy(rng.integers(0, len(choices), k))].to(dtype)
    return x


def _oracle(x, r):
    a = x.double().numpy()
    fin = np.isfinite(a)
    num = ~np.isnan(a)
    lo = a[num].min() if num.any() else np.inf
    hi = a[num].max() if num.any() else -np.inf
    with np.errstate(all="ignore"):
        xa = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        ra = r.to(xa.dtype)
        d = (xa - ra).double().numpy()
        sq = float(np.sum(d * d))
    return lo, hi, int((~fin).sum()), sq


def test_against_numpy_oracle_and_separate_checks(isa):
    rng = np.random.default_rng(draw_seed(2**31))
    for _ in range(12):
        k = int(rng.integers(1, 6))
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        sizes = [int(rng.choice([0, 1, 7, 31, 33, 4095, 4097, 9000 + int(rng.integers(100))])) for _ in range(k)]
        xs = [_hostile(rng, n, dtype) for n in sizes]
        refs = [torch.from_numpy(rng.standard_normal(n)).to(dtype) for n in sizes]
        flags = [bool(rng.integers(2)) for _ in range(k)]
        stats, total = reply_stats(xs, refs, flags)
        assert stats.shape == (k, 4) and stats.dtype == torch.float64
        for j, (x, r) in enumerate(zip(xs, refs)):
            lo, hi, bad, sq = _oracle(x, r)
            assert stats[j, 0].item() == lo and stats[j, 1].item() == hi, (isa, dtype, sizes[j])
            assert stats[j, 2].item() == bad
            squares_fit = dtype == torch.float64 or sq < 1e37  # float32 lanes (as sq_dist): larger can be Inf
            if bad == 0 and np.isfinite(sq) and not squares_fit:
                assert stats[j, 3].item() == pytest.approx(sq, rel=1e-5) or stats[j, 3].item() == float("inf")
            elif bad == 0 and np.isfinite(sq):
                assert stats[j, 3].item() == pytest.approx(sq, rel=1e-5, abs=1e-30)
                # the separate checks it replaces
                if x.numel():
                    mn, mx = torch.aminmax(x)
                    assert (mn.item(), mx.item()) == (lo, hi)
            elif bad:
                assert not np.isfinite(stats[j, 3].item())
        chosen = [j for j in range(k) if flags[j]]
        want = sq_dist([xs[j] for j in chosen], [refs[j] for j in chosen]) if chosen else 0.0
        assert total == want or (np.isnan(total) and np.isnan(want))  # bit for bit, the norm bound's number


def test_same_numbers_for_any_thread_count_and_layout():
    rng = np.random.default_rng(draw_seed(2**31))
    xs = [torch.from_numpy(rng.standard_normal((37, 300))).float(), _hostile(rng, 50001, torch.float32)]
    refs = [torch.from_numpy(rng.standard_normal((37, 300))).float(), torch.randn(50001)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = reply_stats(xs, refs)
        torch.set_num_threads(max(2, old))
        two = reply_stats(xs, refs)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and one[1] == two[1] or np.isnan(one[1])
    # a transposed pair (same strides) and a pair whose strides differ: the same statistics
    t_stats, _ = reply_stats([xs[0].t()], [refs[0].t()])
    m_stats, _ = reply_stats([xs[0].t()], [refs[0].t().contiguous()])
    assert torch.equal(t_stats[0, :3], one[0][0, :3]) and torch.equal(m_stats[0, :3], one[0][0, :3])


def test_refusals_name_the_argument():
    with pytest.raises(ValueError, match="same number"):
        reply_stats([torch.zeros(3)], [])
    with pytest.raises(ValueError, match="in_total"):
        reply_stats([torch.zeros(3)], [torch.zeros(3)], [True, False])
    with pytest.raises((TypeError, ValueError), match=r"xs\[0\]"):
        reply_stats([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)])
    with pytest.raises((TypeError, ValueError), match=r"refs\[0\]"):
        reply_stats([torch.zeros(3)], [torch.zeros(4)])
    assert reply_stats([], [])[1] == 0.0
