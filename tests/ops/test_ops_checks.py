"""Host-side behaviour of the ops that the CUDA review (issue 18) touched, checked
on the CPU: the C == 0 epilogue, memory-overlap rules of out= and in-place
calls, exact integer and bool averaging against a Python-integer oracle, any
number of clients in one list call, and the gate's backward (nothing but the
gradient is allocated). CUDA twins of these live in test_ops_cuda.py."""
import random
from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fedsq_fast as ff
from fedsq_fast import reference as ref
from fedsq_fast.ops import _fallback
from fedsq_fast.ops._registry import OPS  # torch.ops.fedsq_fast, or the reference when not compiled

COMPILED = ff.backend() == "compiled"
compiled_only = pytest.mark.skipif(not COMPILED, reason="compiled library not loaded")


# ---------------------------------------------------------------------------
# struct_epilogue with no channels / no elements (was a remainder by zero)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 0, 3, 4), (3, 0), (0, 5, 2, 2), (0,)])
def test_epilogue_without_elements(dtype, shape):
    z = torch.empty(shape, dtype=dtype)
    C = shape[1] if len(shape) >= 2 else None
    for sc, sh in ((None, None), (torch.ones(C), torch.zeros(C)) if C is not None else (None, None)):
        h, bits = ff.struct_epilogue(z, sc, sh)
        assert h.shape == z.shape and h.dtype == dtype and bits.numel() == 0
        h2, bits2 = ff.struct_epilogue(z.clone(), sc, sh, inplace=True)
        assert h2.shape == z.shape and bits2.numel() == 0
    if len(shape) == 4:
        cl = z.contiguous(memory_format=torch.channels_last)
        h, bits = OPS.struct_epilogue(cl, None, None)
        assert h.shape == z.shape and bits.numel() == 0


@pytest.mark.parametrize("C", [1, 3, 31, 32, 33, 100])
def test_epilogue_channel_tables_wrap(C):
    """Channel tables are built on the host now: every C, both layouts, vs the reference."""
    g = torch.Generator().manual_seed(C)
    z = torch.randn(3, C, 5, 7, generator=g)
    sc, sh = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    for zz in (z, z.contiguous(memory_format=torch.channels_last), z[:, :, 0, 0].contiguous()):
        h, bits = ff.struct_epilogue(zz, sc, sh)
        h_ref, bits_ref = ref.struct_epilogue(zz, sc, sh)
        assert torch.equal(bits, bits_ref) and torch.equal(h, h_ref)
        h, bits = ff.struct_epilogue(zz, None, sh)  # scale None: 1, shift only
        h_ref, bits_ref = ref.struct_epilogue(zz, None, sh)
        assert torch.equal(bits, bits_ref) and torch.equal(h, h_ref)


# ---------------------------------------------------------------------------
# Memory overlap: an output may be exactly its input, nothing else.
def _eager(zq, zs):
    return zq * (zs > 0).to(zq.dtype)


def test_in_place_outputs_equal_their_input():
    g = torch.Generator().manual_seed(1)
    z_q, z_s = torch.randn(4099, generator=g), torch.randn(4099, generator=g)
    want = _eager(z_q, z_s)
    q = z_q.clone()
    assert ff.apply_mask(q, ff.pack_mask(z_s), out=q) is q
    assert torch.equal(q, want)
    q = z_q.clone()
    bits = torch.empty_like(ff.pack_mask(z_s))
    y, b = ff.gate(q, z_s, out=(q, bits))
    assert y is q and torch.equal(q, want) and torch.equal(b, ff.pack_mask(z_s))
    s = z_s.clone()  # the output may also be z_s itself
    ff.gate(z_q, s, out=(s, bits))
    assert torch.equal(s, want)


def test_partial_overlap_is_refused():
    base = torch.randn(4200)
    z_q, z_s = base[:4096], torch.randn(4096)
    bits = ff.pack_mask(z_s)
    with pytest.raises(ValueError, match="out overlaps z_q"):
        ff.apply_mask(z_q, bits, out=base[4:4100])  # shifted by 4 elements
    with pytest.raises(ValueError, match=r"out\[0\] overlaps z_s"):
        ff.gate(torch.randn(4096), base[100:4196], out=(base[101:4197], bits))
    raw = torch.empty(4096 * 4 + 512, dtype=torch.uint8)
    zf = raw[:4096 * 4].view(torch.float32)
    zf.copy_(z_q)
    with pytest.raises(ValueError, match=r"out\[1\] overlaps z_q"):
        ff.gate(zf, z_s, out=(torch.empty(4096), raw[:512]))
    if COMPILED:  # the raw ops check too (they are public through torch.ops)
        with pytest.raises(ValueError, match="overlaps"):
            torch.ops.fedsq_fast.apply_mask_out(z_q, bits, base[4:4100])
        with pytest.raises(ValueError, match="overlaps"):
            torch.ops.fedsq_fast.gate_out(zf, z_s, torch.empty(4096), raw[:512])


