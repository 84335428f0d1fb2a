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
from .provenance import AVX2_PIN, code_version, machine_info, utc
from .provenance import rel as relpath
from .suite import cell_dir, fail, load_suite

# What a run records about the clock rather than the computation: excluded from the check.
_TIMING = ("time_", "elapsed_s", "seconds_to_target")
# The per-round and summary numbers the report is computed from (see analyse()).
REPORT_KEYS = {"val_acc", "gate_change", "gate_flip_prev", "weight_step_rel", "weight_dist_rel", "bytes_up",
               "bva", "rounds_to_best", "test_acc", "final_val_acc", "initial_val_acc", "payload_bytes",
               "rounds", "complete", "best_val_acc", "best_round", "round",
               # federated evaluation (the robustness verdict, the report's section and plot)
               "client_acc_weighted", "client_acc_mean", "client_acc_worst", "client_acc_p10", "client_acc_std",
               "client_acc"}


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
_CPU_KEYS = ("host_cpu", "cpu_vendor", "cpu_simd", "torch_cpu_capability", "fedsq_fast_cpu_isa", "isa_env", "torch",
             "fedsq_fast_backend", "numpy")
# Of those, what must be equal for bit-identical numbers to be expected (label for messages).
_IDENTITY_KEYS = (("cpu_vendor", "CPU vendor"), ("host_cpu", "CPU model"), ("torch_cpu_capability", "torch's CPU ISA"),
                  ("fedsq_fast_cpu_isa", "fedsq_fast's CPU ISA"), ("isa_env", "ISA pins"), ("torch", "torch"),
                  ("fedsq_fast_backend", "fedsq_fast backend"))

# Exit codes of `fedsq-fast suite verify` (docs/federation.md#verify; 2 stays a mistake in the command).
EXIT_IDENTICAL = 0  # every number the report uses came out bit for bit the same
EXIT_DIFFERS = 1  # a difference the machine does not explain, or one that changes the report's conclusions
EXIT_STATISTICAL = 3  # not bit-identical (another CPU/ISA/torch), but every verdict and interval unchanged
EXIT_UNVERIFIED = 4  # could not judge: not identical and no seed-to-seed spread to judge by, or no data here
OUTCOMES = {EXIT_IDENTICAL: "IDENTICAL", EXIT_DIFFERS: "DIFFERS", EXIT_STATISTICAL: "REPRODUCED STATISTICALLY",
            EXIT_UNVERIFIED: "COULD NOT VERIFY"}
# Summary numbers whose rerun value must lie within the recorded seed-to-seed spread.
SPREAD_KEYS = ("bva", "final_val_acc", "test_acc", "rounds_to_best")


def describe_machine(info: dict) -> str:
    """A machine as recorded by :func:`~.provenance.machine_info`, in one phrase; what a
    recording does not hold is shown as ``?``."""
    def g(k):
        v = info.get(k)
        return "?" if v is None else v

    vendor = f" ({info['cpu_vendor']})" if info.get("cpu_vendor") else ""
    env = info.get("isa_env")
    pins = "?" if env is None else (" ".join(f"{k}={v}" for k, v in env.items()) or "none")
    return (f"{g('host_cpu')}{vendor}, torch {g('torch')} at ISA {g('torch_cpu_capability')}, fedsq_fast "
            f"{g('fedsq_fast_backend')} at ISA {g('fedsq_fast_cpu_isa')}, ISA pins: {pins}")


def identity_expected(recorded: dict, now: dict) -> tuple:
    """(expected, reasons): whether the same code can be expected to give bit-identical
    numbers on the machine ``now`` as on ``recorded`` (both :func:`machine_info` dicts):
    False with the differences (CPU vendor or model, the ISA torch or fedsq_fast use, the
    pins, torch), None with what the recording does not say (older recordings lack the ISA),
    True when every one of them is recorded and equal."""
    differ, unknown = [], []
    for k, label in _IDENTITY_KEYS:
        a, b = recorded.get(k), now.get(k)
        if a is None:
            unknown.append(label)
        elif a != b:
            show = lambda v: (" ".join(f"{x}={y}" for x, y in v.items()) or "none") if isinstance(v, dict) else v  # noqa: E731
            differ.append(f"{label} {show(a)} -> {show(b)}")
    if differ:
        return False, differ
    return (None, unknown) if unknown else (True, [])


def _run_info(run_dir: Path) -> dict:
    f = run_dir / "run_info.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _case_verdicts(res) -> list:
    """Every claim's verdict and every case's verdict (the text after '->' in its line)."""
    return [(c["claim"], c["verdict"], tuple(ln.rsplit("-> ", 1)[-1] for ln in c["details"])) for c in res["claims"]]


def _intervals(res) -> dict:
    """Every interval the report prints, by name: (comparison or gate row, key) -> the paired CI."""
    out = {}
    for c in res["comparisons"]:
        for k in ("bva", "rounds_to_best", "rounds_to_target"):
            out[f"{c['partition']} {c['a']} vs {c['b']} {k}"] = c[k]
    for g in res["gates"]:
        out[f"{g['partition']} {g['method']} gate-weight settle"] = g["settle_diff"]
    return out


