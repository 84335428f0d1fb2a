"""Writing output files without following symbolic links.

Every file fedsq_fast writes into an output folder (metrics, plots, ``partition.txt``, reports,
recorded configs, checkpoints) goes through these helpers: the content is written to a fresh
temporary file in the same folder (created with ``O_EXCL``, which never follows a link), then
renamed over the target with :func:`os.replace`. A rename *replaces* a symbolic link planted
at the target's name instead of writing through it, so a link such as
``out/partition.txt -> ~/.bashrc`` is swapped for the real file and the file it pointed at is
left untouched. A reader never sees a half-written file, and an interrupted write leaves no
temporary file behind (except after kill -9: :func:`remove_stale_temps`).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# Temporary files are named ``.<target name>.<random>.tmp`` (checkpoints: ``.ckpt-<random>.tmp``).
TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def replacing(path, mode: str = "w", *, newline=None, encoding: str | None = "utf-8", fsync: bool = False):
    """``with replacing(path) as f: f.write(...)``: ``f`` is a new temporary file beside
    ``path``; when the block ends without an error it replaces ``path`` (a symbolic link at
    ``path`` is replaced, never followed); on an error it is removed and ``path`` is left as
    it was. ``mode``: ``"w"`` (text) or ``"wb"``; ``fsync``: flush to disk before the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would have given (mkstemp makes 0600)
        binary = "b" in mode
        with os.fdopen(fd, "wb" if binary else "w", newline=None if binary else newline,
                       encoding=None if binary else encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, replacing a symbolic link at ``path``
    instead of following it (see :func:`replacing`)."""
    with replacing(path, "w") as f:
        f.write(text)


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, replacing a symbolic link at ``path`` instead of
    following it (see :func:`replacing`)."""
    with replacing(path, "wb") as f:
        f.write(data)


def save_figure(fig, path) -> None:
    """``fig.savefig`` as a PNG to ``path`` through :func:`replacing` (never through a link)."""
    with replacing(path, "wb") as f:
        fig.savefig(f, format="png")


def remove_stale_temps(folder, patterns=(".ckpt-*.tmp",)) -> list[Path]:
    """Remove temporary files that a killed process left in ``folder`` (only regular files
    matching ``patterns``, i.e. names only fedsq_fast's writers create; never links or
    folders); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for pat in patterns:
        for p in sorted(folder.glob(pat)):
            if p.is_symlink() or not p.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
