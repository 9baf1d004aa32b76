"""Build and install the ``qjl_kernel`` package, with its extension ``qjl_kernel._C``.

    pip install --no-build-isolation -e .

The extension always holds the C++ CPU kernels (any C++ compiler). Its CUDA kernels are compiled
too whenever nvcc and a CUDA build of torch are present; a GPU is not needed to compile. Without
them the extension is CPU-only, and GPU tensors use the Triton kernels or the PyTorch references.
Knobs (environment variables; details in ``qjl_kernel/csrc/README.md``):

  QJL_BUILD_CPU=0      build no extension at all (pure Python; every op runs its reference)
  QJL_BUILD_CUDA=0|1   force the CUDA kernels off / on (1 fails loudly when they cannot be built)
  QJL_CUDA_ARCHS       arch list, e.g. "9.0" or "8.0;9.0+PTX" (else TORCH_CUDA_ARCH_LIST, else 8.0;9.0+PTX)
  MAX_JOBS             parallel compile jobs (ninja)
  CUDA_HOME            CUDA toolkit root (else found from nvcc, even when nvcc is a wrapper script)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("qjl_kernel") / "csrc"
CPU_SOURCES = [
    "torch_bindings.cpp",
    "cpu/decode_attention_cpu.cpp",
    "cpu/decode_kernel_scalar.cpp",
    "cpu/decode_kernel_avx2.cpp",
    "cpu/decode_kernel_avx512.cpp",
    "cpu/quantize_values_cpu.cpp",
]
CUDA_SOURCES = [
    "ops.cpp",
    "query_sketch.cu",
    "quantize_keys.cu",
    "key_scores.cu",
    "quantize_values.cu",
    "value_matmul.cu",
    "decode_attention.cu",
]
# at::parallel_for runs its OpenMP loop only in code compiled with OpenMP (ATen/ParallelOpenMP.h).
_OPENMP = sys.platform.startswith("linux")
CXX_FLAGS = ["-O3"] + (["-fopenmp"] if _OPENMP else [])
LINK_FLAGS = ["-fopenmp"] if _OPENMP else []
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100 and H100/H200 SASS, plus PTX for newer GPUs


def _say(message: str) -> None:
    print(f"qjl_kernel setup: {message}", file=sys.stderr, flush=True)


def _toolkit_root(nvcc: str) -> str | None:
    """The toolkit nvcc belongs to. nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc), so ask it."""
    try:
        probe = subprocess.run(
            [nvcc, "-v", "--dryrun", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=120
        )
        for line in (probe.stderr + probe.stdout).splitlines():
            if "TOP=" in line:
                top = os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"'))
                if os.path.isfile(os.path.join(top, "include", "cuda_runtime.h")):
                    return top
    except (OSError, subprocess.SubprocessError):
        pass
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return guess if os.path.isfile(os.path.join(guess, "include", "cuda_runtime.h")) else None


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    return _toolkit_root(nvcc) if nvcc else None


def _cuda_build_blocker() -> str | None:
    """Why the extension cannot be built here, or None when it can."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    home = _find_cuda_home()
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc not found (put it on PATH or set CUDA_HOME)"
    os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension at import
    return None


def _pip_cuda_include_dirs(cuda_home: str) -> list[str]:
    """Headers torch's CUDA headers include (cuBLAS, cuSPARSE...) that a bare toolkit may lack.

    CUDA builds of torch pull them in as pip packages (``nvidia/cu13/include`` and friends); they are
    appended after the toolkit's own include dir so the toolkit's runtime headers win."""
    if all(os.path.isfile(os.path.join(cuda_home, "include", h)) for h in ("cusparse.h", "cublas_v2.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        for include in sorted(Path(base).glob("*/include")):
            if (include / "cusparse.h").exists() or (include / "cublas_v2.h").exists():
                found.append(str(include))
    return found


def _arch_list() -> str:
    archs = os.environ.get("QJL_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch turns it into -gencode flags
    return archs


def _cpu_extension(reason: str):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    _say(f"building qjl_kernel._C with the CPU kernels only ({reason})")
    ext = CppExtension(
        name="qjl_kernel._C", sources=[str(CSRC / s) for s in CPU_SOURCES], extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def _extensions():
    for knob in ("QJL_BUILD_CUDA", "QJL_BUILD_CPU"):
        if os.environ.get(knob, "").strip() not in ("", "0", "1"):
            raise SystemExit(f"{knob} must be 0 or 1, got {os.environ[knob]!r}")
    flag = os.environ.get("QJL_BUILD_CUDA", "").strip()
    if os.environ.get("QJL_BUILD_CPU", "").strip() == "0":
        if flag == "1":
            raise SystemExit("qjl_kernel setup: QJL_BUILD_CPU=0 and QJL_BUILD_CUDA=1 contradict each other")
        _say("QJL_BUILD_CPU=0: building no extension; every op runs its PyTorch reference")
        return [], {}
    if importlib.util.find_spec("torch") is None:
        _say("torch is not installed: building no extension; install torch first, then reinstall")
        return [], {}
    if flag == "0":
        return _cpu_extension("QJL_BUILD_CUDA=0")
    blocker = _cuda_build_blocker()
    if blocker is not None:
        if flag == "1":
            raise SystemExit(f"qjl_kernel setup: QJL_BUILD_CUDA=1 but the CUDA kernels cannot be built: {blocker}")
        return _cpu_extension(f"no CUDA kernels: {blocker}")

    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    archs = _arch_list()
    ext = CUDAExtension(
        name="qjl_kernel._C",
        sources=[str(CSRC / s) for s in CPU_SOURCES + CUDA_SOURCES],
        define_macros=[("QJL_WITH_CUDA", "1")],
        extra_link_args=LINK_FLAGS,
        extra_compile_args={
            "cxx": CXX_FLAGS,
            # No --use_fast_math: quantize_values must round exactly like the float32 reference.
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    extra_includes = _pip_cuda_include_dirs(CUDA_HOME)
    ext.include_dirs.extend(extra_includes)  # after torch's and the toolkit's include dirs
    _say(
        f"building qjl_kernel._C with CPU and CUDA kernels, CUDA_HOME={CUDA_HOME}, archs={archs}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}"
        + (f", extra headers from {extra_includes}" if extra_includes else "")
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


os.chdir(ROOT)
ext_modules, cmdclass = _extensions()

setup(
    name="qjl_kernel",
    version="0.1.0",
    description="QJL: 1-bit quantized JL transform for KV cache quantization (ops + references)",
    packages=["qjl_kernel"],
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
