"""03b_xml_detection: FCOS on the fruit set's VOC XML boxes (train.py, detect.py, model.py).

Every run is a subprocess (tests.helpers); the test process never imports torch.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import assert_one_line_error, run_chapter, run_script, script_env

TRAIN = "03b_xml_detection/train.py"
DETECT = "03b_xml_detection/detect.py"
ANALYSE = "03b_xml_detection/analyse.py"
CLASSES = ("apple", "banana", "orange")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("smoke") / "run"
    metrics = run_chapter(TRAIN, output_dir, "--smoke")
    return output_dir, metrics


def test_smoke_writes_metrics_plots_and_checkpoints(smoke_run):
    output_dir, metrics = smoke_run
    for key in ("map50", "map", "map75", "val_map50", "train_seconds", "wall_seconds", "epochs"):
        assert key in metrics, key
    for name in CLASSES:
        assert f"ap50_{name}" in metrics and f"ap_{name}" in metrics
    assert 0.0 <= metrics["map"] <= metrics["map50"] <= 1.0
    assert metrics["epochs"] == 2
    assert metrics["_wall_seconds"] < 120  # about 10 s alone on 2 cores; slack for a busy CPU
    for name in ("config.json", "loss_curves.png", "val_map.png", "test_predictions.png",
                 "checkpoint.pt", "model.pt"):
        assert (output_dir / name).is_file(), name
    assert json.loads((output_dir / "config.json").read_text())["weights"] == "none"


def test_resume_continues_from_the_checkpoint(smoke_run, tmp_path):
    output_dir, first = smoke_run
    result = run_script(TRAIN, "--smoke", "--output-dir", output_dir, "--resume", "--epochs", "3")
    assert "resumed from" in result.stdout
    assert "epoch   3" in result.stdout and "epoch   1 " not in result.stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    # the time budget counts both sessions, not just the resumed one
    assert metrics["wall_seconds"] > first["wall_seconds"]
    assert metrics["train_seconds"] > first["train_seconds"]


def test_weights_path_fine_tunes_from_a_saved_checkpoint(smoke_run, tmp_path):
    output_dir, _ = smoke_run
    metrics = run_chapter(TRAIN, tmp_path / "again", "--smoke", "--epochs", "1",
                          "--weights", str(output_dir / "model.pt"))
    assert metrics["epochs"] == 1
    assert json.loads((tmp_path / "again" / "config.json").read_text())["weights"].endswith("model.pt")


def test_tuning_run_never_scores_the_test_photos(tmp_path):
    # --no-evaluate-test: validation numbers only, for comparing settings (house rule).
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "test_predictions.png").write_bytes(b"from an earlier run")
    metrics = run_chapter(TRAIN, tmp_path / "tune", "--smoke", "--epochs", "1", "--no-evaluate-test")
    assert "val_map50" in metrics and "wall_seconds" in metrics
    assert not any(key.startswith(("map", "ap50_", "ap_")) for key in metrics)
    assert (tmp_path / "tune" / "val_map.png").is_file()
    assert not (tmp_path / "tune" / "test_predictions.png").exists()


def test_analyse_tallies_every_box_of_the_smoke_test_set(smoke_run, tmp_path):
    output_dir, _ = smoke_run
    metrics = run_chapter(ANALYSE, tmp_path / "analysis", "--model-path", output_dir / "model.pt",
                          "--data-dir", output_dir / "smoke-data", "--score-threshold", "0.05")
    assert metrics["num_true_boxes"] > 0
    assert metrics["found"] + metrics["wrong_class_only"] + metrics["missed"] == metrics["num_true_boxes"]
    assert metrics["true"] <= metrics["found"]
    assert 0.0 <= metrics["map"] <= metrics["map50"] <= 1.0 and 0.0 <= metrics["fruit_map50"] <= 1.0


def test_detect_prints_one_line_per_box(smoke_run, tmp_path):
    from PIL import Image, ImageDraw

    output_dir, _ = smoke_run
    image_path = tmp_path / "fruit.jpg"  # PNG bytes behind a .jpg name, RGBA: the reader copes
    image = Image.new("RGBA", (256, 224), (240, 240, 230, 255))
    ImageDraw.Draw(image).ellipse([40, 40, 140, 140], fill=(245, 140, 20, 255))
    image.save(image_path, format="PNG")
    result = run_script(DETECT, "--model-path", output_dir / "model.pt", "--output-dir",
                        tmp_path / "out", "--score-threshold", "0.0", image_path)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, result.stdout
    for line in lines:
        path, name, score, *box = line.split()
        assert path == str(image_path) and name in CLASSES
        assert 0.0 <= float(score) <= 1.0 and len(box) == 4
        x0, y0, x1, y1 = map(int, box)  # mapped back to the 256 x 224 original, not the square input
        assert 0 <= x0 <= x1 <= 256 and 0 <= y0 <= y1 <= 224, line
    assert Image.open(tmp_path / "out" / "fruit_detections.png").size == (256, 224)


def test_detect_names_an_unreadable_image(smoke_run, tmp_path):
    output_dir, _ = smoke_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    result = run_script(DETECT, "--model-path", output_dir / "model.pt", bad, check=False)
    assert result.returncode == 2 and "broken.jpg" in result.stderr
    assert "Traceback" not in result.stderr


def test_coco_weights_offline_fail_fast_naming_weights_none(tmp_path):
    # A closed local proxy makes "offline" certain, even on a machine with internet.
    env = script_env(TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY="http://127.0.0.1:9",
                     HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                     http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    result = run_script(TRAIN, "--smoke", "--weights", "coco", "--output-dir", tmp_path / "run",
                        env=env, check=False, timeout=120)
    assert result.returncode == 2
    assert "--weights none" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.seconds < 60


def test_bad_flag_is_one_line_exit_2():
    result = run_script(TRAIN, "--no-such-flag", check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_script(TRAIN, "--image-size", "big", check=False)
    assert result.returncode == 2 and "--image-size" in result.stderr


@pytest.mark.parametrize("flags, words", [
    (["--zoom-out-prob", "2"], "--zoom-out-prob must be in [0, 1]"),
    (["--grid-images", "-1"], "--grid-images must be at least 1"),
    (["--batch-size", "64"], "more than the 20 training photos"),  # found after loading the data
])
def test_bad_values_are_one_line_before_training(tmp_path, flags, words):
    result = run_script(TRAIN, "--smoke", "--output-dir", tmp_path / "run", *flags, check=False)
    assert_one_line_error(result, words)


def test_resume_from_final_weights_names_the_fix(smoke_run, tmp_path):
    output_dir, _ = smoke_run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes((output_dir / "model.pt").read_bytes())
    result = run_script(TRAIN, "--smoke", "--output-dir", tmp_path / "run", "--resume", check=False)
    assert_one_line_error(result, "final weights only", "--weights PATH")


def test_corrupt_xml_names_the_file(tmp_path):
    from data.synthetic import write_fruits

    # The real set's layout (240 + 60 photos) so the loader takes it as a complete download.
    root = write_fruits(tmp_path / "data", train_per_class=60, test_per_class=15, image_size=(48, 40))
    bad = root / "train_zip" / "train" / "banana_70.xml"
    bad.write_text("<annotation><object><name>banana</name>")
    result = run_script(TRAIN, "--data-dir", tmp_path / "data", "--weights", "none",
                        "--output-dir", tmp_path / "run", "--epochs", "1", check=False)
    assert result.returncode == 2
    assert "banana_70.xml" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.real_data
@pytest.mark.slow
def test_real_data_training_learns(shared_datasets, tmp_path):
    # A short from-scratch run on the real photos: small images, a small model, a few
    # epochs. It only shows that the pipeline learns; the chapter's figure needs ~55 min.
    env = script_env(DLSTUDY_MIRROR=str(shared_datasets))
    metrics = run_chapter(
        TRAIN, tmp_path / "run", "--data-dir", str(tmp_path / "data"), "--weights", "none",
        "--image-size", "192", "--fpn-channels", "64", "--head-convs", "2", "--epochs", "8",
        "--warmup-epochs", "1", "--eval-every", "4", "--learning-rate", "0.003",
        env=env, timeout=400)
    print({k: metrics[k] for k in ("map50", "map", "val_map50", "train_seconds")})
    assert metrics["num_train"] + metrics["num_val"] == 240 and metrics["num_test"] == 60
    assert max(metrics["val_map50"], metrics["map50"]) > 0.15
