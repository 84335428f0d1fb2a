"""Experiment suites: a fixed grid (settings x partitions x methods x seeds, plus
structural-copy ablations) run from one TOML file, and a Markdown report with
tables, plots and a plain verdict on each of the paper's claims.

    python -m fedsq_fast.experiments run experiments/svhn_mnist.toml [--out DIR] [--resume]
    python -m fedsq_fast.experiments report experiments/results/svhn_mnist

Every setting, seed and verdict rule comes from the suite file (fixed before any run);
nothing here looks at results to choose what to run or how to judge.

CLI hook (3 lines in fedsq_fast/cli.py):
    q = sub.add_parser("suite", help="run an experiment suite / write its report")
    experiments.add_arguments(q)
    ... if ns.command == "suite": return experiments.run_from_args(ns)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import difflib
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .federation import adapter
from .federation.config import RunConfig, config_differences, from_mapping, parse_method, validate
from .federation.data import load_dataset
from .federation.partition import partition_table
from .federation.plots import round_axis
from .federation.runner import method_slug, parse_partition, partition_tag
from .federation.server import Federation, prepare_data

# ------------------------------------------------------------------ suite file
SUITE_KEYS = {
    "name": "folder name under results/ (letters, digits, _ and -)",
    "title": "one-line description for the report",
    "notes": "free text copied into the report (sizing rationale, sources)",
    "requires": "what must exist for the suite to run (weights, data); shown in the report",
    "seeds": "list of integer seeds",
    "partitions": "list of 'iid' | 'dirichlet:ALPHA' | 'quantity:ALPHA' | 'shards:N'",
    "methods": "list of methods run on every partition",
    "ablation_partitions": "partitions that also run ablation_methods",
    "ablation_methods": "structural-copy ablations, e.g. 'fedsq:unfreeze=3'",
    "baseline": "method whose BVA defines the rounds-to-target (default fedavg)",
    "target_fraction": "rounds to this fraction of the baseline's BVA (default 0.95)",
    "noninferiority_margin": "BVA 'same or better' margin, accuracy units (default 0.01)",
    "settle_threshold": "a per-round change has settled once it stays <= this x its round-1 value "
                        "(default 0.25)",
}
# Keys the suite sets per cell; setting them in [run] would be silently overridden.
SUITE_OWNED = ("methods", "seed", "partition", "alpha", "shards_per_client", "out_dir")
# Paired comparisons the report makes (first vs second), where both were run.
COMPARISONS = (("fedsq", "fedavg"), ("fedsq", "fedprox"), ("fedsq+fedprox", "fedprox"),
               ("fedsq+fedprox", "fedavg"))
GATE_METHODS = ("fedavg", "fedprox")  # plain networks: their own gates drift from the pretrained ones


def _fail(key, msg):
    raise ValueError(f"{key}: {msg}")


@dataclass
class Suite:
    name: str
    path: Path
    run: dict
    seeds: list
    partitions: list
    methods: list
    ablation_partitions: list = field(default_factory=list)
    ablation_methods: list = field(default_factory=list)
    title: str = ""
    notes: str = ""
    requires: str = ""
    baseline: str = "fedavg"
    target_fraction: float = 0.95
    noninferiority_margin: float = 0.01
    settle_threshold: float = 0.25
    text: str = ""  # the file as read, copied next to the results

    @property
    def partition_tags(self) -> list:
        return [_tag(p) for p in self.partitions]

    def methods_for(self, spec) -> list:
        extra = self.ablation_methods if _tag(spec) in {_tag(p) for p in self.ablation_partitions} else []
        return list(self.methods) + list(extra)

    def base_config(self) -> RunConfig:
        return from_mapping(_nones(self.run))

    def cell_config(self, spec, seed, method) -> RunConfig:
        return dataclasses.replace(self.base_config(), seed=int(seed), methods=[method],
                                   **parse_partition(spec))

    def cells(self) -> list:
        """(seed, partition spec, method) in run order: seed-major, so every cell gets its
        first seed before any cell gets its second (an interrupted suite is still balanced)."""
        return [(s, p, m) for s in self.seeds for p in self.partitions for m in self.methods_for(p)]


def _nones(run: dict) -> dict:
    """TOML has no null: "none" means None for the keys that may be None (as the CLI's flags)."""
    import typing

    hints = typing.get_type_hints(RunConfig)
    out = {}
    for k, v in run.items():
        k2 = k.replace("-", "_")
        if isinstance(v, str) and v.strip().lower() in ("none", "null") and \
                type(None) in typing.get_args(hints.get(k2, str)):
            v = None
        out[k] = v
    return out


def _tag(spec: str) -> str:
    d = dict(partition="iid", alpha=0.0, shards_per_client=0)
    d.update(parse_partition(spec))
    return partition_tag(d)


def _slug(tag: str) -> str:
    return tag.replace(":", "_")


def _str_list(d, key, parse=None, allow_empty=False):
    v = d.get(key, [])
    if not isinstance(v, list) or (not v and not allow_empty) or not all(isinstance(x, (str, int)) for x in v):
        _fail(key, f"must be a {'possibly empty ' if allow_empty else 'non-empty '}list, got {v!r}")
    if len(set(map(str, v))) != len(v):
        _fail(key, f"has duplicate entries: {v}")
    for x in v:
        if parse is not None:
            parse(x)
    return list(v)


def load_suite(path) -> Suite:
    """Read and check a suite file in full (every key, every cell's config) before any work."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        _fail("suite", f"file not found: {p}")
    if p.suffix != ".toml":
        _fail("suite", f"{p}: a suite is a .toml file")
    text = p.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        _fail("suite", f"{p}: {e}")
    for k in doc:
        if k not in ("suite", "run"):
            _fail(k, f"unknown table in {p.name}; a suite file has [suite] and [run]")
    s = doc.get("suite")
    if not isinstance(s, dict):
        _fail("suite", f"{p.name} needs a [suite] table")
    for k in s:
        if k not in SUITE_KEYS:
            near = difflib.get_close_matches(k, SUITE_KEYS, n=3)
            _fail(f"suite.{k}", "unknown key" + (f" (did you mean {', '.join(near)}?)" if near else
                                                   f"; valid: {', '.join(SUITE_KEYS)}"))
    name = s.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        _fail("suite.name", f"must be a non-empty name of letters, digits, _ and -, got {name!r}")
    seeds = s.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                           and x >= 0 for x in seeds):
        _fail("suite.seeds", f"must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        _fail("suite.seeds", f"has duplicate entries: {seeds}")

    def part(x):
        if not isinstance(x, str):
            _fail("suite.partitions", f"entries must be strings, got {x!r}")
        try:
            parse_partition(x)
        except ValueError as e:
            _fail("suite.partitions", str(e))

    def meth(x):
        try:
            parse_method(x)
        except ValueError as e:
            _fail("suite.methods", str(e))

    parts = _str_list(s, "partitions", part)
    if len({_tag(x) for x in parts}) != len(parts):
        _fail("suite.partitions", f"two entries name the same partition: {parts}")
    methods = _str_list(s, "methods", meth)
    abl_parts = _str_list(s, "ablation_partitions", part, allow_empty=True)
    abl_methods = _str_list(s, "ablation_methods", meth, allow_empty=True)
    for x in abl_parts:
        if _tag(x) not in {_tag(q) for q in parts}:
            _fail("suite.ablation_partitions", f"{x!r} is not in partitions {parts}")
    if bool(abl_parts) != bool(abl_methods):
        _fail("suite.ablation_methods", "give both ablation_partitions and ablation_methods, or neither")
    dup = set(abl_methods) & set(methods)
    if dup:
        _fail("suite.ablation_methods", f"already in methods: {sorted(dup)}")
    baseline = s.get("baseline", "fedavg")
    if baseline not in methods:
        _fail("suite.baseline", f"{baseline!r} must be one of methods {methods}")
    kw = {}
    for k, lo, hi in (("target_fraction", 0.0, 1.0), ("noninferiority_margin", 0.0, 1.0),
                      ("settle_threshold", 0.0, 1.0)):
        if k in s:
            v = s[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v <= hi or
                                                                             (k == "noninferiority_margin" and v == 0)):
                _fail(f"suite.{k}", f"must be a number in ({lo}, {hi}], got {v!r}")
            kw[k] = float(v)
    for k in ("title", "notes", "requires"):
        if k in s and not isinstance(s[k], str):
            _fail(f"suite.{k}", f"must be a string, got {s[k]!r}")
        kw[k] = s.get(k, "")
    run = doc.get("run", {})
    if not isinstance(run, dict):
        _fail("run", "must be a table of RunConfig keys")
    for k in run:
        if k.replace("-", "_") in SUITE_OWNED:
            _fail(f"run.{k}", "is set per cell by [suite] (seeds, partitions, methods, --out); remove it here")
    suite = Suite(name=name, path=p, run=dict(run), seeds=list(seeds), partitions=parts, methods=methods,
                  ablation_partitions=abl_parts, ablation_methods=abl_methods, baseline=baseline,
                  text=text, **kw)
    models = adapter.list_models()
    try:
        base = suite.base_config()  # unknown [run] keys raise here, naming the key
    except ValueError as e:
        raise ValueError(f"run.{e}") from None
    for spec in parts:
        for m in suite.methods_for(spec):
            c = suite.cell_config(spec, seeds[0], m)
            try:
                validate(c, models)
            except ValueError as e:
                raise ValueError(f"run.{e} (partition {spec}, method {m})") from None
    del base
    return suite


def default_out(suite: Suite) -> Path:
    """experiments/<suite>.toml -> experiments/results/<name>/."""
    return suite.path.resolve().parent / "results" / suite.name


def cell_dir(out, spec, seed, method) -> Path:
    return Path(out) / _slug(_tag(spec)) / f"seed{seed}" / method_slug(method)


# ------------------------------------------------------------------ engine
def _float_keys(state) -> list:
    # parameters only: BN running statistics are not weights (and move on their own)
    return [k for k, v in state.items() if v.is_floating_point() and "running_" not in k]


def _dist(a: dict, b: dict | None, keys) -> float:
    s = 0.0
    for k in keys:
        t = a[k].double() if b is None else a[k].double() - b[k].double()
        s += float((t * t).sum())
    return math.sqrt(s)


class SuiteFederation(Federation):
    """Federation plus the mask-evolution metrics the report needs, per round:

    - ``gate_flip_prev``: fraction of gates (probe batch) that changed since the previous
      round's global model (DualCopy: the quantitative copy's own gates);
    - ``weight_step_rel``: ||w_r - w_{r-1}|| / ||w_0|| over the payload's parameters;
    - ``weight_dist_rel``: ||w_r - w_0|| / ||w_0||.
    ``gate_change`` (vs round 0, i.e. the pretrained gates) is the engine's own.
    """

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        w0 = adapter.payload_state(self.initial)
        self._keys = _float_keys(w0)
        self._w0 = {k: w0[k].detach().clone() for k in self._keys}
        self._w0_norm = _dist(self._w0, None, self._keys) or 1.0
        self._prev = None

    def _snapshot(self):
        cache = getattr(self.model, "mask_cache", None)
        if cache is not None:
            self.model.mask_cache = None  # not deep-copied (it belongs to the global model)
        try:
            m = copy.deepcopy(self.model)
        finally:
            if cache is not None:
                self.model.mask_cache = cache
        return m

    def run_round(self, rnd):
        # a full copy every round (small next to a round): after a structural refresh the
        # previous model keeps its own structural copy, so each model is compared by its own gates
        self._prev = self._snapshot()
        prev_w = {k: v.detach().clone() for k, v in adapter.payload_state(self._prev).items() if k in self._keys}
        rec = super().run_round(rnd)
        t = time.perf_counter()
        w = adapter.payload_state(self.model)
        rec["weight_step_rel"] = _dist(w, prev_w, self._keys) / self._w0_norm
        rec["weight_dist_rel"] = _dist(w, self._w0, self._keys) / self._w0_norm
        try:
            g = adapter.gate_change_sites(self._prev, self.model, self.data.transform(self.data.probe))
            rec["gate_flip_prev"] = float(np.mean(g)) if g else float("nan")
        except Exception as e:  # a metric must not stop the suite
            rec["gate_flip_prev"] = float("nan")
            rec["gate_flip_error"] = f"{type(e).__name__}: {e}"
        rec["time_probe_s"] = time.perf_counter() - t
        return rec


# Environment switches that pin the CPU code paths of torch (ATen, oneDNN, MKL) and of our kernels,
# and the setting that reproduces runs made on an AVX2-only CPU on one with AVX-512.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "FEDSQ_FAST_CPU_ISA")
AVX2_PIN = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FEDSQ_FAST_CPU_ISA=avx2"


def machine_info() -> dict:
    import fedsq_fast

    cpu, simd = platform.processor() or platform.machine(), None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = info.get("model name", cpu)
        have = set(info.get("flags", "").split())
        simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    # The instruction sets in use decide the floating-point rounding of convolutions and GEMMs,
    # so a run is reproducible bit for bit only where they match (see experiments/README.md).
    isa = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "fedsq_fast_cpu_isa": torch.ops.fedsq_fast.cpu_isa("") if fedsq_fast.backend() == "compiled" else None,
           "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}
    return {"host_cpu": cpu, "cpu_simd": simd, **isa, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "fedsq_fast_backend": fedsq_fast.backend()}


def _loadavg():
    # 1-minute load average: on a shared machine it explains wall times (not the results)
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _git_version():
    import subprocess

    try:
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fedsq_fast"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+uncommitted changes in fedsq_fast/" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read once, when the code is imported: a long suite must record the code it runs, not
# whatever the checkout holds by the time a run ends.
_CODE_AT_IMPORT = _git_version()


def _code_version():
    return _CODE_AT_IMPORT


def _utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cell_state(d: Path, cfg: RunConfig) -> str:
    """'done' | 'partial' (a checkpoint) | 'new'; refuses results written with other settings."""
    mj = d / "metrics.json"
    if mj.is_file():
        doc = json.loads(mj.read_text())
        diff = config_differences(cfg, doc.get("config", {}))
        if diff:
            raise ValueError(f"out: {mj} was written with other settings (differing keys: {diff}); "
                             "use another --out for a changed suite")
        if doc.get("summary", {}).get("complete", True):
            return "done"
    return "partial" if (d / "checkpoint.safetensors").is_file() else "new"


def run_suite(suite: Suite | str | os.PathLike, out=None, resume: bool = False, echo=print,
              max_runs: int | None = None, deadline: _dt.datetime | None = None,
              shard: tuple[int, int] = (1, 1)) -> Path:
    """Run every cell of the suite (seed-major order), then write the report.

    ``resume``: skip finished cells, continue interrupted ones from their checkpoint.
    ``shard=(k, n)``: run only cells k, k+n, k+2n, ... of the run order (1-based k), so n processes
    on n cores fill one results folder between them (pass ``resume`` to each).
    ``max_runs``: stop after this many newly run cells; ``deadline`` (aware datetime): start no
    run that would, at the longest run time seen so far, end after it. Either way the report
    then lists what is missing.
    """
    k_, n_ = shard
    if not (isinstance(k_, int) and isinstance(n_, int) and 1 <= k_ <= n_):
        _fail("shard", f"must be K/N with 1 <= K <= N, got {k_}/{n_}")
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    out = Path(out) if out is not None else default_out(suite)
    cells = suite.cells()
    states = {}
    for s, p, m in cells:
        states[(s, p, m)] = _cell_state(cell_dir(out, p, s, m), suite.cell_config(p, s, m))
    existing = [k for k, v in states.items() if v != "new"]
    if existing and not resume:
        raise ValueError(f"out: {out} already holds results for {len(existing)} of {len(cells)} runs; "
                         "pass --resume to skip finished runs and continue interrupted ones, "
                         "or choose another --out")
    todo = [c for i, c in enumerate(cells) if states[c] != "done" and i % n_ == k_ - 1]
    bundle = None
    if todo:  # missing data fails here, before the results folder is written
        first = suite.cell_config(todo[0][1], todo[0][0], todo[0][2])
        bundle = load_dataset(first.dataset, first.data_root, first.download)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.toml").write_text(suite.text)
    mine = sum(1 for i in range(len(cells)) if i % n_ == k_ - 1)
    echo(f"suite {suite.name}: {len(cells)} runs" + (f" (shard {k_}/{n_}: {mine} of them)" if n_ > 1 else "")
         + f", {mine - len(todo)} already done, {len(todo)} to run -> {out}")
    ran = 0
    longest = 0.0
    groups = {}
    for s, p, m in todo:
        groups.setdefault((s, p), []).append(m)

    def should_stop():
        if max_runs is not None and ran >= max_runs:
            return f"--max-runs {max_runs} reached"
        if deadline is not None and _dt.datetime.now(_dt.timezone.utc).timestamp() + longest > deadline.timestamp():
            return f"deadline {deadline.isoformat()} (longest run so far {longest:.0f} s)"
        return None

    for (s, p), methods in groups.items():
        stop = should_stop()
        if stop:
            echo(f"stopping: {stop}; {len(todo) - ran} runs left for --resume")
            break
        base = suite.cell_config(p, s, methods[0])
        if base.threads:
            torch.set_num_threads(base.threads)
        data = prepare_data(base, bundle)  # one load for the whole suite: all cells share dataset and settings
        gdir = cell_dir(out, p, s, methods[0]).parent
        gdir.mkdir(parents=True, exist_ok=True)
        (gdir / "partition.txt").write_text(partition_table(data.counts, data.classes) + "\n")
        for m in methods:
            stop = should_stop()
            if stop:
                echo(f"stopping: {stop}; {len(todo) - ran} runs left for --resume")
                break
            cfg = suite.cell_config(p, s, m)
            d = cell_dir(out, p, s, m)
            start, t0, load0 = _utc(), time.perf_counter(), _loadavg()
            fed = SuiteFederation(cfg, m, data, out_dir=d, quiet=True)
            res = fed.run(resume=True)  # continues a checkpoint of an interrupted run, if any
            info = {"started": start, "finished": _utc(), "wall_s": time.perf_counter() - t0,
                    "loadavg_start": load0, "loadavg_end": _loadavg(), "code": _code_version(),
                    "suite": suite.name, "suite_file": _rel(suite.path), **machine_info()}
            (d / "run_info.json").write_text(json.dumps(info, indent=1))
            ran += 1
            longest = max(longest, info["wall_s"])
            sm = res.summary
            echo(f"[{ran}/{len(todo)}] seed {s} {_tag(p)} {m}: BVA {sm['bva']:.4f} at round "
                 f"{sm['rounds_to_best']}, {info['wall_s']:.0f} s ({start})")
    report(out, suite=suite, echo=echo)
    return out


# ------------------------------------------------------------------ verify
# What a run records about the clock rather than the computation: excluded from the check.
_TIMING = ("time_", "elapsed_s", "seconds_to_target")
# The per-round and summary numbers the report is computed from (see analyse()).
REPORT_KEYS = {"val_acc", "gate_change", "gate_flip_prev", "weight_step_rel", "weight_dist_rel", "bytes_up",
               "bva", "rounds_to_best", "test_acc", "final_val_acc", "initial_val_acc", "payload_bytes",
               "rounds", "complete", "best_val_acc", "best_round", "round"}


def _differences(a, b, where="", out=None) -> list:
    """Every (path, recorded, now) where two JSON values differ; floats compared exactly (the same
    code on the same machine kind and thread count gives the same bits)."""
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k.startswith(_TIMING):
                continue
            if k not in a or k not in b:  # a key the recording code did not write, or dropped since
                out.append((f"{where}.{k}", a.get(k, _ABSENT), b.get(k, _ABSENT)))
            else:
                _differences(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _differences(x, y, f"{where}[{i}]", out)
    elif not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
        out.append((where, a, b))
    return out


_ABSENT = "<not recorded>"


def _key_of(path: str) -> str:
    return path.rsplit(".", 1)[-1].split("[")[0]


def _rel_diff(x, y) -> float | None:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        return abs(x - y) / max(abs(x), abs(y), 1e-300)
    return None


def _tally(diffs) -> tuple:
    """Sort the differences of two runs' records into a check's row fields: ``identical`` (every
    number), ``match`` (every number in REPORT_KEYS), the differing report keys, and per key (first
    place, how many places, largest relative difference) the report numbers (``differences``) and
    the diagnostics (``differing_other_keys``); plus the keys only one run recorded (code changes)
    and the verdict that verify and verify --against print."""
    absent = sorted({_key_of(path) for path, x, y in diffs if _ABSENT in (x, y)})
    by_key = {}
    for path, x, y in diffs:
        if _ABSENT in (x, y):
            continue
        r = _rel_diff(x, y)
        e = by_key.setdefault(_key_of(path), {"first": path, "count": 0, "max_rel": 0.0})
        e["count"] += 1
        e["max_rel"] = max(e["max_rel"], float("inf") if r is None else r)
    report = {k: v for k, v in by_key.items() if k in REPORT_KEYS}
    fields = {"identical": not by_key, "match": not report, "differing_report_keys": sorted(report),
              "differences": report, "differing_other_keys": {k: v for k, v in by_key.items() if k not in report}}
    if not by_key:
        verdict = "every recorded number identical"
    elif not report:
        verdict = "every number the report uses identical; other recorded numbers differ: " + ", ".join(
            f"{k} (max rel. {v['max_rel']:.1e})" for k, v in by_key.items())
    else:
        verdict = "DIFFERS in " + ", ".join(f"{k} ({v['count']}x, first {v['first']}, max rel. {v['max_rel']:.1e})"
                                           for k, v in report.items())
    if absent:
        verdict += f"; keys in one run only (code changes): {', '.join(absent)}"
    return fields, absent, verdict


# What decides a run's floating-point rounding on a CPU (machine_info() keys), kept with each check.
_CPU_KEYS = ("host_cpu", "cpu_simd", "torch_cpu_capability", "fedsq_fast_cpu_isa", "isa_env", "torch")


def _run_info(run_dir: Path) -> dict:
    f = run_dir / "run_info.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def verify_runs(root, cells: list | None = None, sample: int = 3, seed: int = 0, echo=print,
                record: bool = True) -> list:
    """Run recorded runs of a results folder again with the code installed now and check that
    every recorded number (history and summary, timings excluded) comes out the same, bit for bit.

    ``cells``: run folders relative to ``root`` (e.g. ``dirichlet_0.5/seed2/fedavg``); default:
    ``sample`` of them drawn with ``seed``. Each rerun writes to a temporary folder; the recorded
    results are only read; with ``record`` each check is appended to ``root/verification.json``,
    which the report lists. Returns one dict per run: ``identical`` (every recorded number),
    ``match`` (every number in REPORT_KEYS), and the differing keys with their largest relative
    difference.
    """
    import random
    import tempfile

    root = Path(root)
    if not (root / "suite.toml").is_file():
        _fail("dir", f"{root} has no suite.toml (not a suite results folder)")
    suite = load_suite(root / "suite.toml")
    by_dir = {}
    for s, p, m in suite.cells():
        d = cell_dir(root, p, s, m)
        if (d / "metrics.json").is_file():
            by_dir[str(d.relative_to(root))] = (s, p, m)
    if not by_dir:
        _fail("dir", f"no recorded runs under {root}")
    if cells:
        bad = [c for c in cells if c.strip("/") not in by_dir]
        if bad:
            _fail("--cell", f"no recorded run {bad[0]!r} under {root}; recorded: {', '.join(sorted(by_dir)[:4])}, ...")
        chosen = [c.strip("/") for c in cells]
    else:
        if sample < 1:
            _fail("--sample", f"must be >= 1, got {sample}")
        chosen = sorted(random.Random(seed).sample(sorted(by_dir), min(sample, len(by_dir))))
    out = []
    bundle = None
    with tempfile.TemporaryDirectory(prefix="fedsq-verify-") as tmp:
        for rel in chosen:
            s, p, m = by_dir[rel]
            rec = json.loads((root / rel / "metrics.json").read_text())
            cfg = suite.cell_config(p, s, m)
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            if bundle is None:
                bundle = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
            t0 = time.perf_counter()
            res = SuiteFederation(cfg, m, prepare_data(cfg, bundle), out_dir=Path(tmp) / rel, quiet=True).run()
            now = json.loads((Path(tmp) / rel / "metrics.json").read_text())
            diffs = _differences({k: rec[k] for k in ("summary", "history")},
                                 {k: now[k] for k in ("summary", "history")})
            fields, absent, verdict = _tally(diffs)
            info = _run_info(root / rel)
            now_cpu = machine_info()
            row = {"run": rel, "verified_at": _utc(), "code": _code_version(), "recorded_code": info.get("code"),
                   "recorded_cpu": {k: info.get(k) for k in _CPU_KEYS},
                   "cpu": {k: now_cpu.get(k) for k in _CPU_KEYS}, **fields,
                   "keys_in_one_run_only": absent,
                   "bva": res.summary["bva"], "wall_s": time.perf_counter() - t0}
            out.append(row)
            echo(f"{rel}: {verdict} (recorded with code {row['recorded_code']}, BVA {row['bva']:.4f}, "
                 f"{row['wall_s']:.0f} s)")
            row["verdict"] = verdict
            if record:  # provenance next to the results, as each check ends: the report lists it
                _record_checks(root, [row])
    return out


def compare_prefix(root, other, echo=print, record: bool = True) -> list:
    """For every run folder in both ``root`` and ``other`` (suites that differ in the number of
    rounds only), check that the rounds both recorded are the same, number for number (timings
    excluded): the longer run must retrace the shorter one. Nothing is rerun. Appends one row per
    run to ``root/verification.json`` (kind ``prefix``) with ``record``."""
    root, other = Path(root), Path(other)
    for d, arg in ((root, "dir"), (other, "--against")):
        if not d.is_dir():
            _fail(arg, f"not a folder: {d}")
    mine = {str(q.parent.relative_to(root)) for q in root.rglob("metrics.json")}
    theirs = {str(q.parent.relative_to(other)) for q in other.rglob("metrics.json")}
    both = sorted(mine & theirs)
    if not both:
        _fail("--against", f"{other} has no run folder in common with {root}")
    rows = []
    for rel in both:
        a, b = (json.loads((d / rel / "metrics.json").read_text()) for d in (other, root))
        n = min(len(a["history"]), len(b["history"]))
        # keys one suite's code did not record are not differences here (rounds are compared as recorded)
        fields, _, verdict = _tally([d for d in _differences(a["history"][:n], b["history"][:n]) if _ABSENT not in d[1:]])
        info = _run_info(root / rel)
        verdict = f"rounds 0-{n - 1} vs {_rel(other)}: {verdict}"
        row = {"run": rel, "kind": "prefix", "against": _rel(other), "verified_at": _utc(), "code": info.get("code"),
               "recorded_code": _run_info(other / rel).get("code"),
               "cpu": {k: info.get(k) for k in _CPU_KEYS}, "rounds_compared": n, **fields, "verdict": verdict}
        rows.append(row)
        echo(f"{rel}: {verdict}")
    if record:  # the newest check against `other` replaces older ones
        _record_checks(root, rows, drop=lambda r: r.get("kind") == "prefix" and r.get("against") == _rel(other))
    return rows


def _record_checks(root: Path, rows: list, drop=lambda r: False) -> None:
    log = root / "verification.json"
    kept = [r for r in (json.loads(log.read_text()) if log.is_file() else []) if not drop(r)]
    tmp = log.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(kept + rows), indent=1))
    os.replace(tmp, log)  # atomic: an interrupted check never leaves a half-written log


# ------------------------------------------------------------------ statistics
# Two-sided 95% Student t quantiles (df 1..30); beyond, the normal 1.96.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def mean_std(vals) -> tuple:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0), len(v)


def paired_ci(diffs) -> dict:
    """Mean of paired differences with a 95% t interval (None bounds when n < 2)."""
    mu, sd, n = mean_std(diffs)
    if n < 2:
        return {"n": n, "mean": mu, "lo": None, "hi": None}
    h = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    return {"n": n, "mean": mu, "lo": mu - h, "hi": mu + h}


def first_round_at(history, target) -> int | None:
    return next((h["round"] for h in history if h["val_acc"] is not None and h["val_acc"] >= target), None)


def settle_round(values, threshold) -> int | None:
    """First round r >= 1 after which the per-round change stays <= threshold x its round-1
    value; None if it never does within the run (or round 1 changed nothing)."""
    v = [(r, x) for r, x in values if r >= 1 and x is not None and math.isfinite(x)]
    if not v or v[0][1] <= 0:
        return None
    ref = v[0][1]
    ok = None
    for r, x in reversed(v):
        if x <= threshold * ref:
            ok = r
        else:
            break
    return ok


# ------------------------------------------------------------------ report
def load_docs(root) -> list:
    docs = []
    for p in sorted(Path(root).rglob("metrics.json")):
        d = json.loads(p.read_text())
        if not d.get("summary", {}).get("complete", True):
            continue
        d["path"] = str(p.relative_to(root))
        info = p.parent / "run_info.json"
        d["run_info"] = json.loads(info.read_text()) if info.is_file() else {}
        docs.append(d)
    return docs


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
        }
    rows = []
    for p in parts:
        for m in methods:
            runs = {s: v for (pp, mm, s), v in per_run.items() if pp == p and mm == m}
            if not runs:
                continue
            seeds = sorted(runs)
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
                          "rounds_to_target": paired(a, b, p, "rounds_to_target", censor=rounds + 1)})
    gates = []
    for p in parts:
        for m in methods:
            runs = {s: v for (pp, mm, s), v in per_run.items() if pp == p and mm == m}
            if not runs:
                continue
            seeds = sorted(runs)
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
    res["claims"] = claims(res, suite)
    return res


def _ci_txt(c, nd=4, pct=False):
    f = (lambda x: f"{100 * x:+.2f} pp") if pct else (lambda x: f"{x:+.{nd}f}")
    if c["n"] == 0:
        return "n/a"
    if c["lo"] is None:
        return f"{f(c['mean'])} (n=1, no interval)"
    return f"{f(c['mean'])} [{f(c['lo'])}, {f(c['hi'])}] (n={c['n']})"


def claims(res, suite) -> list:
    """Verdicts from the fixed rules (95% t intervals of paired differences over seeds)."""
    margin = res["noninferiority_margin"]
    out = []
    parts = res["partitions"]
    dirichlet = [p for p in parts if p.startswith("dirichlet")]
    main = [c for c in res["comparisons"] if c["b"] in ("fedavg", "fedprox") and c["a"].startswith("fedsq")
            and ":" not in c["a"]]

    # 1. same-or-better BVA
    lines, verdicts = [], []
    for c in main:
        ci = c["bva"]
        if ci["lo"] is None:
            v = "not testable (fewer than 2 seeds)"
        elif ci["lo"] >= -margin:
            v = "holds"
        elif ci["hi"] < -margin:
            v = "fails"
        else:
            v = "inconclusive"
        verdicts.append(v)
        lines.append(f"{c['partition']}, {c['a']} vs {c['b']}: ΔBVA {_ci_txt(ci, pct=True)} -> {v}")
    out.append({"claim": "FedSQ keeps the best validation accuracy (same or better than FedAvg / FedProx)",
                "rule": f"holds where the 95% interval of the paired BVA difference lies above -{100 * margin:g} pp "
                        f"(non-inferiority margin); fails where it lies below -{100 * margin:g} pp; "
                        "otherwise inconclusive",
                "verdict": _overall(verdicts), "details": lines})

    # 2. fewer rounds-to-best under Dirichlet
    lines, verdicts = [], []
    for c in main:
        if c["partition"] not in dirichlet or c["b"] not in ("fedavg", "fedprox"):
            continue
        if c["a"] == "fedsq+fedprox" and c["b"] == "fedavg":
            continue  # the claim is FedSQ vs each baseline; FedSQ+FedProx is judged against FedProx
        for key, label in (("rounds_to_best", "rounds-to-best"), ("rounds_to_target", "rounds to target")):
            ci = c[key]
            if ci["lo"] is None:
                v = "not testable (fewer than 2 seeds)"
            elif ci["hi"] < 0:
                v = "holds"
            elif ci["lo"] > 0:
                v = "contradicted (more rounds)"
            else:
                v = "not shown"
            if key == "rounds_to_best":
                verdicts.append(v)
            lines.append(f"{c['partition']}, {c['a']} vs {c['b']}: Δ{label} {_ci_txt(ci, nd=2)} -> {v}")
    out.append({"claim": "FedSQ reaches its best in fewer rounds than FedAvg and FedProx under Dirichlet splits",
                "rule": "holds where the 95% interval of the paired rounds-to-best difference lies below 0; "
                        "contradicted where it lies above 0; otherwise not shown. Rounds to "
                        f"{res['target_fraction']:g} x the baseline's BVA is reported the same way "
                        "(not reached = rounds + 1) but does not decide the verdict",
                "verdict": _overall(verdicts, good="holds", bad="contradicted (more rounds)"), "details": lines})

    # 3. gates settle early (premise; plain-network runs)
    lines, verdicts = [], []
    for g in res["gates"]:
        if g["method"] not in GATE_METHODS:
            continue
        ci = g["settle_diff"]
        if ci["lo"] is None:
            v = "not testable (fewer than 2 seeds)"
        elif ci["hi"] < 0:
            v = "holds"
        elif ci["lo"] > 0:
            v = "contradicted (weights settle first)"
        else:
            v = "not shown"
        verdicts.append(v)
        gm, gs = g["gate_change_rR"]
        lines.append(f"{g['partition']}, {g['method']}: gates settle at round {g['gate_settle'][0]:.2f} "
                     f"({g['gate_settled_runs']}/{g['n']} runs settled), weights at {g['weight_settle'][0]:.2f} "
                     f"({g['weight_settled_runs']}/{g['n']}); Δ {_ci_txt(ci, nd=2)} -> {v}; "
                     f"{100 * gm:.2f}% of the pretrained gates flipped by round {g['rR']}")
    out.append({"claim": "Premise: gates (ReLU regimes) settle earlier than the weights",
                "rule": f"a per-round change has settled from the first round after which it stays <= "
                        f"{res['settle_threshold']:g} x its round-1 value (gates: fraction flipped since the "
                        "previous round on the probe batch; weights: ||w_r - w_(r-1)||); never = rounds + 1. "
                        "Holds where the 95% interval of the paired difference (gate round - weight round) "
                        "lies below 0",
                "verdict": _overall(verdicts, good="holds", bad="contradicted (weights settle first)"),
                "details": lines})

    # 4. unfreezing vs fixed gates (the experiment that would settle the claim)
    lines, verdicts = [], []
    for c in res["comparisons"]:
        if ":" not in c["a"] or c["b"] != "fedsq":
            continue
        b, r = c["bva"], c["rounds_to_best"]
        if b["lo"] is None:
            v = "not testable (fewer than 2 seeds)"
        elif b["lo"] > 0 or (r["hi"] is not None and r["hi"] < 0 and b["lo"] >= -margin):
            v = "unfreezing beats fixed gates"
        elif b["hi"] < -margin:
            v = "fixed gates beat unfreezing"
        else:
            v = "fixed gates not beaten"
        verdicts.append(v)
        lines.append(f"{c['partition']}, {c['a']} vs fedsq: ΔBVA {_ci_txt(b, pct=True)}, "
                     f"Δrounds-to-best {_ci_txt(r, nd=2)} -> {v}")
    if lines:
        out.append({"claim": "Fixed gates are not beaten by unfreezing / refreshing the structural copy",
                    "rule": "unfreezing beats fixed gates where its BVA is higher (95% interval of the paired "
                            "difference above 0), or it needs fewer rounds-to-best (interval below 0) at "
                            f"non-inferior BVA (interval above -{100 * margin:g} pp); "
                            "fixed gates beat unfreezing where its BVA interval lies below the margin",
                    "verdict": _overall(verdicts, good="fixed gates not beaten", bad="unfreezing beats fixed gates"),
                    "details": lines})
    return out


def _overall(verdicts, good="holds", bad="fails") -> str:
    if not verdicts:
        return "not tested (no runs)"
    if all(v.startswith("not testable") for v in verdicts):
        return "not testable yet (fewer than 2 seeds per cell)"
    n = len(verdicts)
    cnt = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    summary = ", ".join(f"{k}: {c}/{n}" for k, c in cnt.items())
    if all(v == good or v.startswith("fixed gates beat") for v in verdicts):
        return f"HOLDS in every tested case ({summary})"
    if any(v == bad for v in verdicts):
        return f"DOES NOT HOLD in {cnt[bad]}/{n} cases ({summary})"
    return f"NOT SHOWN ({summary})"


def _f(x, nd=4):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _pm(mu, sd, nd=4):
    return f"{_f(mu, nd)} ± {_f(sd, nd)}"


def _mb(x):
    return None if x is None or not math.isfinite(x) else x / 1e6


def results_table(res) -> str:
    frac = res["target_fraction"]
    head = ("| partition | method | seeds | BVA (mean ± std) | rounds-to-best | "
            f"rounds to {frac:g}×{res['baseline']} BVA (reached) | MB up to that target | test acc (final model) | "
            "MB per client-round | MB up (total) | time s |")
    lines = [head, "|" + "---|" * 11]
    for r in res["rows"]:
        lines.append(
            f"| {r['partition']} | {r['method']} | {r['n']} | {_pm(r['bva'], r['bva_std'])} | "
            f"{_pm(r['rounds_to_best'], r['rounds_to_best_std'], 2)} | "
            f"{_pm(r['rounds_to_target'], r['rounds_to_target_std'], 2)} ({r['reached']}/{r['with_target']}) | "
            f"{_pm(_mb(r['bytes_to_target']), _mb(r['bytes_to_target_std']), 1)} | "
            f"{_pm(r['test_acc'], r['test_acc_std'])} | {r['payload_bytes'] / 1e6:.3f} | "
            f"{r['bytes_up'] / 1e6:.1f} | {_f(r['time_total_s'], 0)} |")
    return "\n".join(lines)


def comparison_table(res, ablations: bool) -> str:
    lines = ["| partition | method vs reference | seeds | ΔBVA [95% CI] | Δrounds-to-best [95% CI] | "
             f"Δrounds to {res['target_fraction']:g}×{res['baseline']} BVA [95% CI] |", "|---|---|---|---|---|---|"]
    n = 0
    for c in res["comparisons"]:
        if (":" in c["a"]) != ablations:
            continue
        n += 1
        lines.append(f"| {c['partition']} | {c['a']} vs {c['b']} | {c['bva']['n']} | "
                     f"{_ci_txt(c['bva'], pct=True)} | {_ci_txt(c['rounds_to_best'], nd=2)} | "
                     f"{_ci_txt(c['rounds_to_target'], nd=2)} |")
    return "\n".join(lines) if n else "(no runs yet)"


def gate_table(res) -> str:
    g0 = res["gates"][0] if res["gates"] else None
    if g0 is None:
        return "(no runs yet)"
    labels = list(dict((g0[k], k) for k in ("r1", "rq", "rh", "rR")).values())  # distinct rounds only
    rs = [g0[k] for k in labels]
    head = ("| partition | method | seeds | " + " | ".join(f"gates flipped vs pretrained, round {r}" for r in rs)
            + f" | ‖w−w0‖/‖w0‖, round {rs[-1]} | gate settle round | weight settle round |")
    lines = [head, "|" + "---|" * (3 + len(rs) + 3)]
    for g in res["gates"]:
        cells = [f"{100 * g['gate_change_' + k][0]:.2f}% ± {100 * g['gate_change_' + k][1]:.2f}"
                 if g['gate_change_' + k][0] == g['gate_change_' + k][0] else "n/a" for k in labels]
        lines.append(f"| {g['partition']} | {g['method']} | {g['n']} | " + " | ".join(cells) +
                     f" | {_pm(*g['weight_dist_rR'])} | {_pm(*g['gate_settle'], 2)} ({g['gate_settled_runs']}/{g['n']})"
                     f" | {_pm(*g['weight_settle'], 2)} ({g['weight_settled_runs']}/{g['n']}) |")
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(docs, part, method, key):
    hs = [d["history"] for d in docs if partition_tag(d["config"]) == part and d["method"] == method]
    if not hs:
        return None
    n = min(len(h) for h in hs)
    a = np.array([[np.nan if r.get(key) is None else r[key] for r in h[:n]] for h in hs], dtype=float)
    return [r["round"] for r in hs[0][:n]], a


def _band(ax, x, a, label, **kw):
    mu = np.nanmean(a, 0)
    line, = ax.plot(x, mu, label=f"{label} (n={a.shape[0]})", **kw)
    if a.shape[0] > 1:
        sd = np.nanstd(a, 0, ddof=1)
        ax.fill_between(x, mu - sd, mu + sd, alpha=0.18, color=line.get_color())


def plot_all(docs, res, root: Path) -> list:
    plt = _plt()
    parts, methods = res["partitions"], res["methods"]
    parts = [p for p in parts if any(partition_tag(d["config"]) == p for d in docs)]
    files = []
    # accuracy vs round, mean ± 1 std over seeds, one panel per partition
    fig, axes = plt.subplots(1, len(parts), figsize=(4.3 * len(parts), 3.5), dpi=110, squeeze=False,
                             sharey=True)  # one scale: partitions are compared by eye
    for ax, p in zip(axes[0], parts):
        for m in methods:
            c = _curves(docs, p, m, "val_acc")
            if c is not None:
                _band(ax, *c, m, ls="--" if ":" in m else "-")
        ax.set_title(p)
        round_axis(ax)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "accuracy.png")
    plt.close(fig)
    files.append("accuracy.png")
    # gate stability: fraction of pretrained gates flipped, and per-round settling
    fig, axes = plt.subplots(2, len(parts), figsize=(4.3 * len(parts), 6.4), dpi=110, squeeze=False)
    for j, p in enumerate(parts):
        ax = axes[0][j]
        for m in methods:
            c = _curves(docs, p, m, "gate_change")
            if c is not None:
                x, a = c
                _band(ax, x, 100 * a, m + (" (own gates)" if m.startswith("fedsq") else ""),
                      ls="--" if m.startswith("fedsq") else "-")
        ax.set_title(f"{p}: gates flipped vs pretrained")
        round_axis(ax)
        ax.set_ylabel("% of gates (probe batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax = axes[1][j]
        for ci, m in enumerate(GATE_METHODS):
            for key, lab, ls in (("gate_flip_prev", "gate flips", "-"), ("weight_step_rel", "weight step", ":")):
                c = _curves(docs, p, m, key)
                if c is None:
                    continue
                x, a = c
                x, a = x[1:], a[:, 1:]
                ref = a[:, :1]
                ref[ref == 0] = np.nan
                _band(ax, x, a / ref, f"{m} {lab}", ls=ls, color=f"C{ci}")  # one colour per method
        ax.axhline(res["settle_threshold"], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{p}: per-round change / round 1")
        round_axis(ax)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a partial suite may have no FedAvg/FedProx run here yet
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(root / "gate_stability.png")
    plt.close(fig)
    files.append("gate_stability.png")
    # rounds-to-best bars
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(parts) * max(1, len(methods)) / 2 + 2), 3.4), dpi=110)
    w = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys, es = [], [], []
        for i, p in enumerate(parts):
            r = next((r for r in res["rows"] if r["partition"] == p and r["method"] == m), None)
            if r is not None:
                xs.append(i + j * w)
                ys.append(r["rounds_to_best"])
                es.append(r["rounds_to_best_std"])
        if xs:
            ax.bar(xs, ys, w, yerr=es, capsize=3, label=m)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(parts))])
    ax.set_xticklabels(parts)
    ax.set_ylabel("rounds to best (mean ± std)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "rounds_to_best.png")
    plt.close(fig)
    files.append("rounds_to_best.png")
    return files


# ------------------------------------------------------------------ REPORT.md
def _status(docs, suite, root) -> tuple[str, bool]:
    if suite is None:
        return f"{len(docs)} completed runs found (no suite.toml: completeness unknown).", True
    have = {(partition_tag(d["config"]), d["method"], int(d["config"]["seed"])) for d in docs}
    cells = suite.cells()
    missing = [(s, _tag(p), m) for s, p, m in cells if (_tag(p), m, s) not in have]
    lines = [f"**{len(cells) - len(missing)} of {len(cells)} runs complete** "
             f"({len(suite.seeds)} seeds x {len(suite.partitions)} partitions x {len(suite.methods)} methods"
             + (f" + {len(suite.ablation_methods)} ablations on {', '.join(suite.ablation_partitions)}"
                if suite.ablation_methods else "") + ")."]
    seeds_done = [s for s in suite.seeds if not any(x[0] == s for x in missing)]
    lines.append(f"Seeds complete in every cell: {seeds_done or 'none'}.")
    if missing:
        by_seed = {}
        for s, p, m in missing:
            by_seed.setdefault(s, []).append(f"{p}/{m}")
        for s, cs in by_seed.items():
            lines.append(f"- seed {s}: missing {len(cs)} runs: {', '.join(cs)}")
        lines.append("")
        lines.append("The missing runs are to be run with the same command plus `--resume` "
                     "(finished runs are skipped, interrupted ones continue from their checkpoint); "
                     "the report is then rewritten from all runs. Statistics below use the seeds "
                     "present in each cell; paired comparisons use only seeds present in both cells.")
    return "\n".join(lines), not missing


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _cpu_paths(info: dict) -> str:
    """What decided the floating-point rounding of a run's CPU arithmetic (machine_info())."""
    if not info.get("torch_cpu_capability"):
        return "not recorded"
    env = " ".join(f"{k}={v}" for k, v in (info.get("isa_env") or {}).items())
    return (f"CPU has {'/'.join(info.get('cpu_simd') or []) or '?'}; torch {info['torch_cpu_capability']}, "
            f"fedsq_fast {info.get('fedsq_fast_cpu_isa')}" + (f", pinned by {env}" if env else ""))


