"""03_tf_od_api: TFRecords, KerasHub RetinaNet, the standalone SavedModel and detect.py.

Every script runs in its own process (tests.helpers); so does every TensorFlow check: the
test process imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import ctypes.util
import json
import re

import numpy as np
import pytest

from tests import helpers
from tests.helpers import (
    REPO,
    assert_one_line_error,
    interrupt_after,
    keras_learning_rates,
    run_chapter,
    run_python,
    run_script,
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
    "voc": (the LabelImg folder, dump), "voc_records": its records folder}."""
    from data.synthetic import write_fruits

    root = tmp_path_factory.mktemp("records")
    fruit = run_script(MAKE, "--smoke", "--output-dir", root / "fruit", "--seed", "5")
    folder = write_fruits(root / "data", train_per_class=3, test_per_class=1, seed=3) / "train_zip" / "train"
    run_script(MAKE, "--voc-dir", folder, "--output-dir", root / "voc", "--max-side", "64")
    fruit_dump, voc_dump = dump_records(root / "fruit", root / "voc")
    return {"fruit": (root / "fruit", fruit.stdout, fruit_dump), "voc": (folder, voc_dump),
            "voc_records": root / "voc"}


def test_make_tfrecords_smoke_writes_three_records_and_a_label_map(record_sets):
    output_dir, stdout, _ = record_sets["fruit"]
    assert "train.record: 20 photos" in stdout and "test.record: 16 photos" in stdout
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


def test_records_carry_the_od_api_keys_read_with_a_spec_written_here(record_sets):
    """The keys of the OD API's `create_pascal_tf_record.py` / `tf_example_decoder.py`,
    spelled out here rather than taken from records.FEATURES: a record this chapter writes
    parses with the API's own feature spec, and every value is the VOC file's."""
    from data.images import image_size
    from data.voc import read_voc

    folder, output_dir = record_sets["voc"][0], record_sets["voc_records"]
    result = run_python(f"""
        import json
        import tensorflow as tf
        spec = {{
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/format": tf.io.FixedLenFeature([], tf.string),
            "image/height": tf.io.FixedLenFeature([], tf.int64),
            "image/width": tf.io.FixedLenFeature([], tf.int64),
            "image/filename": tf.io.FixedLenFeature([], tf.string),
            "image/source_id": tf.io.FixedLenFeature([], tf.string),
            "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
            "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
            "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
            "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
            "image/object/class/label": tf.io.VarLenFeature(tf.int64),
            "image/object/class/text": tf.io.VarLenFeature(tf.string),
        }}
        out = []
        for serialized in tf.data.TFRecordDataset({str(output_dir / "train.record")!r}):
            example = tf.io.parse_single_example(serialized, spec)
            value = {{k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v).numpy()
                     for k, v in example.items()}}
            image = tf.io.decode_jpeg(value["image/encoded"], channels=3)
            present = set(tf.train.Example.FromString(serialized.numpy()).features.feature)
            out.append({{"keys": sorted(present), "shape": list(image.shape),
                        "format": value["image/format"].decode(), "height": int(value["image/height"]),
                        "width": int(value["image/width"]), "filename": value["image/filename"].decode(),
                        "source_id": value["image/source_id"].decode(),
                        "box": [value["image/object/bbox/" + k].tolist() for k in ("xmin", "ymin", "xmax", "ymax")],
                        "label": value["image/object/class/label"].tolist(),
                        "text": [t.decode() for t in value["image/object/class/text"]]}})
        print("JSON" + json.dumps(out))
        """, CHAPTER)  # the chapter's warm TensorFlow; nothing of the chapter is imported
    examples = json.loads(next(line[4:] for line in result.stdout.splitlines() if line.startswith("JSON")))
    names = sorted({n for xml in folder.glob("*.xml") for n in read_voc(xml).names})
    assert examples
    for example in examples:
        assert example["keys"] == sorted([
            "image/encoded", "image/format", "image/height", "image/width", "image/filename",
            "image/source_id", "image/object/bbox/xmin", "image/object/bbox/ymin",
            "image/object/bbox/xmax", "image/object/bbox/ymax", "image/object/class/label",
            "image/object/class/text"])
        assert example["format"] == "jpeg" and example["source_id"] == example["filename"]
        assert [example["height"], example["width"], 3] == example["shape"]
        annotation = read_voc(folder / example["filename"].replace(".jpg", ".xml"))
        width, height = image_size(folder / example["filename"])
        xmin, ymin, xmax, ymax = (np.array(v) for v in example["box"])
        np.testing.assert_allclose(np.stack([xmin * width, ymin * height, xmax * width, ymax * height], 1),
                                   annotation.boxes, atol=1e-3)
        assert example["text"] == annotation.names
        assert example["label"] == [names.index(n) + 1 for n in annotation.names]  # label map ids from 1


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


