"""Reports from a folder of runs, one stack for both kinds of folder:

- a suite's ``REPORT.md`` (:func:`report`): machine and dates, status, claims and verdicts,
  tables, plots, reproduction checks, settings; with ``summary.json`` / ``summary.csv``;
- the summary table of ``fedsq-fast run`` / ``compare`` / ``report`` (:func:`table_report`):
  ``summary.md`` / ``summary.csv`` and the accuracy and rounds-to-best plots.

Both read the runs with :func:`load_docs`, aggregate with :func:`~.stats.mean_std` and draw
with :mod:`fedsq_fast.plots`.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

from ..federation.metrics import jsonable
from ..outputs import replacing, write_text
from ..federation.runner import partition_tag
from ..plots import (group_histories, plot_accuracy, plot_client_accuracy, plot_gate_stability, plot_privacy,
                     plot_rounds_to_best)
from .analysis import analyse
from .provenance import AVX2_PIN, rel, utc
from .stats import mean_std
from .suite import Suite, fail, load_suite, spec_tag
from .verdicts import GATE_METHODS, ci_txt


def load_docs(root, complete_only: bool = True) -> list:
    """The metrics.json documents under ``root`` (sorted by path), each with ``path`` (relative
    to ``root``) and ``run_info`` (run_info.json, or {}); ``complete_only``: runs that ended."""
    from ..federation.config import read_json

    docs = []
    for p in sorted(Path(root).rglob("metrics.json")):
        d = check_doc(p, read_json(p, "report"))
        if complete_only and not d.get("summary", {}).get("complete", True):
            continue
        d["path"] = str(p.relative_to(root))
        info = p.parent / "run_info.json"
        d["run_info"] = read_json(info, "report") if info.is_file() else {}
        if not isinstance(d["run_info"], dict):
            raise ValueError(f"report: {info}: top level must be a JSON object")
        docs.append(d)
    return docs


def _is_num(x, none_ok=True) -> bool:
    return (x is None and none_ok) or (isinstance(x, (int, float)) and not isinstance(x, bool))


def check_doc(path, d) -> dict:
    """``d`` (the content of metrics.json file ``path``) if it holds what the reports read
    (``method``, ``config`` with the partition keys, ``summary`` numbers, ``history`` rounds
    with ``round`` and ``val_acc``), else a ValueError naming the file and the key; a
    hand-written or damaged file is refused in one line, never a KeyError."""
    def bad(what):
        raise ValueError(f"report: {path}: {what} (a metrics.json as fedsq-fast writes it: method, config, "
                         "summary, history)")

    if not isinstance(d, dict):
        bad(f"top level must be a JSON object, got {type(d).__name__}")
    for k, t, name in (("method", str, "a string"), ("config", dict, "an object"), ("summary", dict, "an object"),
                       ("history", list, "a list")):
        if k not in d:
            bad(f"key {k!r} missing")
        if not isinstance(d[k], t):
            bad(f"key {k!r} must be {name}, got {type(d[k]).__name__}")
    cfg = d["config"]
    part = cfg.get("partition")
    if not isinstance(part, str):
        bad("key 'config.partition' missing or not a string")
    need = {"dirichlet": "alpha", "quantity": "alpha", "shards": "shards_per_client"}.get(part)
    if need is not None and not _is_num(cfg.get(need), none_ok=False):
        bad(f"key 'config.{need}' missing or not a number (partition {part!r} needs it)")
    if "seed" in cfg and not _is_num(cfg["seed"], none_ok=False):
        bad("key 'config.seed' is not a number")
    for k, v in d["summary"].items():
        if k in SUMMARY_KEYS and not _is_num(v):
            bad(f"key 'summary.{k}' must be a number or null, got {v!r}")
    if not d["history"]:
        bad("key 'history' holds no rounds")
    for i, h in enumerate(d["history"]):
        if not isinstance(h, dict):
            bad(f"history[{i}] must be an object, got {type(h).__name__}")
        if not _is_num(h.get("round"), none_ok=False):
            bad(f"key 'history[{i}].round' missing or not a number")
        for k in ("val_acc", "gate_change"):
            if k in h and not _is_num(h[k]):
                bad(f"key 'history[{i}].{k}' must be a number or null, got {h[k]!r}")
    return d


def _f(x, nd=4):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _pm(mu, sd, nd=4):
    return f"{_f(mu, nd)} ± {_f(sd, nd)}"


def _mb(x):
    return None if x is None or not math.isfinite(x) else x / 1e6


def results_table(res) -> str:
    """The Results table: one row per partition and method (mean ± std over seeds)."""
    frac = res["target_fraction"]
    head = ("| partition | method | seeds | BVA (mean ± std) | rounds-to-best | "
            f"rounds to {frac:g}×{res['baseline']} BVA (reached) | MB up to that target | test acc (final model) | "
            "MB per client-round | MB up (total) | time s |")
    lines = [head, "|" + "---|" * 11]
    for r in res["rows"]:
        lines.append(
            f"| {r['partition']} | {r['method']} | {r['n']} | {_pm(r['bva'], r['bva_std'])} | "
            f"{_pm(r['rounds_to_best'], r['rounds_to_best_std'], 2)} | "
            f"{_pm(r['rounds_to_target'], r['rounds_to_target_std'], 2)} ({r['reached']}/{r['with_target']}) | "
            f"{_pm(_mb(r['bytes_to_target']), _mb(r['bytes_to_target_std']), 1)} | "
            f"{_pm(r['test_acc'], r['test_acc_std'])} | {r['payload_bytes'] / 1e6:.3f} | "
            f"{r['bytes_up'] / 1e6:.1f} | {_f(r['time_total_s'], 0)} |")
    return "\n".join(lines)


CLIENT_COLUMNS = (("client_acc_weighted", "weighted mean"), ("client_acc_mean", "unweighted mean"),
                  ("client_acc_worst", "worst client"), ("client_acc_p10", "10th percentile"),
                  ("client_acc_std", "std over clients"))


def client_eval_section(res) -> list:
    """The report's federated-evaluation section (markdown lines): per cell the final global
    model's accuracy on the clients' own test splits (mean ± std over seeds), and the paired
    differences the robustness verdict reads; [] for runs without federated evaluation."""
    if not res.get("client_eval"):
        return []
    head = "| partition | method | seeds | " + " | ".join(lab for _, lab in CLIENT_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(CLIENT_COLUMNS))]
    for r in res["rows"]:
        if r.get("client_acc_worst_n"):
            lines.append(f"| {r['partition']} | {r['method']} | {r['client_acc_worst_n']} | "
                         + " | ".join(_pm(r[k], r[k + "_std"]) for k, _ in CLIENT_COLUMNS) + " |")
    comp = ["| partition | method vs reference | seeds | Δworst client [95% CI] | Δ10th percentile [95% CI] | "
            "Δweighted mean [95% CI] |", "|---|---|---|---|---|---|"]
    for c in res["comparisons"]:
        if ":" not in c["a"] and c.get("client_acc_worst", {}).get("n"):
            comp.append(f"| {c['partition']} | {c['a']} vs {c['b']} | {c['client_acc_worst']['n']} | "
                        f"{ci_txt(c['client_acc_worst'], pct=True)} | {ci_txt(c['client_acc_p10'], pct=True)} | "
                        f"{ci_txt(c['client_acc_weighted'], pct=True)} |")
    return ["## Federated evaluation (how the global model serves each client)", "",
            "Each client kept a seeded share of its partition as its own test split (taken before its training "
            "data, `client_test_fraction`) and evaluated the final global model on it, on the client (FedSQ: with "
            "its own gates from the structural copy). Per run: sample-weighted mean (correct / samples over "
            "all clients), unweighted mean over clients, the worst client, the 10th percentile over clients "
            "(numpy `method='lower'`: an actual client's accuracy) and the population std over clients; here "
            "mean ± sample std over seeds.", "", "\n".join(lines), "",
            "### Paired differences (method minus reference, same seeds)", "", "\n".join(comp), "",
            "![client accuracy](client_accuracy.png)", ""]


def comparison_table(res, ablations: bool) -> str:
    """Paired differences (method minus reference) with 95% intervals: the ablations'
    (``ablations``) or the main comparisons."""
    lines = ["| partition | method vs reference | seeds | ΔBVA [95% CI] | Δrounds-to-best [95% CI] | "
             f"Δrounds to {res['target_fraction']:g}×{res['baseline']} BVA [95% CI] |", "|---|---|---|---|---|---|"]
    n = 0
    for c in res["comparisons"]:
        if (":" in c["a"]) != ablations:
            continue
        n += 1
        lines.append(f"| {c['partition']} | {c['a']} vs {c['b']} | {c['bva']['n']} | "
                     f"{ci_txt(c['bva'], pct=True)} | {ci_txt(c['rounds_to_best'], nd=2)} | "
                     f"{ci_txt(c['rounds_to_target'], nd=2)} |")
    return "\n".join(lines) if n else "(no runs yet)"


def gate_table(res) -> str:
    """The gate-stability table: gates flipped vs pretrained at chosen rounds, weight distance, settle rounds."""
    g0 = res["gates"][0] if res["gates"] else None
    if g0 is None:
        return "(no runs yet)"
    labels = list(dict((g0[k], k) for k in ("r1", "rq", "rh", "rR")).values())  # distinct rounds only
    rs = [g0[k] for k in labels]
    head = ("| partition | method | seeds | " + " | ".join(f"gates flipped vs pretrained, round {r}" for r in rs)
            + f" | ‖w−w0‖/‖w0‖, round {rs[-1]} | gate settle round | weight settle round |")
    lines = [head, "|" + "---|" * (3 + len(rs) + 3)]
    for g in res["gates"]:
        cells = [f"{100 * g['gate_change_' + k][0]:.2f}% ± {100 * g['gate_change_' + k][1]:.2f}"
                 if g['gate_change_' + k][0] == g['gate_change_' + k][0] else "n/a" for k in labels]
        lines.append(f"| {g['partition']} | {g['method']} | {g['n']} | " + " | ".join(cells) +
                     f" | {_pm(*g['weight_dist_rR'])} | "
                     + (f"{_pm(*g['gate_settle'], 2)} ({g['gate_settled_runs']}/{g['n']})"
                        if g.get("gate_measured_runs", g["n"]) == g["n"] else "n/a (not measured)")
                     + f" | {_pm(*g['weight_settle'], 2)} ({g['weight_settled_runs']}/{g['n']}) |")
    return "\n".join(lines)



def plot_all(docs, res, root: Path) -> list:
    """accuracy.png, gate_stability.png, rounds_to_best.png of a suite under ``root``."""
    runs = group_histories(docs, partition_tag)
    parts, methods = res["partitions"], res["methods"]
    plot_accuracy(runs, root / "accuracy.png", parts, methods)
    plot_gate_stability(runs, root / "gate_stability.png", parts, methods, GATE_METHODS, res["settle_threshold"])
    parts = [p for p in parts if any((p, m) in runs for m in methods)]
    plot_rounds_to_best(res["rows"], root / "rounds_to_best.png", parts, methods)
    extra = ["client_accuracy.png"] if plot_client_accuracy(runs, root / "client_accuracy.png", parts, methods) else []
    return ["accuracy.png", "gate_stability.png", "rounds_to_best.png"] + extra


def suite_status(docs, suite, root) -> tuple[str, bool]:
    """The Status section (runs complete, missing per seed) and whether the suite is complete."""
    if suite is None:
        return f"{len(docs)} completed runs found (no suite.toml: completeness unknown).", True
    have = {(partition_tag(d["config"]), d["method"], int(d["config"]["seed"])) for d in docs}
    cells = suite.cells()
    missing = [(s, spec_tag(p), m) for s, p, m in cells if (spec_tag(p), m, s) not in have]
    lines = [f"**{len(cells) - len(missing)} of {len(cells)} runs complete** "
             f"({len(suite.seeds)} seeds x {len(suite.partitions)} partitions x {len(suite.methods)} methods"
             + (f" + {len(suite.ablation_methods)} ablations on {', '.join(suite.ablation_partitions)}"
                if suite.ablation_methods else "") + ")."]
    seeds_done = [s for s in suite.seeds if not any(x[0] == s for x in missing)]
    lines.append(f"Seeds complete in every cell: {seeds_done or 'none'}.")
    if missing:
        by_seed = {}
        for s, p, m in missing:
            by_seed.setdefault(s, []).append(f"{p}/{m}")
        for s, cs in by_seed.items():
            lines.append(f"- seed {s}: missing {len(cs)} runs: {', '.join(cs)}")
        lines.append("")
        lines.append("The missing runs are to be run with the same command plus `--resume` "
                     "(finished runs are skipped, interrupted ones continue from their checkpoint); "
                     "the report is then rewritten from all runs. Statistics below use the seeds "
                     "present in each cell; paired comparisons use only seeds present in both cells.")
    return "\n".join(lines), not missing


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def cpu_paths(info: dict) -> str:
    """What decided the floating-point rounding of a run's CPU arithmetic (machine_info())."""
    if not info.get("torch_cpu_capability"):
        return "not recorded"
    env = " ".join(f"{k}={v}" for k, v in (info.get("isa_env") or {}).items())
    return (f"CPU has {'/'.join(info.get('cpu_simd') or []) or '?'}; torch {info['torch_cpu_capability']}, "
            f"fedsq_fast {info.get('fedsq_fast_cpu_isa')}" + (f", pinned by {env}" if env else ""))


