"""Builds impflow and its extension impflow._C.

Switches (environment variables):
  FORCE_CUDA=1          build the CUDA kernels even where no GPU is visible (needs nvcc)
  FORCE_ONLY_CPU=1      build the CPU kernels only
  IMPFLOW_CUDA_ARCHS    semicolon-separated compute capabilities, e.g. "8.0;9.0"
                        (default "7.5;8.0;9.0+PTX": T4, A100 and later Ampere, H100/H200,
                        and newer GPUs through PTX)
  MAX_JOBS              parallel compile jobs (honoured by torch's ninja build)
  IMPFLOW_DEBUG=1       -O0 -g, for debugging the kernels

Install with `pip install --no-build-isolation .` so that the extension is built against
the torch it will run with.
"""

import glob
import importlib.util
import os
import sys

import setuptools
from setuptools import find_packages, setup

# The metadata lives in pyproject.toml ([project]), which setuptools reads from 64 on (61 in
# part). `--no-build-isolation` skips the build requirements that say so, and an older
# setuptools (Python 3.9's venv brings 58) builds a package named UNKNOWN 0.0.0.
if int(setuptools.__version__.split(".")[0]) < 64:
    sys.exit(
        f"impflow needs setuptools >= 64 to build, found {setuptools.__version__}: "
        "pip install -U 'setuptools>=64'"
    )

# torch guesses CUDA_HOME from `which nvcc`; a wrapper script on PATH (as in /usr/local/bin)
# would point it at a folder without libcudart, so prefer the standard toolkit folder.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if flag("FORCE_ONLY_CPU"):
        return False
    if flag("FORCE_CUDA"):
        if CUDA_HOME is None or torch.version.cuda is None:
            raise RuntimeError(
                "FORCE_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME); found torch "
                f"{torch.__version__} (CUDA {torch.version.cuda}) and CUDA_HOME={CUDA_HOME}"
            )
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def pip_cuda_include_dirs():
    """Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h) but that pip
    wheels put under site-packages/nvidia/*/include rather than into CUDA_HOME."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def arch_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise RuntimeError(f"IMPFLOW_CUDA_ARCHS={archs!r} names no architecture")
    return flags


def extension():
    with_cuda = want_cuda()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    version_define = f"-DIMPFLOW_TORCH_VERSION={torch.__version__}"
    cxx = ["-O0", "-g"] if flag("IMPFLOW_DEBUG") else ["-O3"]
    # at::parallel_for is header code: it only runs in parallel when the extension is compiled
    # with the OpenMP that torch uses. Without it, still honour `#pragma omp simd`.
    cxx += ["-fopenmp"] if torch.backends.openmp.is_available() else ["-fopenmp-simd"]
    cxx += ["-fno-math-errno"]  # sqrt without errno: vectorisable; nothing reads errno
    # Results stay IEEE; only floating-point exception flags, which nothing reads, may differ.
    # It lets GCC vectorise selects around divisions (1/denominator, res/||z||).
    cxx += ["-fno-trapping-math"]
    link = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    if sys.platform.startswith("linux"):
        # Use torch's shared libstdc++ even where the compiler links its own copy statically
        # (seen with a g++ wrapper on a GPU machine): a second copy has uninitialised stream
        # facets, so every TORCH_CHECK message that prints a number was cut short or crashed.
        link += ["-Wl,--push-state,--no-as-needed", "-lstdc++", "-Wl,--pop-state"]
    cxx += [version_define]  # torch picks the C++ standard it needs (17 or 20)
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not with_cuda:
        return CppExtension(
            "impflow._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_define = f"-DIMPFLOW_CUDA_VERSION={torch.version.cuda}"
    cxx += ["-DIMPFLOW_WITH_CUDA", cuda_define]
    nvcc = ["-O0", "-G"] if flag("IMPFLOW_DEBUG") else ["-O3"]
    nvcc += ["-DIMPFLOW_WITH_CUDA", cuda_define, version_define, "--expt-relaxed-constexpr"]
    nvcc += arch_flags(os.environ.get("IMPFLOW_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    # torch adds no arch flags of its own once -gencode flags are given here.
    return CUDAExtension(
        "impflow._C",
        sources,
        include_dirs=include_dirs + pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    packages=find_packages(include=["impflow", "impflow.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
