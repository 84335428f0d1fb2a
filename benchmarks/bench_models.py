"""Training-step benchmark: fedsq_fast DualCopy vs a naive PyTorch DualCopy
(two models, forward hooks, float masks) vs plain fine-tuning, with and without
the mask cache. resnet18 and svhn_cnn at 32x32, batch 64, CPU.

    pytest benchmarks/bench_models.py --benchmark-only -s

Peak memory: each variant runs in a subprocess (``python bench_models.py --rss
MODEL VARIANT``) that reports its peak RSS (ru_maxrss) and its RSS before the
first step. Ratios are printed at the end.
"""
from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fedsq_fast as fs  # noqa: E402
from fedsq_fast.models import MaskCache, build_model  # noqa: E402

BATCH, PX, NBATCH = 64, 32, 4
if os.environ.get("BENCH_THREADS"):  # e.g. 1 on a shared machine: no OpenMP spin contention
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
MODELS = ("resnet18", "svhn_cnn")
VARIANTS = ("plain", "naive", "fedsq", "fedsq_cache")


class NaiveDualCopy(nn.Module):
    """The eager baseline: two models, hooks, masks as float tensors."""

    def __init__(self, model):
        super().__init__()
        self.struct = copy.deepcopy(model).eval().requires_grad_(False)
        self.quant = copy.deepcopy(model)
        self.masks, self.i = [], 0
        for net, hook in ((self.struct, self._record), (self.quant, self._apply)):
            for m in net.modules():
                if isinstance(m, nn.ReLU):
                    m.inplace = False
                    m.register_forward_hook(hook)

    def _record(self, m, inp, out):
        self.masks.append((inp[0] > 0).float())

    def _apply(self, m, inp, out):
        self.i += 1
        return inp[0] * self.masks[self.i - 1]

    def train(self, mode=True):
        super().train(mode)
        self.struct.eval()
        return self

    def forward(self, x):
        self.masks, self.i = [], 0
        with torch.no_grad():
            self.struct(x)
        return self.quant(x)


def make_step(model_name, variant):
    torch.manual_seed(0)
    base = build_model(model_name, num_classes=10)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(NBATCH * BATCH, 3, PX, PX, generator=g)
    ys = torch.randint(0, 10, (NBATCH * BATCH,), generator=g)
    if variant == "plain":
        model = base.train()
    elif variant == "naive":
        model = NaiveDualCopy(base).train()
    else:
        model = fs.dualcopy(base).train()
        if variant == "fedsq_cache":
            model.attach_cache(MaskCache(len(xs)))
            with torch.no_grad():  # first epoch fills the cache (not timed)
                for b in range(NBATCH):
                    idx = torch.arange(b * BATCH, (b + 1) * BATCH)
                    model(xs[idx], sample_idx=idx)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = {"b": 0}

    def step():
        b = state["b"] = (state["b"] + 1) % NBATCH
        idx = torch.arange(b * BATCH, (b + 1) * BATCH)
        out = model(xs[idx], sample_idx=idx) if variant == "fedsq_cache" else model(xs[idx])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out, ys[idx]).backward()
        opt.step()

    return step


def _status_kib(field="VmRSS:"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def rss_main(model_name, variant):
    step = make_step(model_name, variant)
    before = _status_kib()
    for _ in range(3):
        step()
    # VmHWM, this process's own peak (ru_maxrss is not: Linux carries the parent's peak into a
    # forked and exec'ed child, so after bench_ops every variant reported the parent's ~4 GB)
    peak = _status_kib("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": peak, "before_kib": before}))


def measure_rss(model_name, variant):
    # a fixed mmap threshold: freed activations leave RSS, so the peak tracks live bytes
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss", model_name, variant],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
RESULTS: dict = {}

