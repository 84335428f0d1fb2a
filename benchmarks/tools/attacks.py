"""Attack x defence table: hostile minorities against the server's aggregators.

A chosen set of clients (10/20/30 %) attacks every round of a real federation on the embedded
engine; the final test accuracy is compared with the clean run. The model-poisoning attacks
are a :class:`AttackTransport` (an in-process transport that trains every sampled client
honestly, then replaces the attackers' replies: the omniscient attacker of the literature,
who knows the honest updates of the round); label flipping is data poisoning (the attackers'
labels y -> C - 1 - y before the run).

Attacks, on the update d = w_client - w_global:

- ``sign_flip``: -4 x its own honest update;
- ``scaling``: 8 x its own honest update (boosted; just inside the default norm bound of 10x
  the cohort median per local batch: a larger boost is refused before any aggregator sees it);
- ``alie``: a little is enough (Baruch et al. 2019): mean - z std of the honest updates,
  coordinate-wise, z = 1, every attacker the same;
- ``ipm``: inner-product manipulation (Xie et al. 2020): -eps x the mean honest update, eps 0.1;
- ``label_flip``: trains on labels y -> C - 1 - y;
- ``free_rider``: returns the global model unchanged (and claims its sample count).

Run (about 15 minutes on a 2-core VM; results appended to the JSON, so an interrupted run
resumes where it stopped)::

    python benchmarks/tools/attacks.py --out benchmarks/results/attacks_digits.json
    python benchmarks/tools/attacks.py --out benchmarks/results/attacks_digits.json --table
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ATTACKS = ("sign_flip", "scaling", "alie", "ipm", "label_flip", "free_rider")
AGGREGATORS = ("mean", "median", "trimmed_mean", "multi_krum", "geometric_median", "centered_clip")
FRACTIONS = (0.1, 0.2, 0.3)
METHODS = ("fedavg", "fedsq")
SIGN_FLIP, BOOST, ALIE_Z, IPM_EPS = -4.0, 8.0, 1.0, 0.1

# The task: scikit-learn's digits (1,797 8x8 images, always present), tiny_cnn from scratch,
# 10 clients on a Dirichlet(1.0) split, 8 rounds of 3 local epochs: about 3 s a run on one core.
TASK = dict(dataset="digits", model="tiny_cnn", rounds=8, num_clients=10, max_train_samples=None, val_size=300,
            max_test_samples=None, lr=0.05, local_epochs=3, batch_size=32, probe_size=16, min_partition_size=20,
            partition="dirichlet", alpha=1.0, threads=1, checkpoint=False, seed=0)


def attackers_for(fraction: float, num_clients: int, seed: int = 1234) -> list[int]:
    """The attacking clients: round(fraction x num_clients) of them, drawn once (seeded) so
    that 10% are among the 20%, and 20% among the 30%."""
    order = np.random.default_rng(seed).permutation(num_clients)
    return sorted(int(c) for c in order[:round(fraction * num_clients)])


def malicious_updates(attack: str, honest: dict, attackers: list, glob: dict, float_keys: list) -> dict:
    """``{client: state}`` the attackers send, from every sampled client's honest reply
    ``honest`` (client -> state) and the global state. Only floating parameters are attacked
    (BatchNorm statistics and counters are left as trained: an attack on them is refused by
    the plausibility checks already)."""
    out = {}
    upd = {c: {k: honest[c][k].double() - glob[k].double() for k in float_keys} for c in honest}
    benign = [c for c in honest if c not in attackers]
    for c in attackers:
        if c not in honest:
            continue
        s = {k: v.clone() for k, v in honest[c].items()}
        for k in float_keys:
            if attack == "sign_flip":
                d = SIGN_FLIP * upd[c][k]
            elif attack == "scaling":
                d = BOOST * upd[c][k]
            elif attack == "alie":
                x = torch.stack([upd[b][k] for b in benign])
                d = x.mean(0) - ALIE_Z * x.std(0, unbiased=True) if len(benign) > 1 else x.mean(0)
            elif attack == "ipm":
                d = -IPM_EPS * torch.stack([upd[b][k] for b in benign]).mean(0)
            elif attack == "free_rider":
                d = torch.zeros_like(upd[c][k])
            else:
                raise ValueError(f"attack must be one of {', '.join(ATTACKS)}; got {attack!r}")
            s[k] = (glob[k].double() + d).to(glob[k].dtype)
        if attack == "free_rider":
            s = {k: v.clone() for k, v in glob.items()}
        out[c] = s
    return out


def attack_transport(attack: str, attackers: list):
    """An :class:`~fedsq_fast.federation.transport.InProcessTransport` whose attackers' replies
    are replaced by ``attack`` (label_flip: nothing replaced; see :func:`flip_labels`)."""
    from fedsq_fast.federation.strategy import is_stat_key
    from fedsq_fast.federation.transport import InProcessTransport, Reply

    class AttackTransport(InProcessTransport):
        replies_alias = False  # every reply is a copy held here

        def replies(self, task):
            got = []
            for r in super().replies(task):
                if r.error is None:
                    r.state = {k: v.detach().clone() for k, v in r.state.items()}
                got.append(r)
            if attack == "label_flip":
                yield from got
                return
            glob = task.payload
            keys = [k for k, t in glob.items() if t.dtype.is_floating_point and not is_stat_key(k)]
            bad = malicious_updates(attack, {r.cid: r.state for r in got if r.error is None}, attackers, glob, keys)
            for r in got:
                if r.cid in bad:
                    r = Reply(r.cid, bad[r.cid], r.num_samples, r.seconds, r.loss)
                yield r

    return AttackTransport()


def flip_labels(data, attackers: list):
    """``data`` with the attackers' training labels y -> C - 1 - y (label flipping)."""
    y = data.y.clone()
    for c in attackers:
        idx = torch.as_tensor(data.parts[c], dtype=torch.long)
        y[idx] = data.num_classes - 1 - y[idx]
    return dataclasses.replace(data, y=y)


