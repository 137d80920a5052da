"""Loads the compiled extension impflow._C and turns the usual failures into one sentence."""

import importlib
import os

import torch

_BUILD_HINT = "run `pip install --no-build-isolation -e .` in the impflow checkout"


def _load():
    # import_module, not `from impflow import _C`: a missing module then says so by name
    # instead of blaming a "partially initialized module (circular import)".
    try:
        _C = importlib.import_module("impflow._C")  # registers torch.ops.impflow.*
    except ImportError as error:
        raise explain_load_error(error) from error
    check_build(_C.torch_version, torch.__version__)
    return _C


def explain_load_error(error: ImportError) -> ImportError:
    """The one-sentence error for a failed import of impflow._C."""
    text = str(error)
    if "undefined symbol" in text or "cannot open shared object" in text:
        return ImportError(
            f"impflow's compiled extension does not fit the installed torch "
            f"{torch.__version__} (it was probably built against another torch or CUDA); "
            f"to rebuild it, {_BUILD_HINT}. Loader said: {text}"
        )
    if isinstance(error, ModuleNotFoundError) and error.name == "impflow._C":
        folder = os.path.dirname(os.path.abspath(__file__))
        return ImportError(
            f"impflow's compiled extension impflow._C is missing (no _C*.so in {folder}); "
            f"to build it, {_BUILD_HINT}"
        )
    return ImportError(
        f"impflow's compiled extension impflow._C could not be loaded; to rebuild it, "
        f"{_BUILD_HINT}. Loader said: {text}"
    )


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


def check_same_device(op: str, named) -> None:
    """Raises a RuntimeError naming the first tensor of ``named`` (``(name, tensor)`` pairs)
    that is not on the device of the first one.

    The dispatcher runs the kernel of the highest-priority device among all the tensor
    arguments: one meta tensor among CPU ones reaches the fake kernel, which computes nothing
    and updates nothing, and one CUDA tensor the CUDA kernel (or, in a build without CUDA
    kernels, no kernel). The fake kernels call this; the wrappers too when no kernel was found;
    the C++ checks say the same for the real kernels.
    """
    first_name, first = named[0]
    for name, t in named[1:]:
        if isinstance(t, torch.Tensor) and t.device != first.device:
            raise RuntimeError(  # from None: alone, also when raised while handling another
                f"{op}: {name} must be on {first_name}'s device ({first.device}), got {t.device}"
            ) from None