def _verification_section(root: Path) -> list:
    log = root / "verification.json"
    if not log.is_file():
        return []
    rows = json.loads(log.read_text())
    md = ["## Reproduction", ""]
    reruns = [r for r in rows if r.get("kind") != "prefix"]
    if reruns:
        md += [f"Recorded runs run again by `python -m fedsq_fast.experiments verify {rel(root)} --cell ...` "
               "and compared number by number with what was recorded (timings excluded). Floating-point "
               "results depend on the CPU code paths torch and fedsq_fast take (AVX2 vs AVX-512 kernels round "
               "differently), so a rerun matches bit for bit only where they match; on a CPU with more "
               f"instruction sets, pin them: `{AVX2_PIN}`.", "",
               "| run | rerun (UTC) | code then | code now | CPU paths of the rerun | result |",
               "|---|---|---|---|---|---|"]
        md += [f"| {r['run']} | {r['verified_at']} | {r.get('recorded_code') or 'not recorded'} | {r['code']} | "
               f"{cpu_paths(r['cpu'])} | {r['verdict']} |" for r in reruns]
        md += ["", f"{sum(bool(r['match']) for r in reruns)} of {len(reruns)} reruns gave every number the report "
                   "uses, unchanged.", ""]
    for against in sorted({r["against"] for r in rows if r.get("kind") == "prefix"}):
        pre = [r for r in rows if r.get("kind") == "prefix" and r["against"] == against]
        same = sum(bool(r["identical"]) for r in pre)
        diag = [r for r in pre if r["match"] and not r["identical"]]
        odd = [r for r in pre if not r["match"]]
        text = (f"Paired with `{against}` (same seeds and settings, fewer rounds; `python -m fedsq_fast.experiments "
                f"verify {rel(root)} --against {against}`, {max(r['verified_at'] for r in pre)}): "
                f"**{same} of {len(pre)} runs retrace the shorter run's rounds number for number** (timings excluded)")
        if diag:  # diagnostics only: say which and by how much, not run by run
            worst = {}
            for r in diag:
                for k, v in (r.get("differing_other_keys") or {}).items():
                    worst[k] = max(worst.get(k, 0.0), v["max_rel"])
            text += (f"; **{len(diag)} more retrace every number the report uses**, differing only in diagnostics "
                     f"({', '.join(f'{k} max rel. {v:.1e}' for k, v in sorted(worst.items()))})")
        md += [text + "." + "".join(f" {r['run']}: {r['verdict']}." for r in odd), ""]
    return md