@compiled_only
def test_list_op_overlap_rules():
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(1000, generator=g) for _ in range(3))
    w = [0.25, 0.75]
    # out is client 0's tensor itself: allowed, same bits as into a fresh buffer
    fresh = torch.empty(1000)
    torch.ops.fedsq_fast.weighted_sum_out([a, b], w, fresh)
    a2 = a.clone()
    torch.ops.fedsq_fast.weighted_sum_out([a2, b], w, a2)
    assert torch.equal(a2, fresh)
    # an output that is another position's input races in one launch
    with pytest.raises(ValueError, match="overlaps"):
        torch.ops.fedsq_fast.weighted_sum_list_out([a, b, c, a], w, [b.clone().zero_(), a])
    big = torch.randn(3000)
    with pytest.raises(ValueError, match="outputs must not overlap"):
        torch.ops.fedsq_fast.weighted_sum_list_out([a, a, b, b], w, [big[:1000], big[500:1500]])
    with pytest.raises(ValueError, match="overlaps"):
        torch.ops.fedsq_fast.weighted_sum_out([big[1:1001], b], w, big[:1000])
    # accumulate into x itself: acc = acc + w * acc, computed per element
    acc = torch.randn(777, generator=g)
    got = acc.clone()
    torch.ops.fedsq_fast.accumulate_(got, got, 0.5)
    oracle = (acc.double() * 0.5 + acc.double()).float()  # exact in float64, then one rounding: the fma
    assert torch.equal(got, oracle)
    with pytest.raises(ValueError, match="overlaps"):
        torch.ops.fedsq_fast.accumulate_(big[:1000], big[10:1010], 0.5)


# ---------------------------------------------------------------------------
# Exact integer and bool averaging: Python-integer oracle (the README's rule).
def _spec_weights(ws):
    """The README's rule, from exact rationals: the weights themselves when all are
    integers, else round_half_even(w * 2**30); a list the grid cannot hold (sum 0 or
    >= 2**63) first scaled so that its largest weight lies in [1/2, 1)."""
    fr = [Fraction(w) for w in ws]
    if all(f.denominator == 1 for f in fr) and 0 < sum(fr) < 2**63:
        return [int(f) for f in fr]
    qs = [round(f * 2**30) for f in fr]  # round() of a Fraction: half to even
    if 0 < sum(qs) < 2**63:
        return qs
    top = max(fr)
    scale = Fraction(1)
    while top * scale >= 1:
        scale /= 2
    while top * scale < Fraction(1, 2):
        scale *= 2
    return [round(f * scale * 2**30) for f in fr]


def _round_half_even(fr: Fraction) -> int:
    fl = fr.numerator // fr.denominator
    rem = fr - fl
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1):
        fl += 1
    return fl


def _oracle(tensors, ws):
    qs = _spec_weights(ws)
    cols = [[int(v) for v in t.reshape(-1).tolist()] for t in tensors]
    n = tensors[0].numel()
    return [_round_half_even(Fraction(sum(q * c[i] for q, c in zip(qs, cols)), sum(qs))) for i in range(n)]


INT_RANGES = {
    torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-2**15, 2**15 - 1),
    torch.int32: (-2**31, 2**31 - 1), torch.int64: (-2**63, 2**63 - 1), torch.bool: (0, 1),
}


