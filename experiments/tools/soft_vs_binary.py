"""Across the twin suites mnist_fmnist_soft_silu / mnist_fmnist_soft_relu: paired differences
by (partition, seed), with the suites' 95% Student-t interval (fedsq_fast.experiments.stats).

The two suites share seeds, so the same data subset, validation split, partition and client
shuffling; only the network's activation (and so FedSQ's gates: soft vs binary) differs. This is
descriptive: the suite files fix verdict rules for FedSQ vs FedAvg inside each suite only, so no
verdict is drawn here.

    python experiments/tools/soft_vs_binary.py [experiments/results]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fedsq_fast.experiments.stats import paired_ci

SOFT, BIN = "mnist_fmnist_soft_silu", "mnist_fmnist_soft_relu"


def _runs(folder: Path) -> dict:
    f = folder / "summary.json"
    if not f.is_file():
        raise SystemExit(f"results: {f} not found (run the suite, or its report, first)")
    return {(r["partition"], r["method"], r["seed"]): r for r in json.loads(f.read_text())["per_run"]}


def _fmt(ci, scale=100.0, unit=" pp"):
    if ci["lo"] is None:
        return f"{scale * ci['mean']:+.2f}{unit} (n={ci['n']}, no interval)"
    return f"{scale * ci['mean']:+.2f}{unit} [{scale * ci['lo']:+.2f}, {scale * ci['hi']:+.2f}] (n={ci['n']})"


def main(argv=None) -> int:
    root = Path((argv or sys.argv[1:] or ["experiments/results"])[0])
    soft, binary = _runs(root / SOFT), _runs(root / BIN)
    parts = sorted({k[0] for k in soft} & {k[0] for k in binary})
    for p in parts:
        seeds = sorted({k[2] for k in soft if k[0] == p} & {k[2] for k in binary if k[0] == p})
        seeds = [s for s in seeds if all((p, m, s) in d for d in (soft, binary) for m in ("fedavg", "fedsq"))]
        for key in ("bva", "test_acc"):
            def v(d, m, s):
                return d[(p, m, s)][key]
            rows = {
                "FedSQ gain with soft gates (SiLU: fedsq - fedavg)": [v(soft, "fedsq", s) - v(soft, "fedavg", s) for s in seeds],
                "FedSQ gain with binary gates (ReLU: fedsq - fedavg)": [v(binary, "fedsq", s) - v(binary, "fedavg", s) for s in seeds],
                "soft gain - binary gain": [(v(soft, "fedsq", s) - v(soft, "fedavg", s))
                                            - (v(binary, "fedsq", s) - v(binary, "fedavg", s)) for s in seeds],
                "FedAvg: SiLU - ReLU network": [v(soft, "fedavg", s) - v(binary, "fedavg", s) for s in seeds],
                "FedSQ: soft (SiLU) - binary (ReLU)": [v(soft, "fedsq", s) - v(binary, "fedsq", s) for s in seeds],
            }
            for name, diffs in rows.items():
                print(f"{p}, {key}, {name}: {_fmt(paired_ci(diffs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
