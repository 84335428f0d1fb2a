"""Thousands of clients (CPU): 100 against 10,000 clients on the same pool.

1. Partition time for each kind (iid, dirichlet, shards, quantity) over an MNIST-sized
   pool (59,000 labels, 10 classes), plus the class-count matrix the partition table
   and plot are drawn from. Target: 10,000 clients in well under a second each (the
   brief: "in seconds").
2. Round time with the same sampled cohort (10 clients a round, tiny CNN, 20,000
   synthetic 16x16 images): what the number of clients costs the round loop.
3. Peak RSS growth of a 3-round run (tests/federation/scale_probe.py, in subprocesses):
   10,000 clients against 100 at the same cohort size.

    pytest benchmarks/bench_scale.py --benchmark-only -s
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import _bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "federation"))
warnings.filterwarnings("ignore", message="fedsq_fast is using its pure-PyTorch reference ops")

LABELS = np.random.default_rng(0).integers(0, 10, 59_000)
KW = {"iid": {}, "dirichlet": {"alpha": 0.5, "min_partition_size": 0}, "shards": {"shards_per_client": 2},
      "quantity": {"alpha": 0.5, "min_partition_size": 1}}


@pytest.mark.parametrize("kind", list(KW))
@pytest.mark.parametrize("clients", [100, 10_000])
def test_partition_time(benchmark, kind, clients):
    from fedsq_fast.federation import partition as P

    def part():
        parts = P.make_partition(kind, LABELS, clients, seed=1, **KW[kind])
        P.class_counts(LABELS, parts, 10)

    group = f"partition {kind} + class counts (59,000 labels)"
    _bench.run(benchmark, group, f"{clients} clients", part, rounds=5)
    if clients == 10_000:
        _bench.ratio(f"{kind}: time 10,000 / 100 clients", group, "100 clients", "10000 clients", 100.0, "<=")


@pytest.mark.parametrize("clients", [100, 10_000])
def test_round_time_same_cohort(benchmark, clients):
    import torch

    from fedsq_fast.federation import Federation, InputSpec, from_mapping, make_bundle, prepare_data
    from scale_probe import POOL, TEST, tiny_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.random((POOL + TEST, 16, 16), dtype=np.float32)
    y = rng.integers(0, 10, POOL + TEST)
    cfg = from_mapping({"num_clients": clients, "fraction": 10 / clients, "rounds": 100, "val_size": 200,
                        "max_train_samples": None, "max_test_samples": TEST, "batch_size": 8, "lr": 0.05,
                        "partition": "iid", "probe_size": 8, "threads": 1, "checkpoint": False,
                        "methods": ["fedavg"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = prepare_data(cfg, make_bundle((x[:POOL], y[:POOL]), (x[POOL:], y[POOL:])), input_spec=InputSpec(1))
    fed = Federation(cfg, "fedavg", data, model_fn=tiny_model, quiet=True)
    state = {"r": 1}

    def one_round():
        fed.history.append(fed.run_round(state["r"]))
        state["r"] += 1

    group = "round, 10 sampled clients (tiny CNN, 20,000 images)"
    _bench.run(benchmark, group, f"{clients} clients", one_round, rounds=5)
    if clients == 10_000:
        # 10,000 clients hold 2 images each, 100 clients 200: the large federation's round is cheaper
        _bench.ratio("round time 10,000 / 100 clients", group, "100 clients", "10000 clients", 1.0, "<=")


def test_peak_memory_same_cohort(benchmark, tmp_path):
    probe = os.path.join(ROOT, "tests", "federation", "scale_probe.py")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    got = {}

    def measure():
        for k in (100, 10_000):
            out = subprocess.run([sys.executable, probe, str(k), "10", "3", "iid", str(tmp_path / str(k))],
                                 capture_output=True, text=True, env=env, check=True).stdout
            got[k] = json.loads(out.strip().splitlines()[-1])

    benchmark.pedantic(measure, rounds=1, iterations=1)
    a, b = got[100]["peak_kb"], got[10_000]["peak_kb"]
    benchmark.extra_info.update(peak_mb_100=a / 1024, peak_mb_10000=b / 1024, ratio=b / a)
    print(f"\npeak RSS growth, 3 rounds of 10 clients: 100 clients {a / 1024:.1f} MB, "
          f"10,000 clients {b / 1024:.1f} MB ({b / a:.2f}x)")
    assert b <= 1.2 * a, got
