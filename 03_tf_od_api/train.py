"""03: the TensorFlow Object Detection API workflow, rebuilt on KerasHub RetinaNet (TF backend).

What it teaches
    Chapter 3 of the 2020 study followed the Object Detection API tutorial: LabelImg XML
    -> TFRecord + label_map.pbtxt -> train a detector from a pipeline config -> export a
    SavedModel -> detect on new photos. That API no longer installs on TensorFlow 2.21 with
    Keras 3 (it needs protoc-compiled protos, tf-keras and a tf-models-official that pins
    an older TensorFlow). The workflow is kept; the parts are maintained ones:
    - make_tfrecords.py writes the records with the API's own feature keys (records.py);
    - this script reads them with tf.data (pipeline.py: decode, squash to a square, scale
      jitter and flips that move the boxes, padded batches, prefetch) and trains KerasHub's
      RetinaNetObjectDetector (model.py: what KerasHub 0.32 does and does not do for you);
    - validation mAP (pycocotools, `data.detection_eval.coco_map`) every few epochs picks
      the weights to keep; the test photos are scored once, at the end, with bootstrap
      intervals; the split is 03b's, so the two chapters compare on the same photos;
    - the kept model is exported as a SavedModel in the API's exported-model contract
      (`detect_fn = tf.saved_model.load(path)`, `detect_fn(input_tensor)` on a uint8
      [1, H, W, 3] batch -> detection_boxes / _scores / _classes, num_detections), with
      resizing, box decoding and per-class NMS in the graph; validation and test scores go
      through the same NMS. detect.py runs it without Keras, as the API's tutorial did.

How to run
    python 03_tf_od_api/train.py                    # fine-tune KerasHub's COCO RetinaNet (internet once)
    python 03_tf_od_api/train.py --weights none     # from scratch, offline (the measured run)
    python 03_tf_od_api/train.py --weights none --resume    # continue an interrupted run
    python 03_tf_od_api/train.py --smoke            # synthetic data, about a minute, learns
    python 03_tf_od_api/train.py --weights none --strategy mirrored  # data-parallel: every local GPU
    python 03_tf_od_api/detect.py --model-dir runs/03_tf_od_api/saved_model photo.jpg

What to expect (measured on 2 shared CPU cores, seed 0; results/from_scratch.json)
    python 03_tf_od_api/train.py --weights none --data-dir /tmp/dd --output-dir runs/03_tf_od_api
    -> test mAP@0.5 0.826 (95% bootstrap interval over photos 0.763-0.885), mAP@[.5:.95]
       0.484 (0.433-0.558), mAP@0.75 0.477; AP@0.5 apple 0.903, banana 0.654, orange
       0.921. Validation mAP@0.5 0.789 at epoch 65 (the weights kept). 70 epochs of 192
       photos at 256 px, ~29 s each: 33.5 min of training, 34.9 min wall in all.
    03b's FCOS (PyTorch, from scratch) scores 0.796 on the same 60 photos: 0.030 lower,
    well inside this run's interval, so the two are level, not ranked. Banana is the weak
    class in both (03b 0.625): its analysis found bunches boxed whole in some XML files
    and banana by banana in others.
    The exported SavedModel gave the same 1479 boxes on the 60 test photos as the Keras
    model (largest difference 0.00003 px, scores identical; metrics.json export_*).
    The learning rate was the one setting that mattered: at 0.002 the run collapsed
    (val mAP@0.5 0.000 at epochs 5 and 10, see config.toml); at 0.0005 it climbed
    0.28 (epoch 5), 0.64 (30), 0.76 (50), 0.79 (65).
    python 03_tf_od_api/train.py --smoke            # 70 s, TensorFlow's import included
    -> 30 epochs on 20 synthetic photos: test mAP@0.5 0.633 on its 16 test photos (0.601
       with --num-threads 1: the sums run in another order)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from data import cli, outputs
from data.cli import ChapterParser, UserError, require, run_main, seed_everything
from data.detection_eval import coco_map, coco_map_ci95
from data.fruits import BOX_CLASSES
from parallel import tf_strategy

CHAPTER = "03_tf_od_api"
CONFIG_PATH = Path(__file__).with_name("config.toml")

# --- Config ------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    for key in ("epochs", "eval_every", "grid_images", "head_convs"):
        cli.require_at_least(cfg, key, 1)
    cli.require_at_least(cfg, "num_threads", 0, "0 means all cores")
    require(cfg["device"] in ("auto", "cpu", "cuda"),
            f"--device must be auto, cpu or cuda, got {cfg['device']!r}")
    cli.require_at_least(cfg, "batch_size", 2, "BatchNorm")
    cli.require_at_least(cfg, "warmup_epochs", 0)
    cli.require_at_least(cfg, "weight_decay", 0)
    cli.require_at_least(cfg, "color_jitter", 0)
    cli.require_at_least(cfg, "aspect_jitter", 0)
    cli.require_at_least(cfg, "preload_scale", 1)
    for key in ("learning_rate", "grad_clip", "time_limit_minutes", "anchor_size", "scale_min"):
        cli.require_positive(cfg, key)
    require(cfg["scale_min"] <= cfg["scale_max"],
            f"--scale-min {cfg['scale_min']} must not exceed --scale-max {cfg['scale_max']}")
    require(0 < cfg["val_fraction"] < 1, f"--val-fraction must be between 0 and 1, got {cfg['val_fraction']}")
    require(0 < cfg["prior_probability"] < 1,
            f"--prior-probability must be between 0 and 1, got {cfg['prior_probability']}")
    require(0 <= cfg["min_score"] < 1, f"--min-score must be in [0, 1), got {cfg['min_score']}")
    require(0 <= cfg["score_threshold"] <= 1, f"--score-threshold must be in [0, 1], got {cfg['score_threshold']}")
    require(cfg["weights"] in ("coco", "none"), f"--weights must be coco or none, got {cfg['weights']!r}")
    require(len(cfg["resnet_blocks"]) == 4 and min(cfg["resnet_blocks"]) >= 1,
            f"--resnet-blocks must be 4 positive integers (stages P2..P5), got {cfg['resnet_blocks']}")
    require(3 <= cfg["min_level"] <= 5 and cfg["min_level"] <= cfg["max_level"] <= 7,
            f"--min-level / --max-level must satisfy 3 <= min <= 5, min <= max <= 7; "
            f"got {cfg['min_level']}, {cfg['max_level']}")
    stride = 2 ** (cfg["max_level"] if cfg["weights"] == "none" else 7)  # the COCO preset's FPN: P3-P7
    require(cfg["image_size"] >= stride and cfg["image_size"] % stride == 0,
            f"--image-size must be a multiple of 2**max_level = {stride} (the FPN upsamples by 2 "
            f"and adds; --weights coco reaches P7), got {cfg['image_size']}; try {max(stride, round(cfg['image_size'] / stride) * stride)}")
    tf_strategy.check_config(cfg)


# --- Data --------------------------------------------------------------------------


def prepare_records(cfg: dict, args, output_dir: Path) -> Path:
    """The records folder: --records-dir as given, or the fruit set's records written into
    <output-dir>/records (a resumed run reuses them)."""
    import photos
    import records

    if cfg["records_dir"]:
        folder = Path(cfg["records_dir"])
        require(folder.is_dir(), f"--records-dir {folder} is not a folder; run make_tfrecords.py first")
        return folder
    folder = output_dir / "records"
    if cfg["resume"] and (folder / "label_map.pbtxt").is_file():
        return folder
    start = time.monotonic()
    smoke_dir = output_dir / "smoke-data" if args.smoke else None
    splits = photos.fruit_splits(args.data_dir, cfg["val_fraction"], cfg["seed"], smoke_dir)
    photos.check_photos(splits, BOX_CLASSES)
    counts = records.write_dataset(folder, splits, BOX_CLASSES, cfg["max_side"])
    print(f"wrote {', '.join(f'{k}.record ({v})' for k, v in counts.items())} and label_map.pbtxt "
          f"to {folder} in {time.monotonic() - start:.0f} s")
    return folder


def load_data(folder: Path, cfg: dict, arch: dict, resume: bool, output_dir: Path):
    """Decoded train (uint8, preload size) and val splits; the split goes to split.json."""
    import pipeline

    size = arch["image_size"]
    preload = math.ceil(size * cfg["preload_scale"] / 32) * 32
    train = pipeline.load_split(folder / "train.record", preload, keep_photos=False, as_uint8=True)
    val = pipeline.load_split(folder / "val.record", size)
    require(len(train.images) >= cfg["batch_size"], f"--batch-size {cfg['batch_size']} is more than the "
            f"{len(train.images)} training photos; use a smaller --batch-size")
    split = {"train": train.filenames, "val": val.filenames}
    if cfg["evaluate_test"]:  # only the names, read from the record's own file-name feature
        require((folder / "test.record").is_file(), f"no test.record in {folder}; "
                "use --no-evaluate-test, or make_tfrecords.py --test-voc-dir")
        split["test"] = [example["filename"].decode() for example in _record_names(folder / "test.record")]
    elif resume and (output_dir / "split.json").is_file():  # keep the names the run began with
        split["test"] = _read_json(output_dir / "split.json").get("test", [])
    outputs.write_split(output_dir, split, resume=resume)
    return train, val


def _record_names(path: Path):
    import records

    return records.read_records(path)


# --- Model -------------------------------------------------------------------------


def make_detector(cfg: dict, class_names: list[str], output_dir: Path):
    """(detector, arch): rebuilt and reloaded (--resume), COCO weights, or random init."""
    import model as detector_lib

    if cfg["resume"]:
        checkpoint = output_dir / "checkpoint.weights.h5"
        require(checkpoint.is_file() and (output_dir / "state.json").is_file(),
                f"--resume: no {checkpoint} and state.json; start a new run without --resume")
        arch = _read_json(output_dir / "state.json")["arch"]
        detector = (detector_lib.build_coco(cfg, arch["num_classes"])[0] if arch["kind"] == "coco"
                    else detector_lib.build_scratch(arch))
        try:
            detector.load_weights(checkpoint)
        except Exception as exc:
            raise UserError(f"{checkpoint}: weights do not fit the model ({exc.__class__.__name__})") from None
        return detector, arch
    if cfg["weights"] == "coco":
        return detector_lib.build_coco(cfg, len(class_names))
    arch = detector_lib.scratch_arch(cfg, len(class_names))
    return detector_lib.build_scratch(arch, cfg["prior_probability"]), arch


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is missing or unreadable; start a new run without --resume") from None


def restore_optimizer(detector, path: Path) -> None:
    """Put the saved optimizer state (Adam moments, step count -> schedule) back."""
    detector.optimizer.build(detector.trainable_variables)
    with np.load(path) as saved:
        values = [saved[f"v{i}"] for i in range(len(saved.files))]
    variables = detector.optimizer.variables
    require(len(values) == len(variables), f"{path}: optimizer state does not fit this model")
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


# --- Train -------------------------------------------------------------------------


def train(detector, arch, train_split, val_split, cfg, output_dir: Path, state: dict) -> dict:
    """fit() in chunks of eval_every epochs; after each, validation mAP, keep the best
    weights, checkpoint. Stops before a chunk that would end past --time-limit-minutes."""
    import pipeline

    steps = len(train_split.images) // cfg["batch_size"]
    budget = 60 * cfg["time_limit_minutes"]
    while state["epoch"] < cfg["epochs"]:
        first, last = state["epoch"] + 1, min(cfg["epochs"], state["epoch"] + cfg["eval_every"])
        start = time.monotonic()
        history = detector.fit(pipeline.train_dataset(train_split, cfg, arch, first, last), epochs=last,
                               initial_epoch=first - 1, steps_per_epoch=steps, verbose=0).history
        state["train_seconds"] += time.monotonic() - start
        for key, values in history.items():
            state["history"].setdefault(key, []).extend(float(v) for v in values)
        if not all(math.isfinite(v) for v in history["loss"]):
            raise UserError(f"the loss became {history['loss'][-1]} by epoch {last}; try a lower --learning-rate")
        val = score(predict(detector, val_split.images, arch), val_split, arch)
        state["epoch"] = last
        for key in ("map50", "map"):
            state["val_curve"][key].append(val[key])
        state["val_curve"]["epoch"].append(last)
        best = val["map50"] > state["best_map50"]
        if best:
            state.update(best_map50=val["map50"], best_epoch=last)
            save_weights(detector, output_dir / "best.weights.h5")
        state["wall_seconds"] += time.monotonic() - start
        save_checkpoint(detector, arch, state, output_dir)  # before the line: a kill after it can resume
        print(f"epoch {last:3d}  loss {history['loss'][-1]:.3f}  val mAP@0.5 {val['map50']:.3f}  "
              f"mAP {val['map']:.3f}{'  (best)' if best else ''}  {state['wall_seconds'] / 60:.1f} min", flush=True)
        # stop when another chunk like this one would cross the limit (the cosine is cut short)
        if state["wall_seconds"] + (time.monotonic() - start) > budget and state["epoch"] < cfg["epochs"]:
            print(f"stopping after epoch {last}: one more chunk would pass --time-limit-minutes "
                  f"{cfg['time_limit_minutes']}")
            break
    return state


# --- Evaluate ----------------------------------------------------------------------


def predict(detector, images: np.ndarray, arch: dict, batch_size: int = 8) -> list[dict]:
    """Boxes (model-input pixels), 0-based labels and scores for squashed 0..255 images,
    through the same per-class NMS as the export (model.PerClassNMS)."""
    inputs = (images * np.float32(arch["scale"]) + np.float32(arch["offset"])).astype(np.float32)  # model.normalize
    found = detector.predict(inputs, batch_size=batch_size, verbose=0)
    results = []
    for i, count in enumerate(np.asarray(found["num_detections"]).astype(int)):
        results.append({"boxes": np.asarray(found["boxes"][i, :count], np.float64),
                        "labels": np.asarray(found["labels"][i, :count], np.int64),
                        "scores": np.asarray(found["confidence"][i, :count], np.float64)})
    return results


def score(predictions: list[dict], split, arch: dict, with_ci: bool = False) -> dict:
    """COCO mAP in the squashed square's pixels (a per-axis scale leaves IoU unchanged)."""
    truth = [{"boxes": b, "labels": lab} for b, lab in zip(split.boxes, split.labels, strict=True)]
    metrics = coco_map(truth, predictions, arch["class_names"])
    if with_ci:
        metrics.update(coco_map_ci95(truth, predictions, arch["class_names"],
                                     keys=("map50", "map", "map75"), reps=200, seed=0))
    return metrics


