"""Every number a suite's report prints, computed from the per-run metrics (saved as summary.json)."""
from __future__ import annotations

import math

from ..federation.evaluation import SUMMARY_KEYS as CLIENT_KEYS
from ..federation.runner import partition_tag
from .stats import first_round_at, mean_std, paired_ci, settle_round
from .suite import Suite
from .verdicts import COMPARISONS, claims


def analyse(docs, suite: Suite | None) -> dict:
    """Every number the report prints, from the raw per-run metrics (also saved as summary.json)."""
    baseline = suite.baseline if suite else "fedavg"
    frac = suite.target_fraction if suite else 0.95
    margin = suite.noninferiority_margin if suite else 0.01
    thr = suite.settle_threshold if suite else 0.25
    by = {}
    for d in docs:
        by[(partition_tag(d["config"]), d["method"], int(d["config"]["seed"]))] = d
    parts = suite.partition_tags if suite else sorted({k[0] for k in by})
    parts = parts + sorted({k[0] for k in by} - set(parts))
    order = (list(suite.methods) + list(suite.ablation_methods)) if suite else []
    methods = order + sorted({k[1] for k in by} - set(order))
    rounds = max((d["config"]["rounds"] for d in docs), default=0)

    # federated evaluation: only where some run has it (reports of suites without it unchanged)
    client_eval = any(d["summary"].get("client_acc_worst") is not None for d in docs)
    per_run = {}
    for (p, m, s), d in by.items():
        h = d["history"]
        base = by.get((p, baseline, s))
        target = frac * base["summary"]["bva"] if base else None
        r_t = first_round_at(h, target) if target is not None else None
        per_run[(p, m, s)] = {
            "bva": d["summary"]["bva"], "rounds_to_best": d["summary"]["rounds_to_best"],
            "test_acc": d["summary"].get("test_acc"), "final_val_acc": d["summary"]["final_val_acc"],
            "initial_val_acc": d["summary"]["initial_val_acc"],
            "target": target, "rounds_to_target": r_t,
            # communication to reach the target: what the clients uploaded in rounds 1..r_t
            "bytes_to_target": (sum(x["bytes_up"] for x in h if 1 <= x["round"] <= r_t)
                                if r_t is not None else None),
            "bytes_up": d["summary"]["bytes_up"], "payload_bytes": d["summary"]["payload_bytes"],
            "time_total_s": d["summary"]["time_total_s"], "rounds": d["summary"]["rounds"],
            "gate_change_final": h[-1].get("gate_change"),
            "gate_settle": settle_round([(x["round"], x.get("gate_flip_prev")) for x in h], thr),
            "weight_settle": settle_round([(x["round"], x.get("weight_step_rel")) for x in h], thr),
            # federated evaluation (the last evaluated round; None for runs without it)
            **({k: d["summary"].get(k) for k in CLIENT_KEYS} if client_eval else {}),
            # False where no round measured gate flips (a plain SiLU/GELU network has no gate
            # sites): its "never settled" is then no measurement, not a result
            "gate_measured": any(x["round"] >= 1 and isinstance(x.get("gate_flip_prev"), (int, float))
                                 and math.isfinite(x["gate_flip_prev"]) for x in h),
        }

    def cells():  # (partition, method, {seed: per-run numbers}, sorted seeds) of every cell with runs
        for p in parts:
            for m in methods:
                runs = {s: v for (pp, mm, s), v in per_run.items() if pp == p and mm == m}
                if runs:
                    yield p, m, runs, sorted(runs)

    rows = []
    for p, m, runs, seeds in cells():
        row = {"partition": p, "method": m, "seeds": seeds, "n": len(seeds)}
        for k in ("bva", "rounds_to_best", "test_acc", "final_val_acc", "time_total_s", "bytes_up",
                  "bytes_to_target"):
            row[k], row[k + "_std"], _ = mean_std([runs[s][k] for s in seeds])
        rt = [runs[s]["rounds_to_target"] for s in seeds]
        row["rounds_to_target"], row["rounds_to_target_std"], row["reached"] = mean_std(rt)
        row["with_target"] = sum(runs[s]["target"] is not None for s in seeds)
        row["payload_bytes"] = runs[seeds[0]]["payload_bytes"]
        rows.append(row)

    def paired(a, b, p, key, censor=None):
        seeds = sorted(s for (pp, mm, s) in per_run if pp == p and mm == a and (p, b, s) in per_run)
        diffs = []
        for s in seeds:
            x, y = per_run[(p, a, s)][key], per_run[(p, b, s)][key]
            if censor is not None:  # not reached within the run: counted as rounds + 1
                x, y = (censor if x is None else x), (censor if y is None else y)
            if x is None or y is None:
                continue
            diffs.append(x - y)
        out = paired_ci(diffs)
        out["seeds"] = seeds
        return out

    if client_eval:  # federated evaluation: its numbers per cell, as the other rows' (mean ± std over seeds)
        for row in rows:
            runs = {s: v for (pp, mm, s), v in per_run.items() if pp == row["partition"] and mm == row["method"]}
            for k in CLIENT_KEYS:
                row[k], row[k + "_std"], row[k + "_n"] = mean_std([runs[s][k] for s in row["seeds"]])
    comps = []
    pairs = [c for c in COMPARISONS if c[0] in methods and c[1] in methods]
    if suite:
        pairs += [(m, "fedsq") for m in suite.ablation_methods if "fedsq" in methods]
    for a, b in pairs:
        for p in parts:
            if not any(k[0] == p and k[1] == a and (p, b, k[2]) in per_run for k in per_run):
                continue
            comps.append({"a": a, "b": b, "partition": p,
                          "bva": paired(a, b, p, "bva"),
                          "rounds_to_best": paired(a, b, p, "rounds_to_best"),
                          "rounds_to_target": paired(a, b, p, "rounds_to_target", censor=rounds + 1),
                          **({k: paired(a, b, p, k) for k in CLIENT_KEYS} if client_eval else {})})
    gates = []
    for p, m, runs, seeds in cells():
        hs = [by[(p, m, s)]["history"] for s in seeds]
        g = {"partition": p, "method": m, "n": len(seeds)}
        g["rounds_shown"] = sorted({1, max(1, rounds // 4), max(1, rounds // 2), rounds})
        for label, r in (("r1", 1), ("rq", max(1, rounds // 4)), ("rh", max(1, rounds // 2)), ("rR", rounds)):
            g[label] = r
            g["gate_change_" + label] = mean_std([h[r]["gate_change"] if len(h) > r else None for h in hs])[:2]
            g["weight_dist_" + label] = mean_std([h[r].get("weight_dist_rel") if len(h) > r else None
                                                  for h in hs])[:2]
        cens = rounds + 1
        gs = [runs[s]["gate_settle"] for s in seeds]
        ws = [runs[s]["weight_settle"] for s in seeds]
        g["gate_settle"] = mean_std([cens if x is None else x for x in gs])[:2]
        g["weight_settle"] = mean_std([cens if x is None else x for x in ws])[:2]
        g["gate_settled_runs"] = sum(x is not None for x in gs)
        g["gate_measured_runs"] = sum(bool(runs[s].get("gate_measured", True)) for s in seeds)
        g["weight_settled_runs"] = sum(x is not None for x in ws)
        g["settle_diff"] = paired_ci([(cens if a is None else a) - (cens if b is None else b)
                                      for a, b in zip(gs, ws)])
        gates.append(g)
    res = {"baseline": baseline, "target_fraction": frac, "noninferiority_margin": margin,
           "settle_threshold": thr, "rounds": rounds, "partitions": parts, "methods": methods,
           "rows": rows, "comparisons": comps, "gates": gates,
           "per_run": [{"partition": p, "method": m, "seed": s, **v} for (p, m, s), v in sorted(per_run.items())]}
    # runs whose best came in the last two rounds had not plateaued: rounds-to-best is then
    # capped by the run length, which compresses differences in it
    late = [v for v in per_run.values() if v["rounds_to_best"] >= v["rounds"] - 1]
    res["late_best"] = {"runs": len(late), "of": len(per_run)}
    if client_eval:
        res["client_eval"] = True
    res["claims"] = claims(res, suite)
    return res


