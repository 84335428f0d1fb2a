"""Property-based tests (hypothesis) of the averaging ops against independent oracles:
float64 for floating tensors, Python integers (exact fractions, round half to even) for
integer and bool tensors. Any finite positive weights, from 1e-30 to 1e30, integers or
not; any number of clients; values from the dtype's whole range. A failure prints the
falsifying example; hypothesis replays it on the next run."""
import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402
from test_ops_checks import INT_RANGES, _oracle  # noqa: E402  (the Python-integer oracle)

import fedsq_fast as ff  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None)
weights = st.one_of(st.integers(1, 10**6),
                    st.floats(1e-30, 1e30, allow_nan=False, allow_infinity=False)
                    .filter(lambda w: w > 0))


@st.composite
def float_clients(draw):
    k = draw(st.integers(1, 7))
    n = draw(st.integers(0, 40))
    vals = st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_infinity=False, width=32)
    xs = [torch.tensor(draw(st.lists(vals, min_size=n, max_size=n)), dtype=torch.float32) for _ in range(k)]
    ws = draw(st.lists(weights, min_size=k, max_size=k))
    return xs, ws


@SETTINGS
@given(float_clients())
def test_float_average_is_the_float64_average_within_float32_rounding(case):
    xs, ws = case
    got = ff.weighted_average(xs, ws)
    assert got.dtype == torch.float32 and got.shape == xs[0].shape
    x = np.stack([t.double().numpy() for t in xs]) if xs[0].numel() else np.zeros((len(xs), 0))
    w = np.array([float(v) for v in ws]) / math.fsum(float(v) for v in ws)  # exact enough in float64
    ref = (w[:, None] * x).sum(0) if x.size else np.zeros(0)
    # float32 accumulation in client order: each step rounds once (relative 2^-24) on partial
    # sums bounded by max |x|; the weights are normalised once in float64 then rounded to float32
    bound = (len(xs) + 2) * 2.0**-23 * (np.abs(x).max(0) if x.size else 0) + 1e-45
    assert np.all(np.abs(got.double().numpy() - ref) <= bound), (ws, got, ref)


@st.composite
def int_clients(draw):
    dtype = draw(st.sampled_from(list(INT_RANGES)))
    lo, hi = INT_RANGES[dtype]
    k = draw(st.integers(1, 6))
    n = draw(st.integers(0, 12))
    vals = st.one_of(st.sampled_from([lo, hi, 0]), st.integers(lo, hi))
    xs = [torch.tensor(draw(st.lists(vals, min_size=n, max_size=n)), dtype=torch.int64).to(dtype) for _ in range(k)]
    ws = draw(st.lists(weights, min_size=k, max_size=k))
    return xs, ws


@SETTINGS
@given(int_clients())
def test_integer_and_bool_average_is_exact_in_python_integers(case):
    xs, ws = case
    got = ff.weighted_average(xs, ws)
    assert got.dtype == xs[0].dtype and [int(v) for v in got.tolist()] == _oracle(xs, ws)


@SETTINGS
@given(int_clients())
def test_streaming_integer_average_is_the_one_call_average_or_refused(case):
    """StreamingAverage accumulates integers in int64: the same integers as one
    weighted_average call; or, where the fold would wrap int64 or the weights are too small for
    its 2**-30 grid (it cannot rescale to the largest weight, which it sees last), a refusal
    saying so and how to scale them (never a wrapped or divided-by-zero value)."""
    xs, ws = case
    avg = ff.StreamingAverage()
    try:
        for x, w in zip(xs, ws):
            avg.add({"t": x}, w)
        got = avg.result()["t"]
    except ValueError as e:
        msg = str(e)
        assert "past int64" in msg and "scale" in msg or "['t']" in msg and "overflow the int64" in msg \
            or "'t'" in msg and "round to zero" in msg and "scale" in msg, msg
        return
    assert torch.equal(got, ff.weighted_average(xs, ws))
