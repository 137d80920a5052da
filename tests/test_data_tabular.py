"""Tabular loaders on tiny synthetic files in the MAF release's formats (nothing downloaded):
split sizes and order, the release's feature dropping, noise and normalisation, and errors."""

import sys

import h5py  # test dependencies (scripts/setup_env.sh installs them): fail, never skip
import numpy as np
import pandas as pd
import pytest
import torch

from impflow.data import TABULAR_DATASETS, TABULAR_FILES, load_tabular


def _sizes(n):
    """The release's split sizes: test = ⌊0.1 N⌋, validation = ⌊0.1 (N - test)⌋."""
    n_test = int(0.1 * n)
    n_val = int(0.1 * (n - n_test))
    return n - n_test - n_val, n_val, n_test


def _check_split(data, n, n_dims):
    assert (data.train.shape[0], data.val.shape[0], data.test.shape[0]) == _sizes(n)
    for split in (data.train, data.val, data.test):
        assert split.dtype == torch.float32 and split.shape[1] == n_dims == data.n_dims
        assert torch.isfinite(split).all()


def _assert_standardised(x, ddof):
    x = x.double()
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-6)
    std = x.std(0, correction=ddof)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# POWER


def _write_power(root, n=200):
    rng = np.random.default_rng(0)
    data = np.column_stack(
        [
            rng.uniform(0.1, 5, n),  # global active power
            rng.uniform(0, 0.5, n),  # global reactive power (dropped)
            rng.uniform(230, 250, n),  # voltage
            rng.uniform(0, 20, n),  # global intensity (dropped)
            rng.integers(0, 40, (n, 3)),  # sub-metering, integer watt-hours
            np.arange(n, dtype=np.float64),  # "time", here the row id (it gets no noise)
        ]
    )
    (root / "power").mkdir(parents=True)
    np.save(root / "power" / "data.npy", data)
    return data


def _power_as_released(data):
    """The MAF release's POWER preprocessing, step by step as its power.py describes it."""
    rng = np.random.RandomState(42)
    data = data.copy()
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, np.zeros((n, 1))))
    n_test = int(0.1 * n)
    test, data = data[-n_test:], data[:-n_test]
    n_val = int(0.1 * data.shape[0])
    val, train = data[-n_val:], data[:-n_val]
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return [(x - mu) / s for x in (train, val, test)]


def test_power_matches_the_release_preprocessing(tmp_path):
    raw = _write_power(tmp_path)
    data = load_tabular("POWER", tmp_path)
    _check_split(data, 200, 6)
    _assert_standardised(torch.cat([data.train, data.val]), ddof=0)
    for got, want in zip(data, _power_as_released(raw)):
        assert torch.allclose(got.double(), torch.from_numpy(want), atol=1e-6)
    # The rows are in the order of the release's seeded shuffle: read it off the time column
    # (no noise there), which holds the row ids 0..N-1 up to an affine map.
    t = torch.cat([data.train, data.val, data.test])[:, -1].double()
    ids = ((t - t.min()) / (t.max() - t.min()) * (len(t) - 1)).round().long()
    assert torch.equal(ids, torch.from_numpy(np.random.RandomState(42).permutation(200)))


def test_power_refuses_a_file_with_other_columns(tmp_path):
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", np.zeros((50, 7)))
    with pytest.raises(ValueError, match=r"data.npy: expected a 2-D array of shape \(N, 8\)"):
        load_tabular("power", tmp_path)
    (tmp_path / "power" / "data.npy").write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_tabular("power", tmp_path)


# ---------------------------------------------------------------------------------------------
# GAS


def _write_gas(root, n=300):
    rng = np.random.default_rng(1)
    a, b, c = rng.normal(size=(3, n))
    frame = pd.DataFrame(
        {
            "Time": np.arange(n, dtype=np.float64),
            "Meth": rng.uniform(size=n),
            "Eth": rng.uniform(size=n),
            "s1": a,
            "s2": 2 * a + 0.01 * rng.normal(size=n),  # corr(s1, s2) > 0.98: s1 goes
            "s3": b,
            "s4": b - 0.05 * rng.normal(size=n),  # corr(s3, s4) > 0.98: s3 goes
            "s5": c + 0.5 * a,  # corr ≈ 0.45 with s2: stays
        }
    )
    (root / "gas").mkdir(parents=True)
    frame.to_pickle(root / "gas" / "ethylene_CO.pickle")
    return frame


