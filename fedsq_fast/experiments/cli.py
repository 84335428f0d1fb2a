"""Command line of the suites: ``fedsq-fast suite run|report|summary|verify`` (and its alias
``python -m fedsq_fast.experiments ...``)."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

from ..cli_common import Parser, guarded, interruptible
from ..federation import adapter
from ..federation.metrics import jsonable
from ..outputs import write_text
from .report import report
from .runner import run_suite
from .suite import default_out, fail, load_suite
from .summary import summarize_suites
from .verify import compare_prefix, exit_code, verify_runs

DESCRIPTION = ("Experiment suites: a fixed grid (settings x partitions x methods x seeds, plus "
               "structural-copy ablations) run from one TOML file, and a Markdown report with "
               "tables, plots and a plain verdict on each of the paper's claims.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``run``, ``report``, ``summary`` and ``verify`` subcommands, on parser ``p``."""
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
                                      "every recorded number comes out the same (timings excluded)",
                       description="Rerun recorded runs and compare every number. Prints the recording and the "
                                   "verifying machine and whether bit-identity can be expected; where it cannot, "
                                   "judges reproduction statistically. Exit codes: 0 identical, 3 reproduced "
                                   "statistically, 1 differs, 4 could not verify, 2 a mistake in the command "
                                   "(experiments/README.md, 'Reproducing runs').")
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

    warnings.filterwarnings("ignore", message="fedsq_fast is using its pure-PyTorch reference ops")
    return guarded(_run_from_args, ns)


def _need_dir(key, d) -> None:
    if not Path(d).is_dir():
        fail(key, f"{d} is not a folder" if Path(d).exists() else f"{d} does not exist")


def _run_from_args(ns) -> int:
    from ..federation.config import check_sources, read_toml
    from ..federation.runner import check_out_dir

    if ns.suite_command == "run":
        if ns.max_runs is not None and ns.max_runs < 1:
            fail("--max-runs", f"must be >= 1, got {ns.max_runs}")
        deadline = None
        if ns.deadline is not None:
            try:
                deadline = _dt.datetime.fromisoformat(ns.deadline)
            except ValueError:
                fail("--deadline", f"not an ISO date-time: {ns.deadline!r}")
            if deadline.tzinfo is None:
                deadline = deadline.replace(tzinfo=_dt.timezone.utc)
        try:
            shard = tuple(int(x) for x in ns.shard.split("/"))
            if len(shard) != 2:
                raise ValueError
        except ValueError:
            fail("--shard", f"must be K/N, e.g. 1/2, got {ns.shard!r}")
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
        ns._out_dir = out  # what Ctrl-C reports
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
            write_text(ns.json, json.dumps(jsonable(rows), indent=1))
        return exit_code(rows) if not ns.against else (0 if all(r["match"] for r in rows) else 1)
    else:
        _need_dir("dir", ns.dir)
        report(ns.dir)
    return 0


def main(argv=None) -> int:
    """``python -m fedsq_fast.experiments ...``: the same commands as ``fedsq-fast suite ...``."""
    import sys

    p = Parser(prog="python -m fedsq_fast.experiments", description=DESCRIPTION)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        p.print_help()
        return 0
    return interruptible(run_from_args, p.parse_args(argv), argv)
