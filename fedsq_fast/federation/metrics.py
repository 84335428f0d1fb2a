"""Run metrics: the summary of a run's rounds and the metrics.json / metrics.csv writers."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np


def summarize(history: list[dict], target: float | None = None) -> dict:
    """BVA, rounds-to-best (first round at the BVA; round 0 = the initial model),
    rounds and seconds to ``target``, totals."""
    accs = [h["val_acc"] for h in history]
    bva = max(accs)
    best = next(h["round"] for h in history if h["val_acc"] == bva)
    hit = next((h for h in history if target is not None and h["val_acc"] >= target), None)
    rounds = [h for h in history if h["round"] > 0]
    tc = sum(h["time_client_s"] for h in rounds)
    tt = sum(h["time_round_s"] for h in rounds)
    te = sum(h["time_eval_s"] for h in rounds)
    return {
        "bva": bva, "rounds_to_best": best, "initial_val_acc": accs[0], "final_val_acc": accs[-1],
        "target_accuracy": target,
        "rounds_to_target": hit["round"] if hit else None,
        "seconds_to_target": hit["elapsed_s"] if hit else None,
        "rounds": len(rounds), "bytes_up": sum(h["bytes_up"] for h in rounds),
        "bytes_down": sum(h["bytes_down"] for h in rounds),
        "time_total_s": tt, "time_client_s": tc, "time_eval_s": te,
        "time_engine_s": tt - tc - te,
        "dropped": sum(len(h["clients_dropped"]) for h in rounds),
    }


CSV_FIELDS = ("round", "val_loss", "val_acc", "best_val_acc", "best_round", "train_loss",
              "clients_sampled", "clients_ok", "samples", "client_drift", "update_norm", "gate_change",
              "bytes_up", "bytes_down", "time_client_s", "time_eval_s", "time_engine_s",
              "time_other_s", "time_round_s", "elapsed_s", "round_skipped", "rolled_back", "structural_refreshed",
              "clients_dropped")


def jsonable(o):
    """``o`` with non-finite floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return jsonable(float(o))
    return o


def write_metrics(out_dir: Path, method: str, cfg, history: list, summary: dict) -> None:
    """OUT/metrics.json (atomic: config, summary, per-round history) and OUT/metrics.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"method": method, "config": cfg.to_dict(), "summary": summary, "history": history}
    tmp = out_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(jsonable(doc), indent=1))
    tmp.replace(out_dir / "metrics.json")
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for h in history:
            row = dict(h)
            row["clients_dropped"] = json.dumps(h["clients_dropped"])
            w.writerow(row)
