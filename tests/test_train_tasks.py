"""The ``tabular`` and ``image`` training tasks (issue 6) on tiny synthetic files in the
datasets' own formats (nothing downloaded) and on scikit-learn's digits: end-to-end runs,
their metrics and figures, the evaluation's conventions, equal-size ImpFlow/ResFlow depths,
and the CLI's errors for missing data."""

import json
import math

import numpy as np
import pytest
import torch

from impflow.data import dequantize
from impflow.nn import ImplicitBlock, ResidualBlock
from impflow.train.cli import main
from impflow.train.evaluation import count_parameters
from impflow.train.image import ImageTask
from impflow.train.loop import TrainSettings, train
from impflow.train.tabular import TabularTask
from test_data_images import _write_cifar
from test_data_tabular import _write_power


def settings(out, **kw):
    kw.setdefault("progress", False)
    return TrainSettings(out=out, **kw)


def _write_miniboone(root, n=120, dims=5):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(n, dims))
    data[:, 1] += data[:, 0] ** 2  # some structure to fit
    (root / "miniboone").mkdir(parents=True)
    np.save(root / "miniboone" / "data.npy", data)


def tiny_tabular(root, model="implicit", **kw):
    kw.setdefault("blocks", 1)
    return TabularTask(
        "miniboone", root, model, hidden=(8,), batch_size=16, eval_batch_size=7, **kw
    )


def tiny_digits(model="implicit", **kw):
    kw.setdefault("blocks", (1, 1))
    kw.setdefault("eval_batch_size", 8)
    return ImageTask(
        "digits",
        model=model,
        hidden_channels=4,
        batch_size=8,
        eval_samples=16,
        figure_samples=4,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# tabular


def test_tabular_run_writes_finite_test_and_validation_nll(tmp_path):
    _write_miniboone(tmp_path / "data")
    out = tmp_path / "run"
    metrics = train(tiny_tabular(tmp_path / "data"), settings(out, steps=3, log_every=1))
    written = json.loads((out / "metrics.json").read_text())
    assert written["iterations"] == metrics["iterations"] == 3
    for key in ("test_nll", "val_nll"):
        assert math.isfinite(written[key])
    # the release's splits of 120 rows: 12 test, 10 validation
    assert (written["test_rows"], written["val_rows"], written["n_dims"]) == (12, 10, 5)
    assert written["eval_power_iterations"] == 200
    assert (out / "test_log_likelihood.png").stat().st_size > 1000
    assert (out / "checkpoint.pt").exists()
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "seconds", "loss", "bits", "solver_iters"]


def test_tabular_nll_is_the_mean_negative_log_likelihood_in_nats(tmp_path):
    # With the exact log-det the evaluation is deterministic: it must equal the plain mean of
    # -log p over the test rows (natural log), after the 200 power iterations it runs.
    _write_power(tmp_path)
    task = TabularTask(
        "POWER", tmp_path, "implicit", 2, hidden=(8,), logdet="exact", eval_batch_size=5
    )
    model = task.build_model()
    model.log_prob(task.data.train[:64])  # training-mode pass: initialises the ActNorms
    model.eval()
    metrics = task.evaluate(model)
    with torch.no_grad():
        expected_test = -model.log_prob(task.data.test).double().mean()
        expected_val = -model.log_prob(task.data.val).double().mean()
    assert metrics["test_nll"] == pytest.approx(float(expected_test), rel=1e-5)
    assert metrics["val_nll"] == pytest.approx(float(expected_val), rel=1e-5)
    assert metrics["n_dims"] == 6 and metrics["test_rows"] == len(task.data.test)


def test_tabular_series_evaluation_is_seeded(tmp_path):
    _write_miniboone(tmp_path)
    task = tiny_tabular(tmp_path)
    model = task.build_model()
    model.log_prob(task.data.train[:32])
    model.eval()
    first, second = task.evaluate(model), task.evaluate(model)
    assert first["test_nll"] == second["test_nll"] and math.isfinite(first["test_nll"])


def test_tabular_default_depths_have_equal_parameter_counts(tmp_path):
    _write_miniboone(tmp_path)
    implicit = tiny_tabular(tmp_path, "implicit", blocks=None)
    residual = tiny_tabular(tmp_path, "residual", blocks=None)
    assert (implicit.blocks, residual.blocks) == (5, 10)  # the paper's L = 5 vs L = 10
    a, b = implicit.build_model(), residual.build_model()
    assert sum(isinstance(m, ImplicitBlock) for m in a.modules()) == 5
    assert sum(isinstance(m, ResidualBlock) for m in b.modules()) == 10
    # the same networks; the ResFlow has 5 more ActNorms (2·5 parameters each)
    assert count_parameters(b) - count_parameters(a) == 5 * 2 * 5


# ---------------------------------------------------------------------------------------------
# image


