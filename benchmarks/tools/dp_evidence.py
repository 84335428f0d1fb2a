"""Issue 26's evidence: utility against epsilon under client-level DP, FedAvg vs FedSQ.

SVHN CNN (ccexam weights) fine-tuned on MNIST (the svhn_mnist suite's task and hyper-parameters:
1 local epoch, batch 32, SGD lr 0.01 momentum 0.9; sizes cut to fit a shared 2-core CPU: 600
training images, 200 validation, 500 test), split i.i.d. over 100 clients (6 images each) so
that one client is 1% of the federation; every client every round (poisson sampling with
q = 1: the plain Gaussian mechanism composed), 2 rounds, central DP,
fixed clip, delta = 1e-3 (< 1 / num_clients), epsilon in {1, 4, 8, none}, seeds 0, 1, 2.
The clip of each method is fixed before the evidence runs from a pilot (seed 99, one
non-DP round): the median L2 norm of the clients' updates. Writes one JSON per run and a
summary with the suites' intervals (fedsq_fast/experiments/stats.py: mean +- std over seeds,
paired t intervals of FedSQ - FedAvg per epsilon)."""
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from fedsq_fast.experiments.stats import mean_std, paired_ci
from fedsq_fast.federation import Federation, from_mapping, prepare_data, validate

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/privacy_evidence")
BASE = dict(dataset="mnist", model="svhn_cnn", weights="default", max_train_samples=600, val_size=200,
            max_test_samples=500, num_clients=100, partition="iid", min_partition_size=1, rounds=2, fraction=1.0,
            min_clients=1, optimizer="sgd", lr=0.01, momentum=0.9, local_epochs=1, batch_size=32, threads=1,
            checkpoint=False, plausible_scale=None, norm_bound=None, probe_size=16)
EPS = [None, 8.0, 1.0, 4.0]  # run in this order (a shared machine may not finish them all)
METHODS = ["fedavg", "fedsq"]
SEEDS = [0, 1, 2]


def pilot_clip(method):
    cfg = validate(from_mapping({**BASE, "methods": [method], "seed": 99, "rounds": 1}))
    fed = Federation(cfg, method, prepare_data(cfg), quiet=True)
    glob = {k: v.clone() for k, v in fed.trainer.worker.state_dict().items()}
    from fedsq_fast.federation.adapter import payload_state

    g = {k: v.clone() for k, v in payload_state(fed.model).items()}
    norms = []
    for cid in range(0, 100, 5):
        st, _ = fed.train_client(1, cid, g)
        norms.append(math.sqrt(sum(float(((st[k].double() - g[k].double()) ** 2).sum())
                                   for k in g if g[k].dtype.is_floating_point)))
    fed.close_caches()
    return statistics.median(norms), sum(v.numel() for v in g.values() if v.dtype.is_floating_point)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pilot = OUT / "pilot.json"
    if pilot.exists():  # the clips were fixed once, before the evidence runs
        clips = json.loads(pilot.read_text())
    else:
        clips = {m: pilot_clip(m) for m in METHODS}
        pilot.write_text(json.dumps(clips))
    print("pilot median update norm, parameters:", clips, flush=True)
    runs = {}
    for eps in EPS:
        for m in METHODS:
            for seed in SEEDS:
                done = OUT / f"{m}_eps{eps}_seed{seed}.json"
                if done.exists():  # a run finished before a restart
                    runs[(eps, m, seed)] = json.loads(done.read_text())
                    continue
                kw = {**BASE, "methods": [m], "seed": seed}
                if eps is not None:
                    kw.update(dp="central", dp_clip=clips[m][0], dp_target_epsilon=eps, dp_delta=1e-3)
                    del kw["min_clients"]  # not read under poisson sampling (every client joins: q = 1)
                cfg = validate(from_mapping(kw))
                t = time.time()
                res = Federation(cfg, m, prepare_data(cfg), quiet=True).run()
                rec = {"method": m, "epsilon": eps, "seed": seed, "bva": res.summary["bva"],
                       "final_val_acc": res.summary["final_val_acc"], "test_acc": res.summary.get("test_acc"),
                       "dp_epsilon": res.summary.get("dp_epsilon"),
                       "dp_noise_multiplier": res.summary.get("dp_noise_multiplier"),
                       "val_acc": [h["val_acc"] for h in res.history], "seconds": time.time() - t}
                runs[(eps, m, seed)] = rec
                (OUT / f"{m}_eps{eps}_seed{seed}.json").write_text(json.dumps(rec, indent=1))
                print(json.dumps({k: rec[k] for k in ("method", "epsilon", "seed", "test_acc", "final_val_acc",
                                                       "dp_noise_multiplier", "seconds")}), flush=True)
    write_summary(runs, clips, t0)


def write_summary(runs, clips, t0):
    summary = {"clips": clips, "config": BASE, "rows": []}
    for eps in EPS:
        if not all((eps, m, s) in runs for m in METHODS for s in SEEDS):
            continue
        row = {"epsilon": eps}
        for m in METHODS:
            row[m] = mean_std([runs[(eps, m, s)]["test_acc"] for s in SEEDS])
        row["fedsq_minus_fedavg"] = paired_ci([runs[(eps, "fedsq", s)]["test_acc"] - runs[(eps, "fedavg", s)]["test_acc"]
                                               for s in SEEDS])
        row["epsilon_spent"] = [runs[(eps, m, s)]["dp_epsilon"] for m in METHODS for s in SEEDS]
        row["noise_multiplier"] = sorted({runs[(eps, m, s)]["dp_noise_multiplier"] for m in METHODS for s in SEEDS},
                                         key=str)
        summary["rows"].append(row)
    summary["seconds"] = time.time() - t0
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))


def summary_only():
    runs = {}
    for f in OUT.glob("*_eps*_seed*.json"):
        r = json.loads(f.read_text())
        runs[(r["epsilon"], r["method"], r["seed"])] = r
    write_summary(runs, json.loads((OUT / "pilot.json").read_text()), time.time())


if __name__ == "__main__":
    torch.set_num_threads(1)
    summary_only() if "--summary" in sys.argv else main()
