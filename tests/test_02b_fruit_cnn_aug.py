"""02b_fruit_cnn_aug: smoke runs (plain, audit, weights file), the split, errors, real data."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data.splits import stratified_split
from tests.helpers import REPO, assert_one_line_error, run_chapter, run_script, script_env

SCRIPT = "02b_fruit_cnn_aug/train.py"
CLASSES = ("apple", "banana", "orange", "mixed")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("02b") / "run"
    metrics = run_chapter(SCRIPT, out, "--smoke", timeout=180)
    return out, metrics


def _label(name: str) -> str:
    return name.split("_")[0]


def test_smoke_run_writes_metrics_model_and_plots(smoke_run):
    out, metrics = smoke_run
    for split in ("val", "test"):
        assert 0.0 <= metrics[f"{split}_accuracy"] <= 1.0
        for name in CLASSES:
            assert 0.0 <= metrics[f"{split}_accuracy_{name}"] <= 1.0
    assert metrics["num_train"] + metrics["num_val"] == 32 and metrics["num_test"] == 12
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"]
    assert metrics["train_seconds"] > 0 and metrics["num_excluded"] == 0
    for name in ("config.json", "split.json", "model.keras", "curves.png", "confusion.png",
                 "misclassified.png"):
        assert (out / name).is_file(), name
    print(f"02b smoke wall time {metrics['_wall_seconds']:.1f}s")


def test_split_is_stratified_seeded_and_disjoint_from_test(smoke_run):
    out, _ = smoke_run
    split = json.loads((out / "split.json").read_text())
    train, val = set(split["train"]), set(split["val"])
    assert not train & val
    # Train and val come from the training folder only; the test folder is listed whole.
    # (The synthetic set reuses names across its two folders, so compare by folder.)
    root = out / "smoke-data/fruits"
    on_disk = sorted(p.name for p in (root / "train_zip/train").glob("*.jpg"))
    assert sorted(train | val) == on_disk
    assert sorted(split["test"]) == sorted(p.name for p in (root / "test_zip/test").glob("*.jpg"))
    # Stratified: every class gives round(0.2 * 8) = 2 of its 8 images to validation.
    assert Counter(_label(n) for n in val) == dict.fromkeys(CLASSES, 2)
    # Seeded: the saved split is what stratified_split gives for this seed, and only that
    # seed, over the training files in the loader's natural order (banana_9 < banana_10).
    names = sorted(on_disk, key=lambda n: (_label(n), int(n[:-4].split("_")[1])))
    _, val_idx = stratified_split([_label(n) for n in names], split["val_fraction"], split["seed"])
    assert {names[i] for i in val_idx} == val
    _, other = stratified_split([_label(n) for n in names], split["val_fraction"], split["seed"] + 1)
    assert {names[i] for i in other} != val


def test_stratified_split_keeps_the_small_class_in_validation():
    labels = ["apple"] * 75 + ["banana"] * 73 + ["orange"] * 72 + ["mixed"] * 20  # the real set
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    assert Counter(labels[i] for i in val_idx) == {"apple": 15, "banana": 15, "orange": 14,
                                                   "mixed": 4}
    assert len(set(train_idx) | set(val_idx)) == 240 and not set(train_idx) & set(val_idx)


def test_audit_smoke_writes_contact_sheet_and_reports_both_accuracies(tmp_path):
    config = tmp_path / "audit.toml"
    config.write_text('exclude = ["apple_4.jpg: a test exclusion", "mixed_30.jpg: another"]\n')
    out = tmp_path / "run"
    metrics = run_chapter(SCRIPT, out, "--smoke", "--audit", "--config", str(config),
                          "--epochs", "3", timeout=240)
    assert metrics["num_excluded"] == 2
    assert 0.0 <= metrics["no_exclusions_test_accuracy"] <= 1.0
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["num_train"] + metrics["num_val"] == 30
    assert (out / "audit.png").is_file()
    rows = json.loads((out / "audit.json").read_text())
    assert len(rows) == 32 and rows[0]["loss"] >= rows[-1]["loss"]
    split = json.loads((out / "split.json").read_text())
    assert set(split["excluded"]) == {"apple_4.jpg", "mixed_30.jpg"}
    assert "apple_4.jpg" not in split["train"] + split["val"]
    assert len(split["test"]) == 12  # never a test image dropped


def test_unknown_exclusion_is_a_user_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('exclude = ["apple_999.jpg: no such file"]\n')
    result = run_script(SCRIPT, "--smoke", "--output-dir", str(tmp_path / "run"), "--config",
                        str(config), check=False, timeout=120)
    assert result.returncode == 2 and "apple_999.jpg" in result.stderr
    assert "Traceback" not in result.stderr


def test_weights_file_round_trips_through_the_backbone_path(tmp_path):
    """The --weights imagenet code path with a local file: the same backbone, weights=None."""
    weights = tmp_path / "mobilenet_v3_small.weights.h5"
    build = ("import keras; keras.applications.MobileNetV3Small(input_shape=(48, 48, 3), "
             "include_top=False, weights=None, pooling='avg')"
             f".save_weights({str(weights)!r})")
    _python(build)
    assert weights.is_file()
    metrics = run_chapter(SCRIPT, tmp_path / "run", "--smoke", "--weights", str(weights),
                          "--epochs", "2", timeout=180)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def _python(code: str) -> None:
    """Run Python code in its own process: a test never imports the framework itself."""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), check=True,
                   capture_output=True, timeout=120)


def test_imagenet_without_network_names_weights_none(tmp_path):
    # An empty keras cache and a proxy that refuses connections: offline on any machine.
    env = script_env(KERAS_HOME=str(tmp_path / "keras"), HTTPS_PROXY="http://127.0.0.1:9",
                     HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                     http_proxy="http://127.0.0.1:9")
    result = run_script(SCRIPT, "--smoke", "--weights", "imagenet", "--output-dir",
                        str(tmp_path / "run"), env=env, check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--weights none" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, words", [
    (["--weights", "resnet"], "--weights"),
    (["--epochs", "-5"], "--epochs"),
    (["--flip", "diagonal"], "--flip"),
    (["--val-fraction", "1.5"], "--val-fraction"),
])
def test_bad_flag_is_one_line_and_exit_2(tmp_path, flags, words):
    result = run_script(SCRIPT, "--output-dir", str(tmp_path / "run"), *flags, check=False,
                        timeout=60)
    assert_one_line_error(result, words)


@pytest.mark.real_data
@pytest.mark.slow
def test_real_data_brief_training_beats_chance(tmp_path, shared_datasets: Path):
    """A short run from the mirror: unzip, decode 300 photos, train a few epochs."""
    env = script_env(DLSTUDY_MIRROR=str(shared_datasets))
    metrics = run_chapter(SCRIPT, tmp_path / "run", "--data-dir", str(tmp_path / "data"),
                          "--image-size", "96", "--epochs", "12", "--patience", "12",
                          env=env, timeout=400)
    print({k: v for k, v in metrics.items() if "accuracy" in k}, metrics["train_seconds"])
    # Chance is 0.32 (always "apple") on test; a few epochs of a working pipeline clear 0.4.
    assert max(metrics["val_accuracy"], metrics["test_accuracy"]) > 0.4
    split = json.loads((tmp_path / "run/split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 240 and len(split["test"]) == 60
    assert not (set(split["train"]) | set(split["val"])) & set(split["test"])
    assert Counter(_label(n) for n in split["val"]) == {"apple": 15, "banana": 15,
                                                        "orange": 14, "mixed": 4}
