"""Loads the compiled extension impflow._C and turns the usual failures into one sentence."""

import torch

_BUILD_HINT = "run `pip install --no-build-isolation -e .` in the impflow checkout"


def _load():
    try:
        from impflow import _C  # noqa: F401  (registers torch.ops.impflow.*)
    except ImportError as error:
        text = str(error)
        if "undefined symbol" in text or "cannot open shared object" in text:
            raise ImportError(
                f"impflow's compiled extension does not fit the installed torch "
                f"{torch.__version__} (it was probably built against another torch or CUDA); "
                f"to rebuild it, {_BUILD_HINT}. Loader said: {text}"
            ) from error
        raise ImportError(
            f"impflow's compiled extension impflow._C is missing; to build it, {_BUILD_HINT} "
            f"({text})"
        ) from error
    check_build(_C.torch_version, torch.__version__)
    return _C


def check_build(built: str, running: str) -> None:
    """Raises ImportError when the extension was built against another torch release."""
    if built.split("+")[0] != running.split("+")[0]:
        raise ImportError(
            f"impflow._C was built against torch {built} but torch {running} is running; "
            f"to rebuild it, {_BUILD_HINT}"
        )


_C = _load()


def has_cuda_kernels() -> bool:
    """True when impflow._C carries CUDA kernels."""
    return bool(_C.compiled_with_cuda())


def check_device(tensor: torch.Tensor, op: str) -> None:
    """Raises a clear error when a CUDA tensor reaches an op built without CUDA kernels."""
    if tensor.is_cuda and not has_cuda_kernels():
        raise RuntimeError(
            f"impflow.{op} got a CUDA tensor, but impflow was built without CUDA kernels; "
            f"to rebuild it with them, {_BUILD_HINT} on a machine with nvcc (or with FORCE_CUDA=1)"
        )