def offline_env(tmp_path) -> dict[str, str]:
    """helpers.offline_env, with an empty KerasHub (kagglehub) cache too; on a machine with a
    GPU, one TensorFlow does not see (the "no gpu" start)."""
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""} if ctypes.util.find_library("cuda") else {}
    return helpers.offline_env(tmp_path, KAGGLEHUB_CACHE=str(tmp_path / "kaggle"), **no_gpu)


# Three starts that fail before training, each into the smoke run's folder, with the words
# their one-line error must hold: no photos (an empty data folder, offline), a GPU asked for
# where TensorFlow sees none, and the COCO weights offline.
FAILED_STARTS = {
    "no data": (["--weights", "none", "--data-dir", "{empty}"], ["fruits", "from any source"]),
    # --epochs 1: a run that fell back to the CPU would end in seconds, and fail here
    "no gpu": (["--smoke", "--device", "cuda", "--epochs", "1"], ["--device cuda: TensorFlow sees no GPU"]),
    "coco offline": (["--smoke", "--weights", "coco"], ["--weights none", "offline?"]),
}


def test_nms_is_per_class_as_the_od_api_does_it():
    """Known answers for model.PerClassNMS on a 100 x 100 image: one box scored for two
    classes is kept for both (class-agnostic NMS would drop one); of two boxes of one class
    overlapping at IoU 0.90, only the higher is kept; a box under min_score is dropped; a
    box past the edge is clipped to it; the rest is padding."""
    result = run_python("""
        import json
        import numpy as np, tensorflow as tf
        import model
        logit = lambda p: float(np.log(p / (1 - p)))
        boxes = tf.constant([[[10, 10, 50, 50], [12, 10, 52, 50], [60, 60, 120, 90], [0, 0, 5, 5]]], tf.float32)
        scores = [[0.9, 0.8, 0.01], [0.7, 0.01, 0.01], [0.01, 0.01, 0.6], [0.02, 0.01, 0.01]]
        logits = tf.constant([[[logit(p) for p in row] for row in scores]], tf.float32)
        out = model.PerClassNMS(min_score=0.05, max_detections=5)(boxes, logits, images=tf.zeros([1, 100, 100, 3]))
        n = int(out["num_detections"][0])
        print("JSON" + json.dumps({"n": n, "shape": list(out["boxes"].shape), "labels": out["labels"][0, :n].numpy().tolist(),
              "scores": out["confidence"][0, :n].numpy().tolist(),
              "boxes": out["boxes"][0, :n].numpy().tolist(),
              "padding": float(tf.reduce_max(out["confidence"][0, n:]))}))
        """, CHAPTER)
    found = json.loads(next(line[4:] for line in result.stdout.splitlines() if line.startswith("JSON")))
    assert found["shape"] == [1, 5, 4] and found["padding"] == 0.0
    assert found["n"] == 3 and found["labels"] == [0, 1, 2]
    assert found["scores"] == pytest.approx([0.9, 0.8, 0.6], abs=1e-6)
    assert np.allclose(found["boxes"], [[10, 10, 50, 50], [10, 10, 50, 50], [60, 60, 100, 90]], atol=1e-3)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The failed starts of FAILED_STARTS, then the smoke run (the corrected command) into
    the same folder, without --overwrite. Returns (output dir, metrics, {case: (result,
    what the folder held after it)})."""
    root = tmp_path_factory.mktemp("03")
    output_dir, failed = root / "run", {}
    (root / "empty").mkdir()
    for case, (flags, _) in FAILED_STARTS.items():
        flags = [flag.format(empty=root / "empty") for flag in flags]
        result = run_script(TRAIN, *flags, "--output-dir", output_dir, check=False, timeout=120,
                            env=offline_env(root))
        failed[case] = (result, sorted(p.name for p in output_dir.iterdir()) if output_dir.exists() else None)
    metrics = run_chapter(TRAIN, output_dir, "--smoke", timeout=300, fresh=True)
    print(f"03 smoke wall time {metrics['_wall_seconds']:.1f}s")
    return output_dir, metrics, failed


@pytest.mark.parametrize("case", FAILED_STARTS)
def test_a_failed_start_leaves_nothing_and_the_corrected_command_runs(smoke_run, case):
    output_dir, metrics, failed = smoke_run
    result, left = failed[case]
    if case == "no data":  # the download's progress lines come first, then the one error line
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and all(word in last for word in FAILED_STARTS[case][1]), last
    else:
        assert_one_line_error(result, *FAILED_STARTS[case][1])  # exit 2: a CPU fall-back fails here
    assert left is None, f"{case}: the failed start left {left} in {output_dir}"
    if case == "coco offline":
        assert result.seconds < 60  # fails fast, never hangs on a dead network
    # the smoke run, started after all three in the same folder without --overwrite, finished
    assert metrics["epochs"] >= 1 and (output_dir / "metrics.json").is_file()


def test_smoke_writes_metrics_curves_grid_and_saved_model(smoke_run):
    output_dir, metrics, _ = smoke_run
    for key in ("map50", "map", "map75", "val_map50", "train_seconds", "wall_seconds", "epochs",
                "tensorflow_version", "keras_hub_version"):
        assert key in metrics, key
    for key in ("map50", "map", "map75"):
        low, high = metrics[f"{key}_ci95"]
        assert 0.0 <= low <= high <= 1.0
    for name in CLASSES:
        assert f"ap50_{name}" in metrics and f"ap_{name}" in metrics
    assert 0.0 <= metrics["map"] <= metrics["map50"] <= 1.0 and metrics["epochs"] == 30
    assert metrics["_wall_seconds"] < 300  # 54 s alone on one core; slack for a busy CPU
    for name in ("config.json", "split.json", "loss_curves.png", "val_map.png", "test_predictions.png",
                 "augmented_batch.png", "best.weights.h5", "checkpoint.npz",
                 "saved_model/saved_model.pb", "saved_model/assets.extra/label_map.pbtxt",
                 "records/train.record", "records/val.record", "records/test.record"):
        assert (output_dir / name).is_file(), name
    split = json.loads((output_dir / "split.json").read_text())
    assert len(split["train"]) == 20 and len(split["val"]) == 4 and len(split["test"]) == 16


def test_smoke_run_learns_the_synthetic_fruit(smoke_run):
    """The smoke run is a learning run: 30 epochs on 20 synthetic photos, scored on the 16
    test photos (26 boxes). Measured: mAP@0.5 0.633 (seed 0, 2 threads; 0.601 on the one
    core a pytest -n 2 worker has). A model that knows the 42 boxes of the 24 training and
    validation photos and how often each class occurs, but not the photo (34 of those boxes
    drawn at random, each put out for all 3 classes with random scores), scores 0.020 on
    average and 0.063 at its 99th percentile over 300 draws; every one of those boxes at
    one score, 0.004; a background-only model (no boxes) 0."""
    _, metrics, _ = smoke_run
    assert metrics["map50"] > 0.3, metrics["map50"]


def test_saved_model_matches_the_in_memory_model(smoke_run):
    output_dir, metrics, _ = smoke_run
    # Measured by train.py on the test photos: the SavedModel fed the record's uint8 photo
    # against the Keras model fed the same photo through the training code's resize.
    assert metrics["export_num_boxes"] > 0  # the smoke's low --min-score keeps boxes to compare
    assert metrics["export_mismatched_photos"] == 0
    assert metrics["export_max_box_diff_px"] < 0.5 and metrics["export_max_score_diff"] < 1e-3
    # Checked again here, independently of train.py: the kept weights in a rebuilt KerasHub
    # model (pixel xyxy boxes of the model input, 0-based labels) vs both signatures of the
    # SavedModel, held to the OD API's contract: normalised [ymin, xmin, ymax, xmax], float
    # label-map ids from 1, num_detections, every output padded to 100 rows.
    result = run_python(f"""
        import json
        from pathlib import Path
        import numpy as np, tensorflow as tf
        import model, records
        run = Path({str(output_dir)!r})
        with np.load(run / "checkpoint.npz") as checkpoint:
            arch = json.loads(str(checkpoint["state"]))["arch"]
        detector = model.build_scratch(arch)
        detector.load_weights(run / "best.weights.h5")
        saved = tf.saved_model.load(str(run / "saved_model"))
        serving = saved.signatures["serving_default"]
        (spec,) = serving.structured_input_signature[1].values()
        assert (spec.name, spec.dtype, spec.shape.as_list()) == ("input_tensor", tf.uint8, [1, None, None, 3]), spec
        # in a tf.function, as predict() and the export run it: eager mode skips the graph's
        # fused ops, and a 1e-6 change in a logit reorders the smoke model's near-tied scores
        forward = tf.function(lambda x: detector.decode_predictions(detector(x, training=False), x))
        worst, boxes = 0.0, 0
        for serialized in tf.data.TFRecordDataset(str(run / "records" / "test.record")):
            example = records.parse_example(serialized)
            photo = example["image"]
            size = arch["image_size"]
            found = forward(model.normalize(model.model_input(photo, size), arch)[None])
            n = int(found["num_detections"][0])
            x0, y0, x1, y1 = np.moveaxis(found["boxes"][0, :n].numpy() / size, -1, 0)
            expected = np.stack([y0, x0, y1, x1], -1).clip(0, 1)
            encoded = tf.io.parse_single_example(serialized, records.FEATURES)["image/encoded"]
            for out in (saved(photo[None]), serving(input_tensor=photo[None]),
                        saved.signatures["detect_encoded"](input_tensor=encoded[None])):
                assert out["detection_boxes"].dtype == tf.float32 and out["detection_boxes"].shape == (1, 100, 4)
                assert out["detection_scores"].shape == (1, 100) and out["detection_classes"].shape == (1, 100)
                assert out["detection_classes"].dtype == tf.float32 and out["num_detections"].shape == (1,)
                assert out["num_detections"].dtype == tf.float32 and int(out["num_detections"][0]) == n
                assert (out["detection_scores"][0, n:].numpy() == 0).all()  # padding
                worst = max(worst, float(np.abs(out["detection_boxes"][0, :n].numpy() - expected).max(initial=0)))
                np.testing.assert_allclose(out["detection_scores"][0, :n].numpy(),
                                           found["confidence"][0, :n].numpy(), atol=1e-4)
                assert (out["detection_classes"][0, :n].numpy() == found["labels"][0, :n].numpy() + 1).all()
            boxes += n
        print("WORST", worst, boxes)
        """, CHAPTER)
    worst, boxes = result.stdout.split("WORST")[1].split()
    assert int(boxes) > 0 and float(worst) < 0.5 / 128  # half a pixel of the 128 px input


def _weights(path) -> dict[str, np.ndarray]:
    """Every array in a Keras .weights.h5 file (the model's and the optimizer's), by its path."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def _checkpoint(path) -> dict[str, np.ndarray]:
    """Every array in a checkpoint.npz (the model's weights, the optimizer's variables)."""
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files if key != "state"}


