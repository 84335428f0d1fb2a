"""The CUDA vector kernels' index walk, replayed on the CPU: tests/ops/emulated/
tile_check.cpp compiles csrc/cuda/tiles.h (the arithmetic the kernels use) with
g++ and steps every thread of small grids through a launch, checking that each
element is visited once, each mask word written once by the right lane, and
the epilogue's division-free channel tracking equals (e / inner) % C."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cuda_tile_walk_replayed_on_cpu(tmp_path):
    exe = tmp_path / "tile_check"
    build = subprocess.run(["g++", "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}",
                            str(ROOT / "tests" / "ops" / "emulated" / "tile_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK: 0 mismatches"), run.stdout[-3000:]
