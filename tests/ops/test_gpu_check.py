"""benchmarks/gpu_check.sh, checked where there is no GPU: it parses, skips
cleanly with a results file under $OUT, and its planned steps point at tests
and benchmarks that exist and fit the 9.5-minute budget (a device call may run 10)."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _plan():
    env = dict(os.environ, GPU_CHECK_PLAN="1", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    steps = {}
    for line in r.stdout.splitlines():
        name, rest = line.split("|", 1)
        if name == "sanitize-k":
            steps[name] = rest
        else:
            cap, cmd = rest.split("|", 1)
            steps[name] = (int(cap), cmd)
    return steps


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_skips_cleanly_without_gpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no CUDA GPU" in r.stdout
    results = list(tmp_path.glob("gpu-check-*.md"))
    assert len(results) == 1
    text = results[0].read_text()
    assert "skipped: no CUDA GPU" in text and torch.__version__ in text


def test_plan_fits_the_budget_and_selects_real_tests():
    steps = _plan()
    assert [k for k in steps if k != "sanitize-k"] == ["build", "tests", "tests-other", "sanitizer", "bench"]
    caps = sum(cap for k, (cap, _) in ((k, v) for k, v in steps.items() if k != "sanitize-k"))
    assert caps + 5 * 5 + 15 <= 9.5 * 60, caps  # caps, kill grace, setup
    assert "--no-build-isolation" in steps["build"][1] and "TORCH_CUDA_ARCH_LIST" in steps["build"][1]
    assert "compute-sanitizer --tool memcheck" in steps["sanitizer"][1]
    assert "FEDSQ_CUDA_TEST_SMALL=1" in steps["sanitizer"][1]
    # One collection of both files (skipped here, collected all the same); the steps' -k
    # expressions are applied with pytest's own matcher.
    from _pytest.mark.expression import Expression

    env = dict(os.environ, FEDSQ_CUDA_TEST_SMALL="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/ops/test_ops_cuda.py", "benchmarks/bench_ops.py",
                        "benchmarks/bench_gpu_workers.py", "--collect-only", "-q", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/federation/test_workers.py", "--collect-only", "-q",
                        "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    ids += [line for line in r.stdout.splitlines() if "::" in line]  # apart: tests/ and benchmarks/ conftests clash

    def selected(expr, prefix):
        ex = Expression.compile(expr)
        return [i for i in ids if i.startswith(prefix) and ex.evaluate(lambda name: name in i)]

    sanitized = selected(steps["sanitize-k"], "tests/ops/test_ops_cuda.py")
    assert 50 <= len(sanitized) <= 150, len(sanitized)
    bench_k = shlex.split(steps["bench"][1])
    gpu_bench = selected(bench_k[bench_k.index("-k") + 1], "benchmarks/bench_ops.py")
    for kernel in ("pack", "apply", "gate", "epilogue", "accumulate", "sq_dist"):
        assert any(f"[{dt}-{kernel}" in i for i in gpu_bench for dt in ("f32", "bf16")), (kernel, gpu_bench)
    assert any("test_gpu_copy" in i for i in gpu_bench) and any("resnet50" in i for i in gpu_bench)
    assert not any("interleaved" in i or "test_gate_fedsq" in i for i in gpu_bench)  # CPU benchmarks stay out
    # issue 17's GPU side: workers sharing the GPU (identical results, and the throughput ratio)
    assert len(selected(bench_k[bench_k.index("-k") + 1], "benchmarks/bench_gpu_workers.py")) == 3
    other_k = shlex.split(steps["tests-other"][1])
    cuda_workers = selected(other_k[other_k.index("-k") + 1], "tests/federation/test_workers.py")
    assert len(cuda_workers) == 2 and all("test_cuda_workers" in i for i in cuda_workers), cuda_workers
