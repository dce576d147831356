"""03b_xml_detection: FCOS on the fruit set's VOC XML boxes (train.py, detect.py, analyse.py).

Every run is a subprocess (tests.helpers); the test process never imports torch. The
known answers for the arithmetic (mosaic, box scaling, schedule, EMA) are in test_03b_units.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from tests.helpers import assert_one_line_error, run_chapter, run_script, script_env

TRAIN = "03b_xml_detection/train.py"
DETECT = "03b_xml_detection/detect.py"
ANALYSE = "03b_xml_detection/analyse.py"
CLASSES = ("apple", "banana", "orange")
# Keys that say when and how long, not what was measured.
RUN_KEYS = ("date", "train_seconds", "wall_seconds", "_wall_seconds")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("smoke") / "run"
    metrics = run_chapter(TRAIN, output_dir, "--smoke", "--device", "cpu", timeout=600, fresh=True)
    return output_dir, metrics


def files_digest(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_smoke_writes_metrics_intervals_split_and_facts(smoke_run):
    output_dir, metrics = smoke_run
    for key in ("map50", "map", "map75", "val_map50", "train_seconds", "wall_seconds", "epochs"):
        assert key in metrics, key
    for key in ("map50", "map", *(f"ap50_{name}" for name in CLASSES)):
        low, high = metrics[f"{key}_ci95"]
        assert 0.0 <= low <= high <= 1.0, key
    for name in CLASSES:
        assert f"ap50_{name}" in metrics and f"ap_{name}" in metrics
    assert 0.0 <= metrics["map"] <= metrics["map50"] <= 1.0
    assert metrics["epochs"] == 2
    assert metrics["device"] == "cpu" and metrics["mixed_precision"] == "none"
    assert metrics["torch_version"] and metrics["torchvision_version"] and metrics["date"]
    for name in ("config.json", "split.json", "loss_curves.png", "val_map.png", "test_predictions.png",
                 "checkpoint.pt", "model.pt"):
        assert (output_dir / name).is_file(), name
    config = json.loads((output_dir / "config.json").read_text())
    assert config["weights"] == "none" and config["val_fraction"] == 0.2
    split = json.loads((output_dir / "split.json").read_text())
    assert [len(split[part]) for part in ("train", "val", "test")] == [
        metrics["num_train"], metrics["num_val"], metrics["num_test"]]
    assert not set(split["train"]) & set(split["val"])


def test_smoke_run_learns(smoke_run):
    # Two epochs on 24 synthetic pictures: the training loss falls well below its start
    # (to 0.71, 0.74 and 0.74 of it at seeds 0, 1 and 2); a bar loose enough for any seed.
    _, metrics = smoke_run
    assert metrics["loss_last_epoch"] < 0.9 * metrics["loss_first_epoch"]


def test_same_seed_same_figures_and_overwrite_removes_stale_files(smoke_run, tmp_path):
    output_dir, first = smoke_run
    again = tmp_path / "again"
    shutil.copytree(output_dir, again)
    (again / "stale.png").write_bytes(b"an earlier run's plot")
    metrics = run_chapter(TRAIN, again, "--smoke", "--overwrite", timeout=600)
    assert not (again / "stale.png").exists()
    assert {k: v for k, v in metrics.items() if k not in RUN_KEYS} == {
        k: v for k, v in first.items() if k not in RUN_KEYS}


def test_a_second_run_into_the_same_folder_is_refused(smoke_run):
    output_dir, _ = smoke_run
    before = files_digest(output_dir)
    result = run_script(TRAIN, "--weights", "none", "--output-dir", output_dir, check=False)
    assert_one_line_error(result, "already holds a finished run", "--overwrite", "--output-dir")
    assert files_digest(output_dir) == before


def test_resume_continues_from_the_checkpoint(smoke_run, tmp_path):
    output_dir, first = smoke_run
    run_dir = tmp_path / "run"
    shutil.copytree(output_dir, run_dir)
    result = run_script(TRAIN, "--smoke", "--output-dir", run_dir, "--resume", "--epochs", "3", timeout=600)
    assert "resumed from" in result.stdout
    assert "epoch   3" in result.stdout and "epoch   1 " not in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    # the time budget counts both sessions, not just the resumed one
    assert metrics["wall_seconds"] > first["wall_seconds"]
    assert metrics["train_seconds"] > first["train_seconds"]


def test_resume_with_another_config_or_split_is_refused(smoke_run, tmp_path):
    output_dir, _ = smoke_run
    result = run_script(TRAIN, "--smoke", "--output-dir", output_dir, "--resume",
                        "--learning-rate", "0.01", check=False)
    assert_one_line_error(result, "--resume", "learning_rate")
    run_dir = tmp_path / "run"
    shutil.copytree(output_dir, run_dir)
    split = json.loads((run_dir / "split.json").read_text())
    split["train"][0], split["val"][0] = split["val"][0], split["train"][0]
    (run_dir / "split.json").write_text(json.dumps(split))
    result = run_script(TRAIN, "--smoke", "--output-dir", run_dir, "--resume", check=False)
    assert_one_line_error(result, "--resume", "split differs")


def test_tuning_run_from_a_checkpoint_never_reads_the_test_photos(smoke_run, tmp_path):
    # The real set's layout, every test file unreadable: a --no-evaluate-test run must not
    # open them (not even the XML), and leaves no test figure or stale test grid behind.
    # --weights PATH: it fine-tunes the smoke run's checkpoint (its arch rebuilds the model),
    # at this run's own --image-size.
    from data.synthetic import write_fruits

    output_dir, _ = smoke_run

    root = write_fruits(tmp_path / "data", train_per_class=60, test_per_class=15, image_size=(48, 40))
    for path in (root / "test_zip" / "test").iterdir():
        path.write_bytes(b"not readable")
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "test_predictions.png").write_bytes(b"from an earlier run")
    metrics = run_chapter(TRAIN, tmp_path / "tune", "--data-dir", tmp_path / "data",
                          "--weights", output_dir / "model.pt", "--image-size", "64",
                          "--epochs", "1", "--batch-size", "16", "--no-evaluate-test", timeout=600)
    assert "val_map50" in metrics and "wall_seconds" in metrics and metrics["epochs"] == 1
    config = json.loads((tmp_path / "tune" / "config.json").read_text())
    assert config["weights"].endswith("model.pt") and config["image_size"] == 64
    assert not any(key.startswith(("map", "ap50_", "ap_")) for key in metrics)
    assert json.loads((tmp_path / "tune" / "split.json").read_text())["test"] == []
    assert (tmp_path / "tune" / "val_map.png").is_file()
    assert not (tmp_path / "tune" / "test_predictions.png").exists()


def test_analyse_uses_validation_photos_unless_told_test(smoke_run, tmp_path):
    output_dir, first = smoke_run
    split = json.loads((output_dir / "split.json").read_text())
    for flags, part in (([], "val"), (["--split", "test"], "test")):
        metrics = run_chapter(ANALYSE, tmp_path / part, "--model-path", output_dir / "model.pt",
                              "--data-dir", output_dir / "smoke-data", "--score-threshold", "0.05",
                              "--device", "cpu", *flags)
        assert metrics["split"] == part and metrics["num_photos"] == len(split[part])
        assert metrics["num_true_boxes"] > 0
        assert metrics["found"] + metrics["wrong_class_only"] + metrics["missed"] == metrics["num_true_boxes"]
        assert metrics["true"] <= metrics["found"]
        assert 0.0 <= metrics["map"] <= metrics["map50"] <= 1.0 and 0.0 <= metrics["fruit_map50"] <= 1.0
    assert metrics["map50"] == pytest.approx(first["map50"])  # the same test photos train.py scored


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


def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    env = script_env(CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine that has one
    result = run_script(TRAIN, "--smoke", "--device", "cuda", "--output-dir", tmp_path / "run",
                        env=env, check=False)
    assert_one_line_error(result, "--device cuda", "--device cpu")


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
    (["--device", "gpu"], "--device must be auto, cpu or cuda"),
    (["--num-workers", "-1"], "--num-workers must be at least 0"),
    (["--batch-size", "64"], "more than the 24 training photos"),  # found after loading the data
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