def export_parity(saved_model_dir: Path, split, predictions: list[dict], size: int) -> dict:
    """Run the exported SavedModel on the record photos (uint8, their own size) as the OD
    API's tutorial does, and compare with the in-memory predictions: each exported box is
    paired with the nearest in-memory box of its class (per-class NMS can keep one box for
    two classes); the largest box (photo pixels) and score differences, and how many
    photos give a different number of boxes or a box with no partner of its class."""
    import tensorflow as tf

    detect_fn = tf.saved_model.load(str(saved_model_dir))
    worst = {"export_max_box_diff_px": 0.0, "export_max_score_diff": 0.0, "export_mismatched_photos": 0,
             "export_num_boxes": 0}
    for photo, pred in zip(split.photos, predictions, strict=True):
        out = detect_fn(tf.convert_to_tensor(photo)[tf.newaxis, ...])
        count = int(out["num_detections"][0])
        height, width = photo.shape[:2]
        ymin, xmin, ymax, xmax = out["detection_boxes"][0, :count].numpy().T
        boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=1)
        labels = out["detection_classes"][0, :count].numpy().astype(np.int64) - 1
        memory = pred["boxes"] * np.array([width, height] * 2) / size
        worst["export_num_boxes"] += count
        if count != len(memory) or not count:
            worst["export_mismatched_photos"] += int(count != len(memory))
            continue
        distance = np.abs(boxes[:, None, :] - memory[None, :, :]).max(-1)  # (exported, memory)
        distance[labels[:, None] != pred["labels"][None, :]] = np.inf
        nearest = distance.argmin(1)
        if not np.isfinite(distance.min(1)).all():
            worst["export_mismatched_photos"] += 1
            continue
        worst["export_max_box_diff_px"] = max(worst["export_max_box_diff_px"], float(distance.min(1).max()))
        score_diff = np.abs(out["detection_scores"][0, :count].numpy() - pred["scores"][nearest]).max()
        worst["export_max_score_diff"] = max(worst["export_max_score_diff"], float(score_diff))
    return worst


