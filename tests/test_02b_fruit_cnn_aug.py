"""02b_fruit_cnn_aug: smoke runs (plain, audit, a tuning run from a weights file), the split,
predict.py and compare.py, errors."""

from __future__ import annotations

import ctypes.util
import json
import zipfile
from collections import Counter

import pytest

from data.splits import stratified_split
from tests.helpers import (
    assert_one_line_error,
    keras_learning_rates,
    run_chapter,
    run_python,
    run_script,
    run_without_test_reads,
    script_env,
)

SCRIPT = "02b_fruit_cnn_aug/train.py"
PREDICT = "02b_fruit_cnn_aug/predict.py"
COMPARE = "02b_fruit_cnn_aug/compare.py"
RUN_FACTS = {"date", "train_seconds", "_wall_seconds"}  # differ between identical runs
CLASSES = ("apple", "banana", "orange", "mixed")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("02b") / "run"
    metrics = run_chapter(SCRIPT, out, "--smoke", timeout=180, fresh=True)
    return out, metrics


def _label(name: str) -> str:
    return name.split("_")[0]


def test_smoke_run_writes_metrics_with_intervals_model_and_plots(smoke_run):
    out, metrics = smoke_run
    for split, count in (("val", 2), ("test", 3)):
        low, high = metrics[f"{split}_accuracy_ci95"]
        assert low <= metrics[f"{split}_accuracy"] <= high
        for name in CLASSES:
            low, high = metrics[f"{split}_accuracy_{name}_ci95"]
            assert low <= metrics[f"{split}_accuracy_{name}"] <= high
            assert metrics[f"{split}_num_{name}"] == count
    # A learning bar: better than chance (1 in 4 classes) on the 8 validation pictures.
    # Measured at seeds 0-3: 0.5 to 0.75, so a bar at 0.5 would sit on the edge.
    assert metrics["val_accuracy"] > 0.25
    assert metrics["num_train"] + metrics["num_val"] == 32 and metrics["num_test"] == 12
    # patience 0 (the default): the schedule runs to its end, whatever validation does
    assert metrics["epochs_run"] == 20 and 1 <= metrics["best_epoch"] <= 20
    assert metrics["train_seconds"] > 0 and metrics["num_excluded"] == 0
    assert metrics["device"] == "cpu" and metrics["tensorflow_version"] and metrics["date"]
    for name in ("config.json", "split.json", "model.keras", "curves.png", "confusion.png",
                 "misclassified.png"):
        assert (out / name).is_file(), name
    for split, key in (("val", "val"), ("test", "test")):
        rows = json.loads((out / f"{split}_predictions.json").read_text())
        assert sorted(r["name"] for r in rows) == sorted(json.loads((out / "split.json").read_text())[key])
        assert sum(r["true"] == r["predicted"] for r in rows) == metrics[f"{split}_correct"]
    print(f"02b smoke wall time {metrics['_wall_seconds']:.1f}s")


def test_same_seed_same_figures_on_cpu(smoke_run, tmp_path):
    out, first = smoke_run
    again = run_chapter(SCRIPT, tmp_path / "again", "--smoke", "--device", "cpu", timeout=180)
    assert {k: v for k, v in again.items() if k not in RUN_FACTS} == \
           {k: v for k, v in first.items() if k not in RUN_FACTS}
    # compare.py: a run against its own repeat is a difference of exactly zero.
    result = run_script(COMPARE, str(out), "--against", str(tmp_path / "again"), "--reps", "200",
                        "--output", str(tmp_path / "compare.json"))
    compared = json.loads((tmp_path / "compare.json").read_text())
    assert compared["difference"] == 0 and compared["ci95"] == [0, 0] and compared["num_photos"] == 12
    assert "A - B: +0.0%" in result.stdout


