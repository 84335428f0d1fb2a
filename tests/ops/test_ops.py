"""fedsq_fast ops against independent oracles: numpy.packbits for the bit format,
eager PyTorch for the gate semantics, float64 for averages; on every CPU kernel
variant this machine can run, and on CUDA when a GPU is present."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedsq_fast as ff
from fedsq_fast import ops, reference as ref
from fedsq_fast.ops import _fallback, _registry
from fedsq_fast.ops._registry import OPS  # torch.ops.fedsq_fast, or the reference when not compiled
from tests.ops._isa import isa  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ff.backend() == "compiled"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 8, 31, 32, 33, 63, 64, 65, 1000, 4099, 70001]
EDGES = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 5.0, -5.0]


def rand(n, dtype, seed, edges=True, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if edges and n:
        e = torch.tensor(EDGES, dtype=torch.float64)
        idx = torch.randint(0, n, (min(n, 3 * len(EDGES)),), generator=g)
        x[idx] = e[torch.arange(len(idx)) % len(EDGES)]
    x = x.to(dtype)
    return x.reshape(shape) if shape is not None else x


def eager_gate(z_q, z_s):
    return z_q * (z_s > 0).to(z_q.dtype)


def packbits_memory_order(mask):
    flat = ref.memory_order_flat(mask).numpy().astype(bool)
    return np.packbits(flat, bitorder="little")


def assert_same_values(a, b):
    """Equal values, NaN where NaN, and the same sign of zero (multiply semantics)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    an, bn = torch.isnan(a), torch.isnan(b)
    assert torch.equal(an, bn)
    assert torch.equal(a[~an], b[~bn])
    assert torch.equal(torch.signbit(a[~an]), torch.signbit(b[~bn]))


# ---------------------------------------------------------------------------
def test_backend_reports_itself():
    info = ff.backend_info()
    assert info["backend"] in ("compiled", "reference")
    if info["backend"] == "reference":
        assert info["reason"]
    else:
        assert info["reason"] is None and info["library"].endswith(".so")
        assert info["build"]["torch_version"] == torch.__version__


def _library_ops():
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fedsq_fast::")}


@pytest.mark.skipif(not COMPILED, reason="compiled library not loaded")
def test_schemas_come_from_the_library_and_every_op_has_a_fake():
    """C++ is the one place schemas are written: Python registers a fake for each op
    it defines (and a reference for each), nothing more, nothing less."""
    from torch._library.simple_registry import singleton

    defined = _library_ops() - {"cpu_isa", "cpu_cache"}  # kernel switches, not tensor ops
    assert defined == set(_registry.FAKES) == set(_fallback.RAW) == set(ops.SCHEMAS)
    for name in defined:
        assert ops.SCHEMAS[name] == str(getattr(torch.ops.fedsq_fast, name).default._schema).split("::", 1)[1]
        assert singleton.find(f"fedsq_fast::{name}").fake_impl.kernel is not None, name
    assert ops.SCHEMAS["sq_dist_list"].endswith("-> Tensor")  # traceable: a float return is not


