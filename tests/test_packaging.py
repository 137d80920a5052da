"""The source distribution holds what the extension needs to build: setup.py names only the
.cpp/.cu files it compiles, so the headers, the CUDA includes and the CMake build reach the
sdist through MANIFEST.in."""

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_SUFFIXES = {".h", ".cuh", ".cpp", ".cu"}


def test_sdist_holds_every_source_and_header(tmp_path):
    expected = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in SOURCE_SUFFIXES
    }
    expected |= {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md"}
    assert {"csrc/include/impflow/ops.h", "csrc/cuda/broyden_step_device.cuh"} <= expected
    # A fresh egg-info: setuptools would otherwise reuse the file list of an earlier sdist
    # (impflow.egg-info/SOURCES.txt) and hide a file the manifest no longer names.
    egg_base = tmp_path / "egg"
    egg_base.mkdir()
    command = ["setup.py", "-q", "egg_info", "--egg-base", str(egg_base)]
    command += ["sdist", "--dist-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = tmp_path.glob("impflow-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(expected - names)
    assert not missing, f"the sdist lacks {missing}"