def test_digits_run_writes_bits_per_dim_and_a_sample_grid_and_resumes(tmp_path):
    metrics = train(tiny_digits(), settings(tmp_path, steps=2, log_every=1))
    bpd = metrics["test_bits_per_dim"]
    # at most about log2(17) = 4.09 for a flow that has barely moved from its start
    assert math.isfinite(bpd) and 0 < bpd < 6
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test_bits_per_dim"] == bpd and written["n_bins"] == 17
    assert written["test_images"] == 16 and written["parameters"] > 0
    assert (tmp_path / "samples.png").stat().st_size > 1000
    # every buffer has its shape at construction, so a fresh model loads the checkpoint
    resumed = train(tiny_digits(), settings(tmp_path, steps=3, resume=True))
    assert resumed["iterations"] == 3


def test_digits_default_depths_have_equal_network_counts():
    implicit, residual = (
        ImageTask("digits", model="implicit"),
        ImageTask("digits", model="residual"),
    )
    assert (implicit.blocks, residual.blocks) == ((2, 2), (4, 4))
    a, b = implicit.build_model(), residual.build_model()
    n_a, n_b = count_parameters(a), count_parameters(b)
    # the same 8 networks; the ResFlow has 4 more ActNorms and no more than that
    assert 0 < n_b - n_a < 0.01 * n_a


def test_image_evaluation_is_bits_per_dim_with_the_logit_jacobian_and_the_bins():
    # test_bits_per_dim = mean over test images of -log p(x) / (64 ln 2) + log2(17), with x the
    # test digits dequantised once into [0, 1] and log p(x) = log N(z) + the logit log-det +
    # the blocks' log-dets (computed here piece by piece, with the same seeded draws).
    task = tiny_digits(eval_batch_size=16)  # one chunk: the same draws as below
    model = task.build_model()
    model.log_prob(task.sample_batch(torch.Generator().manual_seed(0)))  # initialise ActNorms
    model.eval()
    got = task.evaluate(model)["test_bits_per_dim"]
    x = dequantize(task.data.test[:16], 17, generator=task.eval_seed)
    logit, multiscale = model.transform[0], model.transform[1]
    torch.manual_seed(task.eval_seed)
    y, logdet_logit = logit(x)
    z, logdet_blocks = multiscale(y)
    log_prob = -0.5 * (z**2).sum(1) - 32 * math.log(2 * math.pi) + logdet_logit + logdet_blocks
    expected = (-log_prob.detach().double() / (64 * math.log(2)) + math.log2(17)).mean()
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_cifar10_run_on_tiny_python_batches(tmp_path):
    _write_cifar(tmp_path / "cifar", n_per_batch=4)
    task = ImageTask(
        "cifar10",
        tmp_path / "cifar",
        blocks=(1, 1, 1),
        hidden_channels=4,
        batch_size=4,
        eval_batch_size=4,
        figure_samples=2,
    )
    assert task.data.shape == (3, 32, 32) and task.data.n_bins == 256
    metrics = train(task, settings(tmp_path / "run", steps=1))
    assert math.isfinite(metrics["test_bits_per_dim"]) and metrics["test_bits_per_dim"] > 0
    assert metrics["test_images"] == 4
    assert (tmp_path / "run" / "samples.png").exists()


def test_image_levels_must_fit_the_image_size():
    with pytest.raises(ValueError, match="do not fit 5 levels"):
        tiny_digits(blocks=(1, 1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["tabular", "--data", "hepmass"], ["hepmass/1000_train.csv", "hepmass/1000_test.csv"]),
        (["tabular", "--data", "bsds300"], ["BSDS300/BSDS300.hdf5"]),
        (["image", "--data", "cifar10"], ["data_batch_1", "data_batch_5", "test_batch"]),
    ],
)
def test_cli_missing_data_names_the_files_expected(tmp_path, capsys, argv, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as err:
        main([*argv, "--root", str(empty), "--out", str(tmp_path / "out")])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message
    for name in expected:
        assert name in message
    assert not (tmp_path / "out").exists()  # nothing started


def test_cli_requires_root_for_tabular_and_cifar10(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["tabular", "--data", "power", "--out", str(tmp_path)])
    assert err.value.code == 2 and "--root" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["image", "--data", "cifar10", "--out", str(tmp_path)])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "--root" in message and "test_batch" in message


def test_cli_rejects_unknown_options_and_values(tmp_path, capsys):
    for argv in (
        ["image", "--out", str(tmp_path), "--bogus"],
        ["image", "--out", str(tmp_path), "--data", "mnist"],
        ["image", "--out", str(tmp_path), "--blocks", "2-x"],
        ["tabular", "--out", str(tmp_path), "--root", str(tmp_path), "--data", "nope"],
        ["tabular", "--out", str(tmp_path), "--root", str(tmp_path), "--data", "gas", "--x"],
    ):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_cli_tabular_run(tmp_path, capsys):
    _write_miniboone(tmp_path / "data")
    argv = ["tabular", "--data", "miniboone", "--root", str(tmp_path / "data")]
    argv += ["--out", str(tmp_path / "out"), "--steps", "2", "--blocks", "1", "--hidden", "8"]
    argv += ["--batch-size", "16", "--no-progress", "--eval-samples", "5"]
    assert main(argv) == 0
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["test_rows"] == written["val_rows"] == 5
    assert "test_nll=" in capsys.readouterr().out
