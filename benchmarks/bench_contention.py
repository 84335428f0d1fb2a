"""Runs sharing a machine (issue 25): N runs started together against the same runs one
after another, under OpenMP waiting settings: fedsq_fast's (GOMP_SPINCOUNT=2000: a short spin,
then sleep), libgomp's default ('unset'), OMP_WAIT_POLICY=PASSIVE and ACTIVE.

The job: the README's main job (``python -m fedsq_fast run``: the SVHN-trained CNN fine-tuned on
MNIST, FedAvg and FedSQ), reduced so that one run takes seconds, each run a fresh subprocess
with its own output folder and torch's default thread count (every run wants every core).

Printed per policy: one run alone (wall s), N runs started together (wall s of the last to
finish), and the ratio ``together / (N x alone)``: 1.0 is a fair share of the cores, and the
target is <= 1.15; one run alone should stay within 3% of libgomp's default.

    pytest benchmarks/bench_contention.py --benchmark-only -s
    python benchmarks/bench_contention.py --runs 2 --rounds 2 --repeat 2

Environment (pytest) / flags: FEDSQ_CONT_RUNS / --runs (2), FEDSQ_CONT_ROUNDS / --rounds (2),
FEDSQ_CONT_SAMPLES / --samples (1000 training samples), FEDSQ_CONT_REPEAT / --repeat (1: the
alone arms are timed this many times, the minimum kept).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import pytest


def _cmd(out_dir: str, rounds: int, samples: int) -> list:
    return [sys.executable, "-m", "fedsq_fast", "run", "--rounds", str(rounds), "--max-train-samples",
            str(samples), "--val-size", "300", "--max-test-samples", "300", "--out-dir", out_dir, "--quiet"]


def _env(policy: str) -> dict:
    """PASSIVE / ACTIVE: OMP_WAIT_POLICY; 'unset': libgomp's default (a short spin, then sleep);
    'SPIN:N': GOMP_SPINCOUNT=N with no policy (spin N iterations, then sleep)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    if policy.startswith("SPIN:"):
        env["GOMP_SPINCOUNT"] = policy[5:]
        env["OMP_WAIT_POLICY"] = "unset"  # fedsq_fast's setdefault then leaves libgomp's default
    elif policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    else:
        env["OMP_WAIT_POLICY"] = "unset"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def run_together(n: int, policy: str, rounds: int, samples: int) -> float:
    """Wall seconds until the last of ``n`` runs started together finishes."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(_cmd(os.path.join(tmp, f"r{i}"), rounds, samples), env=_env(policy),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(n)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"run failed ({p.returncode}): {err.decode()[-2000:]}")
        return time.perf_counter() - t0


POLICIES = ("SPIN:2000", "unset", "PASSIVE", "ACTIVE")


def measure(runs: int = 2, rounds: int = 2, samples: int = 1000, repeat: int = 1, policies=POLICIES) -> dict:
    """{policy: {'alone': s, 'together': s, 'ratio': together / (runs x alone)}}."""
    res = {}
    alone = {p: [] for p in policies}
    for r in range(repeat):  # the alone arms interleaved, order rotated: a drifting machine hits all alike
        for policy in policies[r % len(policies):] + policies[:r % len(policies)]:
            alone[policy].append(run_together(1, policy, rounds, samples))
    for policy in policies:
        together = run_together(runs, policy, rounds, samples)
        res[policy] = {"alone": min(alone[policy]), "together": together, "ratio": together / (runs * min(alone[policy]))}
    if "SPIN:2000" in res and "unset" in res:
        res["alone_ours_over_default"] = res["SPIN:2000"]["alone"] / res["unset"]["alone"]
    return res


def report(res: dict, runs: int) -> str:
    lines = [f"| OpenMP waiting | one run alone (s) | {runs} runs together (s) | together / ({runs} x alone) |",
             "|---|---:|---:|---:|"]
    for policy, r in res.items():
        if not isinstance(r, dict):
            continue
        lines.append(f"| {policy} | {r['alone']:.1f} | {r['together']:.1f} | {r['ratio']:.2f} |")
    if "alone_ours_over_default" in res:
        lines.append(f"\none run alone, fedsq_fast's setting / libgomp's default: {res['alone_ours_over_default']:.3f}")
    return "\n".join(lines)


def _env_int(name, default):
    return int(os.environ.get(name, default))


@pytest.mark.slow
def test_runs_side_by_side(benchmark):
    runs, rounds = _env_int("FEDSQ_CONT_RUNS", 2), _env_int("FEDSQ_CONT_ROUNDS", 2)
    samples, repeat = _env_int("FEDSQ_CONT_SAMPLES", 1000), _env_int("FEDSQ_CONT_REPEAT", 1)
    res = benchmark.pedantic(measure, args=(runs, rounds, samples, repeat), rounds=1, iterations=1)
    print("\n" + report(res, runs))
    benchmark.extra_info.update({k: v for k, v in res.items()})
    assert res["SPIN:2000"]["ratio"] > 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated: PASSIVE, ACTIVE, unset, SPIN:N")
    a = ap.parse_args()
    print(report(measure(a.runs, a.rounds, a.samples, a.repeat, tuple(a.policies.split(","))), a.runs))
