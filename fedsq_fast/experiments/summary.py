"""SUMMARY.md: every suite's verdicts and key paired differences side by side (no judgement of
its own: the verdicts are the suites')."""
from __future__ import annotations

import json
from pathlib import Path

from ..outputs import write_text
from .provenance import rel, utc
from .report import suite_status, load_docs, report
from .suite import fail, load_suite
from .verdicts import ci_txt, direction


def _part_order(p: str):
    """Columns from the least to the most skewed split: iid, then Dirichlet by falling alpha,
    then anything else by name (pathological shards, ...)."""
    if p == "iid":
        return (0, 0.0, p)
    if p.startswith("dirichlet:"):
        try:
            return (1, -float(p.split(":", 1)[1]), p)
        except ValueError:
            pass
    return (2, 0.0, p)


def summarize_suites(root, echo=print, refresh: bool = True) -> Path:
    """SUMMARY.md under ``root``: for every suite folder below it (one holding a
    ``suite.toml``), its report is rewritten first (``refresh``) so that every number
    comes from the same set of runs; then status, the verdict of each claim per suite
    and the key paired differences side by side. Verdicts are the suites' own."""
    root = Path(root)
    if not root.is_dir():
        fail("dir", f"not a folder: {root}")
    suites = []
    for st in sorted(root.glob("*/suite.toml")):
        d = st.parent
        suite = load_suite(st)
        docs = load_docs(d)
        if not docs:
            continue
        if refresh or not (d / "summary.json").is_file():
            report(d, suite, echo=lambda *a: None)
        sj = d / "summary.json"
        status, complete = suite_status(docs, suite, d)
        infos = [x["run_info"] for x in docs if x["run_info"]]
        suites.append({"name": suite.name if suite else d.name, "title": suite.title if suite else "",
                       "dir": d, "res": json.loads(sj.read_text()), "status": status.splitlines()[0:2],
                       "complete": complete, "n_runs": len(docs),
                       "n_cells": len(suite.cells()) if suite else len(docs),
                       "first": min((i["started"] for i in infos), default="?"),
                       "last": max((i["finished"] for i in infos), default="?"),
                       "machines": sorted({f"{i['host_cpu']} ({i['cpu_count']} CPUs), GPU: {i.get('gpu') or 'none'}"
                                           for i in infos})})
    if not suites:
        fail("dir", f"no suite results (<suite>/summary.json) under {root}")
    md = ["# FedSQ's claims across the evidence suites", "",
          f"Generated {utc()} by `python -m fedsq_fast.experiments summary {rel(root)}` from each suite's "
          "`summary.json` (itself computed from the per-run `metrics.json` files by `... report`). The verdicts "
          "are each suite's own, decided by the rules fixed in its suite file before any run (see the suite's "
          "REPORT.md for every interval); this page only puts them side by side.", "",
          "## Suites", "", "| suite | setting | runs complete | runs made (UTC) | machine |", "|---|---|---|---|---|"]
    for x in suites:
        md.append(f"| [{x['name']}]({x['dir'].name}/REPORT.md) | {x['title']} | {x['n_runs']} of {x['n_cells']}"
                  f"{'' if x['complete'] else ' (partial; ' + x['status'][1].rstrip('.').lower() + ')'} | "
                  f"{x['first']} to {x['last']} | {'; '.join(x['machines'])} |")
    claim_names = []
    for x in suites:
        for c in x["res"]["claims"]:
            if c["claim"] not in claim_names:
                claim_names.append(c["claim"])
    md += ["", "## Verdicts", "", "| claim | " + " | ".join(x["name"] for x in suites) + " |",
           "|---|" + "---|" * len(suites)]
    for cn in claim_names:
        row = []
        for x in suites:
            v = next((c["verdict"] for c in x["res"]["claims"] if c["claim"] == cn), "not run")
            row.append(v)
        md.append(f"| {cn} | " + " | ".join(row) + " |")

    def comp_table(title, pairs, key, pct, note):
        parts = []
        for x in suites:
            for c in x["res"]["comparisons"]:
                if (c["a"], c["b"]) in pairs and key in c and c["partition"] not in parts:
                    parts.append(c["partition"])
        parts.sort(key=_part_order)
        lines = ["", f"### {title}", "", note, "",
                 "| suite | comparison | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
        for x in suites:
            for a, b in pairs:
                cells, any_ = [], False
                for p in parts:
                    c = next((c for c in x["res"]["comparisons"]
                              if c["a"] == a and c["b"] == b and c["partition"] == p and key in c), None)
                    if c is None:
                        cells.append("")
                        continue
                    any_ = True
                    cells.append(f"{ci_txt(c[key], nd=2, pct=pct)}: {direction(c[key])}")
                if any_:
                    lines.append(f"| {x['name']} | {a} − {b} | " + " | ".join(cells) + " |")
        return lines

    main_pairs = [("fedsq", "fedavg"), ("fedsq", "fedprox"), ("fedsq+fedprox", "fedprox")]
    md += ["", "## Key differences (paired by seed, mean [95% CI] (n))", "",
           "`lower` / `higher`: the whole 95% interval lies below / above 0 (a plain description of the "
           "interval; the verdicts above use the suites' rules, e.g. the 1 pp non-inferiority margin for BVA)."]
    md += comp_table("Best validation accuracy", main_pairs, "bva", True,
                     "ΔBVA in percentage points (FedSQ minus the baseline).")
    md += comp_table("Rounds to 95% of FedAvg's BVA", main_pairs, "rounds_to_target", False,
                     "Δrounds (negative: FedSQ gets there sooner); a run that never gets there counts as rounds + 1.")
    md += comp_table("Rounds-to-best", main_pairs, "rounds_to_best", False,
                     "Δrounds to the best round (censored by the run length when accuracy still rises at the end).")
    if any(x["res"].get("client_eval") for x in suites):  # federated evaluation: the robustness verdict's numbers
        md += comp_table("Worst-client accuracy (federated evaluation)", main_pairs, "client_acc_worst", True,
                         "Δ accuracy in pp of the worst client on its own test split, final global model (FedSQ "
                         "minus the baseline); suites run with client_test_fraction > 0 only.")
        md += comp_table("10th-percentile client accuracy (federated evaluation)", main_pairs, "client_acc_p10",
                         True, "Δ in pp of the 10th percentile over clients (numpy 'lower'), final global model.")
    abl = sorted({(c["a"], c["b"]) for x in suites for c in x["res"]["comparisons"] if ":" in c["a"]})
    if abl:
        md += comp_table("Ablation: structural copy unfrozen / refreshed vs fixed gates", abl, "bva", True,
                         "ΔBVA in pp of the ablation minus FedSQ with fixed gates (positive: updating the "
                         "gates helps).")
    gparts = []
    for x in suites:
        gparts += [p for p in x["res"]["partitions"] if p not in gparts]
    gparts.sort(key=_part_order)
    md += ["", "### Gates of the pretrained network flipped by the last round (FedAvg)", "",
           "| suite | " + " | ".join(gparts) + " |", "|---|" + "---|" * len(gparts)]
    for x in suites:
        cells = []
        for p in gparts:
            g = next((g for g in x["res"]["gates"] if g["partition"] == p and g["method"] == x["res"]["baseline"]), None)
            v = g["gate_change_rR"] if g else None
            # None / NaN: not measured (a network without gate sites, e.g. FedAvg on a SiLU CNN)
            ok = v and v[0] is not None and v[0] == v[0]
            sd = f" ± {100 * v[1]:.1f}" if ok and v[1] is not None else ""  # no spread from one seed
            cells.append(f"{100 * v[0]:.1f}%{sd} (round {g['rR']})" if ok else "")
        md.append(f"| {x['name']} | " + " | ".join(cells) + " |")
    if not all(x["complete"] for x in suites):
        md += ["", "Some suites are partial (see Suites): their verdicts use the seeds completed so far; "
               "`python -m fedsq_fast.experiments run experiments/<suite>.toml --resume` completes them and "
               "`... summary` rewrites this page."]
    md.append("")
    out = root / "SUMMARY.md"
    write_text(out, "\n".join(md))
    echo(f"written: {out}")
    return out