def test_a_finished_run_is_kept_unless_overwrite_then_a_tuning_run_from_a_weights_file(tmp_path):
    out = tmp_path / "run"  # a finished run (not a smoke run) is already there
    out.mkdir()
    (out / "config.json").write_text('{"smoke": false}')
    (out / "metrics.json").write_text('{"test_accuracy": 0.9}')
    (out / "audit.png").write_bytes(b"an old contact sheet")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_script(SCRIPT, "--smoke", "--output-dir", str(out), check=False, timeout=120)
    assert_one_line_error(result, "--overwrite", "--output-dir")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # The --weights imagenet code path with a local file: the same backbone, saved with weights=None.
    weights = tmp_path / "mobilenet_v3_small.weights.h5"
    build = ("import keras; keras.applications.MobileNetV3Small(input_shape=(48, 48, 3), "
             "include_top=False, weights=None, pooling='avg')"
             f".save_weights({str(weights)!r})")
    run_python(build, "02b_fruit_cnn_aug", timeout=120)
    assert weights.is_file()
    # A tuning run with --overwrite, from that file, under a guard that fails the run if a
    # file under test_zip/ is opened for reading: it must score validation only.
    done = run_without_test_reads(SCRIPT, "--smoke", "--overwrite", "--epochs", "1", "--weights", weights,
                                  "--no-evaluate-test", "--output-dir", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / "audit.png").exists() and (out / "model.keras").is_file()
    assert json.loads((out / "config.json").read_text())["weights"] == str(weights)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "val_accuracy" in metrics and not any(k.startswith("test_") for k in metrics)
    assert not (out / "test_predictions.json").exists() and not (out / "confusion.png").exists()


