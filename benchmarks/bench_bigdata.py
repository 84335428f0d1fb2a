"""Data larger than memory (issue 17): per-round time with the client pool read per batch from
a numpy memmap (``make_bundle(..., in_memory=False)``, :class:`LazyImages`) against the same
data read into memory, in one run (ratio printed by the benchmarks' summary).

A small job where reading is a visible share of the round: 3,000 MNIST images stored as a
uint8 ``.npy`` file (28x28), tiny_cnn at 28 px, 10 clients, batch 32, one local epoch,
validation on 500 images. The file was just written, so it sits in the page cache: this
measures what reading per batch costs the engine (gather, uint8 -> float, checks), not the
disk. Both variants train the same model bit for bit (asserted).

    pytest benchmarks/bench_bigdata.py --benchmark-only -s
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message="fedsq_fast is using its pure-PyTorch reference ops")

import _bench  # noqa: E402

GROUP = "federation round, pool as memmap vs in memory (tiny_cnn, MNIST 3000 x 28 px)"
N_TRAIN, N_TEST = 3000, 500
_FILES: dict = {}


def _files():
    """MNIST's first images as uint8 .npy files, opened as read-only memmaps (once)."""
    if not _FILES:
        from fedsq_fast.federation import load_dataset

        b = load_dataset("mnist")
        d = tempfile.mkdtemp(prefix="fedsq-bench-bigdata-")
        for name, ds, n in (("train", b.train, N_TRAIN + 600), ("test", b.test, N_TEST)):
            x = (ds.x[:n] * 255).round().to(dtype=__import__("torch").uint8).numpy()
            np.save(os.path.join(d, f"{name}.npy"), x)
            _FILES[name] = (np.load(os.path.join(d, f"{name}.npy"), mmap_mode="r"), ds.y[:n].numpy())
    return _FILES


def _fed(method: str, lazy: bool):
    from fedsq_fast.federation import Federation, from_mapping, make_bundle, prepare_data

    f = _files()
    bundle = make_bundle(f["train"], f["test"], in_memory=not lazy)
    cfg = from_mapping(dict(dataset="mnist", model="tiny_cnn", num_clients=10, val_size=500, max_test_samples=N_TEST,
                            batch_size=32, lr=0.05, rounds=100, checkpoint=False, seed=0))
    data = prepare_data(cfg, bundle, model_name="tiny_cnn")
    assert (type(data.x).__name__ == "LazyImages") == lazy
    return Federation(cfg, method, data, quiet=True)


@pytest.mark.parametrize("method", ["fedavg", "fedsq"])
def test_round_time_lazy_vs_in_memory(benchmark, method):
    """Each timed step runs round r of both variants back to back (the order alternating), so
    that load from other processes on a shared machine hits both alike. One torch thread, and
    the ratio is of CPU seconds (``time.process_time``; minima over steps): on a machine shared
    with other jobs, wall time measures the neighbours, CPU time this process's work. Wall
    times are printed beside it."""
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    feds = {"in memory": _fed(method, lazy=False), "memmap, read per batch": _fed(method, lazy=True)}
    cpu = {v: [] for v in feds}
    wall = {v: [] for v in feds}
    recs = {v: [] for v in feds}
    state = {"r": 1}

    def pair():
        r = state["r"]
        order = list(feds) if r % 2 else list(feds)[::-1]
        for v in order:
            t, c = time.perf_counter(), time.process_time()
            recs[v].append(feds[v].run_round(r))
            cpu[v].append(time.process_time() - c)
            wall[v].append(time.perf_counter() - t)
        state["r"] += 1

    try:
        benchmark.group = f"{GROUP}, {method} (both variants per step)"
        benchmark.pedantic(pair, rounds=5, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    group = f"{GROUP}, {method}, CPU s per round (1 thread)"
    for v in feds:  # the warm-up step excluded
        _bench.RESULTS[(group, v)] = min(cpu[v][1:])
        _bench.MEDIANS[(group, v)] = float(np.median(cpu[v][1:]))
    _bench.ratio(f"{method}: CPU per round, memmap / in memory (<= 1.3)", group, "in memory",
                 "memmap, read per batch", 1.3, "<=")
    a, b = (min(cpu[v][1:]) for v in feds)
    wa, wb = (min(wall[v][1:]) for v in feds)
    benchmark.extra_info.update(in_memory_cpu_s=a, memmap_cpu_s=b, ratio_cpu=b / a, in_memory_wall_s=wa,
                                memmap_wall_s=wb)
    print(f"\n{method}: CPU s per round (min) in memory {a:.3f}, memmap {b:.3f}, ratio {b / a:.3f}; "
          f"wall s (min) {wa:.3f} / {wb:.3f}, ratio {wb / wa:.3f}")
    got, want = ([(r["val_acc"], r["val_loss"], r["train_loss"]) for r in recs[v]] for v in feds)
    assert got == want  # the same model, round by round
