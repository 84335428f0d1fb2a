"""Build fedsq_fast: setup.py only finds torch and CUDA and runs CMakeLists.txt,
the one build description of the compiled library.

Environment switches:
  FEDSQ_FAST_CUDA=auto|1|0   build the CUDA kernels when nvcc and a CUDA torch
                             are present (auto), always (1: fail if impossible),
                             or never (0).
  TORCH_CUDA_ARCH_LIST       e.g. "9.0" or "8.0;9.0" (default 8.0;9.0).
  MAX_JOBS                   parallel compile jobs (default: all cores).
"""
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _nvcc_prefix(nvcc: str):
    """The real toolkit prefix: the nvcc on PATH may be a wrapper script, so ask
    nvcc itself (its `#$ TOP=` line) instead of trusting its folder."""
    probe = ROOT / "build" / "nvcc_probe.cu"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text("int main() { return 0; }\n")
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", str(probe)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"running {nvcc} failed: {exc}"
    m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
    if not m:
        return None, f"{nvcc} -dryrun printed no TOP= line"
    return Path(m.group(1).strip()).resolve(), None


def detect_cuda(torch):
    """(settings or None, why not). Decided from torch.version.cuda and a found
    nvcc, never from CUDA_HOME alone."""
    mode = os.environ.get("FEDSQ_FAST_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return None, "disabled by FEDSQ_FAST_CUDA=0"
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        nvcc = shutil.which("nvcc")
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if nvcc is None and home and (Path(home) / "bin" / "nvcc").exists():
                nvcc = str(Path(home) / "bin" / "nvcc")
        if nvcc is None:
            reason = "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)"
        else:
            prefix, reason = _nvcc_prefix(nvcc)
            if prefix is not None:
                archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
                sms = sorted({a.split("+")[0].replace(".", "") for a in re.split(r"[;, ]+", archs) if a})
                return {"nvcc": str(prefix / "bin" / "nvcc"), "home": str(prefix), "archs": sms}, None
    if mode in ("1", "on", "true", "yes"):
        raise RuntimeError(f"FEDSQ_FAST_CUDA=1 but CUDA kernels cannot be built: {reason}")
    return None, reason


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch
        import torch.utils

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        cuda, no_cuda_reason = detect_cuda(torch)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: pip install cmake")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",  # find_package(Torch)
            f"-DFEDSQ_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DFEDSQ_OUTPUT_DIR={out.parent}",
            f"-DFEDSQ_OUTPUT_NAME={out.name[:-len('.so')] if out.name.endswith('.so') else out.stem}",
            f"-DFEDSQ_WITH_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        if cuda:
            args += [f"-DFEDSQ_NVCC={cuda['nvcc']}", f"-DFEDSQ_CUDA_HOME={cuda['home']}",
                     f"-DFEDSQ_CUDA_ARCHS={';'.join(cuda['archs'])}"]
        print(f"fedsq_fast: CUDA kernels {'ON ' + str(cuda) if cuda else 'OFF (' + str(no_cuda_reason) + ')'}")
        subprocess.check_call(args)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        info = {
            "torch_version": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_kernels": bool(cuda),
            "cuda_archs": cuda["archs"] if cuda else [],
            "no_cuda_reason": no_cuda_reason,
            "python": sys.version.split()[0],
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        text = json.dumps(info, indent=2) + "\n"
        (out.parent / "_build_info.json").write_text(text)
        if getattr(self, "editable_mode", False):
            # Editable installs copy only the .so into the source tree; the
            # loader reads this file beside it to refuse a library built for
            # another torch before loading it.
            (ROOT / "fedsq_fast" / "_build_info.json").write_text(text)

    def copy_extensions_to_source(self):
        # build_ext --inplace builds into build/ with inplace switched off, then copies
        # the .so into the source tree: the build facts must go with it.
        super().copy_extensions_to_source()
        built = Path(self.build_lib).resolve() / "fedsq_fast" / "_build_info.json"
        if built.exists():
            shutil.copyfile(built, ROOT / "fedsq_fast" / "_build_info.json")


setup(
    ext_modules=[Extension("fedsq_fast._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
