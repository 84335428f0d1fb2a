"""Op benchmarks: fedsq_fast's kernels beside the baselines a user would
otherwise write, all in one run, reported as ratios (see benchmarks/RESULTS.md).

    pytest benchmarks/bench_ops.py --benchmark-only

Sizes: FEDSQ_BENCH_N elements for the gate (default 16 Mi), FEDSQ_BENCH_P per
client for the average (default 12 Mi, about ResNet-18: at 4 Mi a 16 MB
accumulator stays in a 32 MB L3 and flatters the multi-pass baselines), fp32.
"""
import io
import math
import os
import time
from functools import reduce

import numpy as np
import pytest
import torch

import _bench
import fedsq_fast as ff

N = int(os.environ.get("FEDSQ_BENCH_N", 16 << 20))
P = int(os.environ.get("FEDSQ_BENCH_P", 12 << 20))  # ResNet-18-sized: larger than the L3, as real states are
LAYERS = 100  # per-client tensors in the list-based variants (a model's state dict)
ROUNDS = int(os.environ.get("FEDSQ_BENCH_ROUNDS", 15))

# Targets from the kernels issue (2-core CPU): speed-up of fedsq over the baseline.
_bench.ratio("gate fwd vs eager float-mask (both allocate)", "gate-forward", "fedsq gate", "eager z_q*(z_s>0).float()", 2.0)
_bench.ratio("gate fwd out= vs copy_ (<= 1.5x copy time)", "gate-forward", "fedsq gate out=", "copy_ of z_q", 1 / 1.5)
_bench.ratio("gate fwd vs torch.where", "gate-forward", "fedsq gate", "torch.where", 1.0)
_bench.ratio("gate bwd vs eager (autograd, both allocate)", "gate-backward", "fedsq gate backward", "eager backward", 1.5)
_bench.ratio("gate bwd kernel vs eager kernel (into buffers)", "gate-backward", "fedsq apply_mask out= (kernel)", "eager grad*mask out= (kernel)", 1.5)
_bench.ratio("pack vs numpy.packbits", "pack", "fedsq pack_mask", "numpy.packbits", 1.0)
for _k in (4, 8, 16):
    _g = f"average-K{_k}"
    _bench.ratio(f"K={_k} vs Flower-style numpy (decode+mul+add)", _g, "fedsq (100 tensors/client)", "flower-style numpy+decode", 4.0 if _k == 8 else 1.0)
    _bench.ratio(f"K={_k} vs Flower-style numpy (no decode)", _g, "fedsq (100 tensors/client)", "flower-style numpy", 1.0)
    _bench.ratio(f"K={_k} vs foreach_add_ per client", _g, "fedsq (100 tensors/client)", "foreach_add_ per client", 2.0 if _k == 8 else 1.0)
    _bench.ratio(f"K={_k} vs stack + w@X", _g, "fedsq (flat)", "stack then w@X", 1.0)
    _bench.ratio(f"K={_k} vs pre-stacked w@X", _g, "fedsq (flat)", "pre-stacked w@X (gemv)", 1.0)
    _bench.ratio(f"K={_k} flat vs (K+1)-buffer copy floor (<= 1.3x)", _g, "fedsq (flat)", "copy floor (K+1)/2 x copy_", 1 / 1.3)


