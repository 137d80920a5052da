r"""The five tabular density-estimation benchmarks (POWER, GAS, HEPMASS, MINIBOONE, BSDS300),
read from the files of the MAF release and preprocessed as that release does.

``root`` is the release's ``datasets`` folder (as unpacked from its archive), holding

=========  =====================================================  ======  ==========================
name       file(s) under ``root``                                 dims    needs
=========  =====================================================  ======  ==========================
power      ``power/data.npy``                                     6       numpy
gas        ``gas/ethylene_CO.pickle`` (a pandas DataFrame)        8       pandas
hepmass    ``hepmass/1000_train.csv``, ``hepmass/1000_test.csv``  21      numpy
miniboone  ``miniboone/data.npy``                                 43      numpy
bsds300    ``BSDS300/BSDS300.hdf5`` (train/validation/test)       63      h5py
=========  =====================================================  ======  ==========================

(the dims are those of the real files). Nothing is downloaded. The preprocessing, step by step
as in the release's ``datasets/*.py`` (the ImpFlow, FFJORD and Residual Flows code load the
same files the same way):

- **power**: rows shuffled by ``numpy.random.RandomState(42)``; columns 1 and 3 (global
  reactive power, global intensity) dropped; then, from the same generator, uniform noise
  ``0.01·U`` on voltage, ``0.001·U`` on global active power, ``U`` on each sub-metering column
  (drawn in that order), none on time; the last 10 % is test, the last 10 % of the rest is
  validation; normalised by the mean and standard deviation (``ddof=0``) of train + validation.
  (The ImpFlow repository's own copy draws this noise from the unseeded global numpy generator,
  so its split is not reproducible; the release's seed is used here.)
- **gas**: columns ``Meth``, ``Eth``, ``Time`` dropped; then, while some column has a Pearson
  correlation above 0.98 with another one, the first such column is dropped; normalised by the
  mean and standard deviation (pandas, ``ddof=1``) of the whole table; test = last 10 %,
  validation = last 10 % of the rest.
- **hepmass**: rows of class 1 (first column) only, label column dropped; the test file's
  last column dropped too (the release does so, calling that file "messed up": it carries a
  column more than the training file);
  normalised by the training file's mean and standard deviation (``ddof=1``); a feature is
  removed when its smallest training value occurs more than 5 times (the release's
  "too many re-occurring values" test); validation = last 10 % of the training file.
  Test columns are matched to training columns by name, as the release's pandas arithmetic
  does; a kept training column absent from the test file is an error, not a NaN column.
- **miniboone**: test = last 10 %, validation = last 10 % of the rest; normalised by the mean
  and standard deviation (``ddof=0``) of train + validation.
- **bsds300**: the three splits as stored, unchanged.

The computation is in float64, as in the release; the splits are returned as float32.

**Trust.** ``gas/ethylene_CO.pickle`` is read with ``pandas.read_pickle``, which can run code
from the file: load only files you trust.

References:
    | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
    | https://arxiv.org/abs/1705.07057, code and data: https://github.com/gpapamak/maf

    | Implicit Normalizing Flows (Lu et al., 2021), §5.2 https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["TABULAR_DATASETS", "TABULAR_FILES", "TabularData", "load_tabular"]

TABULAR_DATASETS = ("power", "gas", "hepmass", "miniboone", "bsds300")

TABULAR_FILES = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
"""The files each dataset reads, relative to the release's ``datasets`` folder."""

_HELD_OUT_FRACTION = 0.1
_POWER_SEED = 42
_POWER_COLUMNS = 8  # gap, grp, voltage, gintens, sm1, sm2, sm3, time
_GAS_DROPPED = ("Meth", "Eth", "Time")
_GAS_MAX_CORRELATION = 0.98
_HEPMASS_MAX_REPEATS = 5


class TabularData(NamedTuple):
    """The three splits of a tabular dataset, each ``(N_split, n_dims)`` float32."""

    train: Tensor
    val: Tensor
    test: Tensor
    n_dims: int


# ---------------------------------------------------------------------------------------------
# Files and optional dependencies


def _expected_files(name: str, root) -> list[Path]:
    """The dataset's files under ``root``, or FileNotFoundError naming every expected one."""
    expected = TABULAR_FILES[name]
    listing = ", ".join(expected)
    root = Path(os.fspath(root)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{name}: the data folder {str(root)!r} does not exist; expected the MAF release's "
            f"datasets folder, holding {listing}"
        )
    paths = [root / rel for rel in expected]
    missing = [rel for rel, path in zip(expected, paths) if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: missing {', '.join(missing)} under {str(root)!r}; this dataset reads "
            f"{listing} (the MAF release's files, as distributed)"
        )
    return paths