# --- Save --------------------------------------------------------------------------


def save_weights(detector, path: Path) -> None:
    """Keras wants the name to end in .weights.h5, so the atomic rename is done here."""
    tmp = path.with_name(f".{path.name[:-len('.weights.h5')]}.tmp.weights.h5")
    detector.save_weights(tmp)
    tmp.replace(path)


def save_checkpoint(detector, arch: dict, state: dict, output_dir: Path) -> None:
    """checkpoint.weights.h5, optimizer.npz (moments, step count) and state.json (curves, times)."""
    save_weights(detector, output_dir / "checkpoint.weights.h5")
    with outputs.atomic_path(output_dir / "optimizer.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **{f"v{i}": np.asarray(v) for i, v in enumerate(detector.optimizer.variables)})
    outputs.write_json(output_dir / "state.json", {**state, "arch": arch})


def save_figures(output_dir: Path, state: dict, arch: dict, cfg: dict, test=None, predictions=None) -> None:
    outputs.plot_curves({k: v for k, v in state["history"].items()}, output_dir / "loss_curves.png",
                        title="training losses (focal + box)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in (("map50", "mAP@0.5"), ("map", "mAP@[.5:.95]")):
        ax.plot(state["val_curve"]["epoch"], state["val_curve"][key], marker="o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="validation mAP", ylim=(0, 1), title="validation mAP")
    ax.grid(alpha=0.3)
    ax.legend()
    outputs.save_figure(fig, output_dir / "val_map.png")
    if test is None:
        return
    names = arch["class_names"]
    picks = np.linspace(0, len(test.photos) - 1, min(cfg["grid_images"], len(test.photos))).astype(int)
    cells, titles = [], []
    for i in picks:
        photo, pred, size = test.photos[i], predictions[i], arch["image_size"]
        scale = np.array([photo.shape[1], photo.shape[0]] * 2) / size
        shown = pred["scores"] >= cfg["score_threshold"]
        cells += [outputs.draw_boxes(photo, test.boxes[i] * scale, test.labels[i], names),
                  outputs.draw_boxes(photo, pred["boxes"][shown] * scale, pred["labels"][shown], names,
                                     pred["scores"][shown])]
        titles += [f"{Path(test.filenames[i]).stem}: truth", f"predicted (>= {cfg['score_threshold']})"]
    outputs.plot_image_grid(cells, titles, output_dir / "test_predictions.png", columns=6, cell=2.6,
                            title="test photos: ground truth (left) and predictions (right)")


def save_augmented(output_dir: Path, train_split, cfg: dict, arch: dict, count: int = 8) -> None:
    """The first training batch as the model sees it (before normalising), boxes drawn."""
    import pipeline

    images, boxes, labels = pipeline.augmented_examples(train_split, cfg, arch, count)
    cells = [outputs.draw_boxes(image, b[lab >= 0], lab[lab >= 0].astype(int), arch["class_names"])
             for image, b, lab in zip(images, boxes, labels, strict=True)]
    outputs.plot_image_grid(cells, [f"augmented {i + 1}" for i in range(len(cells))],
                            output_dir / "augmented_batch.png", columns=4, cell=2.4,
                            title="training inputs: scale jitter, flips, colour; the boxes move along")


def evaluate_and_export(detector, arch, cfg, folder: Path, output_dir: Path, state: dict, val) -> dict:
    """Best weights back in; final validation; the export; the test photos, once."""
    import model as detector_lib
    import pipeline

    if (output_dir / "best.weights.h5").is_file():
        detector.load_weights(output_dir / "best.weights.h5")
    final_val = score(predict(detector, val.images, arch), val, arch)
    metrics: dict = {}
    saved_model = detector_lib.export_saved_model(detector, arch, output_dir / "saved_model",
                                                  folder / "label_map.pbtxt")
    # The exported graph, checked against the in-memory model on photos it can be shown:
    # the test photos when they are scored anyway, else the validation photos.
    if cfg["evaluate_test"]:
        test = pipeline.load_split(folder / "test.record", arch["image_size"])
        test_predictions = predict(detector, test.images, arch)
        test_metrics = score(test_predictions, test, arch, with_ci=True)
        for key in ("map50", "map", "map75"):
            metrics[key], metrics[f"{key}_ci95"] = test_metrics[key], test_metrics[f"{key}_ci95"]
        for name in arch["class_names"]:
            metrics[f"ap50_{name}"], metrics[f"ap_{name}"] = test_metrics[f"ap50_{name}"], test_metrics[f"ap_{name}"]
        metrics.update(export_parity(saved_model, test, test_predictions, arch["image_size"]))
        save_figures(output_dir, state, arch, cfg, test, test_predictions)
    else:  # a tuning run: no stale test grid next to this model
        (output_dir / "test_predictions.png").unlink(missing_ok=True)
        metrics.update(export_parity(saved_model, val, predict(detector, val.images, arch), arch["image_size"]))
        save_figures(output_dir, state, arch, cfg)
    metrics.update(val_map50=final_val["map50"], val_map=final_val["map"], best_epoch=state["best_epoch"])
    return metrics


def start_state(detector, strategy, cfg: dict, output_dir: Path) -> dict:
    """The run's progress: fresh, or with --resume the saved one and the optimizer's state."""
    state = {"epoch": 0, "train_seconds": 0.0, "wall_seconds": 0.0, "best_map50": -1.0, "best_epoch": 0,
             "history": {}, "val_curve": {"epoch": [], "map50": [], "map": []}}
    if cfg["resume"]:
        saved = _read_json(output_dir / "state.json")
        state.update({key: saved[key] for key in state})
        with strategy.scope():
            restore_optimizer(detector, output_dir / "optimizer.npz")
        print(f"resumed from {output_dir / 'checkpoint.weights.h5'} after epoch {state['epoch']}")
    return state


def main(argv=None) -> dict:
    wall_start = time.monotonic()
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    check_config(cfg)
    args.output_dir = tf_strategy.worker_output_dir(args.output_dir, cfg)  # the chief's, or scratch
    output_dir = outputs.prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite,
                                            resume=cfg["resume"], smoke=args.smoke,
                                            data_dir=str(args.data_dir))
    import keras  # the framework only now: --help and flag errors answer at once
    import model as detector_lib
    import records
    import tensorflow as tf

    device, device_name = detector_lib.use_device(cfg["device"], cfg["num_threads"])
    strategy = tf_strategy.make_strategy(cfg)  # "default": one device, as a plain run
    seed_everything(cfg["seed"])
    keras.utils.set_random_seed(cfg["seed"])
    tf.config.experimental.enable_op_determinism()

    # The model before the photos: `--weights coco` offline fails in seconds.
    class_names = (records.class_names_from(Path(cfg["records_dir"]) / "label_map.pbtxt")
                   if cfg["records_dir"] else list(BOX_CLASSES))
    with strategy.scope():  # the weights, one copy per replica
        detector, arch = make_detector(cfg, class_names, output_dir)
    tf_strategy.sync_batchnorm(detector, strategy)
    folder = prepare_records(cfg, args, output_dir)
    arch["class_names"] = class_names
    train_split, val = load_data(folder, cfg, arch, cfg["resume"], output_dir)
    print(f"{len(train_split.images)} train, {len(val.images)} val photos from {folder}; "
          f"{detector.count_params():,} parameters")
    with strategy.scope():  # and the optimizer's state
        detector_lib.compile_detector(detector, cfg, len(train_split.images) // cfg["batch_size"])
    save_augmented(output_dir, train_split, cfg, arch)
    state = start_state(detector, strategy, cfg, output_dir)
    state["wall_seconds"] += time.monotonic() - wall_start
    outputs.training_started(output_dir)  # data, device and weights checked: a failure now keeps the checkpoint
    state = train(detector, arch, train_split, val, cfg, output_dir, state)
    train_end = time.monotonic()
    metrics = evaluate_and_export(detector, arch, cfg, folder, output_dir, state, val)
    metrics.update(train_seconds=state["train_seconds"],
                   # the whole run: records, decoding, training, validation, test, export
                   # (summed over the sessions of a resumed run)
                   wall_seconds=state["wall_seconds"] + time.monotonic() - train_end,
                   epochs=state["epoch"], weights=cfg["weights"], image_size=arch["image_size"],
                   num_train=len(train_split.images), num_val=len(val.images),
                   **outputs.run_facts(frameworks=("tensorflow", "keras", "keras-hub"), device=device,
                                     device_name=device_name), **tf_strategy.run_facts(strategy, detector))
    outputs.write_metrics(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
