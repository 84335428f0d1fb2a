"""The CUDA kernels against the compiled CPU kernels (bit for bit) and the
reference, skipped without a GPU. benchmarks/gpu_check.sh runs this file on a
GPU machine, once plainly and once under compute-sanitizer with
FEDSQ_CUDA_TEST_SMALL=1 (which skips the multi-gigabyte cases)."""
import math
import os
import random

import pytest
import torch

import fedsq_fast as ff
from fedsq_fast import ops, reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
SMALL = os.environ.get("FEDSQ_CUDA_TEST_SMALL", "") not in ("", "0")
big_only = pytest.mark.skipif(SMALL, reason="large sizes skipped (FEDSQ_CUDA_TEST_SMALL)")

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 3, 7, 8, 31, 32, 33, 127, 128, 129, 1000, 4099, 16383, 16384, 16385, 70001]
KS = [1, 2, 32, 33, 64, 65]
EPI_SHAPES = [(2, 6, 5, 7), (37, 70), (3, 33, 1, 3), (1, 3, 1000), (2, 129, 2, 2), (5, 1), (0, 4, 3), (2, 0, 3, 3),
              (4,), (1, 1, 1, 1)]
AFFINE = ["both", "scale", "shift", "none"]
INT_KS = [1, 3, 33]
if SMALL:  # under compute-sanitizer every launch is slow: the edges only
    SIZES = [0, 1, 33, 129, 4099, 16385]
    KS = [1, 33, 65]
    EPI_SHAPES = [(2, 6, 5, 7), (3, 33, 1, 3), (0, 4, 3), (2, 0, 3, 3)]
    AFFINE = ["both", "none"]
    INT_KS = [1, 33]
EDGES = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 5.0, -5.0, 3e38, -3e38]


def rand(n, dtype, seed, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if n:
        idx = torch.randint(0, n, (min(n, 4 * len(EDGES)),), generator=g)
        x[idx] = torch.tensor(EDGES, dtype=torch.float64)[torch.arange(len(idx)) % len(EDGES)]
    x = x.to(dtype)
    return x.reshape(shape) if shape is not None else x


def same(a, b):
    """Bit-identical: values, NaN positions and signs of zero."""
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
    if a.dtype.is_floating_point:
        ia = a.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])
        ib = b.contiguous().view(ia.dtype)
        nan = torch.isnan(a.contiguous())
        assert torch.equal(nan, torch.isnan(b.contiguous()))
        assert torch.equal(ia[~nan], ib[~nan])
    else:
        assert torch.equal(a, b)


