"""Running a suite: every cell through the grid runner with the mask-evolution metrics, the
provenance of each run (``run_info.json``), resume / shards / stop limits, then the report."""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from ..federation.config import RunConfig, config_differences, read_json
from ..federation.data import load_dataset
from ..outputs import write_text
from .grid import run_grid
from .mask_metrics import MaskMetrics
from .provenance import machine_info, rel
from .report import report
from .suite import Suite, cell_dir, default_out, fail, load_suite, spec_tag


def _cell_state(d: Path, cfg: RunConfig) -> str:
    """'done' | 'partial' (a checkpoint) | 'new'; refuses results written with other settings."""
    mj = d / "metrics.json"
    if mj.is_file():
        doc = read_json(mj, "out")
        if not isinstance(doc, dict) or not isinstance(doc.get("config", {}), dict):
            raise ValueError(f"out: {mj}: not a metrics.json (a JSON object with a config object)")
        diff = config_differences(cfg, doc.get("config", {}))
        if diff:
            raise ValueError(f"out: {mj} was written with other settings (differing keys: {diff}); "
                             "use another --out for a changed suite")
        if doc.get("summary", {}).get("complete", True):
            return "done"
    return "partial" if (d / "checkpoint.safetensors").is_file() else "new"


def run_suite(suite: Suite | str | os.PathLike, out=None, resume: bool = False, echo=print,
              max_runs: int | None = None, deadline: _dt.datetime | None = None,
              shard: tuple[int, int] = (1, 1)) -> Path:
    """Run every cell of the suite (seed-major order), then write the report.

    ``resume``: skip finished cells, continue interrupted ones from their checkpoint.
    ``shard=(k, n)``: run only cells k, k+n, k+2n, ... of the run order (1-based k), so n processes
    on n cores fill one results folder between them (pass ``resume`` to each).
    ``max_runs``: stop after this many newly run cells; ``deadline`` (aware datetime): start no
    run that would, at the longest run time seen so far, end after it. Either way the report
    then lists what is missing.
    """
    k_, n_ = shard
    if not (isinstance(k_, int) and isinstance(n_, int) and 1 <= k_ <= n_):
        fail("shard", f"must be K/N with 1 <= K <= N, got {k_}/{n_}")
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    out = Path(out) if out is not None else default_out(suite)
    cells = suite.cells()
    states = {}
    for s, p, m in cells:
        states[(s, p, m)] = _cell_state(cell_dir(out, p, s, m), suite.cell_config(p, s, m))
    existing = [k for k, v in states.items() if v != "new"]
    if existing and not resume:
        raise ValueError(f"out: {out} already holds results for {len(existing)} of {len(cells)} runs; "
                         "pass --resume to skip finished runs and continue interrupted ones, "
                         "or choose another --out")
    todo = [c for i, c in enumerate(cells) if states[c] != "done" and i % n_ == k_ - 1]
    bundle = None
    if todo:  # missing data fails here, before the results folder is written
        first = suite.cell_config(todo[0][1], todo[0][0], todo[0][2])
        bundle = load_dataset(first.dataset, first.data_root, first.download, first.in_memory)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "suite.toml", suite.text)
    mine = sum(1 for i in range(len(cells)) if i % n_ == k_ - 1)
    echo(f"suite {suite.name}: {len(cells)} runs" + (f" (shard {k_}/{n_}: {mine} of them)" if n_ > 1 else "")
         + f", {mine - len(todo)} already done, {len(todo)} to run -> {out}")
    ran, longest = 0, 0.0

    def stop():
        if max_runs is not None and ran >= max_runs:
            return f"--max-runs {max_runs} reached"
        if deadline is not None and _dt.datetime.now(_dt.timezone.utc).timestamp() + longest > deadline.timestamp():
            return f"deadline {deadline.isoformat()} (longest run so far {longest:.0f} s)"
        return None

    def on_run(cell, d, res, info):
        nonlocal ran, longest
        s, p, m = cell
        info = {**info, "suite": suite.name, "suite_file": rel(suite.path), **machine_info()}
        write_text(d / "run_info.json", json.dumps(info, indent=1))
        ran += 1
        longest = max(longest, info["wall_s"])
        sm = res.summary
        echo(f"[{ran}/{len(todo)}] seed {s} {spec_tag(p)} {m}: BVA {sm['bva']:.4f} at round "
             f"{sm['rounds_to_best']}, {info['wall_s']:.0f} s ({info['started']})")

    # resume=True: a cell with a checkpoint of an interrupted run continues from it
    run_grid(todo, lambda s, p, m: suite.cell_config(p, s, m), out, bundle=bundle, resume=True, quiet=True,
             callbacks=lambda: [MaskMetrics()], stop=stop, on_run=on_run, echo=echo)
    report(out, suite=suite, echo=echo)
    return out