def report(root, suite: Suite | None = None, echo=print) -> Path:
    """Write REPORT.md, summary.json/.csv and the PNGs under ``root`` from its metrics.json files."""
    root = Path(root)
    if not root.is_dir():
        fail("dir", f"not a folder: {root}")
    if suite is None and (root / "suite.toml").is_file():
        suite = load_suite(root / "suite.toml")
    docs = load_docs(root)
    if not docs:
        fail("dir", f"no completed runs (metrics.json) under {root}")
    res = analyse(docs, suite)
    write_text(root / "summary.json", json.dumps(jsonable(res), indent=1))
    with replacing(root / "summary.csv", "w", newline="") as f:
        keys = [k for k in res["rows"][0] if k != "seeds"] + ["seeds"]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in res["rows"]:
            w.writerow({**r, "seeds": " ".join(map(str, r["seeds"]))})
    files = plot_all(docs, res, root)
    infos = [d["run_info"] for d in docs if d["run_info"]]
    status, complete = suite_status(docs, suite, root)
    name = suite.name if suite else root.name
    srcs = sorted({i["suite_file"] for i in infos if i.get("suite_file")})
    src = srcs[-1] if srcs else (str(suite.path) if suite else f"{rel(root)}/suite.toml")
    cfg = docs[0]["config"]
    md = [f"# {name}: {suite.title if suite and suite.title else 'experiment suite'}", ""]
    md += [f"Report generated {utc()} by `python -m fedsq_fast.experiments report {rel(root)}`; runs made with "
           f"`python -m fedsq_fast.experiments run {src} --resume` (the suite file is copied in "
           "`suite.toml`). Every number below is computed from the per-run `metrics.json` files in this "
           "folder (also collected in `summary.json` / `summary.csv`).", ""]
    if infos:
        first = min(i["started"] for i in infos)
        last = max(i["finished"] for i in infos)
        i0 = infos[0]
        mach = sorted({(i["host_cpu"], i["cpu_count"], i.get("gpu")) for i in infos})
        md += ["## Machine and date", "",
               f"- runs: {first} to {last} ({len(infos)} runs, {sum(i['wall_s'] for i in infos) / 3600:.2f} h "
               "of wall time in all)",
               *[f"- machine: {c} ({n} logical CPUs), GPU: {g or 'none'}" for c, n, g in mach],
               f"- torch {i0['torch']} ({i0['torch_threads']} threads), python {i0['python']}, "
               f"fedsq_fast backend `{i0['fedsq_fast_backend']}`, {i0['platform']}"]
        loads = [x for i in infos for x in (i.get("loadavg_start"), i.get("loadavg_end")) if x is not None]
        if loads:
            md.append(f"- 1-minute load average at run starts/ends: {min(loads):.1f} to {max(loads):.1f} "
                      f"on {i0['cpu_count']} CPUs (other jobs shared the machine when it exceeds the thread "
                      "count: wall times, not results, depend on it)")
        codes = Counter(i.get("code") or "not recorded" for i in infos)
        md.append("- code (git): " + ", ".join(f"{c} ({_runs(n)})" for c, n in sorted(codes.items())))
        paths = Counter(cpu_paths(i) for i in infos)
        md.append("- CPU code paths: " + "; ".join(f"{k} ({_runs(n)})" for k, n in sorted(paths.items())))
        md.append("")
    md += ["## Status", "", status, ""]
    md += _verification_section(root)
    md += ["## Claims", "",
           "Each verdict follows a rule fixed in the code and the suite file before any run: 95% Student-t "
           "intervals of paired differences over seeds (a seed fixes the data split, the partition, the "
           "initial head and the client shuffling, so methods with the same seed see the same data).", ""]
    md += [f"- **{c['claim']}**: {c['verdict']}." for c in res["claims"]] + [""]
    for c in res["claims"]:
        md += [f"### {c['claim']}", "", f"**Verdict: {c['verdict']}.**", "", f"Rule: {c['rule']}.", ""]
        md += [f"- {x}" for x in c["details"]] + [""]
    if not complete:
        md += ["These verdicts use the runs completed so far (see Status) and will change as seeds are added.", ""]
    md += ["## Results", "",
           "BVA: best validation accuracy over rounds 0..R of the global model (round 0 = the pretrained "
           "model with its new head). Rounds-to-best: first round at the BVA. Rounds to target: first round "
           f"at {res['target_fraction']:g} x the BVA of {res['baseline']} with the same seed and partition "
           "(mean over the runs that reached it; reached/with a target in brackets). Test accuracy: the "
           "final model on the held-out test split. MB per client-round: the payload one client uploads per "
           "round (FedSQ: the quantitative copy only). Std: sample std over seeds.", "",
           results_table(res), "",
           f"{res['late_best']['runs']} of {res['late_best']['of']} runs reached their BVA in the last two "
           f"rounds ({res['rounds'] - 1} or {res['rounds']}): there the accuracy was still rising, rounds-to-best "
           "is capped by the run length and differences in it are compressed; rounds to the target "
           "accuracy is the less censored measure.", "", "![accuracy](accuracy.png)", "", "![rounds to best](rounds_to_best.png)", "",
           "### Paired differences (method minus reference, same seeds)", "", comparison_table(res, False), ""]
    md += client_eval_section(res)
    if suite and suite.ablation_methods:
        md += ["## Ablation: unfreezing / refreshing the structural copy", "",
               "`fedsq:unfreeze=R`: from round R+1 on, the structural copy is replaced by the global "
               "quantitative copy at the start of every round (gates follow the global model; fixed within "
               "a round). `fedsq:refresh=R`: replaced every R rounds (rounds R+1, 2R+1, ...). Reference: "
               "fedsq (gates fixed from the pretrained model throughout).", "", comparison_table(res, True), ""]
    md += ["## Gate stability (mask evolution)", "",
           "Gates flipped vs pretrained: the fraction of gates (ReLU on/off; ReLU6/Hardtanh 3 regimes) on a "
           f"fixed probe batch of {cfg['probe_size']} validation images whose regime differs from the pretrained "
           "model's (round 0); for FedAvg/FedProx these are the network's own gates, for fedsq the quantitative "
           "copy's own pre-activations (its effective gates are the fixed structural ones). Settle rounds: "
           f"the first round after which the per-round change stays <= {res['settle_threshold']:g} x its "
           "round-1 value (gates: fraction flipped since the previous round; weights: "
           f"‖w_r − w_(r−1)‖); runs that never settle count as {res['rounds'] + 1} (settled runs in brackets).", "",
           gate_table(res), "", "![gate stability](gate_stability.png)", ""]
    md += ["## Settings", "", f"Suite file: `{src}`.", ""]
    if suite:
        if suite.requires:
            md += [f"Requires: {suite.requires}", ""]
        if suite.notes:
            md += [suite.notes.strip(), ""]
        md += [f"- seeds: {suite.seeds}; partitions: {suite.partitions}; methods: {suite.methods}"
               + (f"; ablations {suite.ablation_methods} on {suite.ablation_partitions}" if suite.ablation_methods
                  else ""),
               f"- baseline for rounds-to-target: {suite.baseline}; target fraction {suite.target_fraction:g}; "
               f"BVA non-inferiority margin {100 * suite.noninferiority_margin:g} pp; settle threshold "
               f"{suite.settle_threshold:g}", ""]
    keys = [k for k in cfg if k not in ("methods", "seed", "partition", "alpha", "out_dir")]
    md += ["Run configuration (every run; seed, partition and method vary per cell):", "",
           "| key | value |", "|---|---|"] + [f"| {k} | `{json.dumps(cfg[k])}` |" for k in keys] + [""]
    md += ["## Raw data", "",
           "`<partition>/seed<s>/<method>/`: `metrics.json` (config, summary, per-round history), `metrics.csv`, "
           "`run_info.json` (start/end time, machine), `checkpoint.safetensors` (the final global model; "
           "not committed); `<partition>/seed<s>/partition.txt`: class counts per client. "
           "Plots: " + ", ".join(files) + ".", ""]
    write_text(root / "REPORT.md", "\n".join(md))
    echo(f"written: {root / 'REPORT.md'}, summary.json, summary.csv, {', '.join(files)}")
    return root / "REPORT.md"




