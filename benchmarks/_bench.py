"""Shared by the benchmark modules: run a variant under pytest-benchmark, keep
its median, and compare variants measured in the same run as ratios."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

RESULTS: dict[tuple[str, str], float] = {}  # (group, variant) -> min seconds (ratios use it)
MEDIANS: dict[tuple[str, str], float] = {}
INTERLEAVED: dict[str, tuple[float, float, float]] = {}  # label -> (ratio b/a, min a, min b)
RATIOS: list[tuple[str, str, str, str, float, str]] = []  # label, group, num, den, target, sense
EXTRA: dict[str, str] = {}  # title -> a module's own markdown (e.g. bench_simulation's table), printed last


def run(benchmark, group: str, variant: str, fn, rounds: int = 7, sync_cuda: bool = False):
    """Benchmark ``fn`` as ``group/variant``; returns its minimum in seconds.

    Ratios use the minimum over rounds: on a shared machine, noise only ever
    adds time, so the minimum is the most repeatable estimate of what the code
    can do (medians are reported beside it)."""
    if sync_cuda:
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.group = group
    benchmark.extra_info["variant"] = variant
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the body ran once, nothing was timed
        return None
    RESULTS[(group, variant)] = benchmark.stats.stats.min
    MEDIANS[(group, variant)] = benchmark.stats.stats.median
    return RESULTS[(group, variant)]


def ratio(label: str, group: str, num: str, den: str, target: float, sense: str = ">="):
    """Declare ``median(den) / median(num)`` (a speed-up of num over den);
    ``sense`` says whether it should be >= or <= ``target``."""
    RATIOS.append((label, group, num, den, target, sense))



# Interleaved cross-check: on a shared machine a noise burst can hit one variant's rounds and
# not another's. Each round times every variant back to back, so all see the same machine; the
# first variant of a round meets colder caches, so who goes first rotates. Minima per variant.
INTERLEAVED_ROUNDS = int(os.environ.get("FEDSQ_BENCH_INTERLEAVED_ROUNDS", 15))


def interleaved(fns: dict, rounds: int | None = None) -> dict:
    """{name: min seconds} of the callables ``fns``, timed in interleaved, rotating rounds."""
    import time

    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(INTERLEAVED_ROUNDS if rounds is None else rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        flags = open("/proc/cpuinfo").read()
        isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no-avx2"
    except OSError:
        isa = "?"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu} ({isa}), {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def report() -> str | None:
    if not RESULTS and not INTERLEAVED and not EXTRA:
        return None
    import fedsq_fast as ff

    isa = torch.ops.fedsq_fast.cpu_isa("") if ff.backend() == "compiled" else "-"
    lines = [
        f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}",
        f"fedsq_fast backend: {ff.backend()} (CPU kernels: {isa})",
        "",
        "| group | variant | min ms | median ms |",
        "|---|---|---:|---:|",
    ]
    for (g, v), t in RESULTS.items():
        med = MEDIANS.get((g, v))
        lines.append(f"| {g} | {v} | {t * 1e3:.2f} | {'-' if med is None else f'{med * 1e3:.2f}'} |")
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for label, g, num, den, target, sense in RATIOS:
        if (g, num) in RESULTS and (g, den) in RESULTS:
            val = RESULTS[(g, den)] / RESULTS[(g, num)]
            ok = val >= target if sense == ">=" else val <= target
            lines.append(f"| {label} | {val:.2f} | {sense} {target:.2f} | {'yes' if ok else 'NO'} |")
    if INTERLEAVED:
        lines += ["", "Interleaved cross-check (each round times both variants back to back; minima):", "",
                  "| pair (ratio = second / first) | ratio | fedsq min ms | baseline min ms |", "|---|---:|---:|---:|"]
        for label, (r, a, b) in INTERLEAVED.items():
            lines.append(f"| {label} | {r:.2f} | {a * 1e3:.2f} | {b * 1e3:.2f} |")
    for title, text in EXTRA.items():
        lines += ["", f"{title}:", "", text.rstrip()]
    return "\n".join(lines) + "\n"