def run_cell(data, method: str, aggregator: str, attack: str | None, fraction: float, task: dict) -> dict:
    """One run: final test accuracy and the last round's validation accuracy."""
    from fedsq_fast.federation import Federation, from_mapping

    cfg = from_mapping(dict(task, methods=[method], aggregator=aggregator))
    attackers = attackers_for(fraction, cfg.num_clients) if attack else []
    d = flip_labels(data, attackers) if attack == "label_flip" else data
    transport = attack_transport(attack, attackers) if attack else None
    t0 = time.perf_counter()
    try:
        res = Federation(cfg, method, d, quiet=True, transport=transport).run()
    finally:
        if transport is not None:
            transport.close()
    rejected = sum(1 for h in res.history[1:] for _, r in h["clients_dropped"] if r.startswith("update rejected"))
    return {"method": method, "aggregator": aggregator, "attack": attack or "none", "fraction": fraction if attack else 0.0,
            "attackers": attackers, "test_acc": float(res.summary["test_acc"]), "val_acc": float(res.history[-1]["val_acc"]),
            "rejected": rejected, "seconds": round(time.perf_counter() - t0, 2)}


def cells(aggregators=AGGREGATORS, attacks=ATTACKS, fractions=FRACTIONS, methods=METHODS):
    for method in methods:
        for agg in aggregators:
            yield method, agg, None, 0.0
            for attack in attacks:
                for fr in fractions:
                    yield method, agg, attack, fr


def key(c, seed: int = 0) -> str:
    return f"{c[0]}/{c[1]}/{c[2] or 'none'}/{c[3]:g}" + (f"@{seed}" if seed else "")


def clean_spread(results: dict, method: str, agg: str) -> str:
    """'mean +- sd over n seeds' of the clean runs recorded for (method, agg)."""
    accs = [v["test_acc"] for k, v in results.items() if k.split("@")[0] == key((method, agg, None, 0.0))]
    return f"{np.mean(accs):.3f} +- {np.std(accs, ddof=1):.3f} (n={len(accs)})" if len(accs) > 1 else "-"


def table(results: dict, method: str) -> str:
    """Markdown: one row per (attack, share of attackers), one column per aggregator; each
    cell the final test accuracy; then each aggregator's worst case and its worst drop below
    the clean FedAvg-mean run."""
    aggs = AGGREGATORS
    fmt = lambda v: f"{v['test_acc']:.3f}" if v else "-"  # noqa: E731
    lines = ["| attack | attackers | " + " | ".join(aggs) + " |", "|---|---:|" + "---:|" * len(aggs)]
    rows = [(None, 0.0)] + [(a, f) for a in ATTACKS for f in FRACTIONS]
    for a, f in rows:
        vals = [results.get(key((method, g, a, f))) for g in aggs]
        lines.append(f"| {a or 'none (clean)'} | {int(f * 100)}% | " + " | ".join(fmt(v) for v in vals) + " |")
    worst = []
    for g in aggs:
        accs = [results[key((method, g, a, f))]["test_acc"] for a, f in rows[1:] if key((method, g, a, f)) in results]
        worst.append(f"**{min(accs):.3f}**" if accs else "-")
    lines.append("| worst of the attacks | | " + " | ".join(worst) + " |")
    if any("@" in k for k in results):
        lines.append("| clean, seeds 0-2 | | " + " | ".join(clean_spread(results, method, g) for g in aggs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="JSON file the results are appended to (resumed)")
    p.add_argument("--table", action="store_true", help="only print the tables of the results in --out")
    p.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=AGGREGATORS)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--clean-seeds", nargs="+", type=int, default=[], metavar="SEED",
                   help="instead of the grid: only the clean runs, with these seeds (the seed-to-seed spread)")
    a = p.parse_args(argv)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not a.table:
        from fedsq_fast.federation import data as fdata, from_mapping, prepare_data

        torch.set_num_threads(1)
        logging.disable(logging.WARNING)  # the attackers' rejected updates are counted, not logged
        datas = {TASK["seed"]: prepare_data(from_mapping(TASK), fdata.load_digits())}
        import fedsq_fast

        print(f"fedsq_fast from {fedsq_fast.__file__}; task {TASK}", flush=True)
        if a.clean_seeds:
            todo = [(m, g, None, 0.0, sd) for sd in a.clean_seeds for m in a.methods for g in a.aggregators]
        else:
            todo = [c + (0,) for c in cells(a.aggregators, a.attacks, methods=a.methods)]
        todo = [c for c in todo if key(c[:4], c[4]) not in results]
        t0 = time.perf_counter()
        for i, (*c, sd) in enumerate(todo):
            task = dict(TASK, seed=sd)
            if sd not in datas:  # another seed draws another split (and initialisation)
                datas[sd] = prepare_data(from_mapping(task), fdata.load_digits())
            results[key(c, sd)] = dict(run_cell(datas[sd], *c, task), seed=sd)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
            os.replace(tmp, out)
            r = results[key(c, sd)]
            print(f"[{i + 1}/{len(todo)} {time.perf_counter() - t0:.0f}s] {key(c, sd)}: test_acc {r['test_acc']:.3f} "
                  f"(rejected {r['rejected']})", flush=True)
    for method in a.methods:
        print(f"\n{method} (test accuracy; clean = no attacker)\n")
        print(table(results, method))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's fedsq_fast
    sys.exit(main())