@pytest.mark.skipif(not COMPILED, reason="compiled library not loaded")
def test_cpu_isa_selection_and_errors():
    assert torch.ops.fedsq_fast.cpu_isa("") in ("scalar", "avx2", "avx512")
    with pytest.raises(RuntimeError, match="isa must be"):
        torch.ops.fedsq_fast.cpu_isa("sse9")


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_pack_mask_matches_numpy_packbits(isa, dtype, n):
    z = rand(n, dtype, seed=n)
    bits = ff.pack_mask(z)
    assert bits.dtype == torch.uint8 and bits.numel() == 4 * math.ceil(n / 32)
    want = np.packbits((z > 0).numpy(), bitorder="little")
    np.testing.assert_array_equal(bits.numpy()[: len(want)], want)
    assert not bits.numpy()[len(want):].any(), "padding must be zero"
    if n % 8:
        assert bits[n // 8].item() >> (n % 8) == 0, "bits past n must be zero"


def test_pack_mask_edge_values_are_a_real_compare(isa):
    z = torch.tensor(EDGES, dtype=torch.float32)
    mask = [bool((ff.pack_mask(z)[i // 8].item() >> (i % 8)) & 1) for i in range(len(EDGES))]
    assert mask == [v > 0 for v in EDGES]  # +0, -0, NaN, -inf -> 0


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_gate_and_apply_match_eager(isa, dtype, n):
    z_q, z_s = rand(n, dtype, seed=2 * n + 1), rand(n, dtype, seed=2 * n + 2)
    y, bits = ff.gate(z_q, z_s)
    assert_same_values(y, eager_gate(z_q, z_s))
    assert torch.equal(bits, ff.pack_mask(z_s))
    assert_same_values(ff.apply_mask(z_q, bits), eager_gate(z_q, z_s))


def test_gate_out_variants_write_in_place(isa):
    z_q, z_s = rand(5000, torch.float32, 1), rand(5000, torch.float32, 2)
    y = torch.full_like(z_q, 7.0)
    bits = torch.full((ref.num_bit_bytes(5000),), 255, dtype=torch.uint8)
    r = ff.gate(z_q, z_s, out=(y, bits))
    assert r[0] is y and r[1] is bits
    assert_same_values(y, eager_gate(z_q, z_s))
    assert torch.equal(bits, ff.pack_mask(z_s))
    y2 = torch.empty_like(z_q)
    assert ff.apply_mask(z_q, bits, out=y2) is y2
    assert_same_values(y2, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_bits_follow_memory_order(isa, dtype):
    shape = (3, 5, 7, 9)
    z_q, z_s = rand(945, dtype, 3, shape=shape), rand(945, dtype, 4, shape=shape)
    pairs = [
        (z_q.contiguous(memory_format=torch.channels_last), z_s.contiguous(memory_format=torch.channels_last)),
        (z_q.permute(2, 0, 3, 1), z_s.permute(2, 0, 3, 1)),  # dense, permuted
        (z_q[:, ::2], z_s[:, ::2]),  # not dense: taken in row-major order
    ]
    for zq, zs in pairs:
        y, bits = ff.gate(zq, zs)
        assert_same_values(y, eager_gate(zq, zs))
        target = zq if ref.is_dense(zq) else zq.contiguous()
        assert y.stride() == target.stride()
        want = packbits_memory_order(ref._like(zs > 0, target))
        np.testing.assert_array_equal(bits.numpy()[: len(want)], want)
        assert_same_values(ff.apply_mask(zq, bits), y)
    # z_s in another layout than z_q: brought to z_q's layout, bits follow z_q.
    zq = z_q.contiguous(memory_format=torch.channels_last)
    y, bits = ff.gate(zq, z_s.contiguous())
    assert_same_values(y, eager_gate(zq, z_s))
    np.testing.assert_array_equal(bits.numpy()[:119], packbits_memory_order(ref._like(z_s > 0, zq)))


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc", "odd"])
@pytest.mark.parametrize("affine", ["both", "scale", "shift", "none"])
def test_struct_epilogue_matches_reference(isa, dtype, layout, affine):
    shape = {"nchw": (2, 6, 5, 7), "nhwc": (2, 6, 5, 7), "nc": (37, 70), "odd": (3, 33, 1, 3)}[layout]
    n = math.prod(shape)
    z = rand(n, dtype, seed=n, shape=shape)
    if layout == "nhwc":
        z = z.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(7)
    scale = torch.rand(shape[1], generator=g) + 0.5 if affine in ("both", "scale") else None
    shift = torch.randn(shape[1], generator=g) if affine in ("both", "shift") else None
    h, bits = ff.struct_epilogue(z, scale, shift)
    h_ref, bits_ref = ref.struct_epilogue(z, scale, shift)
    assert torch.equal(bits, bits_ref)
    assert_same_values(h.masked_fill(h == 0, 0.0), h_ref.masked_fill(h_ref == 0, 0.0))  # relu's zero sign is free
    # independent float64 check of the definition (away from rounding ties)
    t = z.double() * (scale.double()[None, :, None, None] if scale is not None and z.dim() == 4 else
                      scale.double()[None, :] if scale is not None else 1.0)
    if shift is not None:
        t = t + (shift.double()[None, :, None, None] if z.dim() == 4 else shift.double()[None, :])
    ok = (t.abs() > 1e-3) | torch.isnan(t)
    unpacked = ref.unpack_bits(bits, h)
    assert torch.equal(unpacked[ok], (t > 0)[ok])
    # in place: relu(t) overwrites z, same bits
    zc = z.clone()
    h2, bits2 = ff.struct_epilogue(zc, scale, shift, inplace=True)
    assert h2 is zc and torch.equal(bits2, bits)
    assert_same_values(zc.masked_fill(zc == 0, 0.0), h.masked_fill(h == 0, 0.0))


# ---------------------------------------------------------------------------
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("k", [1, 2, 5, 33])
@pytest.mark.parametrize("n", [0, 1, 31, 1023, 1025, 20011])
def test_weighted_average_matches_float64(isa, dtype, k, n):
    g = torch.Generator().manual_seed(k * 1000 + n)
    clients = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g) * 100 + 1).round().tolist()  # sample counts
    got = ff.weighted_average(clients, weights)
    want = ref.weighted_average_tensors(clients, weights)
    assert got.dtype == dtype and got.shape == (n,)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


def test_list_ops_equal_per_tensor_ops(isa):
    """The fused list ops (one dispatch for a whole state) give exactly what the
    per-tensor ops give, across tile boundaries, empty tensors and mixed dtypes."""
    g = torch.Generator().manual_seed(3)
    sizes = [0, 1, 4095, 4096, 4097, 10000, 3, 70001]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float32, torch.bfloat16,
              torch.float32]
    k = 5
    clients = [[torch.randn(n, generator=g, dtype=torch.float64).to(dt) for n, dt in zip(sizes, dtypes)]
               for _ in range(k)]
    w = [0.1, 0.3, 0.2, 0.25, 0.15]
    outs = [torch.empty_like(t) for t in clients[0]]
    client_major = [clients[kk][j] for kk in range(k) for j in range(len(sizes))]
    OPS.weighted_sum_list_out(client_major, w, outs)
    for j in range(len(sizes)):
        one = torch.empty_like(clients[0][j])
        OPS.weighted_sum_out([c[j] for c in clients], w, one)
        assert torch.equal(outs[j], one), (sizes[j], dtypes[j])
    accs = [torch.zeros(n, dtype=torch.float64 if dt == torch.float64 else torch.float32) for n, dt in zip(sizes, dtypes)]
    OPS.accumulate_list_(accs, clients[1], 0.7)
    for j in range(len(sizes)):
        one = torch.zeros_like(accs[j])
        OPS.accumulate_(one, clients[1][j], 0.7)
        assert torch.equal(accs[j], one)


def test_weighted_average_is_deterministic_across_threads(isa):
    clients = [torch.randn(300_001) for _ in range(6)]
    w = [3, 1, 4, 1, 5, 9]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ff.weighted_average(clients, w)
        torch.set_num_threads(2)
        two = ff.weighted_average(clients, w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_weighted_average_structures_and_out():
    g = torch.Generator().manual_seed(0)
    states = [
        {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).half(),
         "n": torch.tensor(10 * i + 3), "cl": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)}
        for i in range(3)
    ]
    weights = [10, 20, 30]
    avg = ff.weighted_average(states, weights)
    assert list(avg) == ["w", "b", "n", "cl"]
    for key in ("w", "b", "cl"):
        want = ref.weighted_average_tensors([s[key] for s in states], weights)
        torch.testing.assert_close(avg[key].double(), want, atol=1e-3, rtol=1e-3)
    assert avg["n"].dtype == torch.int64 and avg["n"].item() == round((3 * 10 + 13 * 20 + 23 * 30) / 60)
    assert avg["cl"].stride() == states[0]["cl"].stride()
    lists = ff.weighted_average([list(s.values()) for s in states], weights)
    assert all(torch.equal(a, b) for a, b in zip(lists, avg.values()))
    out = {k: torch.empty_like(v) for k, v in states[0].items()}
    res = ff.weighted_average(states, weights, out=out)
    assert res["w"] is out["w"] and torch.equal(out["w"], avg["w"])


def test_integer_tensors_are_averaged_exactly():
    big = 2**60 + 1  # not representable in float64: a float path would lose it
    a = torch.tensor([big, 7, -5, 0], dtype=torch.int64)
    b = torch.tensor([big, 8, -6, 1], dtype=torch.int64)
    got = ff.weighted_average([a, b], [3, 3])
    assert got.tolist() == [big, 8, -6, 0]  # ties round half to even: 7.5->8, -5.5->-6, 0.5->0
    got = ff.weighted_average([a, b], [1, 3])
    assert got.tolist() == [big, 8, -6, 1]  # 7.75->8, -5.75->-6, 0.75->1
    s = ff.StreamingAverage()
    s.add(a, 1)
    s.add(b, 3)
    assert s.result().tolist() == [big, 8, -6, 1]
    u8 = ff.weighted_average([torch.tensor([0, 255], dtype=torch.uint8), torch.tensor([255, 255], dtype=torch.uint8)], [1, 1])
    assert u8.dtype == torch.uint8 and u8.tolist() == [128, 255]


@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_average_equals_one_pass(isa, dtype):
    g = torch.Generator().manual_seed(5)
    clients = [[torch.randn(1001, generator=g).to(dtype), torch.randn(3, 3, generator=g).to(dtype)] for _ in range(7)]
    weights = [5, 0, 2.5, 1, 8, 3, 1]
    s = ff.StreamingAverage()
    for c, w in zip(clients, weights):
        s.add(c, w)
    got = s.result()
    for j in range(2):
        want = ref.weighted_average_tensors([c[j] for c in clients], weights)
        torch.testing.assert_close(got[j].double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    # The accumulator is one float32 model, whatever the number of clients.
    assert sum(a.numel() * a.element_size() for a in s._acc) == (1001 + 9) * 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_average_consume_reuses_the_accumulator(dtype):
    g = torch.Generator().manual_seed(6)
    clients = [{"w": torch.randn(517, generator=g).to(dtype), "n": torch.tensor(3 + i)} for i in range(4)]
    weights = [2, 1.5, 7, 1]
    keep, spend = ff.StreamingAverage(), ff.StreamingAverage()
    for c, w in zip(clients, weights):
        keep.add(c, w)
        spend.add(c, w)
    want = keep.result()
    accs = [a.data_ptr() for a in spend._acc]
    got = spend.result(consume=True)
    for k in want:  # the same arithmetic, so the same bits
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # float32/float64 results are the accumulators themselves; others are converted
    assert (got["w"].data_ptr() in accs) == (dtype in (torch.float32, torch.float64))
    with pytest.raises(RuntimeError, match="consumed"):
        spend.add(clients[0], 1)
    with pytest.raises(RuntimeError, match="consumed"):
        spend.result()
    with pytest.raises(ValueError, match="out and consume"):
        keep.result(out={k: torch.empty_like(v) for k, v in want.items()}, consume=True)


# ---------------------------------------------------------------------------
def test_gate_backward_matches_eager(isa):
    for dtype in DTYPES:
        z_s = rand(4099, dtype, 11)
        z_q = rand(4099, dtype, 12, edges=False).requires_grad_()
        g = rand(4099, dtype, 13, edges=False)
        y, _ = ff.gate(z_q, z_s)
        (gq,) = torch.autograd.grad(y, z_q, g)
        z_q2 = z_q.detach().clone().requires_grad_()
        (ge,) = torch.autograd.grad(eager_gate(z_q2, z_s), z_q2, g)
        assert_same_values(gq, ge)
        y2 = ff.apply_mask(z_q, ff.pack_mask(z_s))
        (ga,) = torch.autograd.grad(y2, z_q, g)
        assert_same_values(ga, ge)


def test_gate_backward_with_grad_in_another_layout(isa):
    z_q = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    z_s = torch.randn(2, 3, 4, 5)
    y, _ = ff.gate(z_q, z_s)
    g = torch.randn(2, 3, 4, 5)  # contiguous grad for a channels_last output
    (gq,) = torch.autograd.grad(y, z_q, g)
    torch.testing.assert_close(gq, g * (z_s > 0), rtol=0, atol=0)


def test_gradcheck_float64(isa):
    z_s = torch.randn(3, 37, dtype=torch.float64)
    z_s[z_s.abs() < 0.1] = 0.5  # the mask is piecewise constant: keep away from 0
    z_q = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: ff.gate(q, z_s)[0], (z_q,))
    bits = ff.pack_mask(z_s)
    assert torch.autograd.gradcheck(lambda q: ff.apply_mask(q, bits), (z_q,))
    assert torch.autograd.gradgradcheck(lambda q: ff.apply_mask(q, bits), (z_q,))


def test_gate_saves_one_bit_per_element():
    n = 64 * 1000 + 3
    z_q = torch.randn(n, requires_grad=True)
    z_s = torch.randn(n)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = ff.gate(z_q, z_s)
    assert len(saved) == 1
    assert saved[0].dtype == torch.uint8
    assert saved[0].numel() * saved[0].element_size() == 4 * math.ceil(n / 32)  # 1 bit/elem + word padding
    y.sum().backward()
    assert torch.equal(z_q.grad, (z_s > 0).float())


@pytest.mark.skipif(not COMPILED, reason="compiled library not loaded (no torch.ops.fedsq_fast)")
def test_opcheck_every_op():
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch)
    on every op the library defines, the differentiable ones with inputs that need grad."""
    zq, zs = torch.randn(3, 41), torch.randn(3, 41)
    zq_g = torch.randn(3, 41, requires_grad=True)
    bits = ff.pack_mask(zs)
    z4 = torch.randn(2, 3, 4, 5)
    xi, xb = torch.tensor([1, -2, 3, 7]), torch.tensor([True, False, True])
    cases = [
        ("pack_mask", (zs,)),
        ("apply_mask", (zq_g, bits)),
        ("apply_mask_out", (zq, bits, torch.empty_like(zq))),
        ("gate", (zq_g, zs)),
        ("gate_out", (zq, zs, torch.empty_like(zq), torch.empty_like(bits))),
        ("soft_gate_apply", (zq_g, zs, "sigmoid")),
        ("soft_gate_apply_out", (zq, zs, "phi", torch.empty_like(zq))),
        ("struct_epilogue", (z4, torch.rand(3), torch.randn(3))),
        ("struct_epilogue", (z4, None, None)),
        ("struct_epilogue_", (z4.clone(), torch.rand(3), None, torch.empty(ref.num_bit_bytes(120), dtype=torch.uint8))),
        ("weighted_sum_out", ([zq, zs], [0.25, 0.75], torch.empty_like(zq))),
        ("accumulate_", (torch.zeros(3, 41), zq, 0.5)),
        ("weighted_sum_list_out", ([zq, z4, zs, z4 * 2], [0.25, 0.75], [torch.empty_like(zq), torch.empty_like(z4)])),
        ("int_weighted_sum_list_out", ([xi, xb, xi * 2, xb], [1, 3], [torch.empty_like(xi), torch.empty_like(xb)])),
        ("accumulate_list_", ([torch.zeros(3, 41), torch.zeros(2, 3, 4, 5)], [zq, z4], 0.5)),
        ("sq_dist_list", ([zq, z4.half()], [zs, torch.randn(2, 3, 4, 5).half()])),
        ("sq_dist_list", ([zq_g, torch.randn(7, dtype=torch.float64, requires_grad=True)],
                          [zs.requires_grad_(), torch.randn(7, dtype=torch.float64)])),
        ("reply_stats_list", ([zq, z4.bfloat16()], [zs, torch.randn(2, 3, 4, 5).bfloat16()], [1, 0])),
        ("fold_stats_list_", ([torch.empty(3, 41), torch.empty(2, 3, 4, 5)], [zq, z4.half(), zs, z4.half() * 2],
                              [0.25, 0.75], True, [zs, torch.randn(2, 3, 4, 5).half()], [1, 0])),
        ("fold_stats_list_", ([torch.randn(3, 41)], [zq, zs, zq], [0.5, 1.0, 2.0], False, [], [])),
    ]
    assert {name for name, _ in cases} == set(ops.SCHEMAS)  # every op, none forgotten
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.fedsq_fast, name).default, args)


def test_sq_dist_list_is_differentiable_and_traceable():
    xs = [torch.randn(5, 7, dtype=torch.float64, requires_grad=True), torch.randn(33, dtype=torch.float64)]
    refs = [torch.randn(5, 7, dtype=torch.float64), torch.randn(33, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: OPS.sq_dist_list([a, xs[1]], [refs[0], b]), (xs[0], refs[1]))
    total = OPS.sq_dist_list(xs, refs)
    assert total.dtype == torch.float64 and total.shape == ()
    want = sum(((x - r) ** 2).sum() for x, r in zip(xs, refs))  # float64 oracle
    torch.testing.assert_close(total, want, rtol=1e-12, atol=0)
    f = torch.compile(lambda a, b: OPS.sq_dist_list([a], [b]) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(xs[0], refs[0]), 2 * ((xs[0] - refs[0]) ** 2).sum())


def test_torch_compile_fullgraph():
    """The public wrappers trace into one graph with either backend (compiled: the
    ops and their fakes; reference: plain torch ops and autograd.Functions)."""
    def f(z_q, z_s, w):
        y, bits = ff.gate(z_q * w, z_s)
        h, hbits = ff.struct_epilogue(z_s)
        return (ff.apply_mask(y + h, hbits) * w).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    z_q, z_s = torch.randn(5, 67), torch.randn(5, 67)
    w1 = torch.tensor(1.5, requires_grad=True)
    w2 = torch.tensor(1.5, requires_grad=True)
    a, b = f(z_q, z_s, w1), compiled(z_q, z_s, w2)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(w1.grad, w2.grad)


# ---------------------------------------------------------------------------
def test_bad_input_is_named():
    z = torch.randn(10)
    with pytest.raises(ValueError, match="z_s must have the shape of z_q"):
        ff.gate(z, torch.randn(11))
    with pytest.raises(TypeError, match="z_s must have the dtype of z_q"):
        ff.gate(z, torch.randn(10).half())
    with pytest.raises(TypeError, match="z_q must be float32"):
        ff.gate(torch.arange(10), z)
    with pytest.raises(TypeError, match="z_s must be a torch.Tensor"):
        ff.pack_mask([1.0, 2.0])
    with pytest.raises(TypeError, match="bits must be a uint8"):
        ff.apply_mask(z, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="bits must be a 1-D uint8 tensor of 4 bytes"):
        ff.apply_mask(z, torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out\\[0\\] must have the memory layout"):
        zz = torch.randn(2, 3, 4, 5)
        ff.gate(zz, zz, out=(torch.empty_like(zz).to(memory_format=torch.channels_last), ff.pack_mask(zz)))
    with pytest.raises(ValueError, match="out= is not differentiable"):
        ff.apply_mask(z.clone().requires_grad_(), ff.pack_mask(z), out=torch.empty(10))
    with pytest.raises(ValueError, match="scale must be 1-D with one value per channel \\(3\\)"):
        ff.struct_epilogue(torch.randn(2, 3, 4), torch.ones(4))
    with pytest.raises(ValueError, match="clients must hold at least one client"):
        ff.weighted_average([], [])
    with pytest.raises(ValueError, match="weights must have one entry per client \\(2\\), got 3"):
        ff.weighted_average([z, z], [1, 2, 3])
    with pytest.raises(ValueError, match="weights\\[1\\] must be finite and >= 0"):
        ff.weighted_average([z, z], [1, -2])
    with pytest.raises(ValueError, match="weights\\[0\\] must be finite"):
        ff.weighted_average([z, z], [float("nan"), 1])
    with pytest.raises(ValueError, match="must not all be zero"):
        ff.weighted_average([z, z], [0, 0])
    with pytest.raises(ValueError, match=r"clients\[2\]\['fc.bias'\] must have the shape of clients\[0\]\['fc.bias'\] \(3,\), got \(4,\)"):
        good = {"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}
        ff.weighted_average([good, good, {"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(4)}], [1, 1, 1])
    with pytest.raises(TypeError, match=r"clients\[1\]\['0'\] must have the dtype of clients\[0\]\['0'\] \(torch.float32\), got torch.float16"):
        ff.weighted_average([[z], [z.half()]], [1, 1])
    with pytest.raises(ValueError, match="weight must be finite"):
        ff.StreamingAverage().add(z, float("inf"))
    with pytest.raises(ValueError, match="no client was added"):
        ff.StreamingAverage().result()


# ---------------------------------------------------------------------------
def _run_python(code, env_extra, cwd=None, pythonpath=None):
    env = dict(os.environ, **env_extra)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


PROBE = (
    "import warnings, torch\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    import fedsq_fast as ff\n"
    "    ff.gate(torch.randn(40), torch.randn(40))\n"
    "print(ff.backend()); print(ff.backend_info()['reason']); print(sum('reference ops' in str(x.message) for x in w))\n"
    "z_q, z_s = torch.randn(100), torch.randn(100)\n"
    "y, b = ff.gate(z_q, z_s); assert torch.equal(y, z_q * (z_s > 0))\n"
)


def test_reference_backend_forced_by_switch():
    r = _run_python(PROBE, {"FEDSQ_FAST_BACKEND": "reference"})
    assert r.returncode == 0, r.stderr
    backend, reason, warned = r.stdout.split("\n")[:3]
    assert backend == "reference" and "FEDSQ_FAST_BACKEND=reference" in reason and warned == "0"


def test_missing_or_stale_library_falls_back_with_reason(tmp_path):
    pkg = tmp_path / "fedsq_fast"
    shutil.copytree(ROOT / "fedsq_fast", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "_build_info.json"))
    r = _run_python(PROBE, {"FEDSQ_FAST_BACKEND": "auto"}, cwd=tmp_path, pythonpath=str(tmp_path))
    assert r.returncode == 0, r.stderr
    backend, reason, warned = r.stdout.split("\n")[:3]
    assert backend == "reference" and "no compiled library" in reason and warned == "1"
    if COMPILED:  # a library recorded as built for another torch is not even loaded
        for so in (ROOT / "fedsq_fast").glob("_C*.so"):
            shutil.copy(so, pkg / so.name)
        (pkg / "_build_info.json").write_text(json.dumps({"torch_version": "1.0.0"}))
        r = _run_python(PROBE, {"FEDSQ_FAST_BACKEND": "auto"}, cwd=tmp_path, pythonpath=str(tmp_path))
        assert r.returncode == 0, r.stderr
        backend, reason, _ = r.stdout.split("\n")[:3]
        assert backend == "reference" and "built against torch 1.0.0" in reason
        r = _run_python(PROBE, {"FEDSQ_FAST_BACKEND": "compiled"}, cwd=tmp_path, pythonpath=str(tmp_path))
        assert r.returncode != 0 and "FEDSQ_FAST_BACKEND=compiled" in r.stderr


SAME_RESULTS = """
import sys, torch, fedsq_fast as ff
g = torch.Generator().manual_seed(int(sys.argv[1]))
zq, zs = torch.randn(3, 5, 7, 9, generator=g), torch.randn(3, 5, 7, 9, generator=g)
zcl = zq.contiguous(memory_format=torch.channels_last)
sc, sh = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
ints = [{"n": torch.randint(-2**28, 2**28, (37,), generator=g), "b": torch.rand(5, generator=g) > 0.5,
         "u": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8), "w": torch.randn(11, generator=g)}
        for _ in range(4)]
