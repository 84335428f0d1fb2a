"""The AVX-512 and AVX2 kernels on any x86 CPU: tests/ops/emulated/isa_check.cpp
compiles the kernel source against SIMDe (portable implementations of the
intrinsics) and compares every kernel, bit for bit, with the scalar variant.
This is what checks the AVX-512 path on CPUs without AVX-512 (such as CI's).
Needs g++ and SIMDe's headers (Debian: libsimde-dev); skipped otherwise."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIMDE = Path("/usr/include/simde/x86/avx512.h")


@pytest.mark.skipif(shutil.which("g++") is None or not SIMDE.exists(), reason="needs g++ and libsimde-dev")
def test_vector_kernels_match_scalar_under_emulation(tmp_path):
    exe = tmp_path / "isa_check"
    build = subprocess.run(
        ["g++", "-std=c++17", "-O1", "-ffp-contract=off", f"-I{ROOT / 'csrc'}", "-Wno-deprecated-declarations",
         str(ROOT / "tests" / "ops" / "emulated" / "isa_check.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK: 0 mismatches"), run.stdout[-3000:]