def _rand_int(n, dtype, rng):
    lo, hi = INT_RANGES[dtype]
    vals = [rng.choice([lo, hi, 0, 1, -1 if lo < 0 else 2, rng.randint(lo, hi)]) for _ in range(n)]
    return torch.tensor(vals, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", list(INT_RANGES))
@pytest.mark.parametrize("k", [1, 2, 3, 33])
def test_integer_average_matches_python_integers(dtype, k):
    rng = random.Random(k * 31 + len(str(dtype)))
    sizes = [0, 1, 37, 4097]
    clients = [[_rand_int(n, dtype, rng) for n in sizes] for _ in range(k)]
    for ws in ([rng.randint(0, 50) for _ in range(k)], [rng.random() * 3 for _ in range(k)]):
        if sum(ws) == 0:
            ws[0] = 1
        got = ff.weighted_average(clients, ws)
        for j, n in enumerate(sizes):
            assert got[j].dtype == dtype and got[j].shape == (n,)
            assert [int(v) for v in got[j].tolist()] == _oracle([c[j] for c in clients], ws), (dtype, k, n, ws)


def test_bool_average_is_weighted_majority_ties_false():
    t, f = torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])
    assert ff.weighted_average([t, f], [1, 1]).tolist() == [True, False, False, False]  # 0.5 -> False
    assert ff.weighted_average([t, f], [2, 1]).tolist() == [True, True, False, False]
    assert ff.weighted_average([t, f], [1, 2]).tolist() == [True, False, True, False]
    assert ff.weighted_average([t, f, f], [1, 1, 1]).tolist() == [True, False, True, False]
    # a bool buffer inside a state dict beside floats and ints
    states = [{"w": torch.full((3,), float(i)), "flag": torch.tensor([i % 2 == 0] * 3),
               "n": torch.tensor(i, dtype=torch.int64)} for i in range(3)]
    avg = ff.weighted_average(states, [1, 1, 1])
    assert avg["flag"].dtype == torch.bool and avg["flag"].tolist() == [True] * 3
    assert avg["n"].item() == 1 and torch.equal(avg["w"], torch.full((3,), 1.0))


def test_integer_average_beyond_int64_intermediates():
    """sum_k q_k x_k exceeds int64 (a float or int64 path would be wrong or refuse)."""
    big = 2**63 - 1
    a = torch.tensor([big, -big - 1, big, 5], dtype=torch.int64)
    b = torch.tensor([big - 1, -big, -big, 6], dtype=torch.int64)
    for ws in ([3, 5], [1000, 1], [0.3, 0.7]):
        got = ff.weighted_average([a, b], ws)
        assert got.tolist() == _oracle([a, b], ws), ws
        ref_out = torch.empty_like(a)
        _fallback.int_weighted_sum_list_out([a, b], _spec_weights(ws), [ref_out])  # the fallback agrees
        assert ref_out.tolist() == got.tolist()


# The two averaging entry points: one rule, the same integers (StreamingAverage refuses,
# naming the tensor, what would wrap its int64 accumulator; weighted_average never does).
EDGE_INTS = [-2**63, 2**63 - 1, 2**62, -2**62, -2**63 + 1, 0, 1, -1]


def _stream_refuses(cols_by_client, ws):
    """Does the documented bound refuse some add()? Step k refuses when
    max(acc_(k-1)) + max(x_k) q_k reaches 2**63 or min(acc_(k-1)) + min(x_k) q_k falls
    below -2**63 (int64's range; q_k >= 0), with every q on the grid in force at step k (the
    integers themselves until the first non-integer weight). -2**63 alone fits."""
    for k in range(len(ws)):
        qs = _spec_weights_stream(ws[: k + 1])
        acc = [sum(q * c[i] for q, c in zip(qs[:k], cols_by_client[:k])) for i in range(len(cols_by_client[0]))]
        x = cols_by_client[k]
        if qs[k] and x and (max(acc) + max(x) * qs[k] >= 2**63 or min(acc) + min(x) * qs[k] < -2**63):
            return True
    return False


def _spec_weights_stream(ws):
    fr = [Fraction(w) for w in ws]
    if all(f.denominator == 1 for f in fr):
        return [int(f) for f in fr]
    return [round(f * 2**30) for f in fr]


@pytest.mark.parametrize("case", range(12))
def test_weighted_average_and_streaming_average_give_the_same_integers(seed, case):
    rng = random.Random(seed * 100 + case)
    k = rng.choice([1, 2, 3, 5, 8])
    dtypes = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
    sizes = [rng.choice([1, 3, 7, 37, 129]) for _ in dtypes]
    small = case % 2 == 0  # even cases: values no accumulation can wrap; odd: int64 edge values
    clients = []
    for _ in range(k):
        state = {}
        for dt, n in zip(dtypes, sizes):
            lo, hi = INT_RANGES[dt]
            if dt == torch.int64:
                lo, hi = (-2**40, 2**40) if small else (lo, hi)
            vals = [rng.randint(lo, hi) for _ in range(n)]
            if dt == torch.int64 and not small:
                for i in rng.sample(range(n), min(n, 3)):
                    vals[i] = rng.choice(EDGE_INTS)
            state[f"t_{str(dt)[6:]}"] = torch.tensor(vals, dtype=torch.int64).to(dt)
        clients.append(state)
    if case % 3 == 0:
        ws = [rng.randint(0, 9) for _ in range(k)]  # sample counts, zeros allowed
    elif case % 3 == 1:
        ws = [rng.choice([0.0, rng.random() * 4, float(rng.randint(1, 5))]) for _ in range(k)]
    else:
        ws = [0.0] * k  # a single client counts: edge values pass through unchanged
        ws[rng.randrange(k)] = 1.0
    if sum(ws) == 0:
        ws[0] = 1
    got = ff.weighted_average(clients, ws)
    for key in clients[0]:
        want = _oracle([c[key] for c in clients], ws)
        assert [int(v) for v in got[key].tolist()] == want, (key, ws)
    cols = {key: [[int(v) for v in c[key].tolist()] for c in clients] for key in clients[0]}
    refuses = any(_stream_refuses(cols[key], ws) for key in clients[0] if key != "t_bool")
    sa = ff.StreamingAverage()
    if refuses:
        with pytest.raises(ValueError, match=r"client #\d+\['t_int64'\]: integer values up to .* overflow the int64"):
            for c, w in zip(clients, ws):
                sa.add(c, w)
        return
    for c, w in zip(clients, ws):
        sa.add(c, w)
    streamed = sa.result()
    for key in clients[0]:
        assert streamed[key].dtype == got[key].dtype and torch.equal(streamed[key], got[key]), (key, ws)


