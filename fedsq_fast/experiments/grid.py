"""The grid runner: runs of (seed, partition, method) cells, one data split per (seed,
partition), each run in ``OUT/<partition>/seed<s>/<method>/``. Suites (:func:`run_suite`)
and ``fedsq-fast compare`` (:func:`run_compare`) both run through :func:`run_grid`."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..federation import adapter
from ..federation.config import RunConfig, check_sources, validate
from ..federation.data import load_dataset
from ..federation.partition import partition_table
from ..federation.runner import check_out_dir, parse_partition, preflight_models
from ..federation.server import Federation, prepare_data
from ..outputs import write_text
from ..plots import plot_partition
from .provenance import code_version, loadavg, utc
from .report import table_report
from .suite import cell_dir, spec_tag


def run_grid(cells, config, out, *, bundle=None, resume: bool = False, quiet: bool = True,
             callbacks=tuple, preflight: bool = False, partition_plot: bool = False, stop=None,
             on_run=None, echo=print) -> int:
    """Run ``cells`` ((seed, partition spec, method) tuples, in that order) under ``out``.

    ``config(seed, spec, method)``: the cell's RunConfig. The cells of one (seed, partition)
    share one data split (``prepare_data`` on ``bundle``, loaded from the config when None),
    whose class counts go to ``<partition>/seed<s>/partition.txt`` (and ``partition.png`` with
    ``partition_plot``). ``preflight``: build and run each kind of model on the split before
    its first run. ``callbacks()``: fresh engine callbacks for each run. ``resume``: continue a
    run from its checkpoint. ``stop()``: a reason to stop before the next run, or None (the
    reason is echoed). ``on_run(cell, folder, result, info)``: after each run, with ``info``
    (start and end time, wall seconds, load average, code version). Runs with ``workers`` > 1
    share one worker pool (started at the first such run, stopped when the grid ends). Returns
    the runs made."""
    groups: dict = {}
    for s, p, m in cells:
        groups.setdefault((s, p), []).append(m)

    def stopped(ran: int) -> bool:
        why = stop() if stop is not None else None
        if why:
            echo(f"stopping: {why}; {len(cells) - ran} runs left for --resume")
        return bool(why)

    pools: dict = {}  # (workers, threads) -> one WorkerPoolTransport for every run that asks for it
    try:
        return _run_groups(groups, config, out, bundle, resume, quiet, callbacks, preflight, partition_plot,
                           stopped, on_run, pools)
    finally:
        for pool in pools.values():
            pool.close()


def _pool_for(cfg, pools: dict):
    """The worker pool of a run with ``workers`` > 1, started once and shared by every run of
    the grid with the same (workers, threads): spawning workers costs seconds per run, and
    binding a pool to the next run sends it that run's model and data (``WorkerPoolTransport.bind``)."""
    if cfg.workers <= 1:
        return None
    key = (cfg.workers, cfg.threads)
    if key not in pools:
        from ..federation.workers import WorkerPoolTransport

        pools[key] = WorkerPoolTransport(cfg.workers)
    return pools[key]


def _run_groups(groups, config, out, bundle, resume, quiet, callbacks, preflight, partition_plot, stopped,
                on_run, pools) -> int:
    ran = 0
    for (s, p), methods in groups.items():
        if stopped(ran):
            break
        base = config(s, p, methods[0])
        if base.threads:
            torch.set_num_threads(base.threads)
        data = prepare_data(base, bundle)  # one split for the group: its cells share data and settings
        if preflight:
            preflight_models(dataclasses.replace(base, methods=list(methods)), data)
        gdir = cell_dir(out, p, s, methods[0]).parent
        gdir.mkdir(parents=True, exist_ok=True)
        write_text(gdir / "partition.txt", partition_table(data.counts, data.classes) + "\n")
        if partition_plot:
            plot_partition(data.counts, gdir / "partition.png", data.classes,
                           f"{base.dataset}, {spec_tag(p)}, seed {s}")
        for m in methods:
            if stopped(ran):
                return ran
            cfg = config(s, p, m)
            d = cell_dir(out, p, s, m)
            start, t0, load0 = utc(), time.perf_counter(), loadavg()
            res = Federation(cfg, m, data, out_dir=d, quiet=quiet, callbacks=callbacks(),
                             transport=_pool_for(cfg, pools)).run(resume=resume)
            info = {"started": start, "finished": utc(), "wall_s": time.perf_counter() - t0,
                    "loadavg_start": load0, "loadavg_end": loadavg(), "code": code_version()}
            ran += 1
            if on_run is not None:
                on_run((s, p, m), d, res, info)
    return ran


def run_compare(cfg: RunConfig, seeds, partitions, out_dir=None, resume=False, quiet=False,
                echo=print) -> list[dict]:
    """``fedsq-fast compare``: ``cfg.methods`` x ``seeds`` x ``partitions`` (partition-major),
    every configuration validated before any training; then :func:`table_report` of the
    folder. Returns one row per run (its summary, ``partition``, ``seed``)."""
    out = Path(out_dir or cfg.out_dir)
    check_out_dir(out)
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    tags = [spec_tag(p) for p in partitions]
    if len(set(tags)) != len(tags):
        raise ValueError(f"partitions: two entries name the same partition: {list(partitions)}")
    configs = {}
    for spec in partitions:
        over = parse_partition(spec)
        for s in seeds:
            c = dataclasses.replace(cfg, seed=int(s), **over)
            validate(c, adapter.list_models())
            configs[(int(s), spec)] = c
    check_sources(cfg, adapter.list_models())  # data_root and weights files, before loading
    cells = [(int(s), p, m) for p in partitions for s in seeds for m in cfg.methods]
    rows = []

    def on_run(cell, folder, res, info):
        s, spec, m = cell
        rows.append(dict(res.summary, partition=spec, seed=s))
        if not quiet:
            sm = res.summary
            echo(f"[{spec} seed {s}] {m}: BVA {sm['bva']:.4f} (round {sm['rounds_to_best']}), "
                 f"{sm['time_total_s']:.1f} s")

    bundle = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.in_memory)  # once: every cell reads the same data
    run_grid(cells, lambda s, p, m: configs[(s, p)], out, bundle=bundle,
             resume=resume, quiet=quiet, preflight=True, partition_plot=True, on_run=on_run, echo=echo)
    table_report(out, echo=echo if not quiet else (lambda *_: None))
    return rows