def statistical_check(root, suite, reruns: dict) -> dict:
    """Judge reruns that are not bit-identical: the suite's report computed again with each
    rerun run (``reruns``: run folder relative to ``root`` -> its new metrics.json document) in
    place of its recording must keep every claim's and every case's verdict and every
    interval's side of 0 (:func:`~.verdicts.direction`), and each rerun's BVA, final and test
    accuracy and rounds-to-best must lie within the recorded seed-to-seed spread of its cell
    (|now - recorded| <= the sample std over the cell's seeds). Returns ``possible`` (False
    with ``why`` where a cell has fewer than 2 recorded seeds), ``ok``, and the changes found."""
    from .analysis import analyse
    from .report import load_docs
    from .verdicts import direction

    docs = load_docs(root)
    new_docs = []
    for d in docs:
        rel = str(Path(d["path"]).parent)
        new_docs.append(dict(reruns[rel], path=d["path"], run_info=d["run_info"]) if rel in reruns else d)
    before, after = analyse(docs, suite), analyse(new_docs, suite)
    out = {"possible": True, "why": None, "verdicts_changed": [], "intervals_changed": [], "outside_spread": [],
           "largest_in_sd": 0.0}
    for (claim, v0, c0), (_, v1, c1) in zip(_case_verdicts(before), _case_verdicts(after)):
        if v0 != v1 or c0 != c1:
            out["verdicts_changed"].append(f"{claim}: {v0} -> {v1}")
    i0, i1 = _intervals(before), _intervals(after)
    for k in i0:
        if direction(i0[k]) != direction(i1.get(k)):
            out["intervals_changed"].append(f"{k}: {direction(i0[k])} -> {direction(i1.get(k))}")
    rows = {(r["partition"], r["method"]): r for r in before["rows"]}
    rec_runs = {(r["partition"], r["method"], r["seed"]): r for r in before["per_run"]}
    new_runs = {(r["partition"], r["method"], r["seed"]): r for r in after["per_run"]}
    by_rel = {str(Path(d["path"]).parent): d for d in new_docs}
    from ..federation.runner import partition_tag

    for rel in reruns:
        d = by_rel.get(rel)
        if d is None:
            continue
        key = (partition_tag(d["config"]), d["method"], int(d["config"]["seed"]))
        row = rows.get(key[:2])
        if row is None or row["n"] < 2:
            out["possible"] = False
            out["why"] = (f"{rel}: its cell ({key[0]}, {key[1]}) has {row['n'] if row else 0} recorded seed(s): "
                          "no seed-to-seed spread to judge a difference by")
            continue
        for k in SPREAD_KEYS:
            a, b, sd = rec_runs[key].get(k), new_runs[key].get(k), row.get(k + "_std")
            if a is None or b is None or a == b:
                continue
            if sd is None or not math.isfinite(sd) or abs(b - a) > sd:
                out["outside_spread"].append(f"{rel} {k}: {a:.6g} -> {b:.6g} (seed-to-seed sd {sd:.3g})")
            elif sd > 0:
                out["largest_in_sd"] = max(out["largest_in_sd"], abs(b - a) / sd)
    out["ok"] = out["possible"] and not (out["verdicts_changed"] or out["intervals_changed"] or out["outside_spread"])
    return out


def judge(rows: list, stat: dict | None) -> tuple:
    """(exit code, one-line explanation) of a verify check: identical; else reproduced
    statistically where bit-identity was not expected (another machine) and ``stat`` holds;
    could not verify where ``stat`` cannot judge and identity was not expected; else differs."""
    if all(r["match"] for r in rows):
        return EXIT_IDENTICAL, "every number the report uses is bit for bit the same"
    differing = [r for r in rows if not r["match"]]
    expected = [r for r in differing if r.get("identity_expected") is True]
    if stat is not None and not stat["possible"]:
        if expected:
            return EXIT_DIFFERS, (f"{len(expected)} run(s) differ on the machine kind they were recorded on "
                                  f"(a code or environment change), and {stat['why']}")
        return EXIT_UNVERIFIED, f"not bit-identical, and {stat['why']}"
    if stat is not None and stat["ok"]:
        if expected:
            return EXIT_DIFFERS, (f"the same machine kind should give the same bits, but {len(expected)} run(s) "
                                  "differ (a code or environment change); statistically the report's conclusions "
                                  "are unchanged")
        return EXIT_STATISTICAL, ("not bit-identical (a different floating-point path), but every verdict and "
                                  "interval of the report is unchanged and every rerun lies within the recorded "
                                  f"seed-to-seed spread (largest difference in {', '.join(SPREAD_KEYS)}: "
                                  f"{stat['largest_in_sd']:.2f} sd)")
    what = (stat["verdicts_changed"] + stat["intervals_changed"] + stat["outside_spread"]) if stat else []
    return EXIT_DIFFERS, "; ".join(what[:4]) + (f"; {len(what) - 4} more" if len(what) > 4 else "") or "differs"


