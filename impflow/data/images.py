r"""Image data for flows: scikit-learn's 8×8 digits and CIFAR-10, as integer levels, with
uniform dequantisation and the bits-per-dimension convention.

**Convention.** An image dataset holds integer levels ``k ∈ {0, …, n_bins - 1}`` (uint8,
``(N, C, H, W)``). A flow models the density of the dequantised ``x = (k + u) / n_bins``,
``u ~ U[0, 1)`` per element (:func:`dequantize`), which lies in ``[0, 1)``; put an
:class:`impflow.nn.LogitTransform` first in the flow to map it to the real line (its log-det
is part of the flow's ``log_prob``). Bits per dimension is then
``-log p(x) / (D ln 2) + log₂ n_bins`` with ``D = C·H·W``, an upper bound on the discrete
data's negative log-likelihood per pixel value (:func:`impflow.bits_per_dim`, which
:meth:`ImageData.bits_per_dim` calls).

- **digits** (scikit-learn's ``load_digits``: 1797 grey 8×8 images with values 0…16): kept as
  17 levels, ``n_bins = 17``, shape ``(N, 1, 8, 8)``; a fixed seeded 80/20 split. Small enough
  to train on a CPU.
- **cifar10**: the standard python version (``data_batch_1`` … ``data_batch_5``,
  ``test_batch``, pickled dicts with ``data`` of shape ``(10000, 3072)`` in R, G, B planes),
  ``n_bins = 256``, shape ``(N, 3, 32, 32)``; 50000 training and 10000 test images. The batches
  are unpickled by a restricted unpickler that only rebuilds numpy arrays and plain Python
  values, so a tampered file cannot run code.

References:
    | Density estimation using Real NVP (Dinh, Sohl-Dickstein & Bengio, 2017)
    | https://arxiv.org/abs/1605.08803 (dequantisation, logit transform, bits/dim)

    | Implicit Normalizing Flows (Lu et al., 2021), §5.3 https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from impflow.data._random import as_generator
from impflow.flow import bits_per_dim as _bits_per_dim

__all__ = [
    "CIFAR10_FILES",
    "IMAGE_DATASETS",
    "ImageData",
    "dequantize",
    "load_cifar10",
    "load_digits",
    "load_images",
]

IMAGE_DATASETS = ("digits", "cifar10")

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
"""The files of CIFAR-10's python version (the folder ``cifar-10-batches-py``)."""

_CIFAR_SHAPE = (3, 32, 32)
_DIGITS_LEVELS = 17


class ImageData(NamedTuple):
    """An image dataset as integer levels.

    Attributes:
        train, test: uint8 tensors ``(N, C, H, W)`` with values in ``[0, n_bins)``.
        n_bins: the number of levels per pixel value.
        train_labels, test_labels: int64 class labels ``(N,)``.
    """

    train: Tensor
    test: Tensor
    n_bins: int
    train_labels: Tensor
    test_labels: Tensor

    @property
    def shape(self) -> torch.Size:
        """Per-image shape ``(C, H, W)``."""
        return self.train.shape[1:]

    def bits_per_dim(self, log_prob: Tensor) -> Tensor:
        """Bits per dimension of dequantised images of this dataset with log-density
        ``log_prob`` (any shape): :func:`impflow.bits_per_dim` with ``n_dims = C·H·W`` and
        this dataset's ``n_bins``."""
        return _bits_per_dim(log_prob, math.prod(self.shape), self.n_bins)


def dequantize(levels: Tensor, n_bins: int, *, generator=None, dtype=torch.float32) -> Tensor:
    """Uniform dequantisation ``x = (k + u) / n_bins``, ``u ~ U[0, 1)`` elementwise.

    Args:
        levels: integer levels ``k`` in ``[0, n_bins)``, any shape and integer dtype (e.g. an
            :class:`ImageData` split or a batch of it).
        n_bins: the number of levels, ``>= 2``.
        generator: a ``torch.Generator`` on ``levels``' device, an int seed (CPU tensors), or
            None (torch's default generator of that device).
        dtype: floating dtype of the result.

    Returns:
        ``x`` of ``levels``' shape and device, with values in ``[0, 1)``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    if not isinstance(levels, Tensor) or levels.is_floating_point() or levels.is_complex():
        what = f"a {levels.dtype} tensor" if isinstance(levels, Tensor) else type(levels).__name__
        raise TypeError(f"levels must be an integer tensor (e.g. uint8 pixels), got {what}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) >= n_bins):
        raise ValueError(
            f"levels must lie in [0, {n_bins - 1}] for n_bins={n_bins}, got values in "
            f"[{int(levels.min())}, {int(levels.max())}]"
        )
    if isinstance(generator, torch.Generator):
        if generator.device.type != levels.device.type:
            raise ValueError(
                f"generator is on {generator.device} but levels are on {levels.device}"
            )
        gen = generator
    else:
        gen = as_generator(generator)
        if gen is not None and levels.device.type != "cpu":
            raise ValueError("an int seed works for CPU levels only; pass a torch.Generator")
    noise = torch.rand(levels.shape, generator=gen, dtype=dtype, device=levels.device)
    x = (levels.to(dtype) + noise) / n_bins
    # In float32, (n_bins - 1 + u) / n_bins can round up to exactly 1.0: keep x below 1.
    return x.clamp(max=1 - torch.finfo(dtype).eps / 2)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8×8 digits (1797 images, values 0…16) as 17 levels, ``(N, 1, 8, 8)``.

    Args:
        test_fraction: share of the images held out for test, in ``(0, 1)``.
        seed: seed of the permutation that splits train and test (fixed: the same split every
            time).

    Returns:
        :class:`ImageData` with ``n_bins = 17``.
    """
    if not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError as err:
        raise ImportError(
            "the digits dataset needs scikit-learn, which is not installed: "
            "pip install scikit-learn  (or pip install 'impflow[train]')"
        ) from err
    bunch = datasets.load_digits()
    images = np.asarray(bunch.images)
    if images.min() < 0 or images.max() >= _DIGITS_LEVELS or not np.all(images == np.round(images)):
        raise ValueError("scikit-learn's digits are expected to be integers in [0, 16]")
    levels = torch.from_numpy(images.astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(levels.shape[0], generator=as_generator(seed, "seed"))
    n_test = max(1, int(round(test_fraction * levels.shape[0])))
    test, train = order[:n_test], order[n_test:]
    return ImageData(levels[train], levels[test], _DIGITS_LEVELS, labels[train], labels[test])


# ---------------------------------------------------------------------------------------------
# CIFAR-10, python version

# What a CIFAR batch pickle may rebuild: numpy arrays and dtypes (under numpy 1's and numpy 2's
# module names) and bytes as Python 3 writes them at protocol 2. Nothing else is importable.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                "lists, bytes and strings"
            )
        return getattr(importlib.import_module(_numpy_module_here(module)), name)


