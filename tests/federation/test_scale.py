"""Thousands of clients (cross-device): partitions of 10,000 clients cover every sample once
(oracle: numpy counts, and the list-based NIID-Bench loop for Dirichlet), impossible
configs are refused in one line naming the key, the terminal gets summaries instead of
10,000-row tables and drop lists, runs of 1,000 and 10,000 clients at a small sampled
fraction complete, and peak memory for 10,000 clients stays within 1.2x of 100 clients at
the same cohort size (subprocesses, RSS high-water mark)."""
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_seed
from torch import nn

from fedsq_fast.federation import InputSpec, from_mapping, make_bundle, prepare_data
from fedsq_fast.federation import partition as P
from fedsq_fast.federation.metrics import drops_text
from fedsq_fast.federation.runner import run_methods
from fedsq_fast.federation.seeds import sample_clients
from fedsq_fast.federation.server import DROP_LOG_LINES, Federation
from fedsq_fast.plots import PLOT_MAX_CLIENTS, plot_partition

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent


@pytest.fixture
def rng():
    return np.random.default_rng(draw_seed(2**31))


def tiny_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 10))


def _bundle(rng, n, size=8, classes=10, test=300):
    x = rng.random((n + test, size, size), dtype=np.float32)
    y = rng.integers(0, classes, n + test)
    return make_bundle((x[:n], y[:n]), (x[n:], y[n:]))


def _cover(parts, n):
    """Every index 0..n-1 exactly once (numpy counts)."""
    allidx = np.concatenate([np.asarray(p) for p in parts])
    assert allidx.dtype == np.int64
    assert np.array_equal(np.bincount(allidx, minlength=n), np.ones(n, dtype=np.int64))


def _dirichlet_reference(labels, k, alpha, min_size, seed, max_tries=1000):
    """The NIID-Bench loop as first written: per-client Python lists, extended class by class."""
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, float(alpha)))
            p = p * (np.array([len(q) for q in parts]) < n / k)
            if p.sum() <= 0:
                p = np.full(k, 1.0 / k)
            p = p / p.sum()
            for j, chunk in enumerate(np.split(idx, (np.cumsum(p) * len(idx)).astype(int)[:-1])):
                parts[j].extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]
    return None


# ---------------------------------------------------------------- partitions
@pytest.mark.parametrize("kind", P.PARTITIONS)
def test_10000_clients_cover_every_sample_once(kind, rng):
    n = int(rng.integers(60_000, 70_000)) | 1  # odd: splits are not even
    y = rng.integers(0, 10, n)
    k = 10_000
    parts = P.make_partition(kind, y, k, alpha=float(rng.choice([0.3, 1.0])), min_partition_size=0,
                             shards_per_client=2, seed=int(rng.integers(1 << 30)))
    assert len(parts) == k
    _cover(parts, n)
    assert all(np.all(np.diff(p) > 0) for p in parts[:: 97])  # sorted, as documented
    if kind in ("iid", "shards"):
        sizes = np.array([len(p) for p in parts])
        assert sizes.max() - sizes.min() <= (1 if kind == "iid" else 2)


