"""Atomic, verified safetensors checkpoints with JSON metadata and RNG states.

Each file carries a sha256 of its content (every tensor's name, dtype, shape and bytes, and
the metadata) and is checked on load; the previous good file is kept beside it
(``NAME.prev.safetensors``), so a damaged latest checkpoint falls back to the one before
(the caller warns), never silently to round 0.

A hash catches damage, not forgery: anyone who can edit the file can recompute it. With a
key (``FEDSQ_CHECKPOINT_KEY``: the key itself, or ``FEDSQ_CHECKPOINT_KEY_FILE``: a file
holding it; never a config key, so it is never recorded) each file also carries an
HMAC-SHA256 of the same content, and loading refuses a file whose signature is missing or
wrong. A signed file loaded without a key is refused too, saying that it is signed.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open


def rng_state() -> tuple[dict, dict]:
    """(tensors, json-able) holding torch, numpy and python RNG states."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return ({"rng/torch": torch.get_rng_state()},
            {"numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "python": [py[0], list(py[1]), py[2]]})


def set_rng_state(tensors: dict, meta: dict) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    if "numpy" in meta:
        name, keys, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in meta:
        v, st, g = meta["python"]
        random.setstate((v, tuple(st), g))


FORMAT = "fedsq_fast.checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; the message names the file and what failed."""


def previous(path) -> Path:
    """Where the previous good checkpoint of ``path`` is kept."""
    path = Path(path)
    return path.with_name(path.name.replace(".safetensors", "") + ".prev.safetensors")


def _feed(h, flat: dict, meta_json: str):
    h.update(FORMAT.encode())
    h.update(meta_json.encode())
    for k in sorted(flat):
        t = flat[k].detach().cpu().contiguous()
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def digest(flat: dict, meta_json: str) -> str:
    """sha256 over the format, the metadata and every tensor (name, dtype, shape, bytes)."""
    return _feed(hashlib.sha256(), flat, meta_json)


KEY_ENV, KEY_FILE_ENV = "FEDSQ_CHECKPOINT_KEY", "FEDSQ_CHECKPOINT_KEY_FILE"


def signing_key() -> bytes | None:
    """The checkpoint signing key from the environment: ``FEDSQ_CHECKPOINT_KEY`` (the key, as
    text) or ``FEDSQ_CHECKPOINT_KEY_FILE`` (a file whose bytes, trailing newline stripped, are
    the key); None when neither is set. An empty key or an unreadable key file is a
    ValueError naming the variable."""
    if os.environ.get(KEY_ENV) is not None:
        key = os.environ[KEY_ENV].encode()
        if not key:
            raise ValueError(f"{KEY_ENV}: is set but empty; unset it or give a key")
        return key
    f = os.environ.get(KEY_FILE_ENV)
    if f is None:
        return None
    try:
        key = Path(f).read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise ValueError(f"{KEY_FILE_ENV}: cannot read {f} ({e.strerror or type(e).__name__})") from None
    if not key:
        raise ValueError(f"{KEY_FILE_ENV}: {f} is empty")
    return key


def signature(key: bytes, flat: dict, meta_json: str) -> str:
    """HMAC-SHA256 with ``key`` over what :func:`digest` covers."""
    return _feed(hmac.new(key, digestmod=hashlib.sha256), flat, meta_json)


def check_path(path) -> None:
    """Refuse, before any round runs, a checkpoint ``path`` that cannot be written: it (or
    its :func:`previous`) is a folder or other non-file, or a folder on its way is a file.
    The :class:`CheckpointError` (a ValueError) names the ``checkpoint`` key."""
    path = Path(path)
    for q in (path, previous(path)):
        if q.exists() and not q.is_file():
            raise CheckpointError(f"checkpoint: {q} is {'a folder' if q.is_dir() else 'not a regular file'}, where "
                             "the run writes its checkpoint; move it away (or set checkpoint = false)")
    for q in path.parents:
        if q.exists():
            if not q.is_dir():
                raise CheckpointError(f"checkpoint: {q} is a file, where the run needs a folder for {path.name}")
            break


STALE_PATTERNS = (".ckpt-*.tmp", ".metrics.json.*.tmp", ".metrics.csv.*.tmp")


def remove_stale_temps(path) -> list:
    """Remove the temporary files a killed save left beside checkpoint ``path`` (our names
    only: :data:`STALE_PATTERNS`; regular files, never links); returns them. Call it only
    where no other process is saving into that folder (a resume)."""
    from ..outputs import remove_stale_temps as _rm

    return _rm(Path(path).parent, STALE_PATTERNS)


def save(path, groups: dict[str, dict], meta: dict, keep_previous: bool = True) -> None:
    """Write ``{group/key: tensor}`` plus ``meta`` (JSON) and their sha256 to ``path``
    atomically: a temp file in the same folder, fsync, then os.replace. With
    ``keep_previous`` the file it replaces becomes :func:`previous` (pass False when that
    file is not known to be good, so a damaged file never becomes the fallback)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {}
    for g, d in groups.items():
        for k, t in d.items():
            flat[f"{g}/{k}"] = t.detach().cpu().contiguous().clone()  # no shared storage
    rt, rmeta = rng_state()
    flat.update(rt)
    meta_json = json.dumps(dict(meta, rng=rmeta), sort_keys=True)
    header = {"meta": meta_json, "format": FORMAT, "sha256": digest(flat, meta_json)}
    key = signing_key()
    if key is not None:
        header["hmac_sha256"] = signature(key, flat, meta_json)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, previous(path))  # a kill here leaves the previous file: load falls back to it
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the renames themselves survive a power loss
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path) -> tuple[dict[str, dict], dict]:
    """(groups, meta) as written by :func:`save`, verified against the file's sha256;
    RNG states are not applied here. Raises :class:`CheckpointError` naming the file for
    a folder, a truncated or foreign file, or content that does not match its hash. A
    file written before checkpoints carried a hash loads with a warning (unverifiable).
    With a key set (:func:`signing_key`) the file's HMAC must be present and match; a
    signed file loaded without a key is refused, saying it is signed."""
    path = Path(path)
    key = signing_key()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: " + ("is a folder, not a file" if path.is_dir() else "not found"))
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        flat = load_file(str(path))
        meta = json.loads(header["meta"])
    except Exception as e:  # safetensors, JSON and key errors alike: the file is not what we wrote
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(e).__name__}: {e})") from None
    if "sha256" not in header:
        warnings.warn(f"checkpoint {path} has no content hash (written before 2026-12): loaded unverified",
                      UserWarning, stacklevel=2)
    else:
        if header.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path}: format {header.get('format')!r}, expected {FORMAT!r}")
        if digest(flat, header["meta"]) != header["sha256"]:
            raise CheckpointError(f"checkpoint {path}: content does not match its sha256 (damaged or edited)")
    if key is not None:
        if "hmac_sha256" not in header:
            raise CheckpointError(f"checkpoint {path}: not signed, but a key is set ({KEY_ENV} / {KEY_FILE_ENV}): "
                                  "refused (written without a key, or its signature was stripped)")
        if not hmac.compare_digest(signature(key, flat, header["meta"]), str(header["hmac_sha256"])):
            raise CheckpointError(f"checkpoint {path}: its HMAC signature does not match the key set in "
                                  f"{KEY_ENV} / {KEY_FILE_ENV} (forged or edited, or signed with another key)")
    elif "hmac_sha256" in header:
        raise CheckpointError(f"checkpoint {path}: is signed (HMAC-SHA256), but no key is set: set {KEY_ENV} or "
                              f"{KEY_FILE_ENV} to the key it was written with to verify and load it")
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: metadata is not a JSON object")
    groups: dict[str, dict] = {}
    for k, t in flat.items():
        g, _, key = k.partition("/")
        groups.setdefault(g, {})[key] = t
    return groups, meta
