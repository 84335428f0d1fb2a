"""SecAgg+'s cost per round against plain aggregation, on a real Flower deployment on loopback.

One flower-superlink and N flower-supernode processes (tests/flower/test_flower.py's
Deployment), the same FedSQ config run twice: ``secagg = false`` (one train message per node
a round) and ``secagg = true`` (Flower's SecAgg+: four messages per node a round, setup,
share keys, masked vectors, unmask, plus one partition query per node before the first
round). Reported: each round's ``time_round_s`` from metrics.json (the server's wall time
from sending the round to the evaluated model) and the ratio of the medians. Round 1 also
holds the nodes' data loading and model building in both runs.

    python benchmarks/tools/secagg_round.py [--nodes 3] [--rounds 3] [--model tiny_cnn]
    python benchmarks/tools/secagg_round.py --in-process [--model svhn_cnn]

``--in-process``: the same two transports over test grids whose nodes run the ClientApp in
this process (tests/flower: InProcessGrid, SecAggGrid), no Flower runtime and no process
starts: what the protocol itself costs (key agreement, secret sharing, mask expansion,
quantization) beside local training, for a model whose payload is not tiny.

Where each stage's time goes is in the ServerApp's log (``seconds per stage``), printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "flower"), str(ROOT / "tests"), str(ROOT)]


def one_run(root: Path, secagg: bool, args) -> dict:
    from test_flower import Deployment, _run_config, _wait  # noqa: E402 (the tests' loopback harness)

    from fedsq_fast.federation import from_mapping

    cfg = from_mapping(dict(dataset="digits", model=args.model, rounds=args.rounds, num_clients=args.nodes,
                            max_train_samples=None, val_size=200, max_test_samples=200, lr=0.05,
                            methods=["fedsq"], probe_size=16, min_partition_size=5, threads=1,
                            seed=0, norm_bound=None, secagg=secagg, out_dir=str(root / "out")))
    dep = Deployment(root)
    t0 = time.monotonic()
    try:
        dep.start_superlink()
        for i in range(cfg.num_clients):
            dep.start_supernode(i, cfg.num_clients)
        run = dep.flwr_run(_run_config(cfg, **{"round-timeout": 600.0}), timeout=3000)
        _wait(run, 3000, dep)  # pytest.fail's exception with the logs' tails if it does not finish
    finally:
        dep.stop()
    wall = time.monotonic() - t0
    doc = json.loads((root / "out" / "fedsq" / "metrics.json").read_text())
    stages = [ln.split("seconds per stage: ", 1)[1] for ln in (root / "flwr-run.log").read_text(errors="replace")
              .splitlines() if "seconds per stage" in ln]
    return {"rounds": [h["time_round_s"] for h in doc["history"][1:]],
            "ok": [h["clients_ok"] for h in doc["history"][1:]], "wall_s": wall, "stages": stages,
            "val_acc": doc["history"][-1]["val_acc"]}


def in_process(args) -> None:
    import warnings

    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import InProcessGrid
    from test_secagg import SecAggGrid

    from fedsq_fast.federation import Federation, from_mapping, prepare_data
    from fedsq_fast.flower import GridTransport
    from fedsq_fast.flower.secagg import SecAggTransport

    warnings.filterwarnings("ignore")
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
    base = dict(dataset="digits", model=args.model, weights="none", rounds=args.rounds, num_clients=args.nodes,
                max_train_samples=None, val_size=200, max_test_samples=200, lr=0.05, methods=["fedsq"],
                probe_size=16, min_partition_size=5, threads=1, seed=0, norm_bound=None, checkpoint=False)
    times = {}
    for secagg in (False, True):
        cfg = from_mapping({**base, "secagg": secagg})
        data = prepare_data(cfg)
        tr = (SecAggTransport(SecAggGrid(args.nodes), poll_s=0) if secagg else
              GridTransport(InProcessGrid(args.nodes), poll_s=0))
        fed = Federation(cfg, "fedsq", data, quiet=True, transport=tr)
        res = fed.run()
        times[secagg] = [h["time_round_s"] for h in res.history[1:]]
        print(f"in process, secagg={secagg}: payload {fed.payload_bytes} bytes, round seconds "
              f"{[round(x, 2) for x in times[secagg]]}, val_acc {res.history[-1]['val_acc']:.4f}", flush=True)
    plain, sec = (statistics.median(times[k][1:] or times[k]) for k in (False, True))
    print(f"median round after the first: plain {plain:.2f} s, SecAgg+ {sec:.2f} s, ratio {sec / plain:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="tiny_cnn")
    ap.add_argument("--in-process", action="store_true", help="test grids in this process, no Flower runtime")
    args = ap.parse_args()
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    if args.in_process:
        return in_process(args)
    out = {}
    for secagg in (False, True):
        with tempfile.TemporaryDirectory() as d:
            out[secagg] = one_run(Path(d), secagg, args)
        r = out[secagg]
        print(f"secagg={secagg}: round seconds {[round(x, 1) for x in r['rounds']]}, clients ok {r['ok']}, "
              f"val_acc {r['val_acc']:.4f}, wall {r['wall_s']:.0f} s", flush=True)
        for s in r["stages"]:
            print("   ", s)
    plain, sec = (statistics.median(out[k]["rounds"][1:] or out[k]["rounds"]) for k in (False, True))
    print(f"median round after the first: plain {plain:.1f} s, SecAgg+ {sec:.1f} s, ratio {sec / plain:.2f}")


if __name__ == "__main__":
    main()