def test_dirichlet_is_the_reference_procedure(rng):
    """Vectorised draws, same random numbers: the same split as the list-based loop."""
    for _ in range(25):
        n = int(rng.integers(50, 2500))
        k = int(rng.integers(1, min(120, n)))
        y = rng.integers(0, int(rng.integers(1, 12)), n)
        alpha = float(rng.choice([0.05, 0.3, 1.0, 20.0]))
        min_size = int(rng.integers(0, max(1, n // (3 * k)) + 1))
        seed = int(rng.integers(1 << 30))
        ref = _dirichlet_reference(y, k, alpha, min_size, seed, max_tries=50)
        if ref is None:
            with pytest.raises(ValueError, match="min_partition_size"):
                P.dirichlet(y, k, alpha, min_size, seed, max_tries=50)
            continue
        got = P.dirichlet(y, k, alpha, min_size, seed, max_tries=50)
        assert len(got) == k and all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, ref))


def test_hopeless_dirichlet_is_refused_in_a_few_draws(rng):
    """10,000 clients of 2 samples with every client >= 1: hundreds of clients are short in
    every draw; refused after HOPELESS_AFTER draws, naming the key, not after 1,000."""
    y = rng.integers(0, 10, 20_000)
    with pytest.raises(ValueError) as e:
        P.dirichlet(y, 10_000, 0.5, min_partition_size=1, seed=int(rng.integers(1 << 30)))
    msg = str(e.value)
    assert msg.startswith("min_partition_size:") and "\n" not in msg
    assert f"each of {P.HOPELESS_AFTER} draws" in msg


def test_feasible_dirichlet_with_a_few_short_draws_still_succeeds(rng):
    """The early refusal only fires when success is hopeless: a split that needs redraws
    (a few short clients per draw) is still found, and is the reference loop's."""
    y = rng.integers(0, 5, 3000)
    seed = int(rng.integers(1 << 30))
    ref = _dirichlet_reference(y, 200, 1.0, 5, seed)  # about 3 short clients a draw: ~5% succeed
    assert ref is not None
    got = P.dirichlet(y, 200, 1.0, 5, seed)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("kind,extra,lower", [("dirichlet", {"min_partition_size": 3}, "min_partition_size"),
                                              ("quantity", {"min_partition_size": 3}, "min_partition_size"),
                                              ("shards", {"shards_per_client": 3}, "shards_per_client"),
                                              ("iid", {}, "min_partition_size")])
def test_impossible_client_counts_are_one_line_errors(kind, extra, lower, rng):
    """More clients than the pool can give min_partition_size, shards_per_client (or one
    sample) each: refused before any partition draw, in one line naming the keys and sizes."""
    b = _bundle(rng, 1201)
    k = 1201 if kind == "iid" else 500  # 500 x 3 > 1201 - val
    cfg = from_mapping({"num_clients": k, "partition": kind, "val_size": 100, "max_train_samples": None,
                        "max_test_samples": 50, **extra})
    with pytest.raises(ValueError) as e:
        prepare_data(cfg, b, input_spec=InputSpec(1))
    msg = str(e.value)
    assert msg.startswith("num_clients:") and "\n" not in msg and "which holds 1101" in msg
    assert f"at least {k * (1 if kind == 'iid' else 3)} samples" in msg and f"lower num_clients, {lower}" in msg


def test_client_ranges_behave_as_the_index_lists(rng):
    sizes = rng.integers(0, 7, int(rng.integers(1, 500)))
    r = P.ClientRanges(sizes)
    ends = np.cumsum(sizes)
    ref = [np.arange(e - s, e) for s, e in zip(sizes, ends)]
    assert len(r) == len(ref)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(r, ref))
    assert np.array_equal(r[-1], ref[-1]) and len(r[2:5]) == len(ref[2:5])
    assert np.array_equal(r.sizes(), sizes)
    assert all(np.array_equal(a, b) for a, b in zip(pickle.loads(pickle.dumps(r)), ref))
    with pytest.raises(IndexError):
        r[len(ref)]
    with pytest.raises(ValueError, match="sizes"):
        P.ClientRanges([3, -1])


