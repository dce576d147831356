"""03_tf_od_api: TFRecords, KerasHub RetinaNet, the standalone SavedModel and detect.py.

Every script runs in its own process (tests.helpers); so does every TensorFlow check: the
test process imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.helpers import (
    REPO,
    assert_one_line_error,
    keras_learning_rates,
    run_chapter,
    run_python,
    run_script,
    script_env,
)

CHAPTER = "03_tf_od_api"
TRAIN = "03_tf_od_api/train.py"
MAKE = "03_tf_od_api/make_tfrecords.py"
DETECT = "03_tf_od_api/detect.py"
CLASSES = ("apple", "banana", "orange")


def dump_records(*folders) -> list[dict]:
    """For each folder, {filename: example as lists} of every .record in it and its label map,
    read back by records.py (one TensorFlow process for all of them)."""
    result = run_python(f"""
        import json
        from pathlib import Path
        import records
        dumps = []
        for folder in map(Path, {[str(folder) for folder in folders]!r}):
            out = {{"label_map": records.read_label_map(folder / "label_map.pbtxt"), "splits": {{}}}}
            for path in sorted(folder.glob("*.record")):
                out["splits"][path.stem] = {{
                    ex["filename"].decode(): {{"boxes": ex["boxes"].tolist(), "labels": ex["labels"].tolist(),
                        "label_ids": ex["label_ids"].tolist(), "texts": [t.decode() for t in ex["texts"]],
                        "shape": list(ex["image"].shape)}}
                    for ex in records.read_records(path)}}
            dumps.append(out)
        print("JSON" + json.dumps(dumps))
        """, CHAPTER)
    line = next(line for line in result.stdout.splitlines() if line.startswith("JSON"))
    return json.loads(line[4:])


# --- make_tfrecords.py -------------------------------------------------------------------


@pytest.fixture(scope="module")
def record_sets(tmp_path_factory):
    """make_tfrecords.py run as a user would, on the fruit smoke data (seed 5) and on a
    LabelImg-style folder (images with .xml beside them, PNG behind .jpg, a 0x0 size); both
    read back in one TensorFlow process. Returns {"fruit": (output folder, stdout, dump),
    "voc": (the LabelImg folder, dump)}."""
    from data.synthetic import write_fruits

    root = tmp_path_factory.mktemp("records")
    fruit = run_script(MAKE, "--smoke", "--output-dir", root / "fruit", "--seed", "5")
    folder = write_fruits(root / "data", train_per_class=3, test_per_class=1, seed=3) / "train_zip" / "train"
    run_script(MAKE, "--voc-dir", folder, "--output-dir", root / "voc", "--max-side", "64")
    fruit_dump, voc_dump = dump_records(root / "fruit", root / "voc")
    return {"fruit": (root / "fruit", fruit.stdout, fruit_dump), "voc": (folder, voc_dump)}


def test_make_tfrecords_smoke_writes_three_records_and_a_label_map(record_sets):
    output_dir, stdout, _ = record_sets["fruit"]
    assert "train.record: 20 photos" in stdout and "test.record: 8 photos" in stdout
    assert (output_dir / "label_map.pbtxt").read_text() == (
        "item {\n  id: 1\n  name: 'apple'\n}\nitem {\n  id: 2\n  name: 'banana'\n}\n"
        "item {\n  id: 3\n  name: 'orange'\n}\n")


def test_voc_folder_round_trip_with_known_answers(record_sets):
    from data.images import image_size
    from data.voc import read_voc

    folder, dumped = record_sets["voc"]
    names = sorted({n for xml in folder.glob("*.xml") for n in read_voc(xml).names})
    assert dumped["label_map"] == {str(i): name for i, name in enumerate(names, 1)}
    examples = {**dumped["splits"]["train"], **dumped["splits"]["val"]}
    assert sorted(examples) == sorted(p.name for p in folder.glob("*.jpg"))
    assert "test" not in dumped["splits"] and len(dumped["splits"]["val"]) >= 1
    for name, example in examples.items():
        annotation = read_voc(folder / name.replace(".jpg", ".xml"))
        width, height = image_size(folder / name)
        expected = annotation.boxes / np.array([width, height, width, height], np.float32)
        np.testing.assert_allclose(example["boxes"], expected, atol=1e-6)
        assert example["texts"] == annotation.names
        assert example["label_ids"] == [names.index(n) + 1 for n in annotation.names]
        assert example["labels"] == [names.index(n) for n in annotation.names]  # 0-based for KerasHub
        assert max(example["shape"][:2]) == 64 and example["shape"][2] == 3  # shrunk, RGB


def test_fruit_records_use_03b_split(record_sets):
    from data import fruits
    from data.splits import stratified_split

    output_dir, _, dumped = record_sets["fruit"]
    # The same call 03b makes: stratified_split over the file-name classes, loader order.
    train, test = fruits.load_fruits(output_dir / "smoke-data", fetch=False)
    _, val_idx = stratified_split([r.label for r in train], 0.2, 5)
    assert sorted(dumped["splits"]["val"]) == sorted(train[i].image_path.name for i in val_idx)
    assert sorted(dumped["splits"]["test"]) == sorted(r.image_path.name for r in test)
    assert not set(dumped["splits"]["train"]) & set(dumped["splits"]["val"])


@pytest.fixture
def labelimg_folder(tmp_path):
    from data.synthetic import write_fruits

    root = write_fruits(tmp_path / "data", train_per_class=2, test_per_class=1, seed=1)
    return root / "train_zip" / "train"


@pytest.mark.parametrize("case, words", [
    ("malformed", ["banana_3.xml", "malformed XML"]),
    ("doctype", ["banana_3.xml", "DOCTYPE"]),
    ("outside", ["banana_3.xml", "outside its"]),
    ("unknown", ["banana_3.xml", "unknown class", "pear"]),
])
def test_bad_labelimg_file_is_one_line_naming_it(labelimg_folder, tmp_path, case, words):
    xml = labelimg_folder / "banana_3.xml"
    text = xml.read_text()
    if case == "malformed":
        xml.write_text(text[: len(text) // 2])
    elif case == "doctype":
        xml.write_text('<?xml version="1.0"?>\n<!DOCTYPE annotation [<!ENTITY x "banana">]>\n'
                       + text.replace("<name>banana</name>", "<name>&x;</name>"))
    elif case == "outside":
        xml.write_text(text.replace("<xmax>", "<xmax>9999", 1))
    else:
        xml.write_text(text.replace("<name>banana</name>", "<name>pear</name>", 1))
    extra = ["--classes", *CLASSES] if case == "unknown" else []
    result = run_script(MAKE, "--voc-dir", labelimg_folder, "--output-dir", tmp_path / "rec", *extra,
                        check=False)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "rec" / "train.record").exists()


# --- train.py ------------------------------------------------------------------------------


def test_learning_rate_warms_up_from_a_hundredth_then_follows_a_cosine_to_a_hundredth():
    # 10 epochs of 10 steps, 1 warm-up epoch, peak 0.001: 1% of the peak at the first step,
    # the peak when the warm-up ends (step 10), half-way down the cosine (step 10 + 90 / 2)
    # 0.01 + 0.99 / 2 of it, and 1% again at the end.
    cfg = {"epochs": 10, "warmup_epochs": 1, "learning_rate": 0.001, "weight_decay": 0.05,
           "grad_clip": 10.0}
    rates = keras_learning_rates(CHAPTER, "model", "compile_detector", cfg,
                                 steps_per_epoch=10, steps=[0, 10, 55, 100])
    assert rates == pytest.approx([1e-5, 0.001, 0.001 * 0.505, 1e-5], rel=1e-6)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("03") / "run"
    metrics = run_chapter(TRAIN, output_dir, "--smoke", timeout=300, fresh=True)
    print(f"03 smoke wall time {metrics['_wall_seconds']:.1f}s")
    return output_dir, metrics


def test_smoke_writes_metrics_curves_grid_and_saved_model(smoke_run):
    output_dir, metrics = smoke_run
    for key in ("map50", "map", "map75", "val_map50", "train_seconds", "wall_seconds", "epochs",
                "tensorflow_version", "keras_hub_version"):
        assert key in metrics, key
    for key in ("map50", "map", "map75"):
        low, high = metrics[f"{key}_ci95"]
        assert 0.0 <= low <= high <= 1.0
    for name in CLASSES:
        assert f"ap50_{name}" in metrics and f"ap_{name}" in metrics
    assert 0.0 <= metrics["map"] <= metrics["map50"] <= 1.0 and metrics["epochs"] == 2
    assert metrics["_wall_seconds"] < 240  # ~60 s alone on 2 cores; slack for a busy CPU
    for name in ("config.json", "split.json", "loss_curves.png", "val_map.png", "test_predictions.png",
                 "augmented_batch.png", "best.weights.h5", "checkpoint.weights.h5",
                 "saved_model/saved_model.pb", "saved_model/assets.extra/label_map.pbtxt",
                 "records/train.record", "records/val.record", "records/test.record"):
        assert (output_dir / name).is_file(), name
    split = json.loads((output_dir / "split.json").read_text())
    assert len(split["train"]) == 20 and len(split["val"]) == 4 and len(split["test"]) == 8


def test_saved_model_matches_the_in_memory_model(smoke_run):
    output_dir, metrics = smoke_run
    # Measured by train.py on the test photos: the SavedModel fed the record's uint8 photo
    # against the Keras model fed the same photo through the training code's resize.
    assert metrics["export_num_boxes"] > 0  # the smoke's low --min-score keeps boxes to compare
    assert metrics["export_mismatched_photos"] == 0
    assert metrics["export_max_box_diff_px"] < 0.5 and metrics["export_max_score_diff"] < 1e-3
    # Checked again here, independently of train.py: the kept weights in a rebuilt KerasHub
    # model vs both SavedModel endpoints (uint8 image and encoded bytes).
    result = run_python(f"""
        import json
        from pathlib import Path
        import numpy as np, tensorflow as tf
        import model, records
        run = Path({str(output_dir)!r})
        arch = json.loads((run / "state.json").read_text())["arch"]
        detector = model.build_scratch(arch)
        detector.load_weights(run / "best.weights.h5")
        saved = tf.saved_model.load(str(run / "saved_model"))
        # in a tf.function, as predict() and the export run it: eager mode skips the graph's
        # fused ops, and a 1e-6 change in a logit reorders the smoke model's near-tied scores
        forward = tf.function(lambda x: detector.decode_predictions(detector(x, training=False), x))
        worst, boxes = 0.0, 0
        for serialized in tf.data.TFRecordDataset(str(run / "records" / "test.record")):
            example = records.parse_example(serialized)
            photo = example["image"]
            x = model.normalize(model.model_input(photo, arch["image_size"]), arch)[None]
            found = forward(x)
            n = int(found["num_detections"][0])
            scale = np.array([photo.shape[1], photo.shape[0]] * 2) / arch["image_size"]
            expected = found["boxes"][0, :n].numpy() * scale
            encoded = tf.io.parse_single_example(serialized, records.FEATURES)["image/encoded"]
            for out in (saved.signatures["serving_default"](image=photo),
                        saved.signatures["detect_encoded"](encoded_image=encoded)):
                assert out["boxes"].shape[0] == n, (out["boxes"].shape, n)
                worst = max(worst, float(np.abs(out["boxes"].numpy() - expected).max(initial=0)))
                np.testing.assert_allclose(out["scores"].numpy(), found["confidence"][0, :n].numpy(), atol=1e-4)
                assert (out["classes"].numpy() == found["labels"][0, :n].numpy() + 1).all()
            boxes += n
        print("WORST", worst, boxes)
        """, CHAPTER)
    worst, boxes = result.stdout.split("WORST")[1].split()
    assert int(boxes) > 0 and float(worst) < 0.5


def test_resume_continues_and_a_tuning_run_never_reads_test_record(smoke_run, tmp_path):
    output_dir, first = smoke_run
    run = tmp_path / "run"
    shutil.copytree(output_dir, run)
    (run / "records" / "test.record").unlink()  # a tuning run must not need it
    result = run_script(TRAIN, "--smoke", "--output-dir", run, "--resume", "--epochs", "3",
                        "--no-evaluate-test", timeout=300)
    assert "resumed from" in result.stdout and "after epoch 2" in result.stdout
    assert "epoch   3" in result.stdout and "epoch   1 " not in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["train_seconds"] > first["train_seconds"]
    assert not any(key.startswith(("map", "ap50_", "ap_")) for key in metrics)
    assert not (run / "test_predictions.png").exists()


def test_coco_weights_offline_fail_fast_naming_weights_none(tmp_path):
    # A closed local proxy makes "offline" certain, even on a machine with internet.
    proxy = "http://127.0.0.1:9"
    env = script_env(KAGGLEHUB_CACHE=str(tmp_path / "kaggle"), KERAS_HOME=str(tmp_path / "keras"),
                     HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy,
                     NO_PROXY="", no_proxy="")
    result = run_script(TRAIN, "--smoke", "--weights", "coco", "--output-dir", tmp_path / "run",
                        env=env, check=False, timeout=120)
    assert_one_line_error(result, "--weights none")
    assert result.seconds < 60


@pytest.mark.parametrize("flags, words", [
    (["--image-size", "200"], ["--image-size must be a multiple of 2**max_level = 64", "try 192"]),
    (["--weights", "imagenet"], ["--weights must be coco or none"]),
    (["--scale-min", "2"], ["--scale-min 2.0 must not exceed --scale-max"]),
])
def test_bad_values_are_one_line_before_any_work(tmp_path, flags, words):
    result = run_script(TRAIN, "--smoke", "--output-dir", tmp_path / "run", *flags, check=False)
    assert_one_line_error(result, *words)


# --- detect.py -----------------------------------------------------------------------------


def test_detect_runs_the_saved_model_without_keras(smoke_run, tmp_path):
    from PIL import Image, ImageDraw

    output_dir, _ = smoke_run
    photo = tmp_path / "fruit.jpg"  # PNG bytes behind a .jpg name, RGBA: the shared reader copes
    image = Image.new("RGBA", (256, 224), (240, 240, 230, 255))
    ImageDraw.Draw(image).ellipse([40, 40, 140, 140], fill=(245, 140, 20, 255))
    image.save(photo, format="PNG")
    argv = ["detect.py", "--model-dir", str(output_dir / "saved_model"), "--output-dir",
            str(tmp_path / "out"), "--score-threshold", "0.0", str(photo)]
    result = run_python(f"""
        import runpy
        sys.argv = {argv!r}
        runpy.run_path({str(REPO / DETECT)!r}, run_name="__main__")
        print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "keras_hub", "tf_keras")))
        """, CHAPTER, fresh=True)  # a new interpreter: what detect.py imports, it imports itself
    assert "IMPORTED []" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(photo))]
    assert lines, result.stdout
    for line in lines:
        path, name, score, *box = line.split()
        assert path == str(photo) and name in CLASSES and 0.0 <= float(score) <= 1.0 and len(box) == 4
    assert Image.open(tmp_path / "out" / "fruit_detections.png").size == (256, 224)


def test_detect_names_a_missing_model_and_a_bad_image(smoke_run, tmp_path):
    output_dir, _ = smoke_run
    # cold: detect.py refuses to run in a process that has imported Keras
    result = run_script(DETECT, "--model-dir", tmp_path / "nothing", tmp_path / "a.jpg", check=False, fresh=True)
    assert_one_line_error(result, "is not a SavedModel folder")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    result = run_script(DETECT, "--model-dir", output_dir / "saved_model", bad, check=False, fresh=True)
    assert result.returncode == 2 and "broken.jpg" in result.stderr and "Traceback" not in result.stderr


def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    result = run_script("03_tf_od_api/train.py", "--smoke", "--device", "cuda",
                        "--output-dir", str(tmp_path / "run"), check=False,
                        env=script_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device cuda: TensorFlow sees no GPU")