def _state(path) -> dict:
    with np.load(path) as saved:
        return json.loads(str(saved["state"]))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_runs_weights(smoke_run, tmp_path):
    """SIGTERM as soon as the first validation's checkpoint is written (a killed job), then
    --resume: on the CPU the run ends with the same weights, optimizer state, losses and
    validation mAP as the smoke run, which trained the same epochs (same seed) without a
    stop. The resumed run is a tuning run: test.record is gone, and never needed."""
    output_dir, first, _ = smoke_run
    run = tmp_path / "run"
    seen = interrupt_after(TRAIN, run, "--smoke", pattern=r"^epoch +\d+ ")
    stopped = int(re.search(r"^epoch +(\d+) ", seen, re.M).group(1))
    assert stopped < first["epochs"] and not (run / "metrics.json").exists()
    (run / "records" / "test.record").unlink()
    result = run_script(TRAIN, "--smoke", "--output-dir", run, "--resume", "--no-evaluate-test", timeout=300)
    assert f"after epoch {stopped}" in result.stdout
    assert f"epoch {stopped:3d} " not in result.stdout and f"epoch {first['epochs']:3d} " in result.stdout
    resumed = json.loads((run / "metrics.json").read_text())
    for name, read in (("checkpoint.npz", _checkpoint), ("best.weights.h5", _weights)):
        expected, got = read(output_dir / name), read(run / name)
        assert expected.keys() == got.keys() and expected
        different = [key for key in expected if not np.array_equal(expected[key], got[key])]
        assert not different, f"{name}: {len(different)} of {len(expected)} arrays differ, e.g. {different[:3]}"
    state, resumed_state = _state(output_dir / "checkpoint.npz"), _state(run / "checkpoint.npz")
    assert resumed_state["history"] == state["history"] and resumed_state["val_curve"] == state["val_curve"]
    assert resumed_state["epoch"] == resumed["epochs"] == first["epochs"]
    assert (resumed["val_map50"], resumed["val_map"]) == (first["val_map50"], first["val_map"])
    assert not any(key.startswith(("map", "ap50_", "ap_")) for key in resumed)
    assert not (run / "test_predictions.png").exists()


