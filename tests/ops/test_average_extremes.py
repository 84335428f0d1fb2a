"""StreamingAverage at the numeric edges (issue 24, finding 1): any finite weight >= 0 and
any finite value give the average (against exact rational arithmetic), or the client is
refused before it is folded; ordinary weights (sample counts) keep the bits of the plain
float32 fold that recorded runs were made with."""
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import draw_seed

import fedsq_fast as ff
from fedsq_fast.ops._registry import OPS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

F32_MAX = float(torch.finfo(torch.float32).max)


def _stream(pairs, **kw):
    avg = ff.StreamingAverage()
    for x, w in pairs:
        avg.add(x, w, **kw)
    return avg.result()


def _exact_mean(xs, ws) -> np.ndarray:
    """sum_k w_k x_k / sum_k w_k in exact rationals, rounded once to float64."""
    tot = sum(Fraction(w) for w in ws)
    cols = [t.double().tolist() for t in xs]
    return np.array([float(sum(Fraction(w) * Fraction(c[i]) for w, c in zip(ws, cols)) / tot)
                     for i in range(len(cols[0]))])


# ------------------------------------------------------------------ the issue's probes
@pytest.mark.parametrize("pairs, want", [
    # two of ten clients at 2e38: the total passes float32's max (it was all zeros / NaN)
    ([([1.0, 2.0, 3.0], 2e38), ([3.0, 4.0, 5.0], 2e38)], [2.0, 3.0, 4.0]),
    ([([1.0, 0.0, -0.0], 3e38)] * 3, [1.0, 0.0, 0.0]),  # was [nan, 0, -0]
    ([([2.0], 2e38), ([0.0], 1)], [2.0]),  # was inf
    ([([3e38], 1), ([3e38], 1)], [3e38]),  # the accumulator passed float32's max: was inf
    ([([1e30], 1e12)], [1e30]),  # was inf
    ([([F32_MAX, -F32_MAX], 7)] * 5, [F32_MAX, -F32_MAX]),  # the largest float32, never rounded to Inf
    ([([1.0], 1e-300), ([3.0], 1e-300)], [2.0]),  # weights below float32's smallest normal (were refused)
    ([([1.0], 10**400), ([3.0], 10**400)], [2.0]),  # a Python int past float64's range
    ([([1e30, 1.0], 1e-300), ([3.0, 1e-30], 10**400)], [3.0, 1e-30]),
])
def test_the_issues_weights_give_the_average(pairs, want):
    got = _stream([(torch.tensor(x), w) for x, w in pairs])
    assert got.dtype == torch.float32
    ref = _exact_mean([torch.tensor(x) for x, _ in pairs], [w for _, w in pairs])
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=2**-21, atol=0)
    np.testing.assert_allclose(got.double().numpy(), np.float32(want), rtol=2**-21, atol=0)


def test_a_global_model_of_ten_clients_two_at_2e38():
    """The issue's run, at the op: ten clients, two claiming 2e38 samples. The average is
    theirs (the others weigh 1e-37 of it), never zeros."""
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    states = [{"w": torch.randn(50, generator=gen), "b": torch.randn(5, generator=gen)} for _ in range(10)]
    ws = [100] * 8 + [2e38, 2e38]
    got = _stream(list(zip(states, ws)))
    for k in ("w", "b"):
        ref = _exact_mean([s[k] for s in states], ws)
        big = np.abs(np.stack([s[k].double().numpy() for s in states])).max(0)
        assert np.all(np.abs(got[k].double().numpy() - ref) <= 13 * 2.0**-23 * big)
        assert torch.count_nonzero(got[k]) == got[k].numel()


def test_integer_weights_past_2_53_are_exact():
    """2**60 + 1 against 2**60: as floats both are 2**60 and the bool majority would be a tie
    (False); exact, the first client wins. Both entry points, and the float average too."""
    a, b = 2**60 + 1, 2**60
    xs = [torch.tensor([True, False]), torch.tensor([False, True])]
    assert ff.weighted_average(xs, [a, b]).tolist() == [True, False]
    assert _stream(list(zip(xs, [a, b]))).tolist() == [True, False]
    a, b = 2**58 + 1, 2**58  # 8 x 2**58 still fits int64
    ints = [torch.tensor([3, -7]), torch.tensor([4, 8])]
    want = [round(Fraction(a * 3 + b * 4, a + b)), round(Fraction(a * -7 + b * 8, a + b))]
    assert ff.weighted_average(ints, [a, b]).tolist() == want == _stream(list(zip(ints, [a, b]))).tolist()
    w = [2**53 + 1, 2**53 - 1, 3]
    fl = [torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([5.0])]
    ref = float(Fraction(w[0] - w[1] + 5 * w[2], sum(w)))
    assert abs(_stream(list(zip(fl, w))).item() - ref) <= 2**-20 * 5
    assert abs(ff.weighted_average(fl, w).item() - ref) <= 2**-20 * 5