# ---------------------------------------------------------------- fedsq-fast run / compare / report
SUMMARY_KEYS = ("bva", "rounds_to_best", "final_val_acc", "test_acc", "rounds_to_target", "time_total_s", "bytes_up")


def summary_rows(docs) -> list[dict]:
    """Per (partition, method), sorted: the number of runs (``seeds``) and mean and sample std
    over them of each summary value in SUMMARY_KEYS (``<key>`` and ``<key>_std``)."""
    groups: dict = {}
    for d in docs:
        groups.setdefault((partition_tag(d["config"]), d["method"]), []).append(d)
    rows = []
    for (part, m), ds in sorted(groups.items()):
        row = {"partition": part, "method": m, "seeds": len(ds)}
        for k in SUMMARY_KEYS:
            row[k], row[k + "_std"], _ = mean_std([x["summary"].get(k) for x in ds])
        if any("dp_epsilon" in x["summary"] for x in ds):  # DP runs only (docs/privacy.md): the largest spent
            eps = [x["summary"].get("dp_epsilon") for x in ds]
            row["dp_epsilon"] = max((e for e in eps if e is not None), default=float("nan"))
        rows.append(row)
    return rows


def client_table(docs) -> str:
    """fedsq-fast run / compare: the last federated evaluation of each run (accuracy on the
    clients' own test splits, mean ± std over seeds per partition and method); "" when no run
    has one."""
    groups: dict = {}
    for d in docs:
        if d["summary"].get("client_acc_worst") is not None:
            groups.setdefault((partition_tag(d["config"]), d["method"]), []).append(d["summary"])
    if not groups:
        return ""
    head = f"{'partition':<14} {'method':<22} {'seeds':>5} " + " ".join(f"{lab:>17}" for _, lab in CLIENT_COLUMNS)
    lines = ["federated evaluation: the final global model on each client's own test split", head, "-" * len(head)]
    for (part, m), ss in sorted(groups.items()):
        cells = []
        for k, _ in CLIENT_COLUMNS:
            mu, sd, _ = mean_std([x.get(k) for x in ss])
            cells.append(f"{mu:>8.4f}±{sd:<8.4f}")
        lines.append(f"{part:<14} {m:<22} {len(ss):>5} " + " ".join(cells))
    return "\n".join(lines)