def _verification_section(root: Path) -> list:
    log = root / "verification.json"
    if not log.is_file():
        return []
    rows = json.loads(log.read_text())
    md = ["## Reproduction", ""]
    reruns = [r for r in rows if r.get("kind") != "prefix"]
    if reruns:
        md += [f"Recorded runs run again by `python -m fedsq_fast.experiments verify {_rel(root)} --cell ...` "
               "and compared number by number with what was recorded (timings excluded). Floating-point "
               "results depend on the CPU code paths torch and fedsq_fast take (AVX2 vs AVX-512 kernels round "
               "differently), so a rerun matches bit for bit only where they match; on a CPU with more "
               f"instruction sets, pin them: `{AVX2_PIN}`.", "",
               "| run | rerun (UTC) | code then | code now | CPU paths of the rerun | result |",
               "|---|---|---|---|---|---|"]
        md += [f"| {r['run']} | {r['verified_at']} | {r.get('recorded_code') or 'not recorded'} | {r['code']} | "
               f"{_cpu_paths(r['cpu'])} | {r['verdict']} |" for r in reruns]
        md += ["", f"{sum(bool(r['match']) for r in reruns)} of {len(reruns)} reruns gave every number the report "
                   "uses, unchanged.", ""]
    for against in sorted({r["against"] for r in rows if r.get("kind") == "prefix"}):
        pre = [r for r in rows if r.get("kind") == "prefix" and r["against"] == against]
        same = sum(bool(r["identical"]) for r in pre)
        diag = [r for r in pre if r["match"] and not r["identical"]]
        odd = [r for r in pre if not r["match"]]
        text = (f"Paired with `{against}` (same seeds and settings, fewer rounds; `python -m fedsq_fast.experiments "
                f"verify {_rel(root)} --against {against}`, {max(r['verified_at'] for r in pre)}): "
                f"**{same} of {len(pre)} runs retrace the shorter run's rounds number for number** (timings excluded)")
        if diag:  # diagnostics only: say which and by how much, not run by run
            worst = {}
            for r in diag:
                for k, v in (r.get("differing_other_keys") or {}).items():
                    worst[k] = max(worst.get(k, 0.0), v["max_rel"])
            text += (f"; **{len(diag)} more retrace every number the report uses**, differing only in diagnostics "
                     f"({', '.join(f'{k} max rel. {v:.1e}' for k, v in sorted(worst.items()))})")
        md += [text + "." + "".join(f" {r['run']}: {r['verdict']}." for r in odd), ""]
    return md


