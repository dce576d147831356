"""01_mnist/train.py, run as a user runs it: a subprocess per run (TensorFlow stays out of pytest)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from data import synthetic
from tests.helpers import run_chapter, run_script, script_env

SCRIPT = "01_mnist/train.py"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("mnist_smoke")
    return output_dir, run_chapter(SCRIPT, output_dir, "--smoke", timeout=180)


def test_smoke_run_writes_sane_metrics_plots_and_model(smoke_run):
    output_dir, metrics = smoke_run
    assert metrics["model"] == "mlp" and metrics["smoke"] is True
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and 0.0 <= metrics["val_accuracy"] <= 1.0
    assert metrics["test_accuracy"] > 0.3, "synthetic digits are learnable; chance is 0.1"
    assert metrics["test_loss"] > 0 and metrics["epochs"] >= 1 and metrics["train_seconds"] > 0
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"]
    assert metrics["num_train"] + metrics["num_val"] == 1000 and metrics["num_test"] == 200
    for name in ("config.json", "curves.png", "confusion.png", "wrong.png", "model.keras"):
        assert (output_dir / name).stat().st_size > 0, name
    assert json.loads((output_dir / "config.json").read_text())["seed"] == 0
    assert not list(output_dir.glob(".*.tmp*")), "a temporary file was left behind"


def test_eval_only_round_trip_reproduces_the_smoke_metrics(smoke_run, tmp_path):
    output_dir, trained = smoke_run
    metrics = run_chapter(SCRIPT, tmp_path / "eval", "--smoke", "--eval-only",
                          "--model-path", str(output_dir / "model.keras"), timeout=120)
    assert metrics["eval_only"] is True and "train_seconds" not in metrics
    assert metrics["test_accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-9)
    assert metrics["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-4)
    assert metrics["val_accuracy"] == pytest.approx(trained["val_accuracy"], abs=1e-9)
    assert (tmp_path / "eval" / "confusion.png").is_file()
    assert not (tmp_path / "eval" / "model.keras").exists()


def test_tuning_run_skips_the_test_set(tmp_path):
    metrics = run_chapter(SCRIPT, tmp_path, "--smoke", "--no-evaluate-test", timeout=120)
    assert "val_accuracy" in metrics and not any(key.startswith("test_") for key in metrics)
    assert not (tmp_path / "confusion.png").exists() and (tmp_path / "model.keras").is_file()


def test_cnn_smoke_run(tmp_path):
    metrics = run_chapter(SCRIPT, tmp_path, "--smoke", "--model", "cnn", timeout=180)
    assert metrics["model"] == "cnn" and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (tmp_path / "model.keras").is_file()


def _assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_corrupt_idx_file_is_one_clear_line(tmp_path):
    folder = synthetic.write_mnist(tmp_path / "data", num_train=50, num_test=20)
    images = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a truncated download
    result = run_script(SCRIPT, "--data-dir", str(tmp_path / "data"), "--output-dir",
                        str(tmp_path / "out"), check=False, timeout=60,
                        env=script_env(DLSTUDY_MIRROR=str(tmp_path / "no_mirror")))
    _assert_one_line_error(result, "train-images-idx3-ubyte.gz")


@pytest.mark.parametrize(("args", "fragment"), [
    (("--learning-rate", "-0.1"), "--learning-rate"),
    (("--model", "resnet"), "--model"),
    (("--num-epochs", "zero"), "--num-epochs"),
])
def test_bad_flag_values_exit_2_with_one_line(tmp_path, args, fragment):
    result = run_script(SCRIPT, "--smoke", "--output-dir", str(tmp_path), *args,
                        check=False, timeout=60)
    _assert_one_line_error(result, fragment)
    assert not (tmp_path / "metrics.json").exists()


def test_missing_model_path_exits_2(tmp_path):
    missing = tmp_path / "nope.keras"
    result = run_script(SCRIPT, "--smoke", "--eval-only", "--model-path", str(missing),
                        "--output-dir", str(tmp_path / "out"), check=False, timeout=120)
    _assert_one_line_error(result, "nope.keras")


def test_eval_only_rejects_junk_and_non_mnist_models(tmp_path):
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    result = run_script(SCRIPT, "--smoke", "--eval-only", "--model-path", str(junk),
                        "--output-dir", str(tmp_path / "out"), check=False, timeout=120)
    _assert_one_line_error(result, "junk.keras", "not a .keras model archive")
    # A real .keras file, but for 48x48 colour photos and 4 classes (like chapter 2's).
    other = tmp_path / "fruit.keras"
    subprocess.run([sys.executable, "-c",
                    "import sys, keras; m = keras.Sequential([keras.Input((48, 48, 3)), keras.layers.Flatten(), "
                    "keras.layers.Dense(4)]); m.save(sys.argv[1])", str(other)],
                   check=True, capture_output=True, env=script_env(), timeout=120)
    result = run_script(SCRIPT, "--smoke", "--eval-only", "--model-path", str(other),
                        "--output-dir", str(tmp_path / "out2"), check=False, timeout=120)
    _assert_one_line_error(result, "fruit.keras", "is not an MNIST model")


@pytest.mark.real_data
@pytest.mark.slow
def test_default_mlp_reaches_98_2_percent_on_real_mnist(shared_datasets, tmp_path):
    env = script_env(DLSTUDY_MIRROR=str(shared_datasets))
    metrics = run_chapter(SCRIPT, tmp_path / "out", "--data-dir", str(tmp_path / "data"),
                          timeout=900, env=env)
    assert metrics["num_test"] == 10_000 and abs(metrics["num_val"] - 5000) <= 5
    assert metrics["test_accuracy"] >= 0.982, metrics