ws = [3, 0.25, 0, 1.5]
sa = ff.StreamingAverage()
for c, w in zip(ints, ws):
    sa.add(c, w)
q = zq.clone().requires_grad_()
y, bits = ff.gate(q, zs)
(grad,) = torch.autograd.grad((y * zs).sum(), q)
out = {"names": sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fedsq_fast::")),
       "backend": ff.backend(), "gate": ff.gate(zcl, zs), "pack": ff.pack_mask(zs), "grad": grad,
       "apply": ff.apply_mask(zq, ff.pack_mask(zs)), "epi": ff.struct_epilogue(zcl, sc, sh),
       "wavg": ff.weighted_average(ints, ws), "stream": sa.result(), "sq": ff.ops.sq_dist([zq, zs], [zs, zq])}
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(not COMPILED, reason="compiled library not loaded")
def test_reference_mode_registers_nothing_and_gives_the_same_results(tmp_path, seed):
    """FEDSQ_FAST_BACKEND=reference: no op is registered (the schemas live only in the
    C++ library), the wrappers run the reference, and the results are the compiled ones:
    bit for bit for masks, gates, the epilogue and every integer; float sums to rounding."""
    got = {}
    for mode in ("compiled", "reference"):
        r = _run_python(SAME_RESULTS.replace("sys.argv[1]", str(seed)).replace("sys.argv[2]", repr(str(tmp_path / mode))),
                        {"FEDSQ_FAST_BACKEND": mode})
        assert r.returncode == 0, r.stderr[-3000:]
        got[mode] = torch.load(tmp_path / mode)
    c, r = got["compiled"], got["reference"]
    assert c["backend"] == "compiled" and r["backend"] == "reference"
    assert r["names"] == [] and "fedsq_fast::sq_dist_list" in c["names"]
    for key in ("gate", "pack", "grad", "apply", "epi"):
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (c[key], r[key]))):
            assert a.stride() == b.stride(), key
            if a.is_floating_point():
                assert_same_values(a, b)
            else:
                assert torch.equal(a, b), key
    for key in ("n", "b", "u"):  # the one exact-integer rule, both entry points, both backends
        assert torch.equal(c["wavg"][key], r["wavg"][key]) and torch.equal(c["stream"][key], r["stream"][key]), key
        assert torch.equal(c["wavg"][key], c["stream"][key]), key
    torch.testing.assert_close(c["wavg"]["w"], r["wavg"]["w"], rtol=1e-6, atol=1e-6)
    assert c["sq"] == pytest.approx(r["sq"], rel=1e-6)