def format_table(rows) -> str:
    """:func:`summary_rows` as a fixed-width text table."""
    head = (f"{'partition':<14} {'method':<22} {'seeds':>5} {'BVA':>15} {'rounds-to-best':>15} "
            f"{'final acc':>15} {'test acc':>8} {'time s':>8} {'MB up':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['partition']:<14} {r['method']:<22} {r['seeds']:>5} "
            f"{r['bva']:>7.4f}±{r['bva_std']:<7.4f} {r['rounds_to_best']:>7.2f}±{r['rounds_to_best_std']:<7.2f} "
            f"{r['final_val_acc']:>7.4f}±{r['final_val_acc_std']:<7.4f} {r['test_acc']:>8.4f} "
            f"{r['time_total_s']:>8.1f} {r['bytes_up'] / 1e6:>8.2f}"
            + (f"  epsilon {r['dp_epsilon']:.3g}" if "dp_epsilon" in r else ""))
    return "\n".join(lines)


def table_report(root, echo=print) -> list[dict]:
    """Summary table (mean ± std over seeds; summary.md, summary.csv) and plots (accuracy.png,
    rounds_to_best.png) from every metrics.json under ``root`` (a ``fedsq-fast run`` or
    ``compare`` folder); returns the table's rows."""
    root = Path(root)
    docs = load_docs(root, complete_only=False)
    if not docs:
        raise ValueError(f"report: no metrics.json under {root}")
    rows = summary_rows(docs)
    table = format_table(rows)
    ctable = client_table(docs)  # federated evaluation, when the runs have it
    table = table + ("\n\n" + ctable if ctable else "")
    write_text(root / "summary.md", "```\n" + table + "\n```\n")
    with replacing(root / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    plot_accuracy(group_histories(docs, partition_tag), root / "accuracy.png")
    plot_rounds_to_best(rows, root / "rounds_to_best.png")
    dp = any("dp_epsilon" in r for r in rows)
    if dp:  # DP runs: epsilon spent vs round, and accuracy against it
        plot_privacy(group_histories(docs, partition_tag), root / "privacy.png")
    cplot = plot_client_accuracy(group_histories(docs, partition_tag), root / "client_accuracy.png")
    echo(table)
    echo(f"written: {root / 'summary.md'}, summary.csv, accuracy.png, rounds_to_best.png"
         + (", privacy.png" if dp else "") + (", client_accuracy.png" if cplot else ""))
    return rows