def _import_optional(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"loading {name} needs the {module} package, which is not installed: "
            f"pip install {module}  (or pip install 'impflow[train]')"
        ) from err


def _bad_file(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


# ---------------------------------------------------------------------------------------------
# The release's splits and normalisation


def _split_off_last(data: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(first part, last ⌊0.1·N⌋ rows)``."""
    n_last = int(_HELD_OUT_FRACTION * data.shape[0])
    if n_last < 1:
        raise _bad_file(
            path, f"has {data.shape[0]} rows; splitting off 10 % needs at least 10 rows"
        )
    return data[:-n_last], data[-n_last:]


def _mean_std(reference: np.ndarray, ddof: int, path: Path, names=None):
    """Per-column mean and standard deviation, refusing constant columns (division by 0)."""
    mean = reference.mean(axis=0)
    std = reference.std(axis=0, ddof=ddof)
    constant = np.flatnonzero(~(std > 0))
    if constant.size:
        which = [names[i] if names is not None else str(i) for i in constant]
        raise _bad_file(path, f"column(s) {', '.join(which)} are constant; cannot normalise")
    return mean, std


def _standardise(splits, reference: np.ndarray, ddof: int, path: Path):
    mean, std = _mean_std(reference, ddof, path)
    return [(split - mean) / std for split in splits]


def _load_npy(path: Path, n_columns: int | None = None) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise _bad_file(path, f"not a readable .npy array ({err})") from err
    if data.ndim != 2 or (n_columns is not None and data.shape[1] != n_columns):
        want = f"(N, {n_columns})" if n_columns is not None else "(N, D)"
        raise _bad_file(path, f"expected a 2-D array of shape {want}, got {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise _bad_file(path, f"expected numbers, got dtype {data.dtype}")
    return np.array(data, dtype=np.float64)  # a private copy: shuffled in place below


def _power(paths):
    (path,) = paths
    data = _load_npy(path, _POWER_COLUMNS)
    n = data.shape[0]
    rng = np.random.RandomState(_POWER_SEED)
    rng.shuffle(data)
    data = np.delete(data, [1, 3], axis=1)  # global reactive power, global intensity
    # Draw order matters (one generator): voltage, then global active power, then sub-metering.
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sub_metering_noise = rng.rand(n, 3)
    time_noise = np.zeros((n, 1))
    data = data + np.hstack([gap_noise, voltage_noise, sub_metering_noise, time_noise])
    rest, test = _split_off_last(data, path)
    train, val = _split_off_last(rest, path)
    return _standardise((train, val, test), np.vstack([train, val]), 0, path)


def _miniboone(paths):
    (path,) = paths
    data = _load_npy(path)
    rest, test = _split_off_last(data, path)
    train, val = _split_off_last(rest, path)
    return _standardise((train, val, test), np.vstack([train, val]), 0, path)


def _gas(paths):
    (path,) = paths
    pd = _import_optional("pandas", "gas")
    try:
        frame = pd.read_pickle(path)
    except Exception as err:  # any unpickling failure: name the file
        raise _bad_file(
            path, f"pandas {pd.__version__} could not read it ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(frame, pd.DataFrame):
        raise _bad_file(path, f"expected a pickled pandas DataFrame, got {type(frame).__name__}")
    absent = [c for c in _GAS_DROPPED if c not in frame.columns]
    if absent:
        raise _bad_file(path, f"expected columns {', '.join(_GAS_DROPPED)}; missing {absent}")
    frame = frame.drop(columns=list(_GAS_DROPPED))
    while True:  # drop the first column strongly correlated with another, until none is
        too_close = (frame.corr() > _GAS_MAX_CORRELATION).to_numpy().sum(axis=1)
        offenders = np.flatnonzero(too_close > 1)  # the diagonal counts once
        if offenders.size == 0:
            break
        frame = frame.drop(columns=frame.columns[offenders[0]])
    std = frame.std()
    if not bool((std > 0).all()):
        constant = [str(c) for c in frame.columns[~(std > 0).to_numpy()]]
        raise _bad_file(path, f"column(s) {', '.join(constant)} are constant; cannot normalise")
    data = ((frame - frame.mean()) / std).to_numpy(dtype=np.float64)
    rest, test = _split_off_last(data, path)
    train, val = _split_off_last(rest, path)
    return train, val, test


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """Header names and the numbers below them. Like ``pandas.read_csv(index_col=False)``,
    fields past the header's length are ignored."""
    with open(path, encoding="utf-8") as f:
        header = f.readline()
    names = [field.strip() for field in header.rstrip("\r\n").split(",")]
    if len(names) < 2:
        raise _bad_file(path, f"expected a comma-separated header line, got {header[:80]!r}")
    try:
        data = np.loadtxt(
            path,
            delimiter=",",
            skiprows=1,
            usecols=range(len(names)),
            ndmin=2,
            dtype=np.float64,
            comments=None,  # as pandas: no comment character
        )
    except ValueError as err:
        raise _bad_file(
            path, f"expected {len(names)} numeric columns per row, as in its header ({err})"
        ) from err
    return names, data


def _hepmass(paths):
    train_path, test_path = paths
    train_names, train = _read_csv(train_path)
    test_names, test = _read_csv(test_path)
    # Class-1 rows only; the label column goes, and the test file's extra last column too.
    train, train_names = train[train[:, 0] == 1, 1:], train_names[1:]
    test, test_names = test[test[:, 0] == 1, 1:-1], test_names[1:-1]
    for data, path in ((train, train_path), (test, test_path)):
        if data.shape[0] == 0:
            raise _bad_file(path, "has no rows of class 1 (first column == 1)")
    mean, std = _mean_std(train, 1, train_path, train_names)
    train = (train - mean) / std
    # The release drops the features whose smallest (normalised) training value occurs more
    # than 5 times: the discrete ones.
    kept = [j for j in range(train.shape[1]) if _count_of_min(train[:, j]) <= _HEPMASS_MAX_REPEATS]
    missing = [train_names[j] for j in kept if train_names[j] not in test_names]
    if missing:
        raise _bad_file(test_path, f"lacks the column(s) {', '.join(missing)} of {train_path.name}")
    test_columns = [test_names.index(train_names[j]) for j in kept]
    test = (test[:, test_columns] - mean[kept]) / std[kept]
    train, val = _split_off_last(train[:, kept], train_path)
    return train, val, test


def _count_of_min(column: np.ndarray) -> int:
    return int(np.count_nonzero(column == column.min()))


def _bsds300(paths):
    (path,) = paths
    h5py = _import_optional("h5py", "bsds300")
    splits = []
    try:
        with h5py.File(path, "r") as f:
            absent = [key for key in ("train", "validation", "test") if key not in f]
            if absent:
                raise _bad_file(
                    path, f"expected datasets train, validation, test; missing {absent}"
                )
            for key in ("train", "validation", "test"):
                data = np.asarray(f[key][()], dtype=np.float64)
                if data.ndim != 2:
                    raise _bad_file(path, f"dataset {key!r} must be 2-D, got shape {data.shape}")
                splits.append(data)
    except OSError as err:
        raise _bad_file(path, f"not a readable HDF5 file ({err})") from err
    return splits


_LOADERS = {
    "power": _power,
    "gas": _gas,
    "hepmass": _hepmass,
    "miniboone": _miniboone,
    "bsds300": _bsds300,
}


def load_tabular(name: str, root) -> TabularData:
    """Loads, preprocesses and splits a tabular benchmark as the MAF release does (see the
    module docstring for each dataset's steps).

    Args:
        name: one of :data:`TABULAR_DATASETS` (case-insensitive: ``"POWER"`` works).
        root: the MAF release's ``datasets`` folder (a ``str`` or ``os.PathLike``), holding the
            files listed in :data:`TABULAR_FILES`.

    Returns:
        :class:`TabularData` ``(train, val, test, n_dims)``: CPU float32 tensors of shape
        ``(N_split, n_dims)``.

    Raises:
        FileNotFoundError: ``root`` or one of the dataset's files is missing (the message lists
            the files expected under ``root``).
        ImportError: pandas (gas) or h5py (bsds300) is not installed.
        ValueError: a file is unreadable or does not have the release's layout.
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in _LOADERS:
        raise ValueError(
            f"unknown tabular dataset {name!r}; expected one of: {', '.join(TABULAR_DATASETS)}"
        )
    paths = _expected_files(key, root)
    splits = _LOADERS[key](paths)
    for split, part in zip(splits, ("train", "validation", "test")):
        if not np.isfinite(split).all():
            raise ValueError(
                f"{key}: the {part} split holds NaN or Inf after preprocessing; check the "
                f"files under {os.fspath(root)!r} ({', '.join(TABULAR_FILES[key])})"
            )
    n_dims = {split.shape[1] for split in splits}
    if len(n_dims) != 1:
        shapes = ", ".join(str(split.shape) for split in splits)
        raise ValueError(f"{key}: the splits disagree on the dimension: {shapes}")
    tensors = [torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)) for s in splits]
    return TabularData(*tensors, n_dims=n_dims.pop())
