"""fold_stats_list_ and StreamingAverage.add_many (issue 28): K held replies checked and folded
in one read. The fold must be the bits of K accumulate_list_ calls (StreamingAverage.add of each
in turn), the statistics the bits of reply_stats per reply, on every ISA, for any thread count;
a float64 numpy oracle bounds the fold's error."""
import math

import numpy as np
import pytest
import torch

from fedsq_fast.ops import StreamingAverage, reply_stats
from fedsq_fast.ops import average as A
from fedsq_fast.ops._registry import COMPILED, OPS
from tests.conftest import draw_seed
from tests.ops._isa import isa  # noqa: F401 (a fixture)
from tests.ops.test_reply_stats import _hostile

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 7, 31, 4095, 4096, 4097, 9000]


def _bits(t):
    """A tensor's bytes, so -0.0 and NaN payloads compare too."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def _acc_dtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def _case(rng, hostile=True):
    L = int(rng.integers(1, 5))
    dts = [DTYPES[int(rng.integers(len(DTYPES)))] for _ in range(L)]
    sizes = [int(rng.choice(SIZES)) + int(rng.integers(0, 3)) for _ in range(L)]
    K = int(rng.integers(1, 7))
    xs = [[(_hostile(rng, n, dt) if hostile and rng.random() < 0.3 else
            torch.from_numpy(rng.standard_normal(n)).to(dt)) for n, dt in zip(sizes, dts)] for _ in range(K)]
    refs = [torch.from_numpy(rng.standard_normal(n)).to(dt) for n, dt in zip(sizes, dts)]
    ws = [float(rng.choice([0.0, 1.0, 3.0, 1e-3, 123.456, 2.0**-30])) for _ in range(K)]
    flags = [int(rng.integers(2)) for _ in range(L)]
    return xs, refs, ws, flags, sizes, dts


@pytest.mark.skipif(not COMPILED, reason="the fused fold is a compiled CPU op")
def test_fold_is_the_sequential_fold_and_the_stats_are_reply_stats(isa):
    rng = np.random.default_rng(draw_seed(2**31))
    for _ in range(10):
        xs, refs, ws, flags, sizes, dts = _case(rng)
        zero = bool(rng.integers(2))
        start = [torch.from_numpy(rng.standard_normal(n)).to(_acc_dtype(dt)) for n, dt in zip(sizes, dts)]
        got = [(torch.empty_like(s) if zero else s.clone()) for s in start]
        st = OPS.fold_stats_list_(got, [x for c in xs for x in c], ws, zero, refs, flags)
        want = [torch.zeros_like(s) if zero else s.clone() for s in start]
        for c, w in zip(xs, ws):
            OPS.accumulate_list_(want, c, w)
        for g, w in zip(got, want):
            assert torch.equal(_bits(g), _bits(w)), (isa, g.dtype, g.numel())
        assert st.shape == (len(xs), len(refs) + 1, 4)
        for k, c in enumerate(xs):
            one, total = reply_stats(c, refs, flags)
            assert torch.equal(_bits(st[k, :len(refs)]), _bits(one)), (isa, k)
            assert _bits(st[k, len(refs), 3:]).tolist() == _bits(torch.tensor([total], dtype=torch.float64)).tolist()
        # without refs: the fold alone, and an empty statistics tensor
        again = [(torch.empty_like(s) if zero else s.clone()) for s in start]
        none = OPS.fold_stats_list_(again, [x for c in xs for x in c], ws, zero, [], [])
        assert none.shape == (0, len(refs) + 1, 4)
        assert all(torch.equal(_bits(a), _bits(w)) for a, w in zip(again, want))


@pytest.mark.skipif(not COMPILED, reason="the fused fold is a compiled CPU op")
def test_fold_against_a_float64_oracle_and_any_thread_count():
    rng = np.random.default_rng(draw_seed(2**31))
    K, n = 5, 50_003
    xs = [torch.from_numpy(rng.standard_normal(n)).float() for _ in range(K)]
    ws = [float(w) for w in rng.uniform(0, 3, K)]
    ref = torch.from_numpy(rng.standard_normal(n)).float()
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, max(2, old)):
            torch.set_num_threads(threads)
            acc = torch.empty(n)
            st = OPS.fold_stats_list_([acc], xs, ws, True, [ref], [1])
            outs.append((acc, st))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    oracle = sum(np.float64(np.float32(w)) * x.double().numpy() for w, x in zip(ws, xs))
    np.testing.assert_allclose(outs[0][0].numpy(), oracle, rtol=1e-5, atol=1e-5)
    for k, x in enumerate(xs):
        d = x.double().numpy() - ref.double().numpy()
        assert outs[0][1][k, 0, 3].item() == pytest.approx(float(np.sum(d * d)), rel=1e-5)
        assert outs[0][1][k, 0, 0].item() == x.min().item() and outs[0][1][k, 0, 1].item() == x.max().item()


def test_reference_op_matches_the_compiled_one():
    """The pure-PyTorch fallback (the op when the library is absent) against the kernel."""
    from fedsq_fast.ops import _fallback

    rng = np.random.default_rng(draw_seed(2**31))
    xs, refs, ws, flags, sizes, dts = _case(rng, hostile=False)
    accs = [torch.empty(n, dtype=_acc_dtype(dt)) for n, dt in zip(sizes, dts)]
    st = _fallback.fold_stats_list_(accs, [x for c in xs for x in c], ws, True, refs, flags)
    want = [torch.zeros(n, dtype=_acc_dtype(dt)) for n, dt in zip(sizes, dts)]
    for c, w in zip(xs, ws):
        for a, x in zip(want, c):
            a += np.float32(w).item() * x.to(a.dtype) if a.dtype == torch.float32 else w * x
    for a, w in zip(accs, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    for k, c in enumerate(xs):
        one, total = reply_stats(c, refs, flags)
        torch.testing.assert_close(st[k, :len(refs)], one, rtol=1e-6, atol=1e-6)
    if COMPILED:
        got = [torch.empty_like(a) for a in accs]
        st2 = OPS.fold_stats_list_(got, [x for c in xs for x in c], ws, True, refs, flags)
        for a, g in zip(accs, got):
            torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st, st2, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not COMPILED, reason="the op's own checks")
def test_op_refusals_name_the_argument_and_write_nothing():
    a, x = torch.zeros(5), torch.randn(5)
    with pytest.raises(ValueError, match="K\\*L"):
        OPS.fold_stats_list_([a], [x, x, x], [1.0, 2.0], True, [], [])
    with pytest.raises(ValueError, match=r"ws\[1\] must be finite"):
        OPS.fold_stats_list_([a], [x, x], [1.0, math.inf], True, [], [])
    with pytest.raises(ValueError, match="refs must hold 1"):
        OPS.fold_stats_list_([a], [x], [1.0], True, [x, x], [1, 1])
    with pytest.raises(ValueError, match="in_total"):
        OPS.fold_stats_list_([a], [x], [1.0], True, [x], [])
    with pytest.raises(TypeError, match=r"accs\[0\] must be Float"):
        OPS.fold_stats_list_([torch.zeros(5, dtype=torch.float64)], [x], [1.0], True, [], [])
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        OPS.fold_stats_list_([a], [x, torch.randn(6)], [1.0, 1.0], True, [], [])
    # an accumulator that is also an input: zeroing it first would destroy the input
    acc = torch.randn(5)
    before = acc.clone()
    with pytest.raises(ValueError, match="overlaps"):
        OPS.fold_stats_list_([acc], [acc], [1.0], True, [], [])
    assert torch.equal(acc, before)


def _state(rng, n=3000, ints=True):
    s = {"w": torch.from_numpy(rng.standard_normal((n // 100, 100))).float(),
         "h": torch.from_numpy(rng.standard_normal(37)).half(),
         "d": torch.from_numpy(rng.standard_normal(4099)),
         "count": torch.tensor(int(rng.integers(0, 1000))),
         "flags": torch.from_numpy(rng.integers(0, 2, 9).astype(bool)),
         "e": torch.empty(0, 3)}
    if not ints:
        del s["count"], s["flags"]
    return s


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k


class _Spy:
    """OPS, counting the fused folds."""

    def __init__(self):
        self.fused = 0

    def __getattr__(self, name):
        if name == "fold_stats_list_":
            self.fused += 1
        return getattr(OPS, name)


# ordinary counts and weights below 1 led by the largest fold in one pass; weights that move the
# accumulator's power-of-two scale between clients (huge, tiny, growing) are folded one by one
@pytest.mark.parametrize("weights,one_pass", [([3, 1, 7, 2], True), ([0.5, 0.25, 0.125, 0.3], True),
                                              ([2**70, 3, 2**65, 1], True), ([0.25, 1e-3, 7.5, 0.0], False),
                                              ([1e300, 2e300, 1.0, 5e299], False), ([1e-300, 3e-300, 1e-310, 2e-300], False)])
def test_add_many_is_add_of_each_in_turn(weights, one_pass, monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(A, "OPS", spy)
    rng = np.random.default_rng(draw_seed(2**31))
    ints = max(weights) < 2**40 and min(w for w in weights if w) > 1e-6  # else StreamingAverage refuses ints
    glob = _state(rng, ints=ints)
    clients = [_state(rng, ints=ints) for _ in weights]
    clients[1]["w"][0, 3] = -0.0
    for prior in (False, True):
        one, many = StreamingAverage(), StreamingAverage()
        if prior:
            first = _state(rng, ints=ints)
            one.add(first, 11)
            many.add(first, 11)
        moved = False  # did a fold rescale the accumulator (a change of its power of two)?
        for c, w in zip(clients, weights):
            before = one._scale
            one.add(c, w, max_abs=1e6)
            moved |= before is not None and one._scale != before
        assert moved != one_pass or prior  # the cases are what they claim (without a prior client)
        spy.fused = 0
        stats = many.add_many(clients, weights, max_abs=1e6, stats_refs=glob, in_total=[1, 0, 1, 1])
        assert many.count == one.count and spy.fused == (0 if moved or not COMPILED else 1)
        _same(one.result(), many.result())
        floats = ["w", "h", "d", "e"]
        for c, (st, total) in zip(clients, stats):
            want, want_total = reply_stats([c[k] for k in floats], [glob[k] for k in floats], [1, 0, 1, 1])
            assert torch.equal(st, want) and total == want_total
        # and more clients after it, one at a time: the same state carried on
        extra = _state(rng, ints=ints)
        one.add(extra, 5)
        many.add(extra, 5)
        _same(one.result(consume=True), many.result(consume=True))


def test_add_many_without_the_compiled_op_and_with_own_max_abs(monkeypatch):
    rng = np.random.default_rng(draw_seed(2**31))
    clients = [_state(rng) for _ in range(3)]
    one = StreamingAverage()
    for i, c in enumerate(clients):
        one.add(c, i + 1)
    monkeypatch.setattr(A, "backend", lambda: "reference")  # one by one: the same bits
    many = StreamingAverage()
    assert many.add_many(clients, [1, 2, 3]) is None
    _same(one.result(), many.result())


def test_add_many_refuses_before_folding_and_names_the_client():
    rng = np.random.default_rng(draw_seed(2**31))
    clients = [_state(rng) for _ in range(4)]
    avg = StreamingAverage()
    avg.add(clients[0], 2)
    before = avg.result()
    bad = dict(clients[2], w=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"clients\[2\]"):
        avg.add_many([clients[1], clients[3], bad], [1, 1, 1])
    with pytest.raises(ValueError, match=r"clients\[1\]: weight must be finite"):
        avg.add_many([clients[1], clients[3]], [1, -1])
    with pytest.raises(ValueError, match=r"clients\[1\].*overflow the int64"):
        avg.add_many([clients[1], dict(clients[3], count=torch.tensor(2**62))], [1, 3])
    with pytest.raises(ValueError, match="one entry per client"):
        avg.add_many(clients, [1, 2])
    with pytest.raises(ValueError, match="in_total"):
        avg.add_many(clients, [1] * 4, stats_refs=clients[0], in_total=[1])
    with pytest.raises(ValueError, match="stats_refs must hold the clients' tensors in their order"):
        avg.add_many(clients[1:], [1] * 3, stats_refs=dict(reversed(list(clients[0].items()))))
    assert avg.count == 1
    _same(before, avg.result())  # nothing was folded by any refused call
    fresh = StreamingAverage()
    with pytest.raises(ValueError, match=r"clients\[1\]"):
        fresh.add_many([clients[1], bad], [1, 1])
    assert fresh.count == 0
    with pytest.raises(ValueError, match="no client was added"):
        fresh.result()
    assert fresh.add_many([], []) is None
    fresh.add_many(clients[:2], [1, 1])
    fresh.result(consume=True)
    with pytest.raises(RuntimeError, match="consumed"):
        fresh.add_many(clients[2:], [1, 1])