def test_gas_drops_correlated_columns_and_normalises_the_whole_table(tmp_path):
    frame = _write_gas(tmp_path)
    data = load_tabular("gas", tmp_path)
    _check_split(data, 300, 3)
    everything = torch.cat([data.train, data.val, data.test])  # no shuffle: the table's order
    _assert_standardised(everything, ddof=1)  # pandas' std
    kept = frame[["s2", "s4", "s5"]].to_numpy()
    want = (kept - kept.mean(0)) / kept.std(0, ddof=1)
    assert torch.allclose(everything.double(), torch.from_numpy(want), atol=1e-6)


def test_gas_needs_pandas(tmp_path, monkeypatch):
    _write_gas(tmp_path)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match="gas needs the pandas package"):
        load_tabular("gas", tmp_path)


# ---------------------------------------------------------------------------------------------
# HEPMASS


def _hepmass_rows(rng, n, repeats_of_min):
    """n rows: label (alternating 1, 0), then f0..f4. f1 is discrete (removed); f3's smallest
    value occurs `repeats_of_min` times among the class-1 rows."""
    label = (np.arange(n) % 2 == 0).astype(np.float64)
    features = rng.normal(size=(n, 5))
    features[:, 1] = rng.integers(0, 3, n)
    positives = np.flatnonzero(label == 1)
    features[positives[:repeats_of_min], 3] = -10.0
    return np.column_stack([label, features])


def _write_csv(path, names, rows, extra_field=False):
    lines = [",".join(names)]
    for row in rows:
        fields = [repr(float(v)) for v in row] + (["0.5"] if extra_field else [])
        lines.append(",".join(fields))
    path.write_text("\n".join(lines) + "\n")


def _write_hepmass(root, repeats_of_min=5, test_names=None):
    rng = np.random.default_rng(2)
    train = _hepmass_rows(rng, 240, repeats_of_min)
    test = _hepmass_rows(rng, 80, 0)
    test = np.column_stack([test, np.full(len(test), 1000.0)])  # the test file's extra column
    names = ["# label"] + [f"f{i}" for i in range(5)]
    (root / "hepmass").mkdir(parents=True, exist_ok=True)
    _write_csv(root / "hepmass" / "1000_train.csv", names, train)
    _write_csv(root / "hepmass" / "1000_test.csv", test_names or names + ["mass"], test)
    return train, test


@pytest.mark.parametrize("repeats_of_min", [5, 6])
def test_hepmass_keeps_class_one_drops_discrete_features_and_normalises(tmp_path, repeats_of_min):
    train_raw, test_raw = _write_hepmass(tmp_path, repeats_of_min)
    data = load_tabular("hepmass", tmp_path)
    # f1 always goes; f3 goes when its minimum repeats more than 5 times
    kept = [0, 2, 3, 4] if repeats_of_min <= 5 else [0, 2, 4]
    positives = train_raw[train_raw[:, 0] == 1, 1:]
    n = positives.shape[0]
    n_val = int(0.1 * n)
    assert (data.train.shape[0], data.val.shape[0]) == (n - n_val, n_val)
    assert data.n_dims == len(kept) and data.test.shape == (40, len(kept))
    _assert_standardised(torch.cat([data.train, data.val]), ddof=1)
    mu, s = positives.mean(0)[kept], positives.std(0, ddof=1)[kept]
    want_test = (test_raw[test_raw[:, 0] == 1][:, 1:-1][:, kept] - mu) / s
    assert torch.allclose(data.test.double(), torch.from_numpy(want_test), atol=1e-6)
    want_val = (positives[-n_val:, kept] - mu) / s
    assert torch.allclose(data.val.double(), torch.from_numpy(want_val), atol=1e-6)


def test_hepmass_matches_test_columns_by_name(tmp_path):
    _write_hepmass(tmp_path / "a")
    train_raw, test_raw = _write_hepmass(tmp_path / "b")
    # the same test file with f0 and f2 swapped (values and names): same result
    names = ["# label", "f2", "f1", "f0", "f3", "f4", "mass"]
    swapped = test_raw[:, [0, 3, 2, 1, 4, 5, 6]]
    _write_csv(tmp_path / "b" / "hepmass" / "1000_test.csv", names, swapped)
    a, b = load_tabular("hepmass", tmp_path / "a"), load_tabular("hepmass", tmp_path / "b")
    assert torch.equal(a.test, b.test) and torch.equal(a.train, b.train)
    # a kept feature missing from the test file is named
    _write_csv(tmp_path / "b" / "hepmass" / "1000_test.csv", names[:3] + names[4:], swapped)
    with pytest.raises(ValueError, match="1000_test.csv: lacks the column.* f0 of 1000_train.csv"):
        load_tabular("hepmass", tmp_path / "b")