def exit_code(rows: list) -> int:
    """The exit code of a verify check from its rows (each holds the check's ``outcome_code``;
    rows without one: 0 when every report number matched, else 1)."""
    codes = {r.get("outcome_code") for r in rows}
    if codes - {None}:
        return max(codes - {None}, key=lambda c: (c == EXIT_DIFFERS, c == EXIT_UNVERIFIED, c))
    return EXIT_IDENTICAL if all(r["match"] for r in rows) else EXIT_DIFFERS


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

    It prints the machine that recorded the runs and the one verifying (CPU vendor and model,
    the ISA torch and fedsq_fast use, the pins, torch) and whether bit-identical numbers can
    be expected (:func:`identity_expected`). Where they are not identical the suite's report is
    judged again with the reruns in place (:func:`statistical_check`); every row carries the
    check's ``outcome`` and ``outcome_code`` (:func:`judge`; the exit code of
    ``fedsq-fast suite verify``: 0 identical, 3 reproduced statistically, 1 differs, 4 could
    not verify).
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
    out, reruns = [], {}
    bundle = None
    now_cpu = machine_info()
    recorded = {}
    for rel in chosen:
        recorded.setdefault(describe_machine(_run_info(root / rel)), []).append(rel)
    for desc, rels in recorded.items():
        echo(f"recorded on:  {desc}" + (f" ({len(rels)} of the runs)" if len(recorded) > 1 else ""))
    echo(f"verifying on: {describe_machine(now_cpu)}")
    for desc, rels in recorded.items():
        exp, why = identity_expected(_run_info(root / rels[0]), now_cpu)
        echo("bit-identical numbers: " + (
            "expected (same CPU, ISA and torch)" if exp else
            f"not expected ({'; '.join(why)}): differences are judged statistically" if exp is False else
            f"cannot tell (the recording does not say: {', '.join(why)}); differences are judged statistically"))
    cap = str(now_cpu.get("torch_cpu_capability") or "")
    if cap.upper().startswith("AVX512") and not now_cpu.get("isa_env") and any(
            str(_run_info(root / r).get("torch_cpu_capability") or "AVX2").upper() == "AVX2" for r in chosen):
        echo(f"(this CPU runs AVX-512 paths; to take the AVX2 paths of the recording: export {AVX2_PIN})")
    with tempfile.TemporaryDirectory(prefix="fedsq-verify-") as tmp:
        for rel in chosen:
            s, p, m = by_dir[rel]
            rec = json.loads((root / rel / "metrics.json").read_text())
            cfg = suite.cell_config(p, s, m)
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            if bundle is None:
                try:
                    bundle = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.in_memory)
                except ValueError as e:  # the data is not on this machine: nothing was compared
                    echo(f"COULD NOT VERIFY (exit {EXIT_UNVERIFIED}): {e}")
                    return [{"run": rel, "match": False, "identical": False, "outcome_code": EXIT_UNVERIFIED,
                             "outcome": OUTCOMES[EXIT_UNVERIFIED], "verdict": f"not rerun: {e}"}]
            t0 = time.perf_counter()
            res = Federation(cfg, m, prepare_data(cfg, bundle), out_dir=Path(tmp) / rel, quiet=True,
                             callbacks=[MaskMetrics()]).run()
            now = json.loads((Path(tmp) / rel / "metrics.json").read_text())
            diffs = _differences({k: rec[k] for k in ("summary", "history")},
                                 {k: now[k] for k in ("summary", "history")})
            fields, absent, verdict = _tally(diffs)
            info = _run_info(root / rel)
            exp, why = identity_expected(info, now_cpu)
            row = {"run": rel, "verified_at": utc(), "code": code_version(), "recorded_code": info.get("code"),
                   "recorded_cpu": {k: info.get(k) for k in _CPU_KEYS},
                   "cpu": {k: now_cpu.get(k) for k in _CPU_KEYS}, **fields,
                   "keys_in_one_run_only": absent, "identity_expected": exp, "identity_reasons": why,
                   "bva": res.summary["bva"], "wall_s": time.perf_counter() - t0}
            out.append(row)
            reruns[rel] = now
            if exp is not True and verdict.startswith("DIFFERS"):  # expected on another machine: judged below
                verdict = "not bit-identical" + verdict[len("DIFFERS"):]
            echo(f"{rel}: {verdict} (recorded with code {row['recorded_code']}, BVA {row['bva']:.4f}, "
                 f"{row['wall_s']:.0f} s)")
            row["verdict"] = verdict
            if record:  # provenance next to the results, as each check ends: the report lists it
                _record_checks(root, [row])
    stat = None
    if not all(r["match"] for r in out):
        stat = statistical_check(root, suite, {r["run"]: reruns[r["run"]] for r in out})
    code, why = judge(out, stat)
    for r in out:
        r.update(outcome_code=code, outcome=OUTCOMES[code], outcome_reason=why, statistical=stat)
    echo(f"{OUTCOMES[code]} (exit {code}): {why}")
    if record:  # the check's outcome, on the rows logged above
        done = {(r["run"], r["verified_at"]) for r in out}
        _record_checks(root, out, drop=lambda r: (r.get("run"), r.get("verified_at")) in done)
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


