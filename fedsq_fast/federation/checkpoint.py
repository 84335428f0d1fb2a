"""Atomic, verified safetensors checkpoints with JSON metadata and RNG states.

Each file carries a sha256 of its content (every tensor's name, dtype, shape and bytes, and
the metadata) and is checked on load; the previous good file is kept beside it
(``NAME.prev.safetensors``), so a damaged latest checkpoint falls back to the one before
(the caller warns), never silently to round 0.
"""
from __future__ import annotations

import hashlib
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


def digest(flat: dict, meta_json: str) -> str:
    """sha256 over the format, the metadata and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(meta_json.encode())
    for k in sorted(flat):
        t = flat[k].detach().cpu().contiguous()
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


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
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"meta": meta_json, "format": FORMAT, "sha256": digest(flat, meta_json)})
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
    file written before checkpoints carried a hash loads with a warning (unverifiable)."""
    path = Path(path)
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
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: metadata is not a JSON object")
    groups: dict[str, dict] = {}
    for k, t in flat.items():
        g, _, key = k.partition("/")
        groups.setdefault(g, {})[key] = t
    return groups, meta