def test_a_refused_client_leaves_the_average_as_it_was():
    """An integer fold that would wrap int64 is refused before anything changes (floating
    tensors included): the result is that of the clients before it, bit for bit."""
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    states = [{"w": torch.randn(40, generator=gen), "n": torch.tensor(5 + i)} for i in range(3)]
    avg = ff.StreamingAverage()
    avg.add(states[0], 10)
    avg.add(states[1], 30)
    with pytest.raises(ValueError, match=r"client #2: weight .* takes the integer weights' sum to .* past int64"):
        avg.add(states[2], 2**63)
    with pytest.raises(ValueError, match=r"weight must be finite and >= 0, got -1"):
        avg.add(states[2], -1)
    with pytest.raises(TypeError, match=r"weight must be a real number, got '3'"):
        avg.add(states[2], "3")
    with pytest.raises(ValueError, match=r"max_abs must be finite and >= 0, got nan"):
        avg.add(states[2], 1, max_abs=math.nan)
    assert avg.count == 2
    ref = _stream([(states[0], 10), (states[1], 30)])
    got = avg.result()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    avg.add(states[2], 2**40)  # an acceptable weight still folds afterwards
    assert avg.count == 3


def _old_fold(xs, ws):
    """The fold before the scale existed, from the kernels themselves: float32 (float64 for
    float64) accumulators, fma with the weight in client order, divided by the float64 sum
    of the weights (what recorded runs were computed with)."""
    accs = [torch.zeros(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32) for x in xs[0]]
    total = 0.0
    for x, w in zip(xs, ws):
        OPS.accumulate_list_(accs, list(x), float(w))
        total += float(w)
    return [(a / total).to(x.dtype) for a, x in zip(accs, xs[0])]


@pytest.mark.parametrize("kind", ["counts", "reals", "with_zeros"])
def test_ordinary_weights_keep_the_bits_of_recorded_runs(kind):
    rng = random.Random(draw_seed(2**31))
    for _ in range(25):
        k, n = rng.randint(1, 12), rng.choice([0, 1, 7, 300, 4099])
        xs = []
        for _ in range(k):
            scale = 10.0 ** rng.randint(-35, 25)  # values down to float32 subnormals (no old overflow)
            xs.append([torch.randn(n, dtype=torch.float64).mul(scale).float(),
                       torch.randn(9).half(), torch.randn(6).bfloat16(), torch.randn(5, dtype=torch.float64)])
        if kind == "counts":
            ws = [rng.randint(1, 10**6) for _ in range(k)]
        elif kind == "reals":
            ws = [rng.uniform(1, 1e6) for _ in range(k)]
        else:
            ws = [rng.choice([0, rng.randint(1, 10**6)]) for _ in range(k)]
            ws[0] = max(ws[0], 1)
        got = _stream(list(zip(xs, ws)))
        for g, o in zip(got, _old_fold(xs, ws)):
            assert g.dtype == o.dtype and torch.equal(g.view(-1).view(torch.uint8), o.view(-1).view(torch.uint8)), ws


def test_a_known_bound_folds_the_same_bits_as_a_read_one():
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    xs = [torch.randn(100, generator=gen) * 1e30 for _ in range(4)]
    ws = [1e12, 3e20, 1, 7e11]
    read = _stream(list(zip(xs, ws)))
    told = _stream(list(zip(xs, ws)), max_abs=max(float(x.abs().max()) for x in xs) * 4)
    ref = _exact_mean(xs, ws)
    for got in (read, told):
        assert torch.isfinite(got).all()
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=2**-19, atol=0)


# ------------------------------------------------------------------ property: any finite input
weights = st.one_of(
    st.integers(0, 10**6), st.integers(0, 2**70), st.integers(10**300, 10**320),
    st.floats(0, 1.7e308, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-45, 2e38, 3e38, 3.5e38, 1e40, 1e308, 2.0**63, 2**63, 2**64 - 1]))


@st.composite
def clients(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(0, 12))
    vals = st.one_of(st.floats(-F32_MAX, F32_MAX, allow_nan=False, width=32),
                     st.sampled_from([0.0, -0.0, F32_MAX, -F32_MAX, 1e-45, 3e38]))
    xs = [torch.tensor(draw(st.lists(vals, min_size=n, max_size=n)), dtype=torch.float32) for _ in range(k)]
    ws = draw(st.lists(weights, min_size=k, max_size=k))
    if not any(ws):
        ws[0] = 1
    return xs, ws


@settings(max_examples=80, deadline=None)
@given(clients())
def test_any_finite_weights_and_values_give_the_average(case):
    """Exact rational oracle. Float32 folding: each client's weight and each partial sum
    round once (relative 2**-24 of max |x|); a client whose weight is below 2**-149 of the
    largest folds as 0 (its share of the average is below that too); where values near
    float32's max make the scale shrink, values below 2**-270 of the largest lose bits
    (float32's subnormals), an error float32 cannot hold anyway."""
    xs, ws = case
    got = _stream(list(zip(xs, ws)))
    assert got.dtype == torch.float32 and got.shape == xs[0].shape
    if not xs[0].numel():
        return
    assert torch.isfinite(got).all(), (ws, xs, got)
    ref = _exact_mean(xs, ws)
    big = np.abs(np.stack([x.double().numpy() for x in xs])).max(0)
    bound = (len(xs) + 3) * 2.0**-23 * big + len(xs) * (2.0**-148 + 2.0**-270 * big.max())
    assert np.all(np.abs(got.double().numpy() - ref) <= bound), (ws, got, ref)
    assert np.all(np.abs(got.double().numpy()) <= F32_MAX)