def test_predict_names_odd_photos_and_each_chapter_refuses_the_others_model(smoke_run, tmp_path):
    from PIL import Image, ImageDraw

    out, _ = smoke_run
    image = Image.new("RGB", (240, 160), (245, 245, 235))
    ImageDraw.Draw(image).ellipse([60, 20, 180, 140], fill=(250, 140, 20))
    image.convert("RGBA").save(tmp_path / "png.jpg", format="PNG")  # PNG bytes behind .jpg
    image.convert("CMYK").save(tmp_path / "cmyk.jpg", format="JPEG", quality=95)
    image.save(tmp_path / "upright.png")
    sideways = image.transpose(Image.Transpose.ROTATE_90)
    exif = sideways.getexif()
    exif[0x0112] = 6  # a phone photo stored sideways, to be turned upright by the reader
    sideways.save(tmp_path / "phone.png", exif=exif)
    names = ("png.jpg", "cmyk.jpg", "phone.png", "upright.png")
    result = run_script(PREDICT, "--model-path", str(out / "model.keras"),
                        *(str(tmp_path / n) for n in names), timeout=120)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    for line, name in zip(lines, names, strict=True):
        assert line.startswith(f"{name}: ") and "(runner-up: " in line, line
        assert sum(c in line for c in CLASSES) >= 2
    assert lines[2].split(": ", 1)[1] == lines[3].split(": ", 1)[1]  # turned upright: same answer
    print(f"02b predict: 4 photos in {result.seconds:.1f}s wall time")

    # A model of 02 to 02b's predict.py and back: each refused with one line. The 02 model
    # is this run's model.keras under 02's name (what 02's train.py names its model, and
    # 02's tests check that 02's predict.py takes it), which spares a training run here.
    other = tmp_path / "02_model.keras"
    with zipfile.ZipFile(out / "model.keras") as source, zipfile.ZipFile(other, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["name"] = "02_fruit_cnn"
                data = json.dumps(config)
            target.writestr(item, data)
    refused = run_script(PREDICT, "--model-path", str(other), str(tmp_path / "png.jpg"),
                         check=False, timeout=60)
    assert_one_line_error(refused, "02_fruit_cnn", "02b_fruit_cnn_aug")
    refused = run_script("02_fruit_cnn/predict.py", "--model-path", str(out / "model.keras"),
                         str(tmp_path / "png.jpg"), check=False, timeout=60)
    assert_one_line_error(refused, "02b_fruit_cnn_aug", "02_fruit_cnn")


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
    config = json.loads((out / "config.json").read_text())
    labels = [_label(n) for n in names]
    _, val_idx = stratified_split(labels, config["val_fraction"], config["seed"])
    assert {names[i] for i in val_idx} == val
    _, other = stratified_split(labels, config["val_fraction"], config["seed"] + 1)
    assert {names[i] for i in other} != val


def test_learning_rate_warms_up_from_a_tenth_then_follows_a_cosine_to_zero():
    # 10 epochs of 10 steps: the warm-up is min(5, 10 // 4) = 2 epochs (20 steps). A tenth of
    # the peak at the first step, the peak when the warm-up ends, half the peak half-way
    # down the cosine (step 20 + 80 / 2), and 0 at the end.
    cfg = {"weights": "none", "learning_rate": 0.002, "finetune_learning_rate": 0.0005,
           "epochs": 10, "label_smoothing": 0.1}
    rates = keras_learning_rates("02b_fruit_cnn_aug", "training", "compile_model", cfg,
                                 steps_per_epoch=10, steps=[0, 20, 60, 100])
    assert rates == pytest.approx([0.0002, 0.002, 0.001, 0.0], rel=1e-6, abs=1e-9)


def test_audit_compares_on_validation_and_scores_test_once(tmp_path):
    # apple_3 falls into validation for seed 0 (see the split test): it must stay there, so
    # both runs are compared on the same 8 validation pictures; mixed_30 leaves training.
    config = tmp_path / "audit.toml"
    config.write_text('exclude = ["apple_3.jpg: a test exclusion", "mixed_30.jpg: another"]\n')
    out = tmp_path / "run"
    metrics = run_chapter(SCRIPT, out, "--smoke", "--audit", "--config", str(config),
                          "--epochs", "3", timeout=300)
    assert (out / "audit.png").is_file()
    rows = json.loads((out / "audit.json").read_text())
    assert len(rows) == 32 and rows[0]["loss"] >= rows[-1]["loss"]
    every, fewer = metrics["audit_val_accuracy_every_photo"], metrics["audit_val_accuracy_with_exclusions"]
    assert metrics["audit_val_difference"] == pytest.approx(fewer - every)
    low, high = metrics["audit_val_difference_ci95"]
    assert low <= fewer - every <= high
    kept = metrics["audit_kept"]
    assert kept == ("with_exclusions" if fewer > every else "every_photo")
    assert metrics["val_accuracy"] == (fewer if kept == "with_exclusions" else every)
    split = json.loads((out / "split.json").read_text())
    assert "apple_3.jpg" in split["val"] and metrics["num_val"] == 8
    assert split["excluded"] == (["mixed_30.jpg"] if kept == "with_exclusions" else [])
    assert metrics["num_train"] == 24 - len(split["excluded"]) == 24 - metrics["num_excluded"]
    # The test split once, for the kept run: one set of test figures, no second one.
    assert len(split["test"]) == 12 and "test_accuracy" in metrics
    assert not any("test" in k for k in metrics if k.startswith(("audit", "no_exclusions")))
    assert len(json.loads((out / "test_predictions.json").read_text())) == 12


def test_unknown_exclusion_is_a_user_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('exclude = ["apple_999.jpg: no such file"]\n')
    result = run_script(SCRIPT, "--smoke", "--output-dir", str(tmp_path / "run"), "--config",
                        str(config), check=False, timeout=120)
    assert result.returncode == 2 and "apple_999.jpg" in result.stderr
    assert "Traceback" not in result.stderr


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
    (["--device", "tpu"], "--device"),
    pytest.param(["--device", "cuda"], "--device cuda", marks=pytest.mark.skipif(
        ctypes.util.find_library("cuda") is not None, reason="this machine has an NVIDIA driver")),
])
def test_bad_flag_is_one_line_and_exit_2(tmp_path, flags, words):
    result = run_script(SCRIPT, "--output-dir", str(tmp_path / "run"), *flags, check=False,
                        timeout=60)
    assert_one_line_error(result, words)