def _gen(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gate_inputs():
    return _gen(N, 1), _gen(N, 2)


# ---------------------------------------------------------------------------
# gate forward
def test_gate_fedsq(benchmark, gate_inputs):
    z_q, z_s = gate_inputs
    _bench.run(benchmark, "gate-forward", "fedsq gate", lambda: ff.gate(z_q, z_s), ROUNDS)


def test_gate_fedsq_out(benchmark, gate_inputs):
    z_q, z_s = gate_inputs
    y, bits = torch.empty_like(z_q), ff.pack_mask(z_s)
    _bench.run(benchmark, "gate-forward", "fedsq gate out=", lambda: ff.gate(z_q, z_s, out=(y, bits)), ROUNDS)


def test_gate_eager(benchmark, gate_inputs):
    z_q, z_s = gate_inputs
    _bench.run(benchmark, "gate-forward", "eager z_q*(z_s>0).float()", lambda: z_q * (z_s > 0).float(), ROUNDS)


def test_gate_eager_out(benchmark, gate_inputs):
    z_q, z_s = gate_inputs
    mb, mf, y = torch.empty(N, dtype=torch.bool), torch.empty(N), torch.empty(N)

    def f():
        torch.gt(z_s, 0, out=mb)
        mf.copy_(mb)
        torch.mul(z_q, mf, out=y)

    _bench.run(benchmark, "gate-forward", "eager chain into buffers", f, ROUNDS)


def test_gate_where(benchmark, gate_inputs):
    z_q, z_s = gate_inputs
    _bench.run(benchmark, "gate-forward", "torch.where", lambda: torch.where(z_s > 0, z_q, 0.0), ROUNDS)


def test_gate_copy_floor(benchmark, gate_inputs):
    z_q, _ = gate_inputs
    y = torch.empty_like(z_q)
    _bench.run(benchmark, "gate-forward", "copy_ of z_q", lambda: y.copy_(z_q), ROUNDS)


# ---------------------------------------------------------------------------
# gate backward: the gradient of z_q only (autograd.grad, no accumulation)
def test_gate_backward_fedsq(benchmark, gate_inputs):
    z_q, z_s = gate_inputs
    q = z_q.clone().requires_grad_()
    y, _ = ff.gate(q, z_s)
    g = _gen(N, 3)
    _bench.run(benchmark, "gate-backward", "fedsq gate backward",
               lambda: torch.autograd.grad(y, q, g, retain_graph=True), ROUNDS)


def test_gate_backward_eager(benchmark, gate_inputs):
    z_q, z_s = gate_inputs
    q = z_q.clone().requires_grad_()
    y = q * (z_s > 0).float()
    g = _gen(N, 3)
    _bench.run(benchmark, "gate-backward", "eager backward",
               lambda: torch.autograd.grad(y, q, g, retain_graph=True), ROUNDS)


def test_gate_backward_fedsq_out(benchmark, gate_inputs):
    """The backward's kernel alone: grad * mask from the packed bits, into a buffer."""
    z_q, z_s = gate_inputs
    bits, g, out = ff.pack_mask(z_s), _gen(N, 3), torch.empty(N)
    _bench.run(benchmark, "gate-backward", "fedsq apply_mask out= (kernel)", lambda: ff.apply_mask(g, bits, out=out), ROUNDS)


def test_gate_backward_eager_out(benchmark, gate_inputs):
    """Eager's backward kernel alone: grad * float mask, into a buffer."""
    _, z_s = gate_inputs
    mf, g, out = (z_s > 0).float(), _gen(N, 3), torch.empty(N)
    _bench.run(benchmark, "gate-backward", "eager grad*mask out= (kernel)", lambda: torch.mul(g, mf, out=out), ROUNDS)


def test_gate_backward_copy(benchmark, gate_inputs):
    z_q, _ = gate_inputs
    _bench.run(benchmark, "gate-backward", "clone of grad (alloc floor)", lambda: z_q.clone(), ROUNDS)


# ---------------------------------------------------------------------------
# pack
def test_pack_fedsq(benchmark, gate_inputs):
    _, z_s = gate_inputs
    _bench.run(benchmark, "pack", "fedsq pack_mask", lambda: ff.pack_mask(z_s), ROUNDS)


def test_pack_numpy(benchmark, gate_inputs):
    _, z_s = gate_inputs
    zn = z_s.numpy()
    _bench.run(benchmark, "pack", "numpy.packbits", lambda: np.packbits(zn > 0, bitorder="little"), ROUNDS)


# ---------------------------------------------------------------------------
# the server's checks of one reply (ResNet-18-sized, 100 tensors): one fused read (reply_stats)
# against the separate passes it replaces (aminmax per tensor for the NaN/Inf, plausibility and
# BatchNorm-domain checks, then sq_dist for the update norm), and a plain read (sum) as the floor
@pytest.fixture(scope="module")
def reply_pair():
    return _split(_gen(P, 3)), _split(_gen(P, 4))


def test_reply_checks_fused(benchmark, reply_pair):
    xs, refs = reply_pair
    _bench.run(benchmark, "reply-checks", "fedsq reply_stats (one read)", lambda: ff.ops.reply_stats(xs, refs),
               ROUNDS)


def test_reply_checks_separate(benchmark, reply_pair):
    xs, refs = reply_pair

    def separate():
        for x in xs:
            torch.aminmax(x)
        ff.ops.sq_dist(xs, refs)

    _bench.run(benchmark, "reply-checks", "aminmax per tensor + sq_dist", separate, ROUNDS)


def test_reply_checks_read_floor(benchmark, reply_pair):
    xs, refs = reply_pair
    _bench.run(benchmark, "reply-checks", "floor: torch.sum of x and ref", lambda: [(x.sum(), r.sum()) for x, r in
                                                                                   zip(xs, refs)], ROUNDS)


_bench.ratio("reply checks: fused vs separate", "reply-checks", "fedsq reply_stats (one read)",
             "aminmax per tensor + sq_dist", 1.5)


# ---------------------------------------------------------------------------
# weighted average of K clients, P fp32 elements each
@pytest.fixture(scope="module", params=[4, 8, 16], ids=lambda k: f"K{k}")
def clients(request):
    k = request.param
    flat = [_gen(P, 10 + i) for i in range(k)]
    weights = [float(100 + 17 * i) for i in range(k)]
    return k, flat, weights


def _split(t):
    return list(torch.chunk(t, LAYERS))


def test_avg_fedsq_flat(benchmark, clients):
    k, flat, w = clients
    out = torch.empty(P)
    _bench.run(benchmark, f"average-K{k}", "fedsq (flat)", lambda: ff.weighted_average(flat, w, out=out), ROUNDS)


def test_avg_fedsq_lists(benchmark, clients):
    k, flat, w = clients
    lists = [_split(c) for c in flat]
    out = [torch.empty_like(t) for t in lists[0]]
    _bench.run(benchmark, f"average-K{k}", "fedsq (100 tensors/client)",
               lambda: ff.weighted_average(lists, w, out=out), ROUNDS)


def test_avg_fedsq_streaming(benchmark, clients):
    k, flat, w = clients
    lists = [_split(c) for c in flat]

    def f():
        s = ff.StreamingAverage()
        for c, wk in zip(lists, w):
            s.add(c, wk)
        return s.result()

    _bench.run(benchmark, f"average-K{k}", "fedsq streaming (100 tensors/client)", f, ROUNDS)


# a round's held replies under the norm bound (issue 28): every check of each reply and the fold
# of all of them in one read (StreamingAverage.add_many with stats_refs: fold_stats_list_), against
# the two passes per reply it replaces (reply_stats, then StreamingAverage.add)
def test_avg_held_checks_one_read(benchmark, clients, reply_pair):
    k, flat, w = clients
    lists = [_split(c) for c in flat]
    _, refs = reply_pair

    def f():
        s = ff.StreamingAverage()
        s.add_many(lists, w, max_abs=1e7, stats_refs=refs)
        return s.result(consume=True)

    _bench.run(benchmark, f"held-K{k}", "fedsq checks + fold, one read (add_many)", f, ROUNDS)


def test_avg_held_checks_two_passes(benchmark, clients, reply_pair):
    k, flat, w = clients
    lists = [_split(c) for c in flat]
    _, refs = reply_pair

    def f():
        s = ff.StreamingAverage()
        for c in lists:
            ff.ops.reply_stats(c, refs)
        for c, wk in zip(lists, w):
            s.add(c, wk, max_abs=1e7)
        return s.result(consume=True)

    _bench.run(benchmark, f"held-K{k}", "reply_stats per reply, then add per reply", f, ROUNDS)


for _k in (4, 8, 16):
    _bench.ratio(f"K={_k} held replies: checks + fold in one read vs two passes", f"held-K{_k}",
                 "fedsq checks + fold, one read (add_many)", "reply_stats per reply, then add per reply", 1.5)


def _flower_aggregate(results):
    """Flower's FedAvg aggregate (flwr.server.strategy.aggregate.aggregate)."""
    total = sum(n for _, n in results)
    weighted = [[layer * n for layer in weights] for weights, n in results]
    return [reduce(np.add, layer_updates) / total for layer_updates in zip(*weighted)]


def _to_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_avg_flower_numpy(benchmark, clients):
    k, flat, w = clients
    nd = [[t.numpy() for t in _split(c)] for c in flat]
    _bench.run(benchmark, f"average-K{k}", "flower-style numpy",
               lambda: _flower_aggregate(list(zip(nd, w))), ROUNDS)


def test_avg_flower_numpy_decode(benchmark, clients):
    k, flat, w = clients
    blobs = [[_to_bytes(t.numpy()) for t in _split(c)] for c in flat]

    def f():  # Flower decodes every reply (parameters_to_ndarrays: np.load per layer)
        nd = [[np.load(io.BytesIO(b), allow_pickle=False) for b in c] for c in blobs]
        return _flower_aggregate(list(zip(nd, w)))

    _bench.run(benchmark, f"average-K{k}", "flower-style numpy+decode", f, ROUNDS)


def test_avg_foreach(benchmark, clients):
    k, flat, w = clients
    lists = [_split(c) for c in flat]
    total = sum(w)

    acc = [torch.empty_like(t) for t in lists[0]]  # preallocated, like fedsq's out=

    def f():
        torch._foreach_zero_(acc)
        for c, wk in zip(lists, w):
            torch._foreach_add_(acc, c, alpha=wk / total)
        return acc

    _bench.run(benchmark, f"average-K{k}", "foreach_add_ per client", f, ROUNDS)


def test_avg_stack(benchmark, clients):
    k, flat, w = clients
    wt = torch.tensor(w) / sum(w)
    _bench.run(benchmark, f"average-K{k}", "stack then w@X", lambda: wt @ torch.stack(flat), ROUNDS)


def test_avg_prestacked(benchmark, clients):
    k, flat, w = clients
    X = torch.stack(flat)
    wt = torch.tensor(w) / sum(w)
    out = torch.empty(P)
    _bench.run(benchmark, f"average-K{k}", "pre-stacked w@X (gemv)", lambda: torch.mv(X.t(), wt, out=out), ROUNDS)


def test_avg_copy_floor(benchmark, clients):
    """The op reads K*P and writes P elements: a copy_ of (K+1)/2*P elements moves
    the same bytes (large enough to stay out of the caches, like the op's)."""
    k, flat, w = clients
    m = (k + 1) * P // 2
    src, dst = _gen(m, 99), torch.empty(m)
    _bench.run(benchmark, f"average-K{k}", "copy floor (K+1)/2 x copy_", lambda: dst.copy_(src), ROUNDS)


# ---------------------------------------------------------------------------
# GPU group (skipped without CUDA): every kernel's bandwidth as a fraction of a
# copy_ of the same dtype measured in the same run. Each timed call queues
# GPU_REPS launches and synchronises once, so launch latency and the sync are
# amortised; bytes are what the kernel must move (reads + writes).
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
GN = int(os.environ.get("FEDSQ_BENCH_GPU_N", 64 << 20))  # elements: 256 MB f32, 128 MB bf16
GPU_REPS = int(os.environ.get("FEDSQ_BENCH_GPU_REPS", 20))
GPU_ROUNDS = int(os.environ.get("FEDSQ_BENCH_GPU_ROUNDS", 10))
GPU_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def _gpu_run(benchmark, variant, fn, moved_bytes=None, copy_bytes=None):
    """Time GPU_REPS calls of fn; with moved_bytes, also record the time the
    kernel would take at copy_'s byte rate and declare the fraction ratio."""
    def reps():
        for _ in range(GPU_REPS):
            fn()

    t = _bench.run(benchmark, "gpu", variant, reps, GPU_ROUNDS, sync_cuda=True)
    if moved_bytes is not None:
        _bench.RESULTS[("gpu", variant + " @copy bytes")] = t * copy_bytes / moved_bytes
        dt = variant.split()[-1]
        _bench.ratio(f"GPU {variant}: fraction of copy_ bandwidth", "gpu", variant + " @copy bytes",
                     f"copy_ {dt}", 0.85)
    return t


@pytest.fixture(scope="module", params=list(GPU_DTYPES))
def gpu_inputs(request):
    dt = GPU_DTYPES[request.param]
    g = torch.Generator(device="cuda").manual_seed(0)
    z_q = torch.randn(GN, device="cuda", generator=g).to(dt)
    z_s = torch.randn(GN, device="cuda", generator=g).to(dt)
    return request.param, z_q, z_s


@gpu
def test_gpu_copy(benchmark, gpu_inputs):
    name, z_q, _ = gpu_inputs
    y = torch.empty_like(z_q)
    _gpu_run(benchmark, f"copy_ {name}", lambda: y.copy_(z_q))


@gpu
@pytest.mark.parametrize("kernel", ["pack", "apply", "gate", "epilogue", "epilogue NHWC", "accumulate", "sq_dist",
                                    "soft sigmoid", "soft phi"])
def test_gpu_kernel_bandwidth(benchmark, gpu_inputs, kernel):
    name, z_q, z_s = gpu_inputs
    if ff.backend() != "compiled":  # the raw ops below exist only in the compiled library
        pytest.skip("compiled library not loaded")
    if ("gpu", f"copy_ {name}") not in _bench.RESULTS:
        pytest.skip("copy_ baseline missing (run the whole GPU group)")
    T, n = z_q.element_size(), GN
    y, bits = torch.empty_like(z_q), ff.pack_mask(z_s)
    C = 64
    z4 = z_s.view(-1, C, 32, 32)
    sc, sh = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    z4cl = z4.contiguous(memory_format=torch.channels_last)
    acc = torch.zeros(n, device="cuda")
    cases = {  # fn, bytes moved
        "pack": (lambda: ff.pack_mask(z_s), T * n + n / 8),
        "apply": (lambda: ff.apply_mask(z_q, bits, out=y), 2 * T * n + n / 8),
        "gate": (lambda: ff.gate(z_q, z_s, out=(y, bits)), 3 * T * n + n / 8),
        "epilogue": (lambda: torch.ops.fedsq_fast.struct_epilogue(z4, sc, sh), 2 * T * n + n / 8),
        "epilogue NHWC": (lambda: torch.ops.fedsq_fast.struct_epilogue(z4cl, sc, sh), 2 * T * n + n / 8),
        "accumulate": (lambda: torch.ops.fedsq_fast.accumulate_(acc, z_q, 0.5), T * n + 8 * n),
        "sq_dist": (lambda: torch.ops.fedsq_fast.sq_dist_list([z_q], [z_s]), 2 * T * n),
        "soft sigmoid": (lambda: ff.soft_gate_apply(z_q, z_s, "sigmoid", out=y), 3 * T * n),  # issue 27
        "soft phi": (lambda: ff.soft_gate_apply(z_q, z_s, "phi", out=y), 3 * T * n),
    }
    fn, moved = cases[kernel]
    _gpu_run(benchmark, f"{kernel} {name}", fn, moved, 2 * T * n)


def _resnet50_shapes():
    """Shapes of a ResNet-50 state dict (25.6 M parameters, ~320 tensors)."""
    try:
        import torchvision

        return [tuple(t.shape) for t in torchvision.models.resnet50().state_dict().values()
                if t.dtype.is_floating_point]
    except Exception:  # no torchvision: the same parameter count in 161 tensors
        return [(25_557_032 // 161,)] * 161


@gpu
def test_gpu_average_resnet50_k10(benchmark):
    """Weighted average of K = 10 ResNet-50-sized fp32 states, one launch, against
    the (K+1)-buffer floor: a copy_ of (K+1)/2 x the state's elements."""
    if ("gpu", "copy_ f32") not in _bench.RESULTS:
        pytest.skip("copy_ baseline missing (run the whole GPU group)")
    k, shapes = 10, _resnet50_shapes()
    p = sum(math.prod(s) for s in shapes)
    states = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(k)]
    out = [torch.empty(s, device="cuda") for s in shapes]
    w = [float(100 + 7 * i) for i in range(k)]
    m = (k + 1) * p // 2
    src, dst = torch.randn(m, device="cuda"), torch.empty(m, device="cuda")
    _gpu_run(benchmark, "(K+1)-buffer floor, ResNet-50 K=10", lambda: dst.copy_(src))
    _gpu_run(benchmark, "fedsq average ResNet-50 K=10", lambda: ff.weighted_average(states, w, out=out))
    _bench.ratio("GPU average ResNet-50 K=10 vs (K+1)-buffer floor (>= 0.87 is within 1.15x)", "gpu",
                 "fedsq average ResNet-50 K=10", "(K+1)-buffer floor, ResNet-50 K=10", 1 / 1.15)


# ---------------------------------------------------------------------------
# Interleaved cross-check (_bench.interleaved): each round times every variant of a pair back to
# back, so both see the same machine; the ratio uses their minima.


def test_interleaved_cross_check(benchmark, gate_inputs):
    z_q, z_s = gate_inputs
    y, bits, mf = torch.empty_like(z_q), ff.pack_mask(z_s), (z_s > 0).float()
    g, gout = _gen(N, 3), torch.empty(N)
    k = 8
    flat = [_gen(P, 10 + i) for i in range(k)]
    w = [float(100 + 17 * i) for i in range(k)]
    lists = [_split(c) for c in flat]
    out_flat, out_lists = torch.empty(P), [torch.empty_like(t) for t in lists[0]]
    acc = [torch.empty_like(t) for t in lists[0]]
    m = (k + 1) * P // 2
    src, dst = _gen(m, 99), torch.empty(m)
    X, wt = torch.stack(flat), torch.tensor(w) / sum(w)
    out_mv = torch.empty(P)

    blobs = [[_to_bytes(t.numpy()) for t in c] for c in lists]
    q1, q2 = z_q.clone().requires_grad_(), z_q.clone().requires_grad_()
    y1, _ = ff.gate(q1, z_s)
    y2 = q2 * (z_s > 0).float()

    def flower():
        nd = [[np.load(io.BytesIO(b), allow_pickle=False) for b in c] for c in blobs]
        return _flower_aggregate(list(zip(nd, w)))

    def foreach():
        torch._foreach_zero_(acc)
        for c, wk in zip(lists, w):
            torch._foreach_add_(acc, c, alpha=wk / sum(w))

    pairs = {
        "gate fwd: fedsq / eager float-mask (both allocate)": {
            "a": lambda: ff.gate(z_q, z_s), "b": lambda: z_q * (z_s > 0).float()},
        "gate fwd out=: copy_ / fedsq (>= 0.67 is within 1.5x of copy)": {
            "a": lambda: ff.gate(z_q, z_s, out=(y, bits)), "b": lambda: y.copy_(z_q)},
        "gate bwd autograd: fedsq / eager (both allocate the gradient)": {
            "a": lambda: torch.autograd.grad(y1, q1, g, retain_graph=True),
            "b": lambda: torch.autograd.grad(y2, q2, g, retain_graph=True)},
        "gate bwd kernel: fedsq / eager (into buffers)": {
            "a": lambda: ff.apply_mask(g, bits, out=gout), "b": lambda: torch.mul(g, mf, out=gout)},
        "pack: fedsq / numpy.packbits": {
            "a": lambda: ff.pack_mask(z_s), "b": lambda: np.packbits(z_s.numpy() > 0, bitorder="little")},
        "K=8 average flat: (K+1)-buffer copy floor / fedsq (>= 0.77 is within 1.3x)": {
            "a": lambda: ff.weighted_average(flat, w, out=out_flat), "b": lambda: dst.copy_(src)},
        "K=8 average: pre-stacked w@X / fedsq flat": {
            "a": lambda: ff.weighted_average(flat, w, out=out_flat), "b": lambda: torch.mv(X.t(), wt, out=out_mv)},
        "K=8 average 100 tensors/client: foreach / fedsq": {
            "a": lambda: ff.weighted_average(lists, w, out=out_lists), "b": foreach},
        "K=8 average 100 tensors/client: Flower-style numpy+decode / fedsq": {
            "a": lambda: ff.weighted_average(lists, w, out=out_lists), "b": flower},
    }

    def run_all():
        for label, fns in pairs.items():
            t = _bench.interleaved(fns)
            _bench.INTERLEAVED[label] = (t["b"] / t["a"], t["a"], t["b"])

    benchmark.group = "interleaved cross-check"
    benchmark.pedantic(run_all, rounds=1, iterations=1)


# ---------------------------------------------------------------------------
# Our kernels on each CPU instruction set this machine has, interleaved (each round runs
# every ISA back to back): is the AVX-512 build worth its dispatch? Where the work is
# memory-bound both should sit at the copy floor; compute-heavier ops (pack, the epilogue)
# are where 512-bit registers can show.
def test_isa_cross_check(benchmark, gate_inputs):
    if ff.backend() != "compiled":
        pytest.skip("compiled library not loaded")
    cpu_isa = torch.ops.fedsq_fast.cpu_isa
    before = cpu_isa("")
    isas = []
    for isa in ("avx512", "avx2", "scalar"):
        try:
            cpu_isa(isa)
            isas.append(isa)
        except RuntimeError:
            pass
    cpu_isa("auto")
    if len(isas) < 2:
        pytest.skip(f"this CPU runs only {isas}")
    z_q, z_s = gate_inputs
    y, bits = torch.empty_like(z_q), ff.pack_mask(z_s)
    g, gout = _gen(N, 3), torch.empty(N)
    k = 8
    flat = [_gen(P, 10 + i) for i in range(k)]
    w = [float(100 + 17 * i) for i in range(k)]
    out_flat = torch.empty(P)
    scale, shift = torch.rand(64) + 0.5, torch.randn(64)
    zs4 = z_s[: N - N % 4096].view(-1, 64, 8, 8)  # NCHW, 64 channels
    ops = {
        "gate fwd out=": lambda: ff.gate(z_q, z_s, out=(y, bits)),
        "gate bwd (apply_mask out=)": lambda: ff.apply_mask(g, bits, out=gout),
        "pack_mask": lambda: ff.pack_mask(z_s),
        "struct_epilogue (per-channel scale/shift)": lambda: torch.ops.fedsq_fast.struct_epilogue(zs4, scale, shift),
        "K=8 weighted_average flat, out=": lambda: ff.weighted_average(flat, w, out=out_flat),
    }

    def on(isa, f):
        def run():
            cpu_isa(isa)
            f()
        return run

    def run_all():
        try:
            for label, f in ops.items():
                t = _bench.interleaved({isa: on(isa, f) for isa in isas})
                for isa in isas[1:]:
                    _bench.INTERLEAVED[f"ISA {label}: {isa} / {isas[0]}"] = (t[isa] / t[isas[0]], t[isas[0]], t[isa])
        finally:
            cpu_isa(before if before in isas else "auto")

    benchmark.group = "ISA cross-check"
    benchmark.pedantic(run_all, rounds=1, iterations=1)
