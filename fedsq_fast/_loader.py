"""Find and load the compiled kernel library, or record why not.

Modelled on xformers' loader: importing fedsq_fast never fails because the
compiled library is missing, stale or built against another torch. The reason
is kept in ``BACKEND_INFO`` (shown by ``fedsq_fast.backend_info()``), a warning
is issued once, and the ops run on the pure-PyTorch reference instead.

FEDSQ_FAST_BACKEND=auto (default) | compiled (fail loudly if it can't load) |
reference (never load the library).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

_PKG = Path(__file__).resolve().parent

BACKEND_INFO: dict = {
    "backend": "reference",  # "compiled" once the library is loaded
    "reason": None,  # why the compiled library is not used
    "library": None,
    "build": None,  # contents of _build_info.json written by setup.py
    "cuda_kernels": False,  # the library holds CUDA kernels
}


def _find_library():
    for name in sorted(_PKG.glob("_C*.so")) + sorted(_PKG.glob("_C*.pyd")):
        return name
    return None


def _try_load() -> str | None:
    """Load the library; return None on success or the reason it was not loaded."""
    mode = os.environ.get("FEDSQ_FAST_BACKEND", "auto").strip().lower()
    if mode not in ("auto", "compiled", "reference"):
        raise ValueError(
            f"FEDSQ_FAST_BACKEND must be 'auto', 'compiled' or 'reference', got {mode!r}"
        )
    if mode == "reference":
        return "disabled by FEDSQ_FAST_BACKEND=reference"
    cache_mb = os.environ.get("FEDSQ_FAST_CPU_CACHE_MB")
    # read by the library when its first large output is made (csrc/ops.cpp): checked here, loudly
    if cache_mb is not None and not (cache_mb.strip().isdigit() and cache_mb.strip() == cache_mb):
        raise ValueError(f"FEDSQ_FAST_CPU_CACHE_MB must be a whole number of MiB >= 0, got {cache_mb!r}")
    lib = _find_library()
    if lib is None:
        return f"no compiled library (_C*.so) in {_PKG}; install with `pip install -e .` to build it"
    BACKEND_INFO["library"] = str(lib)
    info_path = _PKG / "_build_info.json"
    if info_path.exists():
        build = json.loads(info_path.read_text())
        BACKEND_INFO["build"] = build
        built_for = build.get("torch_version")
        if built_for != torch.__version__:
            return (
                f"library was built against torch {built_for}, but torch {torch.__version__} "
                "is installed; rebuild with `pip install -e .`"
            )
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as exc:  # undefined symbols, wrong ABI, ...
        return f"loading {lib.name} failed: {type(exc).__name__}: {exc}"
    BACKEND_INFO["cuda_kernels"] = bool(
        torch._C._dispatch_has_kernel_for_dispatch_key("fedsq_fast::gate", "CUDA")
    )
    return None


def load() -> bool:
    """Load once; True if the compiled library is in use."""
    if BACKEND_INFO.get("_done"):
        return BACKEND_INFO["backend"] == "compiled"
    BACKEND_INFO["_done"] = True
    reason = _try_load()
    if reason is None:
        BACKEND_INFO["backend"] = "compiled"
        return True
    BACKEND_INFO["reason"] = reason
    mode = os.environ.get("FEDSQ_FAST_BACKEND", "auto").strip().lower()
    if mode == "compiled":
        raise ImportError(f"fedsq_fast: FEDSQ_FAST_BACKEND=compiled but {reason}")
    if mode == "auto":
        warnings.warn(
            f"fedsq_fast is using its pure-PyTorch reference ops (slower, more memory): {reason}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
