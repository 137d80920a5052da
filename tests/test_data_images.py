"""Image data: scikit-learn digits, CIFAR-10 from tiny synthetic python batches (nothing
downloaded), dequantisation and bits per dimension."""

import math
import pickle
import sys

import numpy as np
import pytest
import torch

import impflow
from impflow.data import CIFAR10_FILES, dequantize, images, load_cifar10, load_digits, load_images


def _write_cifar(folder, n_per_batch=4, protocol=2, bytes_keys=True):
    """Six batch files shaped like CIFAR-10's python version: pickled dicts with 'data'
    (N, 3072) uint8 in R, G, B planes and 'labels'. Image i of batch b has red = 10·b + i,
    green = 100, blue = 200 + i, and label (b + i) % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    for b, name in enumerate(CIFAR10_FILES):
        i = np.arange(n_per_batch)
        data = np.empty((n_per_batch, 3, 1024), dtype=np.uint8)
        data[:, 0] = (10 * b + i)[:, None]
        data[:, 1] = 100
        data[:, 2] = (200 + i)[:, None]
        batch = {
            "batch_label": f"batch {b}",
            "labels": [int(v) for v in (b + i) % 10],
            "data": data.reshape(n_per_batch, 3072),
            "filenames": [f"img{b}_{k}.png" for k in i],
        }
        if bytes_keys:  # as Python 2's cPickle wrote them
            batch = {k.encode(): v for k, v in batch.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize(
    "module,numpy_major,expected",
    [
        ("numpy.core.multiarray", 2, "numpy._core.multiarray"),  # CIFAR-10's pickles, numpy 2
        ("numpy.core.multiarray", 1, "numpy.core.multiarray"),
        ("numpy._core.numeric", 1, "numpy.core.numeric"),  # written by numpy 2, read by 1
        ("numpy._core.numeric", 2, "numpy._core.numeric"),
        ("numpy.core_extra", 2, "numpy.core_extra"),
        ("numpy", 2, "numpy"),
    ],
)
def test_pickled_numpy_modules_are_renamed_for_the_installed_numpy(module, numpy_major, expected):
    # With numpy 1.26 every CIFAR-10 batch failed to load ("No module named
    # 'numpy._core.numeric'"): 1.26 has a partial numpy._core, which was taken for numpy 2's.
    assert images._numpy_module_here(module, numpy_major) == expected


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (pickle.HIGHEST_PROTOCOL, False)])
def test_cifar10_reads_the_python_batches(tmp_path, protocol, bytes_keys):
    _write_cifar(tmp_path, protocol=protocol, bytes_keys=bytes_keys)
    data = load_cifar10(tmp_path)
    assert data.train.shape == (20, 3, 32, 32) and data.test.shape == (4, 3, 32, 32)
    assert data.train.dtype == data.test.dtype == torch.uint8
    assert data.n_bins == 256 and data.shape == (3, 32, 32)
    # batches 1..5 in order, channels as R, G, B planes of each row
    for b in range(5):
        for i in range(4):
            image = data.train[4 * b + i]
            assert (image[0] == 10 * b + i).all() and (image[1] == 100).all()
            assert (image[2] == 200 + i).all()
            assert data.train_labels[4 * b + i] == (b + i) % 10
    assert (data.test[:, 0, 0, 0] == torch.tensor([50, 51, 52, 53], dtype=torch.uint8)).all()
    assert data.test_labels.tolist() == [(5 + i) % 10 for i in range(4)]


def test_cifar10_finds_the_cifar_10_batches_py_subfolder(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert load_images("cifar10", tmp_path).train.shape == (20, 3, 32, 32)


def test_cifar10_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1, .*test_batch"):
        load_cifar10(tmp_path / "nowhere")
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3, test_batch under"):
        load_cifar10(tmp_path)


def test_cifar10_refuses_bad_batches_without_running_them(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Evil:  # unpickling it would call open(marker, "w")
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2: not a readable .*refusing to load"):
        load_cifar10(tmp_path)
    assert not marker.exists()
    (tmp_path / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="data_batch_2: not a readable CIFAR-10 python batch"):
        load_cifar10(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"'data' must be uint8 of shape \(N, 3072\)"):
        load_cifar10(tmp_path)


def test_digits_as_seventeen_levels():
    data = load_digits()
    assert data.n_bins == 17 and data.shape == (1, 8, 8)
    assert data.train.dtype == torch.uint8
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 359
    assert int(data.train.max()) == 16 and int(data.train.min()) == 0
    # a fixed split: the same every call, and the two parts are disjoint images
    again = load_digits()
    assert torch.equal(data.train, again.train) and torch.equal(data.test, again.test)
    from sklearn.datasets import load_digits as sklearn_digits

    images = torch.from_numpy(sklearn_digits().images.astype(np.uint8))
    assert torch.equal(
        torch.cat([data.train, data.test]).flatten(1).sort(0).values,
        images.flatten(1).sort(0).values,
    )
    assert not torch.equal(load_digits(seed=1).test, data.test)


def test_digits_needs_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="digits dataset needs scikit-learn"):
        load_digits()


def test_dequantize_fills_each_bin_uniformly():
    levels = torch.arange(17, dtype=torch.uint8).repeat(2000)
    x = dequantize(levels, 17, generator=0)
    assert x.dtype == torch.float32 and (x >= 0).all() and (x < 1).all()
    # each value lies in its own bin [k/17, (k+1)/17), where it is uniform (mean at the centre)
    assert torch.equal(torch.floor(x.double() * 17).long(), levels.long())
    within = (x.double() * 17 - levels.double()).view(2000, 17)
    assert (within.mean(0) - 0.5).abs().max() < 5 * math.sqrt(1 / 12 / 2000)
    assert torch.equal(x, dequantize(levels, 17, generator=0))
    assert not torch.equal(x, dequantize(levels, 17, generator=1))
    # the top level never rounds up to 1.0 (in float16, (255 + u)/256 does for u > 0.94)
    top = torch.full((10000,), 255, dtype=torch.uint8)
    assert dequantize(top, 256, generator=3, dtype=torch.float16).max() < 1


def test_dequantize_bad_input():
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 16\]"):
        dequantize(torch.tensor([17]), 17)
    with pytest.raises(TypeError, match="integer tensor"):
        dequantize(torch.rand(3), 17)
    with pytest.raises(ValueError, match="n_bins"):
        dequantize(torch.tensor([0]), 1)


def test_bits_per_dim_uses_the_flow_convention(tmp_path):
    _write_cifar(tmp_path)
    cifar, digits = load_cifar10(tmp_path), load_digits()
    log_prob = torch.tensor([-3000.0, 100.0])
    assert torch.equal(cifar.bits_per_dim(log_prob), impflow.bits_per_dim(log_prob, 3072, 256))
    # a uniform density on [0, 1)^D has log p = 0: exactly log2(n_bins) bits per dimension,
    # the entropy of uniform levels
    zero = torch.zeros(1)
    assert cifar.bits_per_dim(zero).item() == pytest.approx(8.0)
    assert digits.bits_per_dim(zero).item() == pytest.approx(math.log2(17))
    expected = -100.0 / (64 * math.log(2)) + math.log2(17)
    assert digits.bits_per_dim(torch.tensor(100.0)).item() == pytest.approx(expected)


def test_unknown_image_dataset():
    with pytest.raises(ValueError, match="digits, cifar10"):
        load_images("mnist")
    with pytest.raises(ValueError, match="cifar10 needs root"):
        load_images("cifar10")
