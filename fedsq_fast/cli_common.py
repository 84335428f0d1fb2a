"""What both command lines share (``fedsq-fast`` in :mod:`fedsq_fast.cli`, ``fedsq-fast suite``
in :mod:`fedsq_fast.experiments.cli`): the parser class, what counts as a user's mistake and
how it is printed, and Ctrl-C. Neither command line imports the other's module for these, so
there is no import circle between them."""
from __future__ import annotations

import argparse
import errno
import sys

# What counts as the user's mistake (one line, exit 2) rather than a bug (traceback): the
# library raises ValueError (config.ConfigError among them) for bad input, and these OSErrors
# come from paths the user gave. Parse errors of config files, non-UTF-8 text and unloadable
# weights files are turned into ValueErrors naming the file where they are read
# (config.load_file, adapter.build_model). Everything else -- TypeError, RuntimeError, ... --
# is an internal error and keeps its traceback, which a bug report needs.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
               FileExistsError)
# OSErrors about the user's disk rather than the code
USER_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The exit status of a run stopped by Ctrl-C (128 + SIGINT, what a shell reports for it).
EXIT_INTERRUPTED = 130


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a user mistake to print as one line (see :data:`USER_ERRORS`)."""
    return isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)


def user_error_line(e: BaseException) -> str:
    """``e`` as the one line ``fedsq-fast: error: ...`` (multi-line messages are joined)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return "fedsq-fast: error: " + "; ".join(ln.strip() for ln in msg.splitlines() if ln.strip())


class Parser(argparse.ArgumentParser):
    """argparse's mistakes (unknown flag, bad value) as the same one line as ours, exit 2.
    Abbreviated flags are refused (``allow_abbrev=False``, in every subparser too: they are
    made by this class): ``--round 2`` is an unknown flag, never ``--rounds 2``."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            import difflib

            known = sorted(self._options())
            for a in message.split(":", 1)[1].split():
                near = difflib.get_close_matches(a.split("=")[0], known, n=2) if a.startswith("--") else []
                if near:
                    message += f" (did you mean {' or '.join(near)}?)"
                    break
        sys.stderr.write(f"fedsq-fast: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)

    def _options(self) -> set:
        opts = set()
        for a in self._actions:
            opts.update(o for o in a.option_strings if o.startswith("--"))
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    opts |= sp._options() if isinstance(sp, Parser) else set()
        return opts


def log_level(s: str) -> str:
    """argparse type of ``--log-level``: one of :data:`LOG_LEVELS`, any case."""
    v = s.strip().upper()
    if v not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)} (any case), got {s!r}")
    return v


def guarded(fn, *args) -> int:
    """``fn(*args)``; a user error becomes its one line on stderr and exit code 2, anything
    else (a bug) keeps its traceback."""
    try:
        return fn(*args)
    except Exception as e:
        if not is_user_error(e):
            raise
        print(user_error_line(e), file=sys.stderr)
        return 2


def program_name() -> str:
    """How the user started this command, for commands we print back to them:
    ``fedsq-fast`` (the script), else ``python -m fedsq_fast`` (or ``... .experiments``)."""
    from pathlib import Path

    a0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("")
    if a0.name in ("__main__.py", "cli.py") and "fedsq_fast" in a0.parts:
        return "python -m fedsq_fast.experiments" if a0.parent.name == "experiments" else "python -m fedsq_fast"
    return "fedsq-fast"


def resume_command(argv: list[str], prog: str | None = None) -> str:
    """The exact command line that continues an interrupted ``argv`` (``--resume`` added
    once), quoted for a POSIX shell."""
    import shlex

    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return " ".join([prog or program_name(), shlex.join(args)])


def interruptible(fn, ns, argv, *args) -> int:
    """``fn(*args, ns)``; Ctrl-C (KeyboardInterrupt) becomes the one line of
    :func:`interrupted_line` on stderr and exit code :data:`EXIT_INTERRUPTED` (130), no
    traceback. Checkpoints are written atomically, so the resume command it prints continues
    from the last saved round, bit for bit as if never interrupted."""
    try:
        return fn(*args, ns)
    except KeyboardInterrupt:
        print(interrupted_line(ns, argv), file=sys.stderr)
        return EXIT_INTERRUPTED


def _last_checkpoint(out_dir):
    """(path, method, round, rounds) of the newest readable checkpoint under ``out_dir``, or None."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    try:
        files = [(p.stat().st_mtime, p) for p in Path(out_dir).rglob("checkpoint.safetensors") if p.is_file()]
    except OSError:
        return None
    for _, p in sorted(files, reverse=True):
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["meta"])
            return p, meta.get("method"), int(meta["round"]), int(meta["config"]["rounds"])
        except Exception:  # a damaged file: resume falls back to the previous one and says so
            continue
    return None


def interrupted_line(ns, argv) -> str:
    """The one line printed on Ctrl-C: where the run had got to (its newest checkpoint) and,
    for commands that resume, the exact command line that continues it."""
    command = getattr(ns, "command", "suite")  # python -m fedsq_fast.experiments has suite commands only
    cmd = command if command != "suite" else f"suite {ns.suite_command}"
    if cmd not in ("run", "compare", "suite run"):
        return f"fedsq-fast: interrupted (Ctrl-C) during {cmd}"
    out = getattr(ns, "_out_dir", None)
    if getattr(ns, "_checkpoints_off", False):
        return (f"fedsq-fast: interrupted (Ctrl-C); checkpoint = false, so nothing was saved to resume from; "
                f"run it again with: {resume_command(argv).removesuffix(' --resume')}")
    last = _last_checkpoint(out) if out is not None else None
    where = ("before any round was saved" if last is None else
             f"after round {last[2]} of {last[3]} of {last[1]} was saved ({last[0]})")
    return f"fedsq-fast: interrupted (Ctrl-C) {where}; resume with: {resume_command(argv)}"