def test_class_counts_match_per_client_counts(rng):
    n, c = int(rng.integers(1000, 5000)), int(rng.integers(2, 15))
    y = rng.integers(0, c, n)
    perm = rng.permutation(n)
    cuts = np.sort(rng.choice(np.arange(1, n), 40, replace=False))
    parts = np.split(perm, cuts)  # unsorted, uneven, arbitrary index lists
    oracle = np.array([[sum(1 for i in p if y[i] == j) for j in range(c)] for p in parts])
    got = P.class_counts(y, parts, c)
    assert got.dtype == np.int64 and np.array_equal(got, oracle)
    assert np.array_equal(P.class_counts(y, P.ClientRanges([n // 2, n - n // 2])),
                          np.stack([np.bincount(y[: n // 2], minlength=c), np.bincount(y[n // 2:], minlength=c)]))
    with pytest.raises(ValueError, match="num_classes"):
        P.class_counts(y, parts, c - 1)


# ---------------------------------------------------------------- terminal output
def test_partition_report_summarises_beyond_the_table_limit(rng):
    y = rng.integers(0, 10, 30_001)
    parts = P.make_partition("dirichlet", y, 10_000, alpha=0.3, min_partition_size=0, seed=draw_seed())
    counts = P.class_counts(y, parts, 10)
    text = P.partition_report(counts)
    lines = text.splitlines()
    assert len(lines) <= 8 and lines[0].startswith("10000 clients")
    sizes = np.sort(counts.sum(1))
    row = lines[2].split()
    assert row[0] == "samples"
    assert [int(row[1]), int(row[-2])] == [sizes[0], sizes[-1]]  # min, max
    assert float(row[-1]) == pytest.approx(30_001 / 10_000, abs=0.005)  # mean
    assert f"total 30001; empty clients {int((sizes == 0).sum())}" in lines[-1]
    small = P.partition_report(counts[:P.TABLE_MAX_CLIENTS])
    assert small == P.partition_table(counts[:P.TABLE_MAX_CLIENTS])  # small federations keep the table
    assert len(small.splitlines()) == P.TABLE_MAX_CLIENTS + 3


def test_partition_plot_stays_a_readable_size(tmp_path, rng):
    import matplotlib.image as mpimg

    counts = rng.integers(0, 5, (10_000, 10))
    plot_partition(counts, tmp_path / "big.png", title="10k")
    h, w = mpimg.imread(tmp_path / "big.png").shape[:2]
    assert w <= 1000 and h <= 400  # 8 x 3.2 in at 110 dpi, whatever the number of clients
    plot_partition(counts[:PLOT_MAX_CLIENTS], tmp_path / "small.png")  # one bar per client
    assert mpimg.imread(tmp_path / "small.png").shape[1] > w


def test_drops_text_lists_few_and_summarises_many(rng):
    few = [[int(c), "simulated failure (failure_rate)"] for c in sorted(rng.choice(100, 5, replace=False))]
    assert drops_text(few) == str(few)
    many = [[i, f"worker died: exit code 1 (while training client {i})"] for i in range(0, 300, 3)]
    many += [[i, "simulated failure (failure_rate)"] for i in range(1, 60, 3)]
    text = drops_text(sorted(many))
    assert "\n" not in text and len(text) < 300
    assert text.startswith(f"{len(many)} clients (100 x worker died: exit code # (while training client #); "
                           "20 x simulated failure (failure_rate); first 0, 1, 3, 4, 6, ...)")


# ---------------------------------------------------------------- runs
def _scale_config(k, cohort, out, **kw):
    return from_mapping({"num_clients": k, "fraction": cohort / k, "min_clients": 2, "rounds": 3, "val_size": 200,
                         "max_train_samples": None, "max_test_samples": 200, "batch_size": 8, "lr": 0.05,
                         "partition": "iid", "probe_size": 8, "threads": 1, "seed": draw_seed(),
                         "methods": ["fedavg"], "out_dir": str(out), **kw})


@pytest.mark.parametrize("k,n,kind", [(1000, 12_347, "dirichlet"), (10_000, 30_001, "shards")])
def test_thousands_of_clients_run_with_summarised_output(k, n, kind, tmp_path, rng):
    """1,000 and 10,000 clients, 12 sampled per round: every round samples the cohort,
    trains it (samples = the cohort's partition sizes), the terminal shows a summary of the
    partition (not k rows) while partition.txt keeps every client."""
    b = _bundle(rng, n)
    cfg = _scale_config(k, 12, tmp_path, partition=kind, alpha=0.5, min_partition_size=2, shards_per_client=2)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small clients: 'too little data' is expected here
        res = run_methods(cfg, tmp_path, echo=lines.append, bundle=b, model_fn=tiny_model,
                          input_spec=InputSpec(1), progress=False)["fedavg"]
        data = prepare_data(cfg, b, input_spec=InputSpec(1))  # the same split (same seed)
    sizes = data.parts.sizes()
    assert len(sizes) == k and sizes.sum() == n - 200 and sizes.min() >= 2
    for h in res.history[1:]:
        chosen = sample_clients(cfg, h["round"])
        assert h["clients_sampled"] == len(chosen) == 12 and h["clients_ok"] == 12
        assert h["samples"] == int(sizes[chosen].sum())
        assert math.isfinite(h["val_acc"]) and math.isfinite(h["train_loss"])
    echoed = "\n".join(lines)
    assert f"{k} clients" in echoed and len(echoed.splitlines()) < 20
    table = (tmp_path / "partition.txt").read_text().splitlines()
    assert len(table) == k + 3  # header, rule, one row per client, totals
    assert np.array_equal([int(r.split()[-1]) for r in table[2:-1]], sizes)
    doc = json.loads((tmp_path / "fedavg" / "metrics.json").read_text())
    assert len(doc["history"]) == 4 and doc["summary"]["complete"]


def test_many_drops_are_summarised_in_the_log_but_kept_in_metrics(tmp_path, rng, caplog):
    """40 clients a round, half failing: at most DROP_LOG_LINES per-client lines a round and
    one summary line; the record keeps every [client, reason]."""
    b = _bundle(rng, 4001)
    cfg = _scale_config(2000, 40, tmp_path, failure_rate=0.5, rounds=2, checkpoint=False)
    with caplog.at_level(logging.INFO, logger="fedsq_fast.federation"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 2 samples a client: 'too little data' is expected
        data = prepare_data(cfg, b, input_spec=InputSpec(1))
        res = Federation(cfg, "fedavg", data, model_fn=tiny_model, quiet=True).run()
    for h in res.history[1:]:
        rnd = h["round"]
        seed = int(np.random.SeedSequence([cfg.seed, rnd, 5]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
        draws = np.random.default_rng(seed).random(40)  # seeds.FAIL = 5: the documented stream, drawn here
        failed = [c for c, f in zip(sample_clients(cfg, rnd), draws < 0.5) if f]
        assert [c for c, _ in h["clients_dropped"]] == failed and len(failed) > DROP_LOG_LINES
        per_client = [r for r in caplog.records if r.getMessage().startswith(f"round {rnd}: client ")
                      and r.levelno >= logging.INFO]
        summary = [r for r in caplog.records if r.getMessage().startswith(f"round {rnd}: ")
                   and "more clients dropped than logged" in r.getMessage()]
        assert len(per_client) == DROP_LOG_LINES and len(summary) == 1
        assert f"{len(failed) - DROP_LOG_LINES} more" in summary[0].getMessage()
        assert f"in all {len(failed)} clients" in summary[0].getMessage()


def _probe(k, out):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(HERE / "scale_probe.py"), str(k), "10", "3", "iid", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow  # two fresh interpreters: 13-16 s on 2 shared cores
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's RSS high-water reset")
def test_memory_is_flat_in_the_number_of_clients(tmp_path):
    """Peak RSS growth of a 3-round run with 10 sampled clients a round: 10,000 clients
    within 1.2x of 100 clients over the same 20,000-image pool (what grows with the number of
    clients is one bound per client and the class-count matrix; a per-client model copy or
    per-client tensors would break the bound)."""
    procs = {k: _probe(k, tmp_path / str(k)) for k in (100, 10_000)}
    got = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        got[k] = json.loads(out.strip().splitlines()[-1])
        assert got[k]["sampled"] == [10, 10, 10]
    a, b = got[100]["peak_kb"], got[10_000]["peak_kb"]
    assert a > 10_000  # the pool and its splits are in the measurement (MB): a ratio means something
    assert b <= 1.2 * a, (a, b)


# ---------------------------------------------------------------- one worker pool per grid
def test_grid_runs_share_one_worker_pool(tmp_path, monkeypatch, bundle):
    """`compare` and the suites (run_grid) start one pool for all their runs, not one per run:
    2 worker processes for 3 runs on 2 splits, all stopped at the end, and every recorded
    number (timings aside) that of the in-process grid."""
    from conftest import SMALL

    from fedsq_fast.experiments.grid import run_grid
    from fedsq_fast.federation import workers as W

    started = []

    class CountingSlot(W._Slot):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            started.append(self)

    monkeypatch.setattr(W, "_Slot", CountingSlot)
    s = draw_seed()
    cells = [(s, "iid", "fedavg"), (s, "iid", "fedsq"), (s + 1, "iid", "fedavg")]
    hist = {}
    for workers in (2, 1):
        def config(seed, spec, method, workers=workers):
            return from_mapping({**SMALL, "seed": seed, "partition": spec, "rounds": 2, "workers": workers,
                                 "methods": [method], "checkpoint": False})

        got = []
        assert run_grid(cells, config, tmp_path / str(workers), bundle=bundle,
                        on_run=lambda cell, d, res, info: got.append(res.history)) == 3
        hist[workers] = [[{k: v for k, v in h.items() if "time" not in k and k != "elapsed_s"} for h in run]
                         for run in got]
    assert len(started) == 2 and not any(sl.proc.is_alive() for sl in started)
    assert hist[2] == hist[1]
