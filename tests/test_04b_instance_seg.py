"""04b_instance_seg: Mask R-CNN in Keras 3 (train.py, predict.py), each run in a subprocess.

The test process never imports TensorFlow (tests.helpers); the known-answer checks of the
model's parts are in test_04b_instance_seg_units.py.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import assert_one_line_error, run_chapter, run_script, script_env

TRAIN = "04b_instance_seg/train.py"
PREDICT = "04b_instance_seg/predict.py"
SHAPES = ("square", "circle", "triangle")


@pytest.fixture(scope="module")
def shapes_smoke(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("shapes") / "run"
    return output_dir, run_chapter(TRAIN, output_dir, "--smoke", fresh=True)


def test_shapes_smoke_writes_metrics_plots_and_model(shapes_smoke):
    output_dir, metrics = shapes_smoke
    for kind in ("mask", "box"):
        for key in ("map50", "map"):
            assert 0.0 <= metrics[f"{kind}_{key}"] <= 1.0
            low, high = metrics[f"{kind}_{key}_ci95"]
            assert 0.0 <= low <= high <= 1.0
        for name in SHAPES:
            assert f"{kind}_ap50_{name}" in metrics
    for key in ("val_mask_map50", "best_epoch", "train_seconds", "wall_seconds", "tensorflow_version"):
        assert key in metrics, key
    assert metrics["epochs"] == 2 and metrics["num_val"] == 8 and metrics["num_test"] == 8
    assert metrics["_wall_seconds"] < 150  # about 55 s alone on 2 cores (TF import and tracing included)
    for name in ("config.json", "split.json", "checkpoint.npz", "model.weights.h5", "model.json",
                 "loss_curves.png", "val_map.png", "test_predictions.png"):
        assert (output_dir / name).is_file(), name
    split = json.loads((output_dir / "split.json").read_text())
    assert len(split["val"]) == 8 and len(split["test"]) == 8
    assert json.loads((output_dir / "model.json").read_text())["class_names"] == list(SHAPES)


def test_resume_continues_and_a_tuning_run_never_scores_the_test_set(shapes_smoke):
    output_dir, first = shapes_smoke
    result = run_script(TRAIN, "--smoke", "--output-dir", output_dir, "--resume", "--epochs", "3",
                        "--no-evaluate-test")
    assert "resumed from" in result.stdout
    assert "epoch   3" in result.stdout and "epoch   1 " not in result.stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["train_seconds"] > first["train_seconds"]
    assert "val_mask_map50" in metrics
    assert not any(key.startswith(("mask_map", "box_map", "mask_ap", "box_ap")) for key in metrics)
    assert not (output_dir / "test_predictions.png").exists(), "a tuning run left a test grid"


def test_resume_refuses_a_changed_config(shapes_smoke):
    output_dir, _ = shapes_smoke
    result = run_script(TRAIN, "--smoke", "--output-dir", output_dir, "--resume", "--fpn-channels", "48",
                        check=False)
    assert_one_line_error(result, "--resume", "fpn_channels")


def test_pennfudan_smoke_splits_and_scores_one_class(tmp_path):
    metrics = run_chapter(TRAIN, tmp_path / "run", "--smoke", "--dataset", "pennfudan")
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    names = split["train"] + split["val"] + split["test"]
    assert len(names) == len(set(names)) == 24 and all(split.values())
    assert metrics["num_test"] == len(split["test"]) and metrics["dataset"] == "pennfudan"
    assert 0.0 <= metrics["mask_map50"] <= 1.0 and "mask_map50_ci95" in metrics
    assert not any(key.startswith("mask_ap50_") for key in metrics)  # one class: no per-class copy
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["rpn_max_level"] == 6 and config["aspect_ratios"] == [1.0, 2.0, 3.0]  # pennfudan.toml


def test_predict_prints_one_line_per_instance(shapes_smoke, tmp_path):
    from PIL import Image, ImageDraw

    output_dir, _ = shapes_smoke
    image_path = tmp_path / "shapes.jpg"  # PNG bytes behind a .jpg name, RGBA: the reader copes
    image = Image.new("RGBA", (150, 100), (40, 90, 160, 255))
    ImageDraw.Draw(image).ellipse([20, 20, 70, 70], fill=(250, 220, 30, 255))
    image.save(image_path, format="PNG")
    result = run_script(PREDICT, "--model-path", output_dir / "model.weights.h5", "--output-dir",
                        tmp_path / "out", "--score-threshold", "0.0", image_path)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, result.stdout
    for line in lines:
        path, name, score, *box, pixels = line.split()
        assert path == str(image_path) and name in SHAPES and 0.0 <= float(score) <= 1.0
        x0, y0, x1, y1 = map(int, box)  # in the 150 x 100 photo, not the square input
        assert 0 <= x0 <= x1 <= 150 and 0 <= y0 <= y1 <= 100 and int(pixels) >= 0, line
    assert Image.open(tmp_path / "out" / "shapes_instances.png").size == (150, 100)


def test_predict_names_an_unreadable_image(shapes_smoke, tmp_path):
    output_dir, _ = shapes_smoke
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    result = run_script(PREDICT, "--model-path", output_dir / "model.weights.h5", bad, check=False)
    assert_one_line_error(result, "broken.jpg")


def test_imagenet_weights_offline_fail_fast_naming_weights_none(tmp_path):
    # A closed local proxy makes "offline" certain, even on a machine with internet.
    proxy = "http://127.0.0.1:9"
    env = script_env(KAGGLEHUB_CACHE=str(tmp_path / "cache"), KERAS_HOME=str(tmp_path / "keras"),
                     HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy,
                     NO_PROXY="", no_proxy="")
    result = run_script(TRAIN, "--smoke", "--weights", "imagenet", "--output-dir", tmp_path / "run",
                        env=env, check=False, timeout=120)
    # TensorFlow's own start-up log lines come first; the error is the one line after them.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "imagenet" in last and "--weights none" in last, result.stderr
    assert result.seconds < 60


@pytest.mark.parametrize("flags, words", [
    (["--image-size", "100"], "--image-size must be a multiple of 32"),
    (["--dataset", "coco"], "--dataset must be one of shapes, pennfudan"),
    (["--backbone-filters", "32", "64", "128", "256"], "--backbone-filters"),
    (["--batch-size", "64"], "more than the 16 training images"),  # found after reading the data
])
def test_bad_values_are_one_line_before_training(tmp_path, flags, words):
    result = run_script(TRAIN, "--smoke", "--output-dir", tmp_path / "run", *flags, check=False)
    assert_one_line_error(result, words)


def test_the_chapter_never_imports_torch():
    from tests.helpers import REPO

    for path in sorted((REPO / "04b_instance_seg").glob("*.py")):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            assert words[:2] not in (["import", "torch"], ["import", "torchvision"]), f"{path.name}: {line}"
            assert not (words[:1] == ["from"] and len(words) > 1 and words[1].split(".")[0] in
                        ("torch", "torchvision")), f"{path.name}: {line}"