try:
    import pytest

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("model_name", MODELS)
    def test_train_step(benchmark, model_name, variant):
        step = make_step(model_name, variant)
        step()  # warm-up (oneDNN primitives, allocator)
        benchmark.group = f"{model_name} {PX}px batch {BATCH}"
        benchmark.extra_info["backend"] = fs.backend()
        benchmark.pedantic(step, rounds=6, iterations=1, warmup_rounds=1)
        rss = measure_rss(model_name, variant)
        benchmark.extra_info.update(rss)
        RESULTS[(model_name, variant)] = (benchmark.stats.stats.median, rss)

    def test_zz_ratios(benchmark):
        benchmark.pedantic(lambda: None, rounds=1)
        print(f"\nbackend: {fs.backend()}, threads: {torch.get_num_threads()}")
        for m in MODELS:
            r = {v: RESULTS.get((m, v)) for v in VARIANTS}
            if any(x is None for x in r.values()):
                continue
            t = {v: r[v][0] for v in VARIANTS}
            pk = {v: r[v][1]["peak_kib"] / 1024 for v in VARIANTS}
            inc = {v: (r[v][1]["peak_kib"] - r[v][1]["before_kib"]) / 1024 for v in VARIANTS}
            print(f"{m}: step median ms " + ", ".join(f"{v} {1e3 * t[v]:.1f}" for v in VARIANTS))
            print(f"{m}: peak RSS MiB " + ", ".join(f"{v} {pk[v]:.0f} (+{inc[v]:.0f} in steps)" for v in VARIANTS))
            print(f"{m}: speed-up vs naive: no cache {t['naive'] / t['fedsq']:.2f}x, cache "
                  f"{t['naive'] / t['fedsq_cache']:.2f}x (targets 1.15x / 1.4x)")
            print(f"{m}: time vs plain: no cache {t['fedsq'] / t['plain']:.2f}x, cache "
                  f"{t['fedsq_cache'] / t['plain']:.2f}x (targets <= 1.35x / 1.05x)")
            print(f"{m}: peak RSS vs naive: {pk['fedsq'] / pk['naive']:.2f}x total, step increment "
                  f"{inc['fedsq'] / max(inc['naive'], 1e-9):.2f}x (target <= 0.8x)")
except ImportError:  # run as a script for --rss
    pass


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rss":
        rss_main(sys.argv[2], sys.argv[3])
    else:
        print(__doc__)


# Interleaved cross-check: every round times one step of each variant back to
# back, so noise from a shared machine hits all of them alike (minima compared).
def test_interleaved_steps(benchmark):
    import time

    import _bench

    rounds = int(os.environ.get("FEDSQ_BENCH_INTERLEAVED_ROUNDS", 10))

    def run_all():
        for name in MODELS:
            steps = {v: make_step(name, v) for v in VARIANTS}
            for s in steps.values():
                s()
            best = {v: float("inf") for v in VARIANTS}
            for _ in range(rounds):
                for v, s in steps.items():
                    t0 = time.perf_counter()
                    s()
                    best[v] = min(best[v], time.perf_counter() - t0)
            for label, a, b in (
                ("naive / fedsq, no cache (target >= 1.15)", "fedsq", "naive"),
                ("naive / fedsq with mask cache (target >= 1.4)", "fedsq_cache", "naive"),
                ("plain / fedsq, no cache (target >= 0.74, i.e. <= 1.35x plain)", "fedsq", "plain"),
                ("plain / fedsq with cache (target >= 0.95, i.e. <= 1.05x plain)", "fedsq_cache", "plain"),
            ):
                _bench.INTERLEAVED[f"{name} train step: {label}"] = (best[b] / best[a], best[a], best[b])

    benchmark.group = "interleaved train steps"
    benchmark.pedantic(run_all, rounds=1, iterations=1)


# Memory at batch 64 (issue 28): what autograd saves for backward (by layer: benchmarks/tools/
# saved_activations.py) and each variant's own peak RSS over 3 steps (a subprocess each),
# fedsq against the naive two-model step. Target: <= 0.8x.
def test_memory_vs_naive(benchmark):
    import _bench
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
    from saved_activations import saved_by_layer, variant

    rows = ["| model | saved activations MiB: plain / naive / fedsq | fedsq / naive | "
            "peak RSS growth MiB: plain / naive / fedsq | fedsq / naive | peak RSS MiB: naive / fedsq |",
            "|---|---|---:|---|---:|---|"]

    def run_all():
        for name in MODELS:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(BATCH, 3, PX, PX, generator=g)
            y = torch.randint(0, 10, (BATCH,), generator=g)
            saved = {v: sum(saved_by_layer(variant(v, name), x, y)[0].values()) / 2**20
                     for v in ("plain", "naive", "fedsq")}
            rss = {v: measure_rss(name, v) for v in ("plain", "naive", "fedsq")}
            grow = {v: (r["peak_kib"] - r["before_kib"]) / 1024 for v, r in rss.items()}
            rows.append(f"| {name} | {saved['plain']:.1f} / {saved['naive']:.1f} / {saved['fedsq']:.1f} | "
                        f"**{saved['fedsq'] / saved['naive']:.2f}** | {grow['plain']:.0f} / {grow['naive']:.0f} / "
                        f"{grow['fedsq']:.0f} | **{grow['fedsq'] / grow['naive']:.2f}** | "
                        f"{rss['naive']['peak_kib'] / 1024:.0f} / {rss['fedsq']['peak_kib'] / 1024:.0f} |")
        _bench.EXTRA[f"Memory at batch {BATCH}, {PX}px (target fedsq / naive <= 0.8)"] = "\n".join(rows)

    benchmark.group = "memory vs naive"
    benchmark.pedantic(run_all, rounds=1, iterations=1)
