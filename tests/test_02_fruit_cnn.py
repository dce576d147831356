"""02_fruit_cnn: the study's first fruit CNN, end to end on synthetic data, and its errors."""

from __future__ import annotations

import json

import pytest

from tests.helpers import assert_one_line_error, run_chapter, run_script

SCRIPT = "02_fruit_cnn/train.py"
CLASSES = ("apple", "banana", "orange", "mixed")


def test_smoke_run_writes_metrics_model_and_plots(tmp_path):
    out = tmp_path / "run"
    metrics = run_chapter(SCRIPT, out, "--smoke", timeout=180)

    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    for name in CLASSES:
        assert 0.0 <= metrics[f"test_accuracy_{name}"] <= 1.0
    assert metrics["train_seconds"] > 0
    assert metrics["num_train"] == 32 and metrics["num_test"] == 12  # 8 / 3 per class
    for name in ("config.json", "model.keras", "curves.png", "confusion.png", "misclassified.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["smoke"] is True and config["seed"] == 0
    print(f"02 smoke wall time {metrics['_wall_seconds']:.1f}s")


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "ten"], "--epochs"),
    (["--image-size", "8"], "--image-size"),
    (["--no-such-flag"], "unrecognized"),
])
def test_bad_flag_is_one_line_and_exit_2(tmp_path, flags, words):
    result = run_script(SCRIPT, "--output-dir", str(tmp_path / "run"), *flags, check=False,
                        timeout=60)
    assert_one_line_error(result, words)
