"""Augmentation's cost for FedSQ (issue 23): per-round time of FedSQ with ``augment =
"crop_flip"`` (the mask cache steps aside: one structural pass per step, the gates computed
from each augmented batch) against FedSQ with the mask cache (no augmentation: later rounds
skip the structural pass) and against FedAvg (with and without augmentation), in one run.

The main job's model and data, shrunk: the SVHN-trained CNN (offline weights) fine-tuned on
1,000 MNIST images at 32 px, 10 clients, batch 64, one local epoch, validation on 300
images, no checkpoint. Each timed step runs round r of all four variants back to back (the
order rotating), one torch thread, CPU seconds of this process (``time.process_time``;
minimum over steps after a warm-up round): on a machine shared with other jobs, wall time
measures the neighbours.

    pytest benchmarks/bench_augment.py --benchmark-only -s
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message="fedsq_fast is using its pure-PyTorch reference ops")

import _bench  # noqa: E402

GROUP = "federation round, augmentation (svhn_cnn on MNIST 1000 x 32 px, 10 clients)"
VARIANTS = {  # name -> (method, augment)
    "FedAvg": ("fedavg", "none"),
    "FedAvg + crop_flip": ("fedavg", "crop_flip"),
    "FedSQ, mask cache": ("fedsq", "none"),
    "FedSQ + crop_flip (structural pass per step)": ("fedsq", "crop_flip"),
}


def _fed(method: str, augment: str):
    from fedsq_fast.federation import Federation, from_mapping, prepare_data

    cfg = from_mapping(dict(dataset="mnist", model="svhn_cnn", num_clients=10, max_train_samples=1000, val_size=300,
                            max_test_samples=300, batch_size=64, lr=0.01, rounds=100, checkpoint=False, seed=0,
                            partition="iid", augment=augment, probe_size=32))
    return Federation(cfg, method, prepare_data(cfg), quiet=True)


def test_round_time_with_augmentation(benchmark):
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    feds = {v: _fed(*mv) for v, mv in VARIANTS.items()}
    cpu = {v: [] for v in feds}
    client = {v: [] for v in feds}
    state = {"r": 1}

    def step():
        r = state["r"]
        names = list(feds)
        for v in names[r % len(names):] + names[:r % len(names)]:
            c = time.process_time()
            rec = feds[v].run_round(r)
            cpu[v].append(time.process_time() - c)
            client[v].append(rec["time_client_s"])
        state["r"] += 1

    try:
        benchmark.group = f"{GROUP} (all variants per step)"
        benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert feds["FedSQ + crop_flip (structural pass per step)"].trainer.cache is None  # stepped aside
    assert feds["FedSQ, mask cache"].trainer.cache is not None
    group = f"{GROUP}, CPU s per round (1 thread)"
    lines = ["| variant | CPU s per round (min) | median | client wall s (median) |", "|---|---:|---:|---:|"]
    for v in feds:  # the warm-up step excluded
        _bench.RESULTS[(group, v)] = min(cpu[v][1:])
        _bench.MEDIANS[(group, v)] = float(np.median(cpu[v][1:]))
        lines.append(f"| {v} | {min(cpu[v][1:]):.2f} | {np.median(cpu[v][1:]):.2f} | "
                     f"{np.median(client[v][1:]):.2f} |")
    _bench.ratio("FedSQ + crop_flip / FedSQ with the mask cache, CPU per round (<= 1.5)", group,
                 "FedSQ, mask cache", "FedSQ + crop_flip (structural pass per step)", 1.5, "<=")
    _bench.ratio("FedSQ + crop_flip / FedAvg + crop_flip, CPU per round (<= 1.5)", group,
                 "FedAvg + crop_flip", "FedSQ + crop_flip (structural pass per step)", 1.5, "<=")
    _bench.EXTRA["Augmentation's cost per round"] = "\n".join(lines) + "\n"
    print("\n" + "\n".join(lines))