def _numpy_module_here(module: str, numpy_major: int | None = None) -> str:
    """``module`` as the installed numpy names it: numpy 2 moved ``numpy.core`` to
    ``numpy._core`` (the old name only warns), and numpy 1 has no ``numpy._core.numeric`` (1.26
    has a partial ``numpy._core``, so its presence does not tell). Pickles name the one of the
    numpy that wrote them: CIFAR-10's own, numpy 1's."""
    if numpy_major is None:
        numpy_major = int(np.__version__.split(".")[0])
    old, new = "numpy.core", "numpy._core"
    if numpy_major >= 2 and (module == old or module.startswith(old + ".")):
        return new + module[len(old) :]
    if numpy_major < 2 and (module == new or module.startswith(new + ".")):
        return old + module[len(new) :]
    return module


def _cifar_folder(root) -> Path:
    root = Path(os.fspath(root)).expanduser()
    listing = ", ".join(CIFAR10_FILES)
    if not root.is_dir():
        raise FileNotFoundError(
            f"cifar10: the folder {str(root)!r} does not exist; expected the python version of "
            f"CIFAR-10 (cifar-10-batches-py), holding {listing}"
        )
    for folder in (root, root / "cifar-10-batches-py"):
        if all((folder / f).is_file() for f in CIFAR10_FILES):
            return folder
    missing = [f for f in CIFAR10_FILES if not (root / f).is_file()]
    raise FileNotFoundError(
        f"cifar10: missing {', '.join(missing)} under {str(root)!r}; expected the python version "
        f"of CIFAR-10 (cifar-10-batches-py), holding {listing}"
    )


def _entry(batch: dict, key: str, path: Path):
    for k in (key.encode(), key):  # Python 2 pickles give bytes keys
        if k in batch:
            return batch[k]
    raise ValueError(f"{path}: a CIFAR-10 batch must have a {key!r} entry; has {list(batch)}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: a CIFAR-10 batch is a pickled dict, got {type(batch).__name__}")
    data = np.asarray(_entry(batch, "data", path))
    labels = np.asarray(_entry(batch, "labels", path))
    n_values = math.prod(_CIFAR_SHAPE)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != n_values:
        raise ValueError(
            f"{path}: 'data' must be uint8 of shape (N, {n_values}), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: 'labels' must hold one label per image ({data.shape[0]}), got shape "
            f"{labels.shape}"
        )
    return data.reshape(-1, *_CIFAR_SHAPE), labels.astype(np.int64)


def load_cifar10(root) -> ImageData:
    """CIFAR-10 from its python version in ``root`` (or ``root/cifar-10-batches-py``).

    Args:
        root: the folder holding ``data_batch_1`` … ``data_batch_5`` and ``test_batch``.

    Returns:
        :class:`ImageData` with uint8 ``train`` ``(50000, 3, 32, 32)`` (batches 1…5 in order),
        ``test`` ``(10000, 3, 32, 32)``, ``n_bins = 256``.

    Raises:
        FileNotFoundError: ``root`` or one of the six files is missing (all are named).
        ValueError: a file is not a CIFAR-10 python batch.
    """
    folder = _cifar_folder(root)
    parts = [_read_cifar_batch(folder / name) for name in CIFAR10_FILES]
    train = np.concatenate([images for images, _ in parts[:-1]])
    train_labels = np.concatenate([labels for _, labels in parts[:-1]])
    test, test_labels = parts[-1]
    return ImageData(
        torch.from_numpy(train),
        torch.from_numpy(np.ascontiguousarray(test)),
        256,
        torch.from_numpy(train_labels),
        torch.from_numpy(test_labels),
    )


def load_images(name: str, root=None) -> ImageData:
    """``load_digits()`` for ``"digits"``, ``load_cifar10(root)`` for ``"cifar10"``."""
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        if root is None:
            raise ValueError("cifar10 needs root: the folder holding the python version's files")
        return load_cifar10(root)
    raise ValueError(
        f"unknown image dataset {name!r}; expected one of: {', '.join(IMAGE_DATASETS)}"
    )