def report(root, suite: Suite | None = None, echo=print) -> Path:
    """Write REPORT.md, summary.json/.csv and the PNGs under ``root`` from its metrics.json files."""
    root = Path(root)
    if not root.is_dir():
        _fail("dir", f"not a folder: {root}")
    if suite is None and (root / "suite.toml").is_file():
        suite = load_suite(root / "suite.toml")
    docs = load_docs(root)
    if not docs:
        _fail("dir", f"no completed runs (metrics.json) under {root}")
    res = analyse(docs, suite)
    (root / "summary.json").write_text(json.dumps(_clean(res), indent=1))
    import csv

    with open(root / "summary.csv", "w", newline="") as f:
        keys = [k for k in res["rows"][0] if k != "seeds"] + ["seeds"]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in res["rows"]:
            w.writerow({**r, "seeds": " ".join(map(str, r["seeds"]))})
    files = plot_all(docs, res, root)
    infos = [d["run_info"] for d in docs if d["run_info"]]
    status, complete = _status(docs, suite, root)
    name = suite.name if suite else root.name
    srcs = sorted({i["suite_file"] for i in infos if i.get("suite_file")})
    src = srcs[-1] if srcs else (str(suite.path) if suite else f"{_rel(root)}/suite.toml")
    cfg = docs[0]["config"]
    md = [f"# {name}: {suite.title if suite and suite.title else 'experiment suite'}", ""]
    md += [f"Report generated {_utc()} by `python -m fedsq_fast.experiments report {_rel(root)}`; runs made with "
           f"`python -m fedsq_fast.experiments run {src} --resume` (the suite file is copied in "
           "`suite.toml`). Every number below is computed from the per-run `metrics.json` files in this "
           "folder (also collected in `summary.json` / `summary.csv`).", ""]
    if infos:
        first = min(i["started"] for i in infos)
        last = max(i["finished"] for i in infos)
        i0 = infos[0]
        mach = sorted({(i["host_cpu"], i["cpu_count"], i.get("gpu")) for i in infos})
        md += ["## Machine and date", "",
               f"- runs: {first} to {last} ({len(infos)} runs, {sum(i['wall_s'] for i in infos) / 3600:.2f} h "
               "of wall time in all)",
               *[f"- machine: {c} ({n} logical CPUs), GPU: {g or 'none'}" for c, n, g in mach],
               f"- torch {i0['torch']} ({i0['torch_threads']} threads), python {i0['python']}, "
               f"fedsq_fast backend `{i0['fedsq_fast_backend']}`, {i0['platform']}"]
        loads = [x for i in infos for x in (i.get("loadavg_start"), i.get("loadavg_end")) if x is not None]
        if loads:
            md.append(f"- 1-minute load average at run starts/ends: {min(loads):.1f} to {max(loads):.1f} "
                      f"on {i0['cpu_count']} CPUs (other jobs shared the machine when it exceeds the thread "
                      "count: wall times, not results, depend on it)")
        codes = Counter(i.get("code") or "not recorded" for i in infos)
        md.append("- code (git): " + ", ".join(f"{c} ({_runs(n)})" for c, n in sorted(codes.items())))
        paths = Counter(_cpu_paths(i) for i in infos)
        md.append("- CPU code paths: " + "; ".join(f"{k} ({_runs(n)})" for k, n in sorted(paths.items())))
        md.append("")
    md += ["## Status", "", status, ""]
    md += _verification_section(root)
    md += ["## Claims", "",
           "Each verdict follows a rule fixed in the code and the suite file before any run: 95% Student-t "
           "intervals of paired differences over seeds (a seed fixes the data split, the partition, the "
           "initial head and the client shuffling, so methods with the same seed see the same data).", ""]
    md += [f"- **{c['claim']}**: {c['verdict']}." for c in res["claims"]] + [""]
    for c in res["claims"]:
        md += [f"### {c['claim']}", "", f"**Verdict: {c['verdict']}.**", "", f"Rule: {c['rule']}.", ""]
        md += [f"- {x}" for x in c["details"]] + [""]
    if not complete:
        md += ["These verdicts use the runs completed so far (see Status) and will change as seeds are added.", ""]
    md += ["## Results", "",
           "BVA: best validation accuracy over rounds 0..R of the global model (round 0 = the pretrained "
           "model with its new head). Rounds-to-best: first round at the BVA. Rounds to target: first round "
           f"at {res['target_fraction']:g} x the BVA of {res['baseline']} with the same seed and partition "
           "(mean over the runs that reached it; reached/with a target in brackets). Test accuracy: the "
           "final model on the held-out test split. MB per client-round: the payload one client uploads per "
           "round (FedSQ: the quantitative copy only). Std: sample std over seeds.", "",
           results_table(res), "",
           f"{res['late_best']['runs']} of {res['late_best']['of']} runs reached their BVA in the last two "
           f"rounds ({res['rounds'] - 1} or {res['rounds']}): there the accuracy was still rising, rounds-to-best "
           "is capped by the run length and differences in it are compressed; rounds to the target "
           "accuracy is the less censored measure.", "", "![accuracy](accuracy.png)", "", "![rounds to best](rounds_to_best.png)", "",
           "### Paired differences (method minus reference, same seeds)", "", comparison_table(res, False), ""]
    if suite and suite.ablation_methods:
        md += ["## Ablation: unfreezing / refreshing the structural copy", "",
               "`fedsq:unfreeze=R`: from round R+1 on, the structural copy is replaced by the global "
               "quantitative copy at the start of every round (gates follow the global model; fixed within "
               "a round). `fedsq:refresh=R`: replaced every R rounds (rounds R+1, 2R+1, ...). Reference: "
               "fedsq (gates fixed from the pretrained model throughout).", "", comparison_table(res, True), ""]
    md += ["## Gate stability (mask evolution)", "",
           "Gates flipped vs pretrained: the fraction of gates (ReLU on/off; ReLU6/Hardtanh 3 regimes) on a "
           f"fixed probe batch of {cfg['probe_size']} validation images whose regime differs from the pretrained "
           "model's (round 0); for FedAvg/FedProx these are the network's own gates, for fedsq the quantitative "
           "copy's own pre-activations (its effective gates are the fixed structural ones). Settle rounds: "
           f"the first round after which the per-round change stays <= {res['settle_threshold']:g} x its "
           "round-1 value (gates: fraction flipped since the previous round; weights: "
           f"‖w_r − w_(r−1)‖); runs that never settle count as {res['rounds'] + 1} (settled runs in brackets).", "",
           gate_table(res), "", "![gate stability](gate_stability.png)", ""]
    md += ["## Settings", "", f"Suite file: `{src}`.", ""]
    if suite:
        if suite.requires:
            md += [f"Requires: {suite.requires}", ""]
        if suite.notes:
            md += [suite.notes.strip(), ""]
        md += [f"- seeds: {suite.seeds}; partitions: {suite.partitions}; methods: {suite.methods}"
               + (f"; ablations {suite.ablation_methods} on {suite.ablation_partitions}" if suite.ablation_methods
                  else ""),
               f"- baseline for rounds-to-target: {suite.baseline}; target fraction {suite.target_fraction:g}; "
               f"BVA non-inferiority margin {100 * suite.noninferiority_margin:g} pp; settle threshold "
               f"{suite.settle_threshold:g}", ""]
    keys = [k for k in cfg if k not in ("methods", "seed", "partition", "alpha", "out_dir")]
    md += ["Run configuration (every run; seed, partition and method vary per cell):", "",
           "| key | value |", "|---|---|"] + [f"| {k} | `{json.dumps(cfg[k])}` |" for k in keys] + [""]
    md += ["## Raw data", "",
           "`<partition>/seed<s>/<method>/`: `metrics.json` (config, summary, per-round history), `metrics.csv`, "
           "`run_info.json` (start/end time, machine), `checkpoint.safetensors` (the final global model; "
           "not committed); `<partition>/seed<s>/partition.txt`: class counts per client. "
           "Plots: " + ", ".join(files) + ".", ""]
    (root / "REPORT.md").write_text("\n".join(md))
    echo(f"written: {root / 'REPORT.md'}, summary.json, summary.csv, {', '.join(files)}")
    return root / "REPORT.md"


