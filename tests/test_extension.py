"""Loading the extension: the one-sentence errors of impflow/_extension.py."""

import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import impflow
from impflow import _extension


def test_extension_loaded_and_matches_torch():
    assert _extension._C.torch_version.split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(impflow.has_cuda_kernels(), bool)
    assert hasattr(torch.ops.impflow, "broyden_step") and hasattr(torch.ops.impflow, "solver_track")


def test_other_torch_release_is_refused():
    with pytest.raises(
        ImportError,
        match=r"built against torch 2\.4\.0\+cu121 but torch 2\.5\.1 is running; to rebuild it",
    ):
        _extension.check_build("2.4.0+cu121", "2.5.1")
    _extension.check_build("2.5.1+cu121", "2.5.1+cpu")  # same release, other build: fine


def test_missing_extension_says_how_to_build():
    code = "import sys; sys.modules['impflow._C'] = None; import impflow"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert (
        "impflow._C is missing" in run.stderr and "pip install --no-build-isolation" in run.stderr
    )


def test_a_package_without_its_extension_says_it_is_missing(tmp_path):
    # The real case: the Python files without a built _C*.so (before, the message blamed a
    # "partially initialized module (most likely due to a circular import)").
    shutil.copytree(
        os.path.dirname(impflow.__file__),
        tmp_path / "impflow",
        ignore=shutil.ignore_patterns("_C*"),
    )
    # -S: no .pth files, so an editable install's import hook cannot send `import impflow` back
    # to the checkout; torch and numpy come from their folder on PYTHONPATH, after the copy.
    packages = os.path.dirname(os.path.dirname(torch.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), packages])}
    run = subprocess.run(
        [sys.executable, "-S", "-c", "import impflow"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "impflow._C is missing (no _C*.so in" in last and str(tmp_path) in last
    assert "circular" not in last


def test_an_extension_built_against_another_torch_says_so():
    error = ImportError("/x/impflow/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
    explained = _extension.explain_load_error(error)
    assert "does not fit the installed torch" in str(explained)
    assert "pip install --no-build-isolation" in str(explained)
    assert "undefined symbol: _ZN3c104cuda9SetDeviceEi" in str(explained)


def test_other_load_failures_keep_the_loaders_words():
    explained = _extension.explain_load_error(ImportError("bad magic number"))
    assert "could not be loaded" in str(explained) and "bad magic number" in str(explained)


def test_cuda_tensor_without_cuda_kernels(monkeypatch):
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _extension.check_device(fake_cuda, "ops.broyden_step")


def test_kernel_error_messages_print_their_numbers():
    # A second, statically linked libstdc++ in the extension (a compiler that links it by
    # default) leaves its stream facets uninitialised: C++ messages then stop at the first
    # number, or crash. setup.py links torch's shared copy; this shows the result.
    U, V = torch.zeros(3, 4, 5), torch.zeros(3, 3, 5)
    z, active = torch.zeros(3, 5), torch.ones(3, dtype=torch.bool)
    with pytest.raises(RuntimeError) as error:
        torch.ops.impflow.broyden_step(U, V, z, z, z, active, 1, 4)
    assert "V must have the shape of U [3, 4, 5], got [3, 3, 5]" in str(error.value)
    w, u, v = torch.zeros(3, 2), torch.zeros(3), torch.zeros(2)
    with pytest.raises(RuntimeError) as error:
        torch.ops.impflow.power_iteration([w], [u], [v], -7)
    assert "n_iterations must be >= 0, got -7" in str(error.value)