def test_grid_switch_in_a_stream_is_exact_and_order_free():
    """Integer weights first, then a fraction: the earlier sums move to the grid
    exactly, so the order of the weights does not change the integers."""
    xs = [torch.tensor([7, -5, 2**30, 0]), torch.tensor([8, -6, -2**30, 1]), torch.tensor([3, 3, 3, 3])]
    ws = [3, 2, 0.25]
    want = _oracle(xs, ws)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        sa = ff.StreamingAverage()
        for i in order:
            sa.add(xs[i], ws[i])
        assert sa.result().tolist() == want, order
    assert ff.weighted_average(xs, ws).tolist() == want
    sa = ff.StreamingAverage()  # 2**40 on the 2**-30 grid: the accumulator itself would wrap
    sa.add(torch.tensor([2**40]), 1)
    with pytest.raises(ValueError, match=r"client #1\['tensor'\]: .* overflow the int64"):
        sa.add(torch.tensor([1]), 0.5)
    assert sa.result().tolist() == [2**40]  # the refused add changed nothing


def test_integer_average_errors_are_named():
    x = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"clients\[0\]\['0'\] has dtype torch.complex64"):
        ff.weighted_average([[torch.zeros(2, dtype=torch.complex64)]] * 2, [1, 1])
    if COMPILED:
        with pytest.raises(ValueError, match=r"weights\[1\] must be >= 0"):
            torch.ops.fedsq_fast.int_weighted_sum_list_out([x, x], [1, -1], [torch.empty_like(x)])
        with pytest.raises(TypeError, match=r"outs\[0\] must be int8, uint8, int16, int32, int64 or bool"):
            f = torch.zeros(2)
            torch.ops.fedsq_fast.int_weighted_sum_list_out([f, f], [1, 1], [torch.empty_like(f)])
        with pytest.raises(ValueError, match="sum to less than 2\\^63"):
            torch.ops.fedsq_fast.int_weighted_sum_list_out([x, x], [2**62, 2**62], [torch.empty_like(x)])


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [32, 33, 64, 65])
def test_any_number_of_clients_in_one_list_call(k):
    g = torch.Generator().manual_seed(k)
    sizes, dtypes = [5, 4099, 0, 130], [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    clients = [[torch.randn(n, generator=g, dtype=torch.float64).to(dt) for n, dt in zip(sizes, dtypes)]
               for _ in range(k)]
    w = (torch.rand(k, generator=g) + 0.1).tolist()
    got = ff.weighted_average(clients, w)
    for j in range(len(sizes)):
        one = torch.empty_like(clients[0][j])
        OPS.weighted_sum_out([c[j] for c in clients], [x / sum(w) for x in w], one)
        assert torch.equal(got[j], one)
        want = ref.weighted_average_tensors([c[j] for c in clients], w)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}[dtypes[j]]
        torch.testing.assert_close(got[j].double(), want, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------
class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_backward_runs_one_kernel(dtype):
    """The backward is one apply_mask: no zero-filled gradient for the bits
    output (autograd used to materialise one per call), no copies."""
    z_s = torch.randn(3, 4099).to(dtype)
    z_q = torch.randn(3, 4099).to(dtype).requires_grad_()
    y, _ = ff.gate(z_q, z_s)
    g = torch.randn(3, 4099).to(dtype)
    with _Record() as rec:
        (gq,) = torch.autograd.grad(y, z_q, g)
    assert torch.equal(gq, g * (z_s > 0).to(dtype))
    if COMPILED:
        assert [o for o in rec.ops if "detach" not in o] == ["fedsq_fast.apply_mask.default"], rec.ops
    else:  # the reference's apply_mask (unpack and multiply), still no zero-filled bits gradient
        assert not any("zero" in o or "fill" in o for o in rec.ops), rec.ops


@compiled_only
def test_large_outputs_are_ordinary_tensors():
    """Large CPU outputs come from the huge-page allocator: they must behave like
    any tensor (values, resize_, views, numpy, freed without leaks)."""
    n = (4 << 20) // 4 + 7  # just past the 4 MB threshold
    z_q, z_s = torch.randn(n), torch.randn(n)
    y, bits = ff.gate(z_q, z_s)
    assert torch.equal(y, _eager(z_q, z_s))
    assert y.untyped_storage().data_ptr() % (2 << 20) == 0  # the huge-page path was taken
    y2 = y.clone()
    y.resize_(2 * n)
    assert torch.equal(y[:n], y2)
    assert y.numpy()[: n].tolist()[:5] == y2[:5].tolist()
    h, hb = ff.struct_epilogue(z_s.view(1, -1, 1), None, None)
    h_ref, hb_ref = ref.struct_epilogue(z_s.view(1, -1, 1), None, None)
    assert torch.equal(h, h_ref) and torch.equal(hb, hb_ref)


# ---------------------------------------------------------------------------
# Input bits that are strided or start off a 32-bit word (views into a larger buffer): the
# compiled op reads them from an aligned copy, so both backends accept the same inputs (issue 16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("numel", [1, 31, 33, 64, 1000])
def test_strided_and_unaligned_input_bits_equal_the_reference(dtype, numel):
    g = torch.Generator().manual_seed(random.randrange(2**31))
    z_q = torch.randn(numel, generator=g).to(dtype)
    z_s = torch.randn(numel, generator=g)
    z_s[::7] = 0.0  # the strict z > 0 edge
    bits = ref.pack_mask(z_s)
    offset = random.randrange(1, 4)
    buf = torch.zeros(bits.numel() + offset, dtype=torch.uint8)
    buf[offset:].copy_(bits)
    unaligned = buf[offset:]
    wide = torch.zeros(2 * bits.numel(), dtype=torch.uint8)
    wide[::2].copy_(bits)
    strided = wide[::2]
    expect = ref.apply_mask(z_q, bits)
    for b in (unaligned, strided):
        assert torch.equal(ff.apply_mask(z_q, b), expect)
        assert torch.equal(OPS.apply_mask(z_q, b), expect)  # the raw op too, not only the wrapper


@compiled_only
def test_unaligned_output_bits_are_refused_naming_them():
    z = torch.randn(64)
    buf = torch.empty(ref.num_bit_bytes(64) + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be contiguous and 4-byte aligned"):
        ff.gate(z, z.clone(), out=(torch.empty_like(z), buf[1:]))


@pytest.mark.skipif(not COMPILED, reason="the kernels' own layout check")
def test_size_one_dims_may_have_any_stride():
    """A size-1 dim's stride does not change memory order (torch gives a channels_last
    [N, C, 1, 1] tensor strides (C, 1, C, C), a contiguous one (C, 1, 1, 1)): the ops take such
    pairs as one layout (a channels_last model's 1x1 convolutions against a contiguous average
    used to be refused by sq_dist), and still refuse pairs whose memory orders differ."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    a = torch.randn(8, 5, 1, 1, generator=g)
    b = torch.randn(8, 5, 1, 1, generator=g).to(memory_format=torch.channels_last)
    assert a.stride() != b.stride() and b.is_contiguous()
    want = float(((a.double() - b.double()) ** 2).sum())
    assert ff.ops.sq_dist([a], [b]) == pytest.approx(want, rel=1e-6)
    assert float(torch.ops.fedsq_fast.sq_dist_list([a], [b])) == pytest.approx(want, rel=1e-6)
    acc = torch.zeros(8, 5, 1, 1)
    torch.ops.fedsq_fast.accumulate_list_([acc], [b], 2.0)
    assert torch.equal(acc, 2.0 * b)
    y = torch.empty(8, 5, 1, 1).to(memory_format=torch.channels_last)
    torch.ops.fedsq_fast.apply_mask_out(a, ff.pack_mask(a), y)
    assert torch.equal(y, a.clamp_min(0) * (a > 0))
    z = torch.randn(4, 5, generator=g)
    with pytest.raises(ValueError, match="must have the strides of"):
        torch.ops.fedsq_fast.sq_dist_list([z], [torch.randn(5, 4, generator=g).t()])