# ------------------------------------------------------------------ across suites
def _direction(ci) -> str:
    """Where a paired interval lies relative to 0 (a description, not a verdict)."""
    if not ci or ci.get("n", 0) == 0:
        return "no runs"
    if ci.get("lo") is None:
        return "n=1"
    return "lower" if ci["hi"] < 0 else "higher" if ci["lo"] > 0 else "no difference detected"


def summarize_suites(root, echo=print, refresh: bool = True) -> Path:
    """SUMMARY.md under ``root``: for every suite folder below it (one holding a
    ``suite.toml``), its report is rewritten first (``refresh``) so that every number
    comes from the same set of runs; then status, the verdict of each claim per suite
    and the key paired differences side by side. Verdicts are the suites' own."""
    root = Path(root)
    if not root.is_dir():
        _fail("dir", f"not a folder: {root}")
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
        status, complete = _status(docs, suite, d)
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
        _fail("dir", f"no suite results (<suite>/summary.json) under {root}")
    md = ["# FedSQ's claims across the evidence suites", "",
          f"Generated {_utc()} by `python -m fedsq_fast.experiments summary {_rel(root)}` from each suite's "
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
                if (c["a"], c["b"]) in pairs and c["partition"] not in parts:
                    parts.append(c["partition"])
        lines = ["", f"### {title}", "", note, "",
                 "| suite | comparison | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
        for x in suites:
            for a, b in pairs:
                cells, any_ = [], False
                for p in parts:
                    c = next((c for c in x["res"]["comparisons"]
                              if c["a"] == a and c["b"] == b and c["partition"] == p), None)
                    if c is None:
                        cells.append("")
                        continue
                    any_ = True
                    cells.append(f"{_ci_txt(c[key], nd=2, pct=pct)}: {_direction(c[key])}")
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
    abl = sorted({(c["a"], c["b"]) for x in suites for c in x["res"]["comparisons"] if ":" in c["a"]})
    if abl:
        md += comp_table("Ablation: structural copy unfrozen / refreshed vs fixed gates", abl, "bva", True,
                         "ΔBVA in pp of the ablation minus FedSQ with fixed gates (positive: updating the "
                         "gates helps).")
    gparts = []
    for x in suites:
        gparts += [p for p in x["res"]["partitions"] if p not in gparts]
    md += ["", "### Gates of the pretrained network flipped by the last round (FedAvg)", "",
           "| suite | " + " | ".join(gparts) + " |", "|---|" + "---|" * len(gparts)]
    for x in suites:
        cells = []
        for p in gparts:
            g = next((g for g in x["res"]["gates"] if g["partition"] == p and g["method"] == x["res"]["baseline"]), None)
            v = g["gate_change_rR"] if g else None
            cells.append(f"{100 * v[0]:.1f}% ± {100 * v[1]:.1f} (round {g['rR']})"
                         if v and v[0] == v[0] else "")
        md.append(f"| {x['name']} | " + " | ".join(cells) + " |")
    if not all(x["complete"] for x in suites):
        md += ["", "Some suites are partial (see Suites): their verdicts use the seeds completed so far; "
               "`python -m fedsq_fast.experiments run experiments/<suite>.toml --resume` completes them and "
               "`... summary` rewrites this page."]
    md.append("")
    out = root / "SUMMARY.md"
    out.write_text("\n".join(md))
    echo(f"written: {out}")
    return out


def _rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {(k if isinstance(k, str) else str(k)): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _clean(float(o))
    return o


# ------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="suite_command", required=True)
    r = sub.add_parser("run", help="run a suite (then write its report)")
    r.add_argument("suite", help="experiments/<suite>.toml")
    r.add_argument("--out", default=None, help="results folder (default: experiments/results/<name>/)")
    r.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones")
    r.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    r.add_argument("--shard", default="1/1", metavar="K/N",
                   help="run every N-th run starting at the K-th (one process per core, each with --resume)")
    r.add_argument("--deadline", default=None,
                   help="UTC time (ISO, e.g. 2026-11-22T04:40) after which no run may end: runs that "
                        "would not fit are left for --resume")
    q = sub.add_parser("report", help="(re)write REPORT.md, tables and plots from a results folder")
    q.add_argument("dir")
    m = sub.add_parser("summary", help="write SUMMARY.md: every suite's verdicts side by side "
                                       "(from <dir>/<suite>/summary.json)")
    m.add_argument("dir", nargs="?", default="experiments/results")
    v = sub.add_parser("verify", help="run recorded runs again with the current code and check that "
                                      "every recorded number comes out the same (timings excluded)")
    v.add_argument("dir", help="a suite's results folder")
    v.add_argument("--cell", action="append", default=None,
                   help="a run folder relative to DIR, e.g. dirichlet_0.5/seed2/fedavg (repeatable)")
    v.add_argument("--sample", type=int, default=3, help="without --cell: how many runs to draw (default 3)")
    v.add_argument("--seed", type=int, default=0, help="seed of that draw (default 0)")
    v.add_argument("--json", default=None, help="also write the results to this file")
    v.add_argument("--against", default=None, metavar="OTHER_DIR",
                   help="rerun nothing: check that DIR's runs retrace the rounds recorded for the same "
                        "run folders in OTHER_DIR (a suite that differs only in its number of rounds)")
    v.add_argument("--no-record", action="store_true",
                   help="do not append the checks to DIR/verification.json (the report lists them)")


def run_from_args(ns) -> int:
    """``fedsq-fast suite ...``: a user's mistake (suite file missing, not UTF-8, malformed or
    invalid; a results folder that cannot be one) is one line ``fedsq-fast: error: ...`` and
    exit 2, checked before any data loads; internal errors keep their traceback."""
    import warnings

    from .cli import guarded

    warnings.filterwarnings("ignore", message="fedsq_fast is using its pure-PyTorch reference ops")
    return guarded(_run_from_args, ns)


def _need_dir(key, d) -> None:
    if not Path(d).is_dir():
        _fail(key, f"{d} is not a folder" if Path(d).exists() else f"{d} does not exist")


def _run_from_args(ns) -> int:
    from .federation.config import check_sources, read_toml
    from .federation.runner import check_out_dir

    if ns.suite_command == "run":
        if ns.max_runs is not None and ns.max_runs < 1:
            _fail("--max-runs", f"must be >= 1, got {ns.max_runs}")
        deadline = None
        if ns.deadline is not None:
            try:
                deadline = _dt.datetime.fromisoformat(ns.deadline)
            except ValueError:
                _fail("--deadline", f"not an ISO date-time: {ns.deadline!r}")
            if deadline.tzinfo is None:
                deadline = deadline.replace(tzinfo=_dt.timezone.utc)
        try:
            shard = tuple(int(x) for x in ns.shard.split("/"))
            if len(shard) != 2:
                raise ValueError
        except ValueError:
            _fail("--shard", f"must be K/N, e.g. 1/2, got {ns.shard!r}")
        p = Path(ns.suite)
        if p.is_file() and p.suffix == ".toml":
            read_toml(p, "suite")  # names the line of a syntax error, and text that is not UTF-8
        suite = load_suite(p)
        s0, p0, m0 = suite.cells()[0]  # data and weights are [run] keys, the same in every cell
        try:
            check_sources(suite.cell_config(p0, s0, m0), adapter.list_models())
        except ValueError as e:
            raise ValueError(f"{p}: run.{e}") from None
        out = Path(ns.out) if ns.out is not None else default_out(suite)
        try:
            check_out_dir(out)  # before any data loads
        except ValueError as e:
            raise ValueError(str(e).replace("out_dir:", "--out:", 1)) from None
        run_suite(suite, out, resume=ns.resume, max_runs=ns.max_runs, deadline=deadline, shard=shard,
                  echo=lambda *a: print(*a, flush=True))
    elif ns.suite_command == "summary":
        _need_dir("dir", ns.dir)
        summarize_suites(ns.dir)
    elif ns.suite_command == "verify":
        _need_dir("dir", ns.dir)
        if ns.against:
            _need_dir("--against", ns.against)
        if ns.json:
            check_out_dir(Path(ns.json).resolve().parent)
        echo = lambda *a: print(*a, flush=True)  # noqa: E731
        rows = (compare_prefix(ns.dir, ns.against, echo=echo, record=not ns.no_record) if ns.against else
                verify_runs(ns.dir, ns.cell, ns.sample, ns.seed, echo=echo, record=not ns.no_record))
        if ns.json:
            Path(ns.json).write_text(json.dumps(_clean(rows), indent=1))
        return 0 if all(r["match"] for r in rows) else 1
    else:
        _need_dir("dir", ns.dir)
        report(ns.dir)
    return 0


def main(argv=None) -> int:
    from .cli import _Parser

    p = _Parser(prog="python -m fedsq_fast.experiments", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