@pytest.mark.parametrize("flags, words", [
    (["--image-size", "200"], ["--image-size must be a multiple of 2**max_level = 64", "try 192"]),
    (["--weights", "imagenet"], ["--weights must be coco or none"]),
    (["--scale-min", "2"], ["--scale-min 2.0 must not exceed --scale-max"]),
])
def test_bad_values_are_one_line_before_any_work(tmp_path, flags, words):
    result = run_script(TRAIN, "--smoke", "--output-dir", tmp_path / "run", *flags, check=False)
    assert_one_line_error(result, *words)


# --- detect.py -----------------------------------------------------------------------------


def test_detect_and_the_od_api_tutorial_steps_run_the_saved_model_without_keras(smoke_run, tmp_path):
    """detect.py, then the OD API tutorial's inference steps (TF2 "Object Detection From
    TF2 Saved Model"), in one new interpreter that never imports Keras; both see the same
    detections on a plain RGB JPEG."""
    from PIL import Image, ImageDraw

    output_dir, _, _ = smoke_run
    photo = tmp_path / "fruit.jpg"  # PNG bytes behind a .jpg name, RGBA: the shared reader copes
    image = Image.new("RGBA", (256, 224), (240, 240, 230, 255))
    ImageDraw.Draw(image).ellipse([40, 40, 140, 140], fill=(245, 140, 20, 255))
    image.save(photo, format="PNG")
    plain = tmp_path / "plain.jpg"  # what the tutorial's np.array(Image.open(path)) reads as is
    image = Image.new("RGB", (200, 150), (235, 235, 220))
    ImageDraw.Draw(image).ellipse([20, 30, 80, 90], fill=(200, 30, 40))
    ImageDraw.Draw(image).arc([100, 40, 180, 90], 20, 160, fill=(235, 210, 50), width=12)
    image.save(plain, format="JPEG", quality=95)
    model_dir = output_dir / "saved_model"
    argv = ["detect.py", "--model-dir", str(model_dir), "--output-dir", str(tmp_path / "out"),
            "--score-threshold", "0.0", str(photo), str(plain)]
    result = run_python(f"""
        import json, re, runpy
        sys.argv = {argv!r}
        runpy.run_path({str(REPO / DETECT)!r}, run_name="__main__")

        import numpy as np
        import tensorflow as tf
        from PIL import Image
        PATH_TO_SAVED_MODEL = {str(model_dir)!r}
        detect_fn = tf.saved_model.load(PATH_TO_SAVED_MODEL)
        label_map = open(PATH_TO_SAVED_MODEL + "/assets.extra/label_map.pbtxt").read()
        category_index = {{int(i): {{"id": int(i), "name": name}}
                          for i, name in re.findall(r"id:\\s*(\\d+)\\s*name:\\s*'([^']+)'", label_map)}}
        image_np = np.array(Image.open({str(plain)!r}))
        input_tensor = tf.convert_to_tensor(image_np)
        input_tensor = input_tensor[tf.newaxis, ...]
        detections = detect_fn(input_tensor)
        # the tutorial's int(detections.pop('num_detections')) of the [1] tensor: NumPy 2.4
        # makes no scalar of a 1-d array (nor for the OD API's own exports), hence the [0]
        num_detections = int(detections.pop('num_detections')[0])
        detections = {{key: value[0, :num_detections].numpy() for key, value in detections.items()}}
        detections['num_detections'] = num_detections
        detections['detection_classes'] = detections['detection_classes'].astype(np.int64)
        print("TUTORIAL" + json.dumps({{
            "shape": list(image_np.shape), "names": [category_index[c]["name"] for c in detections['detection_classes']],
            "scores": detections['detection_scores'].tolist(), "boxes": detections['detection_boxes'].tolist()}}))
        print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "keras_hub", "tf_keras")))
        """, CHAPTER, fresh=True)  # a new interpreter: what detect.py imports, it imports itself
    assert "IMPORTED []" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(photo))]
    assert lines, result.stdout
    for line in lines:
        path, name, score, *box = line.split()
        assert path == str(photo) and name in CLASSES and 0.0 <= float(score) <= 1.0 and len(box) == 4
    assert Image.open(tmp_path / "out" / "fruit_detections.png").size == (256, 224)

    tutorial = json.loads(next(line[8:] for line in result.stdout.splitlines() if line.startswith("TUTORIAL")))
    height, width, _ = tutorial["shape"]
    printed = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith(str(plain) + " ")]
    assert len(printed) == len(tutorial["names"]) > 0  # every detection (threshold 0)
    for (name, score, *box), tutorial_name, tutorial_score, (ymin, xmin, ymax, xmax) in zip(
            printed, tutorial["names"], tutorial["scores"], tutorial["boxes"], strict=True):
        assert name == tutorial_name and float(score) == pytest.approx(tutorial_score, abs=5e-4)
        assert [float(v) for v in box] == pytest.approx([xmin * width, ymin * height, xmax * width,
                                                         ymax * height], abs=0.51)  # printed rounded


def test_detect_names_a_missing_model_and_a_bad_image(smoke_run, tmp_path):
    output_dir, _, _ = smoke_run
    # cold: detect.py refuses to run in a process that has imported Keras
    result = run_script(DETECT, "--model-dir", tmp_path / "nothing", tmp_path / "a.jpg", check=False, fresh=True)
    assert_one_line_error(result, "is not a SavedModel folder")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    result = run_script(DETECT, "--model-dir", output_dir / "saved_model", "--output-dir", tmp_path / "out", bad,
                        check=False, fresh=True)
    assert result.returncode == 2 and "broken.jpg" in result.stderr and "Traceback" not in result.stderr