# ---------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", SIZES + [(1 << 22) + 5])
def test_cuda_ops_match_cpu_reference(dtype, n):
    z_q, z_s = rand(n, dtype, 1), rand(n, dtype, 2)
    y, bits = ff.gate(z_q.cuda(), z_s.cuda())
    assert_same_values(y.cpu(), eager_gate(z_q, z_s))
    assert torch.equal(bits.cpu(), ref.pack_mask(z_s))
    assert torch.equal(ff.pack_mask(z_s.cuda()).cpu(), bits.cpu())
    assert_same_values(ff.apply_mask(z_q.cuda(), bits).cpu(), eager_gate(z_q, z_s))
    zq = z_q.cuda().requires_grad_()
    y, _ = ff.gate(zq, z_s.cuda())
    y.backward(torch.ones_like(y))
    assert torch.equal(zq.grad.cpu(), (z_s > 0).to(dtype))


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8, 40])
def test_cuda_weighted_average_and_epilogue(dtype, k):
    clients = [torch.randn(100_003).to(dtype) for _ in range(k)]
    w = list(range(1, k + 1))
    got = ff.weighted_average([c.cuda() for c in clients], w).cpu()
    torch.testing.assert_close(got.double(), ref.weighted_average_tensors(clients, w), atol=TOL[dtype] * 4, rtol=TOL[dtype])
    s = ff.StreamingAverage()
    for c, wk in zip(clients, w):
        s.add(c.cuda(), wk)
    torch.testing.assert_close(s.result().cpu().double(), got.double(), atol=TOL[dtype] * 4, rtol=TOL[dtype])
    z = torch.randn(4, 16, 9, 9).to(dtype)
    sc, sh = torch.rand(16) + 0.5, torch.randn(16)
    for zz in (z, z.to(memory_format=torch.channels_last)):
        h, bits = ff.struct_epilogue(zz.cuda(), sc.cuda(), sh.cuda())
        h_ref, bits_ref = ref.struct_epilogue(zz, sc, sh)
        assert torch.equal(bits.cpu(), bits_ref)
        assert torch.equal(h.cpu(), h_ref)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_sq_dist_matches_float64_and_flags_nonfinite(isa, dtype):
    g = torch.Generator().manual_seed(9)
    sizes = [0, 1, 7, 4096, 4097, 30011]
    xs = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
    refs = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
    want = sum(float(((x.double() - r.double()) ** 2).sum()) for x, r in zip(xs, refs))
    got = ff.ops.sq_dist(xs, refs)
    assert got == pytest.approx(want, rel=1e-5 if dtype != torch.float64 else 1e-12)
    old = torch.get_num_threads()
    try:  # tile partial sums are added in order: thread count does not matter
        torch.set_num_threads(1)
        assert ff.ops.sq_dist(xs, refs) == got
    finally:
        torch.set_num_threads(old)
    bad = [x.clone() for x in xs]
    bad[4][100] = float("nan")
    assert math.isnan(ff.ops.sq_dist(bad, refs))
    bad[4][100] = float("inf")
    assert not math.isfinite(ff.ops.sq_dist(bad, refs))
    with pytest.raises(ValueError, match="xs and refs must hold the same number"):
        ff.ops.sq_dist(xs, refs[:-1])
    with pytest.raises(ValueError, match=r"xs\[1\] must have the shape of refs\[1\]"):
        ff.ops.sq_dist(xs, [refs[0], refs[2]] + refs[2:])
