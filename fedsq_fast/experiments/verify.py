"""Checking recorded evidence: rerun recorded runs and compare every number (:func:`verify_runs`),
or check that a longer suite retraces a shorter one's rounds (:func:`compare_prefix`); each
check is appended to the results folder's ``verification.json``, which the report lists."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..federation.data import load_dataset
from ..federation.metrics import jsonable
from ..outputs import write_text
from ..federation.server import Federation, prepare_data
from .mask_metrics import MaskMetrics
from .provenance import code_version, machine_info, utc
from .provenance import rel as relpath
from .suite import cell_dir, fail, load_suite

# What a run records about the clock rather than the computation: excluded from the check.
_TIMING = ("time_", "elapsed_s", "seconds_to_target")
# The per-round and summary numbers the report is computed from (see analyse()).
REPORT_KEYS = {"val_acc", "gate_change", "gate_flip_prev", "weight_step_rel", "weight_dist_rel", "bytes_up",
               "bva", "rounds_to_best", "test_acc", "final_val_acc", "initial_val_acc", "payload_bytes",
               "rounds", "complete", "best_val_acc", "best_round", "round"}


def _differences(a, b, where="", out=None) -> list:
    """Every (path, recorded, now) where two JSON values differ; floats compared exactly (the same
    code on the same machine kind and thread count gives the same bits)."""
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k.startswith(_TIMING):
                continue
            if k not in a or k not in b:  # a key the recording code did not write, or dropped since
                out.append((f"{where}.{k}", a.get(k, _ABSENT), b.get(k, _ABSENT)))
            else:
                _differences(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _differences(x, y, f"{where}[{i}]", out)
    elif not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
        out.append((where, a, b))
    return out


_ABSENT = "<not recorded>"


def _key_of(path: str) -> str:
    return path.rsplit(".", 1)[-1].split("[")[0]


def _rel_diff(x, y) -> float | None:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        return abs(x - y) / max(abs(x), abs(y), 1e-300)
    return None


def _tally(diffs) -> tuple:
    """Sort the differences of two runs' records into a check's row fields: ``identical`` (every
    number), ``match`` (every number in REPORT_KEYS), the differing report keys, and per key (first
    place, how many places, largest relative difference) the report numbers (``differences``) and
    the diagnostics (``differing_other_keys``); plus the keys only one run recorded (code changes)
    and the verdict that verify and verify --against print."""
    absent = sorted({_key_of(path) for path, x, y in diffs if _ABSENT in (x, y)})
    by_key = {}
    for path, x, y in diffs:
        if _ABSENT in (x, y):
            continue
        r = _rel_diff(x, y)
        e = by_key.setdefault(_key_of(path), {"first": path, "count": 0, "max_rel": 0.0})
        e["count"] += 1
        e["max_rel"] = max(e["max_rel"], float("inf") if r is None else r)
    report = {k: v for k, v in by_key.items() if k in REPORT_KEYS}
    fields = {"identical": not by_key, "match": not report, "differing_report_keys": sorted(report),
              "differences": report, "differing_other_keys": {k: v for k, v in by_key.items() if k not in report}}
    if not by_key:
        verdict = "every recorded number identical"
    elif not report:
        verdict = "every number the report uses identical; other recorded numbers differ: " + ", ".join(
            f"{k} (max rel. {v['max_rel']:.1e})" for k, v in by_key.items())
    else:
        verdict = "DIFFERS in " + ", ".join(f"{k} ({v['count']}x, first {v['first']}, max rel. {v['max_rel']:.1e})"
                                           for k, v in report.items())
    if absent:
        verdict += f"; keys in one run only (code changes): {', '.join(absent)}"
    return fields, absent, verdict


# What decides a run's floating-point rounding on a CPU (machine_info() keys), kept with each check.
_CPU_KEYS = ("host_cpu", "cpu_simd", "torch_cpu_capability", "fedsq_fast_cpu_isa", "isa_env", "torch")


def _run_info(run_dir: Path) -> dict:
    f = run_dir / "run_info.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def verify_runs(root, cells: list | None = None, sample: int = 3, seed: int = 0, echo=print,
                record: bool = True) -> list:
    """Run recorded runs of a results folder again with the code installed now and check that
    every recorded number (history and summary, timings excluded) comes out the same, bit for bit.

    ``cells``: run folders relative to ``root`` (e.g. ``dirichlet_0.5/seed2/fedavg``); default:
    ``sample`` of them drawn with ``seed``. Each rerun writes to a temporary folder; the recorded
    results are only read; with ``record`` each check is appended to ``root/verification.json``,
    which the report lists. Returns one dict per run: ``identical`` (every recorded number),
    ``match`` (every number in REPORT_KEYS), and the differing keys with their largest relative
    difference.
    """
    import random
    import tempfile

    root = Path(root)
    if not (root / "suite.toml").is_file():
        fail("dir", f"{root} has no suite.toml (not a suite results folder)")
    suite = load_suite(root / "suite.toml")
    by_dir = {}
    for s, p, m in suite.cells():
        d = cell_dir(root, p, s, m)
        if (d / "metrics.json").is_file():
            by_dir[str(d.relative_to(root))] = (s, p, m)
    if not by_dir:
        fail("dir", f"no recorded runs under {root}")
    if cells:
        bad = [c for c in cells if c.strip("/") not in by_dir]
        if bad:
            fail("--cell", f"no recorded run {bad[0]!r} under {root}; recorded: {', '.join(sorted(by_dir)[:4])}, ...")
        chosen = [c.strip("/") for c in cells]
    else:
        if sample < 1:
            fail("--sample", f"must be >= 1, got {sample}")
        chosen = sorted(random.Random(seed).sample(sorted(by_dir), min(sample, len(by_dir))))
    out = []
    bundle = None
    with tempfile.TemporaryDirectory(prefix="fedsq-verify-") as tmp:
        for rel in chosen:
            s, p, m = by_dir[rel]
            rec = json.loads((root / rel / "metrics.json").read_text())
            cfg = suite.cell_config(p, s, m)
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            if bundle is None:
                bundle = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.in_memory)
            t0 = time.perf_counter()
            res = Federation(cfg, m, prepare_data(cfg, bundle), out_dir=Path(tmp) / rel, quiet=True,
                             callbacks=[MaskMetrics()]).run()
            now = json.loads((Path(tmp) / rel / "metrics.json").read_text())
            diffs = _differences({k: rec[k] for k in ("summary", "history")},
                                 {k: now[k] for k in ("summary", "history")})
            fields, absent, verdict = _tally(diffs)
            info = _run_info(root / rel)
            now_cpu = machine_info()
            row = {"run": rel, "verified_at": utc(), "code": code_version(), "recorded_code": info.get("code"),
                   "recorded_cpu": {k: info.get(k) for k in _CPU_KEYS},
                   "cpu": {k: now_cpu.get(k) for k in _CPU_KEYS}, **fields,
                   "keys_in_one_run_only": absent,
                   "bva": res.summary["bva"], "wall_s": time.perf_counter() - t0}
            out.append(row)
            echo(f"{rel}: {verdict} (recorded with code {row['recorded_code']}, BVA {row['bva']:.4f}, "
                 f"{row['wall_s']:.0f} s)")
            row["verdict"] = verdict
            if record:  # provenance next to the results, as each check ends: the report lists it
                _record_checks(root, [row])
    return out


def compare_prefix(root, other, echo=print, record: bool = True) -> list:
    """For every run folder in both ``root`` and ``other`` (suites that differ in the number of
    rounds only), check that the rounds both recorded are the same, number for number (timings
    excluded): the longer run must retrace the shorter one. Nothing is rerun. Appends one row per
    run to ``root/verification.json`` (kind ``prefix``) with ``record``."""
    root, other = Path(root), Path(other)
    for d, arg in ((root, "dir"), (other, "--against")):
        if not d.is_dir():
            fail(arg, f"not a folder: {d}")
    mine = {str(q.parent.relative_to(root)) for q in root.rglob("metrics.json")}
    theirs = {str(q.parent.relative_to(other)) for q in other.rglob("metrics.json")}
    both = sorted(mine & theirs)
    if not both:
        fail("--against", f"{other} has no run folder in common with {root}")
    rows = []
    for rel in both:
        a, b = (json.loads((d / rel / "metrics.json").read_text()) for d in (other, root))
        n = min(len(a["history"]), len(b["history"]))
        # keys one suite's code did not record are not differences here (rounds are compared as recorded)
        fields, _, verdict = _tally([d for d in _differences(a["history"][:n], b["history"][:n]) if _ABSENT not in d[1:]])
        info = _run_info(root / rel)
        verdict = f"rounds 0-{n - 1} vs {relpath(other)}: {verdict}"
        row = {"run": rel, "kind": "prefix", "against": relpath(other), "verified_at": utc(), "code": info.get("code"),
               "recorded_code": _run_info(other / rel).get("code"),
               "cpu": {k: info.get(k) for k in _CPU_KEYS}, "rounds_compared": n, **fields, "verdict": verdict}
        rows.append(row)
        echo(f"{rel}: {verdict}")
    if record:  # the newest check against `other` replaces older ones
        _record_checks(root, rows, drop=lambda r: r.get("kind") == "prefix" and r.get("against") == relpath(other))
    return rows


def _record_checks(root: Path, rows: list, drop=lambda r: False) -> None:
    log = root / "verification.json"
    kept = [r for r in (json.loads(log.read_text()) if log.is_file() else []) if not drop(r)]
    write_text(log, json.dumps(jsonable(kept + rows), indent=1))  # atomic, never through a link