@pytest.mark.filterwarnings("ignore:Length of header")  # pandas' note on the extra field
def test_hepmass_ignores_fields_beyond_the_header_like_pandas(tmp_path):
    _write_hepmass(tmp_path / "a")
    train_raw, test_raw = _write_hepmass(tmp_path / "b")
    names = ["# label"] + [f"f{i}" for i in range(5)]
    _write_csv(tmp_path / "b" / "hepmass" / "1000_train.csv", names, train_raw, extra_field=True)
    a, b = load_tabular("hepmass", tmp_path / "a"), load_tabular("hepmass", tmp_path / "b")
    assert torch.equal(a.train, b.train)
    # pandas with index_col=False reads the same numbers (with its exact float parser: the
    # default one of pandas 1-2 can be off by an ulp; pandas 3 parses exactly by default and
    # deprecates the argument)
    path = tmp_path / "b" / "hepmass" / "1000_train.csv"
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    frame = pd.read_csv(path, index_col=False, **exact)
    assert np.array_equal(frame.to_numpy(), train_raw)


# ---------------------------------------------------------------------------------------------
# MINIBOONE and BSDS300


def test_miniboone_splits_in_order_and_normalises_by_train_and_val(tmp_path):
    raw = np.random.default_rng(3).normal(size=(150, 5)) * [1, 2, 3, 4, 5] + [0, 1, 2, 3, 4]
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    data = load_tabular("miniboone", tmp_path)
    _check_split(data, 150, 5)
    _assert_standardised(torch.cat([data.train, data.val]), ddof=0)
    n_train, n_val, n_test = _sizes(150)
    mu, s = raw[: n_train + n_val].mean(0), raw[: n_train + n_val].std(0)
    got = torch.cat([data.train, data.val, data.test]).double()
    assert torch.allclose(got, torch.from_numpy((raw - mu) / s), atol=1e-6)


def test_bsds300_reads_the_three_stored_splits(tmp_path):
    rng = np.random.default_rng(4)
    splits = {"train": (50, 63), "validation": (10, 63), "test": (20, 63)}
    stored = {key: rng.uniform(-0.5, 0.5, shape) for key, shape in splits.items()}
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for key, values in stored.items():
            f[key] = values
    data = load_tabular("bsds300", tmp_path)
    assert data.n_dims == 63
    for got, key in zip(data, ("train", "validation", "test")):
        assert torch.equal(got, torch.from_numpy(stored[key].astype(np.float32)))
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        f["train"] = stored["train"]
        f["test"] = stored["test"]
    with pytest.raises(ValueError, match=r"missing \['validation'\]"):
        load_tabular("bsds300", tmp_path)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", TABULAR_DATASETS)
def test_missing_files_are_named(tmp_path, name):
    with pytest.raises(FileNotFoundError) as missing_root:
        load_tabular(name, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as missing_file:
        load_tabular(name, tmp_path)
    for err in (missing_root, missing_file):
        for rel in TABULAR_FILES[name]:
            assert rel in str(err.value)


def test_one_missing_hepmass_file_is_named(tmp_path):
    _write_hepmass(tmp_path)
    (tmp_path / "hepmass" / "1000_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="missing hepmass/1000_test.csv under"):
        load_tabular("hepmass", tmp_path)


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="power, gas, hepmass, miniboone, bsds300"):
        load_tabular("mnist", tmp_path)


def test_nan_in_a_file_is_reported(tmp_path):
    raw = np.random.default_rng(0).normal(size=(50, 3))
    raw[45, 1] = np.nan  # lands in the test split, which the statistics never see
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    with pytest.raises(ValueError, match="miniboone: the test split holds NaN or Inf"):
        load_tabular("miniboone", tmp_path)


def test_too_few_rows_to_split(tmp_path):
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", np.random.default_rng(0).normal(size=(9, 3)))
    with pytest.raises(ValueError, match="at least 10 rows"):
        load_tabular("miniboone", tmp_path)
