"""Experiment suites: a fixed grid (settings x partitions x methods x seeds, plus
structural-copy ablations) run from one TOML file, and a Markdown report with tables, plots
and a plain verdict on each of the paper's claims.

    fedsq-fast suite run experiments/svhn_mnist.toml [--out DIR] [--resume]
    fedsq-fast suite report experiments/results/svhn_mnist
    (python -m fedsq_fast.experiments ... is the same command)

Every setting, seed and verdict rule comes from the suite file (fixed before any run);
nothing here looks at results to choose what to run or how to judge.

Modules: :mod:`.suite` (suite files, cells), :mod:`.grid` (the grid runner, shared with
``fedsq-fast compare``), :mod:`.runner` (running a suite), :mod:`.mask_metrics` (the per-round
engine callback), :mod:`.provenance` (machine, code version), :mod:`.verify` (rerun and compare
recorded runs), :mod:`.stats`, :mod:`.analysis`, :mod:`.verdicts` (the claims' rules),
:mod:`.report` (REPORT.md and the summary table), :mod:`.summary` (SUMMARY.md across suites),
:mod:`.cli`. Plots are in :mod:`fedsq_fast.plots`.
"""
from .analysis import analyse
from .cli import add_arguments, main, run_from_args
from .grid import run_compare, run_grid
from .mask_metrics import MaskMetrics
from .provenance import AVX2_PIN, ISA_ENV, machine_info
from .report import format_table, load_docs, plot_all, report, summary_rows, table_report
from .runner import _cell_state, run_suite  # noqa: F401 (_cell_state: tests)
from .stats import first_round_at, mean_std, paired_ci, settle_round
from .suite import SUITE_KEYS, SUITE_OWNED, Suite, cell_dir, default_out, load_suite
from .summary import summarize_suites
from .verdicts import COMPARISONS, GATE_METHODS, claims, interval_verdict
from .verify import REPORT_KEYS, compare_prefix, verify_runs

__all__ = [
    "analyse", "add_arguments", "main", "run_from_args", "run_compare", "run_grid", "MaskMetrics",
    "AVX2_PIN", "ISA_ENV", "machine_info", "format_table", "load_docs", "plot_all", "report",
    "summary_rows", "table_report", "run_suite", "first_round_at", "mean_std", "paired_ci",
    "settle_round", "SUITE_KEYS", "SUITE_OWNED", "Suite", "cell_dir", "default_out", "load_suite",
    "summarize_suites", "COMPARISONS", "GATE_METHODS", "claims", "interval_verdict", "REPORT_KEYS",
    "compare_prefix", "verify_runs",
]
