"""Atomic safetensors checkpoints with JSON metadata and RNG states."""
from __future__ import annotations

import json
import os
import random
import tempfile
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


def save(path, groups: dict[str, dict], meta: dict) -> None:
    """Write ``{group/key: tensor}`` plus ``meta`` (JSON) to ``path`` atomically:
    a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {}
    for g, d in groups.items():
        for k, t in d.items():
            flat[f"{g}/{k}"] = t.detach().cpu().contiguous().clone()  # no shared storage
    rt, rmeta = rng_state()
    flat.update(rt)
    meta = dict(meta, rng=rmeta)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"meta": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path) -> tuple[dict[str, dict], dict]:
    """(groups, meta) as written by :func:`save`; RNG states are not applied here."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    flat = load_file(str(path))
    groups: dict[str, dict] = {}
    for k, t in flat.items():
        g, _, key = k.partition("/")
        groups.setdefault(g, {})[key] = t
    return groups, meta
