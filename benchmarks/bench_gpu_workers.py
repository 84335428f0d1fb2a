"""Several clients at once on one GPU (issue 17): worker processes sharing the device
against the in-process run that trains the sampled clients one after another.

A round of 10 small clients (tiny_cnn on digits, batch 16, two local epochs) leaves an
H100/H200 idle most of the time: one Python process cannot launch kernels fast enough. With
N workers, N clients' kernels are in flight together. The ratio is per round after the
first (start-up and CUDA contexts excluded), all in the same run; results identical to the
in-process run are the test's job (tests/federation/test_workers.py::test_cuda_workers_*).
Skipped without a CUDA GPU; benchmarks/gpu_check.sh runs it.

    pytest benchmarks/bench_gpu_workers.py --benchmark-only -s
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import _bench  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GROUP = "gpu round, 10 clients (tiny_cnn, digits, batch 16, 2 local epochs)"
ROUNDS = 4


@pytest.mark.parametrize("method", ["fedsq"])  # gpu_check.sh's time cap: the library's method only
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_gpu_concurrent_clients(benchmark, method, workers):
    """One round per timed call on one federation (the first round is the warm-up: CUDA
    contexts, workers' models); the minimum over the timed rounds enters the ratio."""
    from fedsq_fast.federation import Federation, WorkerPoolTransport, from_mapping, prepare_data

    cfg = from_mapping(dict(dataset="digits", model="tiny_cnn", num_clients=10, fraction=1.0, rounds=ROUNDS + 1,
                            batch_size=16, local_epochs=2, val_size=200, max_test_samples=200,
                            min_partition_size=5, methods=[method], checkpoint=False, device="cuda"))
    pool = WorkerPoolTransport(workers, threads=1) if workers > 1 else None
    try:
        fed = Federation(cfg, method, prepare_data(cfg), quiet=True, transport=pool)
        rnd = iter(range(1, ROUNDS + 2))
        group = f"{GROUP}, {method}"
        t = _bench.run(benchmark, group, f"workers={workers}", lambda: fed.history.append(fed.run_round(next(rnd))),
                       rounds=ROUNDS, sync_cuda=True)
    finally:
        if pool is not None:
            pool.close()
    if t is not None:
        print(f"\n{method} workers={workers}: {t * 1e3:.0f} ms per round (min of {ROUNDS})")
    if workers > 1:
        _bench.ratio(f"GPU {method}: {workers} workers vs in process, per round", group, f"workers={workers}",
                     "workers=1", 1.5)