def garbage_like(t):
    g = torch.empty_like(t)
    if g.dtype.is_floating_point:
        g.fill_(float("nan"))
    else:
        g.view(torch.uint8).fill_(0xAB)
    return g


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_elementwise_equal_cpu_bit_for_bit(dtype, n):
    z_q, z_s = rand(n, dtype, 1 + n), rand(n, dtype, 2 + n)
    y_c, b_c = ff.gate(z_q, z_s)
    y, b = ff.gate(z_q.cuda(), z_s.cuda())
    same(y, y_c)
    same(b, b_c)
    same(b, ref.pack_mask(z_s))
    same(ff.pack_mask(z_s.cuda()), b_c)
    same(ff.apply_mask(z_q.cuda(), b), ff.apply_mask(z_q, b_c))
    # out= into garbage-filled buffers
    yo, bo = garbage_like(y), garbage_like(b)
    ff.gate(z_q.cuda(), z_s.cuda(), out=(yo, bo))
    same(yo, y_c)
    same(bo, b_c)
    ao = garbage_like(y)
    ff.apply_mask(z_q.cuda(), b, out=ao)
    same(ao, y_c)
    # in place: the output is z_q itself
    q = z_q.cuda()
    ff.apply_mask(q, b, out=q)
    same(q, y_c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views_take_the_scalar_path(dtype):
    base_q, base_s = rand(5003, dtype, 3), rand(5003, dtype, 4)
    for off in (1, 2, 3, 5):  # storage offsets that break 16-byte alignment
        zq, zs = base_q[off:off + 4097], base_s[off:off + 4097]
        y, b = ff.gate(zq.cuda(), zs.cuda())  # .cuda() keeps no offset: slice on the device instead
        y2, b2 = ff.gate(base_q.cuda()[off:off + 4097], base_s.cuda()[off:off + 4097])
        yc, bc = ff.gate(zq, zs)
        same(y, yc), same(b, bc), same(y2, yc), same(b2, bc)
        h, hb = ff.struct_epilogue(base_s.cuda()[off:off + 4096].view(4, 16, 64), None, None)
        hc, hbc = ff.struct_epilogue(zs[:4096].view(4, 16, 64), None, None)
        same(h, hc), same(hb, hbc)


@pytest.mark.parametrize("dtype", FLOATS)
def test_layouts(dtype):
    shape = (3, 5, 7, 9)
    z_q, z_s = rand(945, dtype, 5, shape), rand(945, dtype, 6, shape)
    cases = [
        (z_q.contiguous(memory_format=torch.channels_last), z_s.contiguous(memory_format=torch.channels_last)),
        (z_q.permute(2, 0, 3, 1), z_s.permute(2, 0, 3, 1)),
        (z_q[:, ::2], z_s[:, ::2]),  # not dense
        (z_q.contiguous(memory_format=torch.channels_last), z_s),  # z_s in another layout
    ]
    for zq, zs in cases:
        yc, bc = ff.gate(zq, zs)
        y, b = ff.gate(zq.cuda(), zs.cuda())
        same(y, yc), same(b, bc)
        same(ff.apply_mask(zq.cuda(), b), ff.apply_mask(zq, bc))
        same(ff.pack_mask(zs.cuda()), ff.pack_mask(zs))


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", EPI_SHAPES)
@pytest.mark.parametrize("affine", AFFINE)
def test_epilogue_equal_cpu(dtype, shape, affine):
    n = math.prod(shape)
    z = rand(n, dtype, n + 7, shape)
    C = shape[1] if len(shape) >= 2 else 1
    g = torch.Generator().manual_seed(C)
    sc = torch.rand(C, generator=g) + 0.5 if affine in ("both", "scale") and len(shape) >= 2 else None
    sh = torch.randn(C, generator=g) if affine in ("both", "shift") and len(shape) >= 2 else None
    layouts = [z]
    if len(shape) == 4:
        layouts.append(z.contiguous(memory_format=torch.channels_last))
    for zz in layouts:
        hc, bc = ff.struct_epilogue(zz, sc, sh)
        h, b = ff.struct_epilogue(zz.cuda(), None if sc is None else sc.cuda(), None if sh is None else sh.cuda())
        same(h, hc), same(b, bc)
        same(b, ref.struct_epilogue(zz, sc, sh)[1])
        zi = zz.cuda().clone(memory_format=torch.preserve_format)
        h2, b2 = ff.struct_epilogue(zi, None if sc is None else sc.cuda(), None if sh is None else sh.cuda(),
                                    inplace=True)
        assert h2 is zi
        same(zi, hc), same(b2, bc)


# ---------------------------------------------------------------------------
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", KS)
def test_weighted_average_equal_cpu(dtype, k):
    g = torch.Generator().manual_seed(k)
    sizes = [0, 1, 33, 4099, 16384, 16385, 50001]
    clients = [[torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes] for _ in range(k)]
    w = (torch.rand(k, generator=g) * 100 + 1).round().tolist()
    want = ff.weighted_average(clients, w)
    got = ff.weighted_average([[t.cuda() for t in c] for c in clients], w)
    for j in range(len(sizes)):
        same(got[j], want[j])
        torch.testing.assert_close(got[j].cpu().double(), ref.weighted_average_tensors([c[j] for c in clients], w),
                                   atol=TOL[dtype] * 4, rtol=TOL[dtype])
    outs = [garbage_like(t.cuda()) for t in clients[0]]  # out= over garbage
    ff.weighted_average([[t.cuda() for t in c] for c in clients], w, out=outs)
    for j in range(len(sizes)):
        same(outs[j], want[j])


@pytest.mark.parametrize("dtype", FLOATS)
def test_weighted_average_edge_values_equal_cpu(dtype):
    """NaN, +-0, +-Inf and huge finite values (sums that overflow) give the CPU's bits."""
    clients = [[rand(n, dtype, 100 * k + n) for n in (1, 33, 4099, 16385)] for k in range(3)]
    for w in ([1, 2, 3], [0, 1, 0], [1e-30, 1, 1e30]):
        want = ff.weighted_average(clients, w)
        got = ff.weighted_average([[t.cuda() for t in c] for c in clients], w)
        for a, b in zip(got, want):
            same(a, b)
    acc_c = [torch.zeros(t.shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32) for t in clients[0]]
    acc_g = [a.cuda() for a in acc_c]
    for c in clients:
        torch.ops.fedsq_fast.accumulate_list_(acc_c, c, 0.75)
        torch.ops.fedsq_fast.accumulate_list_(acc_g, [t.cuda() for t in c], 0.75)
    for a, b in zip(acc_g, acc_c):
        same(a, b)


def test_sync_mode_reports_in_the_op():
    """FEDSQ_FAST_CUDA_SYNC=1 synchronises after each launch (a fresh process reads it once)."""
    import subprocess
    import sys

    code = ("import torch, fedsq_fast as ff\n"
            "z = torch.randn(1000, device='cuda')\n"
            "y, b = ff.gate(z, z)\n"
            "print(bool(torch.equal(y, z * (z > 0).float())), ff.weighted_average([z, z], [1, 1]).shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, FEDSQ_FAST_CUDA_SYNC="1"))
    assert r.returncode == 0 and r.stdout.startswith("True torch.Size([1000])"), r.stderr[-2000:]


def test_list_ops_mixed_dtypes_empty_and_unaligned():
    g = torch.Generator().manual_seed(3)
    sizes = [0, 1, 4095, 4096, 16385, 3, 70001, 0, 9]
    dts = [torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float32,
           torch.bfloat16, torch.float64, torch.float16]
    k = 5
    flat = [torch.randn(sum(sizes) + 3, generator=g).cuda() for _ in range(k)]  # unaligned views of one buffer
    clients = []
    for c in range(k):
        off, lst = 1, []
        for n, dt in zip(sizes, dts):
            lst.append(flat[c][off:off + n].to(dt) if dt != torch.float32 else flat[c][off:off + n])
            off += n
        clients.append(lst)
    w = [0.1, 0.3, 0.2, 0.25, 0.15]
    outs = [garbage_like(t) for t in clients[0]]
    cm = [clients[kk][j] for kk in range(k) for j in range(len(sizes))]
    torch.ops.fedsq_fast.weighted_sum_list_out(cm, w, outs)
    cpu_outs = [torch.empty_like(t.cpu()) for t in clients[0]]
    torch.ops.fedsq_fast.weighted_sum_list_out([t.cpu() for t in cm], w, cpu_outs)
    for a, b in zip(outs, cpu_outs):
        same(a, b)
    accs = [torch.randn(n, generator=g).to(torch.float64 if dt == torch.float64 else torch.float32)
            for n, dt in zip(sizes, dts)]
    acc_gpu = [a.cuda() for a in accs]
    torch.ops.fedsq_fast.accumulate_list_(acc_gpu, clients[1], 0.7)
    torch.ops.fedsq_fast.accumulate_list_(accs, [t.cpu() for t in clients[1]], 0.7)
    for a, b in zip(acc_gpu, accs):
        same(a, b)
    one = accs[6].cuda()
    torch.ops.fedsq_fast.accumulate_(one, clients[2][6], -1.25)
    torch.ops.fedsq_fast.accumulate_(accs[6], clients[2][6].cpu(), -1.25)
    same(one, accs[6])


def test_streaming_average_equal_cpu():
    g = torch.Generator().manual_seed(8)
    clients = [{"w": torch.randn(4099, generator=g).half(), "b": torch.randn(7, generator=g),
                "n": torch.tensor(3 + i), "f": torch.tensor([i % 2 == 0, True])} for i in range(6)]
    ws = [5, 0, 2.5, 1, 8, 3]
    sc, sg = ff.StreamingAverage(), ff.StreamingAverage()
    for c, w in zip(clients, ws):
        sc.add(c, w)
        sg.add({k: v.cuda() for k, v in c.items()}, w)
    a, b = sc.result(), sg.result()
    for key in a:
        same(b[key], a[key])


def test_add_many_on_cuda_equals_the_cpu_one_pass():
    """add_many on CUDA (one by one there: the fused op is CPU only) against the CPU's one pass:
    the same average bit for bit, and each reply's reply_stats from the same numbers."""
    g = torch.Generator().manual_seed(9)
    clients = [{"w": torch.randn(4099, generator=g).half(), "b": torch.randn(70001, generator=g),
                "n": torch.tensor(3 + i)} for i in range(5)]
    glob = {"w": torch.randn(4099, generator=g).half(), "b": torch.randn(70001, generator=g), "n": torch.tensor(2)}
    ws = [5, 1, 2.5, 7, 3]
    sc, sg = ff.StreamingAverage(), ff.StreamingAverage()
    st_c = sc.add_many(clients, ws, max_abs=1e6, stats_refs=glob)
    st_g = sg.add_many([{k: v.cuda() for k, v in c.items()} for c in clients], ws, max_abs=1e6,
                       stats_refs={k: v.cuda() for k, v in glob.items()})
    a, b = sc.result(), sg.result()
    for key in a:
        same(b[key], a[key])
    for (sa, ta), (sb, tb) in zip(st_c, st_g):
        assert torch.equal(sa[:, :3], sb[:, :3])  # min, max, NaN/Inf count: exact anywhere
        torch.testing.assert_close(sa[:, 3], sb[:, 3], rtol=1e-5, atol=0)  # squares: float32 lanes on the CPU
        assert tb == pytest.approx(ta, rel=1e-5)


# ---------------------------------------------------------------------------
INT_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("k", INT_KS)
def test_integer_and_bool_average_equal_cpu(dtype, k):
    rng = random.Random(k)
    info = torch.iinfo(dtype) if dtype != torch.bool else None
    lo, hi = (info.min, info.max) if info else (0, 1)
    sizes = [0, 1, 37, 16385]
    clients = [[torch.tensor([rng.choice([lo, hi, 0, rng.randint(lo, hi)]) for _ in range(n)],
                             dtype=torch.int64).to(dtype) for n in sizes] for _ in range(k)]
    for ws in ([rng.randint(0, 9) + (i == 0) for i in range(k)], [rng.random() + 0.01 for _ in range(k)]):
        want = ff.weighted_average(clients, ws)
        got = ff.weighted_average([[t.cuda() for t in c] for c in clients], ws)
        for a, b in zip(got, want):
            same(a, b)


def test_averaging_has_no_host_sync():
    k = 4
    states = [{"w": torch.randn(1000, device="cuda"), "h": torch.randn(33, device="cuda").half(),
               "n": torch.tensor(i, device="cuda"), "f": torch.tensor([True, False], device="cuda")}
              for i in range(k)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        avg = ff.weighted_average(states, [1, 2, 3, 4])
        s = ff.StreamingAverage()
        for st in states:
            s.add(st, 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert avg["n"].item() == round((0 * 1 + 1 * 2 + 2 * 3 + 3 * 4) / 10)


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
def test_sq_dist(dtype):
    g = torch.Generator().manual_seed(9)
    sizes = [0, 1, 7, 4096, 16385, 70011]
    xs = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
    rs = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
    want = sum(float(((x.double() - r.double()) ** 2).sum()) for x, r in zip(xs, rs))
    xg, rg = [x.cuda() for x in xs], [r.cuda() for r in rs]
    got = ff.ops.sq_dist(xg, rg)
    assert got == pytest.approx(want, rel=1e-5 if dtype != torch.float64 else 1e-12)
    assert ff.ops.sq_dist(xg, rg) == got  # deterministic: partial sums in chunk order
    xg[4][100] = float("nan")
    assert math.isnan(ff.ops.sq_dist(xg, rg))


# ---------------------------------------------------------------------------
def test_devices_streams_and_mixed_lists():
    z_q, z_s = rand(100_003, torch.float32, 11), rand(100_003, torch.float32, 12)
    yc, bc = ff.gate(z_q, z_s)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # the current stream is used, not the default one
        zq, zs = z_q.cuda(), z_s.cuda()
        y, b = ff.gate(zq, zs)
        xs = [torch.randn(5000, device="cuda") for _ in range(3)]
        avg = ff.weighted_average(xs, [1, 2, 3])
    s.synchronize()
    same(y, yc), same(b, bc)
    same(avg, ff.weighted_average([x.cpu() for x in xs], [1, 2, 3]))
    # one list call sees one device: a CPU tensor among CUDA ones is refused before any launch
    a, c = torch.randn(10, device="cuda"), torch.randn(10)
    with pytest.raises(ValueError, match=r"is on cpu"):
        torch.ops.fedsq_fast.weighted_sum_list_out([a, a.clone(), a, a.clone()], [0.5, 0.5],
                                                   [torch.empty_like(a), torch.empty(10)])
    with pytest.raises(ValueError, match=r"acc\[1\] is on cpu"):
        torch.ops.fedsq_fast.accumulate_list_([torch.zeros(10, device="cuda"), torch.zeros(10)], [a, c], 1.0)
    with pytest.raises(ValueError, match=r"xs\[1\] is on cpu"):
        torch.ops.fedsq_fast.sq_dist_list([a, c], [a, c])
    # a state dict split across devices is averaged per device
    states = [{"gpu": torch.randn(33, device="cuda"), "cpu": torch.randn(33), "n": torch.tensor(i)}
              for i in range(3)]
    avg = ff.weighted_average(states, [1, 1, 2])
    assert avg["gpu"].is_cuda and not avg["cpu"].is_cuda
    cpu_avg = ff.weighted_average([{k: v.cpu() for k, v in st.items()} for st in states], [1, 1, 2])
    for key in avg:
        same(avg[key], cpu_avg[key])
    assert ff.ops.sq_dist(list(states[0].values())[:2], list(states[1].values())[:2]) == pytest.approx(
        ff.ops.sq_dist([states[0]["gpu"].cpu(), states[0]["cpu"]], [states[1]["gpu"].cpu(), states[1]["cpu"]]),
        rel=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU")
def test_second_gpu():
    with torch.cuda.device(0):  # the op must switch to its tensors' device itself
        z_q, z_s = rand(70001, torch.bfloat16, 13), rand(70001, torch.bfloat16, 14)
        y, b = ff.gate(z_q.to("cuda:1"), z_s.to("cuda:1"))
        assert y.device.index == 1
        yc, bc = ff.gate(z_q, z_s)
        same(y, yc), same(b, bc)
        xs = [torch.randn(5000, device="cuda:1") for _ in range(3)]
        same(ff.weighted_average(xs, [1, 2, 3]), ff.weighted_average([x.cpu() for x in xs], [1, 2, 3]))
        with pytest.raises(ValueError, match="is on cuda:0"):  # never a launch on foreign pointers
            torch.ops.fedsq_fast.weighted_sum_list_out([xs[0], torch.randn(5000, device="cuda:0")], [1.0],
                                                       [torch.empty_like(xs[0]), torch.empty(5000, device="cuda:0")])


# ---------------------------------------------------------------------------
@big_only
def test_second_grid_stride_pass_and_int64_indexing():
    n = (1 << 28) + 33
    g = torch.Generator(device="cuda").manual_seed(0)
    z_q = torch.randn(n, device="cuda", generator=g)
    z_s = torch.randn(n, device="cuda", generator=g)
    y, b = ff.gate(z_q, z_s)
    assert torch.equal(y, z_q * (z_s > 0).float())
    assert torch.equal(ref.unpack_bits(b, z_s), z_s > 0)
    del y, b
    h, hb = ff.struct_epilogue(z_s.view(1, -1, 1), None, None)
    h_ref, hb_ref = ref.struct_epilogue(z_s.view(1, -1, 1), None, None)
    assert torch.equal(h, h_ref) and torch.equal(hb, hb_ref)


@big_only
def test_more_than_2_31_elements_f16():
    n = (1 << 31) + 77
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * 2 * n + (4 << 30):
        pytest.skip(f"needs ~{5 * 2 * n >> 30} GiB free, {free >> 30} GiB free")
    z_s = torch.empty(n, device="cuda", dtype=torch.float16).normal_()
    z_q = torch.empty(n, device="cuda", dtype=torch.float16).normal_()
    y, b = ff.gate(z_q, z_s)
    tail = slice(n - 5000, n)  # the far end, past 2^31: compared with eager
    assert torch.equal(y[tail], z_q[tail] * (z_s[tail] > 0).half())
    assert torch.equal(y[:5000], z_q[:5000] * (z_s[:5000] > 0).half())
    assert torch.equal(b, ff.pack_mask(z_s))
    words = b.view(torch.int32)
    last = (n - 1) // 32  # the last word holds the final n % 32 elements, the rest zero
    want_tail = ref.pack_mask(z_s[32 * last:].cpu())
    assert torch.equal(words[last:].cpu().view(torch.uint8), want_tail)
    del y
    out = torch.empty_like(z_q)
    ff.apply_mask(z_q, b, out=out)
    assert torch.equal(out[tail], z_q[tail] * (z_s[tail] > 0).half())


# ---------------------------------------------------------------------------
def test_opcheck_on_cuda():
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck missing")
    d = "cuda"
    zq, zs = torch.randn(3, 41, device=d), torch.randn(3, 41, device=d)
    zq_g = torch.randn(3, 41, device=d, requires_grad=True)
    bits = ff.pack_mask(zs)
    z4 = torch.randn(2, 3, 4, 5, device=d)
    xi = torch.tensor([1, 2, 3], device=d)
    cases = [
        (torch.ops.fedsq_fast.pack_mask.default, (zs,)),
        (torch.ops.fedsq_fast.apply_mask.default, (zq_g, bits)),
        (torch.ops.fedsq_fast.apply_mask_out.default, (zq, bits, torch.empty_like(zq))),
        (torch.ops.fedsq_fast.gate.default, (zq_g, zs)),
        (torch.ops.fedsq_fast.gate_out.default, (zq, zs, torch.empty_like(zq), torch.empty_like(bits))),
        (torch.ops.fedsq_fast.soft_gate_apply.default, (zq_g, zs, "phi")),
        (torch.ops.fedsq_fast.soft_gate_apply_out.default, (zq, zs, "sigmoid", torch.empty_like(zq))),
        (torch.ops.fedsq_fast.struct_epilogue.default, (z4, torch.rand(3, device=d), torch.randn(3, device=d))),
        (torch.ops.fedsq_fast.struct_epilogue.default, (z4, None, None)),
        (torch.ops.fedsq_fast.struct_epilogue_.default,
         (z4.clone(), torch.rand(3, device=d), None, torch.empty(ref.num_bit_bytes(120), dtype=torch.uint8, device=d))),
        (torch.ops.fedsq_fast.weighted_sum_out.default, ([zq, zs], [0.25, 0.75], torch.empty_like(zq))),
        (torch.ops.fedsq_fast.accumulate_.default, (torch.zeros(3, 41, device=d), zq, 0.5)),
        (torch.ops.fedsq_fast.weighted_sum_list_out.default,
         ([zq, z4, zs, z4 * 2], [0.25, 0.75], [torch.empty_like(zq), torch.empty_like(z4)])),
        (torch.ops.fedsq_fast.int_weighted_sum_list_out.default, ([xi, xi * 2], [1, 3], [torch.empty_like(xi)])),
        (torch.ops.fedsq_fast.accumulate_list_.default,
         ([torch.zeros(3, 41, device=d), torch.zeros(2, 3, 4, 5, device=d)], [zq, z4], 0.5)),
        # a 0-dim float64 tensor left on the device (no host sync); differentiable
        (torch.ops.fedsq_fast.sq_dist_list.default, ([zq, z4.half()], [zs, torch.randn(2, 3, 4, 5, device=d).half()])),
        (torch.ops.fedsq_fast.sq_dist_list.default, ([zq_g], [zs])),
    ]
    assert {op.name().split("::")[1] for op, _ in cases} == set(ops.SCHEMAS)  # every op
    for op, args in cases:
        torch.library.opcheck(op, args)
    total = torch.ops.fedsq_fast.sq_dist_list([zq], [zs])
    assert total.is_cuda and total.dtype == torch.float64 and total.shape == ()


def test_torch_compile_on_cuda():
    def f(z_q, z_s, w):
        y, bits = torch.ops.fedsq_fast.gate(z_q * w, z_s)
        h, hbits = torch.ops.fedsq_fast.struct_epilogue(z_s, None, None)
        return (torch.ops.fedsq_fast.apply_mask(y + h, hbits) * w).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    z_q, z_s = torch.randn(5, 67, device="cuda"), torch.randn(5, 67, device="cuda")
    w1 = torch.tensor(1.5, device="cuda", requires_grad=True)
    w2 = torch.tensor(1.5, device="cuda", requires_grad=True)
    a, b = f(z_q, z_s, w1), compiled(z_q, z_s, w2)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_gate_backward_on_cuda():
    z_s = rand(70001, torch.bfloat16, 21).cuda()
    z_q = rand(70001, torch.bfloat16, 22).cuda().requires_grad_()
    y, _ = ff.gate(z_q, z_s)
    g = torch.randn_like(y)
    (gq,) = torch.autograd.grad(y, z_q, g)
    same(gq, g * (z_s > 0).to(g.dtype))


# ---------------------------------------------------------------------------
# Soft gates (issue 27): the CUDA kernel computes g with CUDA's accurate float functions (the
# CPU kernels with their own vectorised approximations), so the two agree to the stated bounds,
# not bit for bit; the multiply given the gate is bit for bit (tests/ops/test_soft_gate.py).
SOFT_KINDS = ("sigmoid", "phi", "phi_tanh", "hardsigmoid", "tanh_softplus")


def _soft_oracle(z, kind):
    z = z.double()
    return {"sigmoid": lambda: 1.0 / (1.0 + torch.exp(-z)),
            "phi": lambda: 0.5 * torch.erfc(-z / math.sqrt(2.0)),
            "phi_tanh": lambda: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3))),
            "hardsigmoid": lambda: torch.clamp(z / 6.0 + 0.5, 0.0, 1.0),
            "tanh_softplus": lambda: torch.tanh(torch.log1p(torch.exp(z)))}[kind]()


@pytest.mark.parametrize("kind", SOFT_KINDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_soft_gate_against_float64_and_its_gate(dtype, kind):
    for n in SIZES:
        z_q, z_s = rand(n, dtype, 5 + n).cuda(), rand(n, dtype, 6 + n).cuda()
        y = ff.soft_gate_apply(z_q, z_s, kind)
        g = ff.soft_gate_apply(torch.ones_like(z_s), z_s, kind)
        same(y, z_q * g)  # the multiply given the gate, as eager rounds it
        want = _soft_oracle(z_s.cpu(), kind)
        got = g.cpu().double()
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        fin = ~torch.isnan(want)
        # float32 g: CUDA's expf/erfcf within 4 ulp (plus the dtype's rounding of the stored gate)
        u = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8,
             torch.float64: 2.0 ** -53}[dtype]
        rel = 1e-15 if dtype == torch.float64 else 12 * 2.0 ** -24 + u
        assert bool(((got - want).abs()[fin] <= 4e-7 * (dtype != torch.float64) + 1e-15 + rel * want.abs()[fin]
                     + float(torch.finfo(dtype).smallest_normal)).all()), (dtype, kind, n)


@pytest.mark.parametrize("kind", SOFT_KINDS)
def test_soft_gate_misaligned_views_and_layouts(kind):
    base_q, base_s = rand(5003, torch.float32, 3).cuda(), rand(5003, torch.float32, 4).cuda()
    ref_y = ff.soft_gate_apply(base_q, base_s, kind)
    for off in (1, 2, 3):  # the scalar kernel: same bits as the vector one
        same(ff.soft_gate_apply(base_q[off:off + 4097], base_s[off:off + 4097], kind), ref_y[off:off + 4097])
    zq = base_q[:4800].view(2, 6, 20, 20).contiguous(memory_format=torch.channels_last)
    zs = base_s[:4800].view(2, 6, 20, 20)
    y = ff.soft_gate_apply(zq, zs, kind)
    assert y.stride() == zq.stride()
    same(y.contiguous(), ff.soft_gate_apply(zq.contiguous(), zs, kind))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_gate_backward_on_cuda(dtype):
    z_s = rand(70001, dtype, 31).cuda()
    z_q = rand(70001, dtype, 32).cuda().requires_grad_()
    y = ff.soft_gate_apply(z_q, z_s, "phi")
    w = torch.randn_like(y)
    (gq,) = torch.autograd.grad(y, z_q, w)
    same(gq, w * ff.soft_gate_apply(torch.ones_like(z_s), z_s, "phi"))
