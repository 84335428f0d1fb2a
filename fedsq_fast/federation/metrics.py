"""Run metrics: the summary of a run's rounds and the metrics.json / metrics.csv writers."""
from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

_NAN = float("nan")


def _col(default=_NAN, csv=True, **kw):
    return field(default=default, metadata={"csv": csv}, **kw)


@dataclass(eq=False)
class RoundRecord(MutableMapping):
    """One round of a run, as metrics.json (``history``), metrics.csv and checkpoints hold it.

    Declared fields are the engine's (in CSV column order); callbacks add their own keys
    (``record["gate_flip_prev"] = x``), kept in ``extra`` and written to JSON after the
    declared ones. It is a mapping, so ``rec["val_acc"]`` and ``dict(rec)`` work on
    records and on their JSON form alike. Round 0 is the initial model.
    """

    round: int
    val_loss: float = _col()
    val_acc: float = _col()
    best_val_acc: float = _col()
    best_round: int = _col(0)
    train_loss: float = _col()
    clients_sampled: int = _col(0)
    clients_ok: int = _col(0)
    samples: int = _col(0)
    client_drift: float = _col()
    update_norm: float = _col()
    gate_change: float = _col()  # mean fraction of gates flipped since round 0 (GateStability)
    bytes_up: int = _col(0)
    bytes_down: int = _col(0)
    time_client_s: float = _col(0.0)
    time_eval_s: float = _col(0.0)
    time_engine_s: float = _col(0.0)
    time_other_s: float = _col(0.0)
    time_round_s: float = _col(0.0)
    elapsed_s: float = _col(0.0)
    round_skipped: bool = _col(False)
    rolled_back: str | None = _col(None)  # why the aggregate was discarded, when it was
    structural_refreshed: bool = _col(False)
    clients_dropped: list = _col(csv=True, default=None)  # [[client, reason], ...]
    gate_change_sites: list = _col(csv=False, default=None)
    time_checkpoint_s: float | None = _col(csv=False, default=None)
    extra: dict = field(default_factory=dict, metadata={"csv": False})

    def __post_init__(self):
        if self.clients_dropped is None:
            self.clients_dropped = []
        if self.gate_change_sites is None:
            self.gate_change_sites = []

    # -- mapping view: declared fields, then extra keys (time_checkpoint_s only once set)
    def _declared(self, key) -> bool:
        return key in _FIELDS and (key != "time_checkpoint_s" or self.time_checkpoint_s is not None)

    def __getitem__(self, key):
        if self._declared(key):
            return getattr(self, key)
        return self.extra[key]

    def __setitem__(self, key, value) -> None:
        if key in _FIELDS:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key) -> None:
        if key in _FIELDS:
            raise KeyError(f"{key} is a field of every round record; it cannot be removed")
        del self.extra[key]

    def __iter__(self):
        yield from (k for k in _FIELDS if self._declared(k))
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __eq__(self, other) -> bool:
        return isinstance(other, (RoundRecord, dict)) and dict(self) == dict(other)

    def to_dict(self) -> dict:
        """The record as one flat dict (JSON form, before :func:`jsonable`)."""
        return {k: self[k] for k in self}

    @classmethod
    def from_dict(cls, d) -> "RoundRecord":
        """A record from its JSON form (keys not declared go to ``extra``)."""
        if isinstance(d, RoundRecord):
            return d
        rec = cls(round=d["round"])
        for k, v in d.items():
            rec[k] = v
        return rec

    def csv_row(self) -> dict:
        """The record's CSV row (``clients_dropped`` as JSON text)."""
        row = {k: getattr(self, k) for k in CSV_FIELDS}
        row["clients_dropped"] = json.dumps(self.clients_dropped)
        return row


_FIELDS = tuple(f.name for f in fields(RoundRecord) if f.name != "extra")
CSV_FIELDS = tuple(f.name for f in fields(RoundRecord) if f.metadata.get("csv"))
# Extra keys written as CSV columns (after the declared ones) only by runs that record them:
# DP runs (federation/privacy.py); every other run's CSV keeps its columns.
EXTRA_CSV_FIELDS = ("dp_epsilon", "dp_delta", "dp_clip", "dp_noise_std", "dp_unclipped_fraction")


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


def drops_text(dropped, limit: int = 5) -> str:
    """A round's ``clients_dropped`` for a log line: the list itself up to ``limit`` clients,
    else the count, the reasons grouped (numbers masked, so 'client 3' and 'client 7' group)
    and the first client ids; the metrics files keep every [client, reason]."""
    if len(dropped) <= limit:
        return str([[int(c), r] for c, r in dropped])
    groups: dict = {}
    for _, r in dropped:
        key = re.sub(r"\d+(\.\d+)?", "#", str(r))
        groups[key] = groups.get(key, 0) + 1
    top = sorted(groups.items(), key=lambda kv: -kv[1])
    reasons = "; ".join(f"{n} x {r}" for r, n in top[:3]) + (f"; {len(top) - 3} other reasons" if len(top) > 3 else "")
    first = ", ".join(str(int(c)) for c, _ in dropped[:limit])
    return f"{len(dropped)} clients ({reasons}; first {first}, ...)"


def jsonable(o):
    """``o`` with non-finite floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (dict, RoundRecord)):
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
    from ..outputs import replacing, write_text

    write_text(out_dir / "metrics.json", json.dumps(jsonable(doc), indent=1))  # atomic, never through a link
    extra = extra_csv_keys(history)
    with replacing(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + extra, extrasaction="ignore")
        w.writeheader()
        for h in history:
            r = RoundRecord.from_dict(h)
            w.writerow({**r.csv_row(), **{k: r[k] for k in extra if k in r}})


def extra_csv_keys(history) -> tuple:
    """metrics.csv columns beyond the engine's, only where some round has them (runs
    without them keep their columns): DP's (:data:`EXTRA_CSV_FIELDS`), then federated
    evaluation's (:mod:`.evaluation`)."""
    from .evaluation import CSV_KEYS

    return tuple(k for k in EXTRA_CSV_FIELDS + CSV_KEYS if any(k in h for h in history))
