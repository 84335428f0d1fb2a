"""Provenance of a run: the machine and CPU code paths (which decide floating-point rounding),
the code version (git), times (UTC) and load."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

import torch

# Environment switches that pin the CPU code paths of torch (ATen, oneDNN, MKL) and of our kernels,
# and the setting that reproduces runs made on an AVX2-only CPU on one with AVX-512.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "FEDSQ_FAST_CPU_ISA")
AVX2_PIN = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FEDSQ_FAST_CPU_ISA=avx2"


def machine_info() -> dict:
    """CPU (vendor, model, SIMD flags, the code paths torch and fedsq_fast take: ISA in use and
    the environment switches that pin them), GPU, versions (torch, numpy, python, the torch
    fedsq_fast's library was built for)."""
    from .. import backend

    cpu, simd, vendor = platform.processor() or platform.machine(), None, None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = info.get("model name", cpu)
        vendor = info.get("vendor_id")
        have = set(info.get("flags", "").split())
        simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    # The instruction sets in use decide the floating-point rounding of convolutions and GEMMs,
    # so a run is reproducible bit for bit only where they match (see experiments/README.md).
    isa = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "fedsq_fast_cpu_isa": torch.ops.fedsq_fast.cpu_isa("") if backend() == "compiled" else None,
           "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}
    import numpy

    from .. import backend_info

    built = (backend_info().get("build") or {}).get("torch_version")
    return {"host_cpu": cpu, "cpu_vendor": vendor, "cpu_simd": simd, **isa, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "fedsq_fast_backend": backend(), "fedsq_fast_built_for_torch": built}


def loadavg():
    """The 1-minute load average (None where unknown): on a shared machine it explains wall
    times, not results."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _git_version():
    import subprocess

    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fedsq_fast"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+uncommitted changes in fedsq_fast/" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read once, when the code is imported: a long suite must record the code it runs, not
# whatever the checkout holds by the time a run ends.
_CODE_AT_IMPORT = _git_version()


def code_version():
    """The git version of fedsq_fast/ when this module was imported (``+uncommitted ...`` if dirty)."""
    return _CODE_AT_IMPORT


def utc() -> str:
    """Now, as ``YYYY-mm-dd HH:MM:SS UTC``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def rel(p) -> str:
    """``p`` relative to the working directory where it lies below it (as the reports print paths)."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


