"""03: the TensorFlow Object Detection API workflow, rebuilt on KerasHub RetinaNet (TF backend).

What it teaches
    The 2020 study's OD API tutorial, step by step, on maintained parts (the API no longer
    installs on TensorFlow 2.21 with Keras 3): LabelImg XML -> TFRecords with the API's feature
    keys and a label_map.pbtxt (make_tfrecords.py, records.py) -> tf.data batches whose boxes
    move with the augmentation (pipeline.py) -> KerasHub's RetinaNetObjectDetector (model.py),
    fit() in chunks of --eval-every epochs, validation mAP after each keeping the best weights
    -> the test photos scored once (--no-evaluate-test: never) -> a SavedModel with the API's
    signature (exporting.py checks it against Keras; detect.py runs it without Keras). Also:
    figures.py (augmented batch, test grid), config_checks.py. Figures, commands, history: README.md.

How to run
    python 03_tf_od_api/train.py                    # fine-tune KerasHub's COCO RetinaNet (internet once)
    python 03_tf_od_api/train.py --weights none     # from scratch, offline (the measured run)
    python 03_tf_od_api/train.py --weights none --resume    # continue a stopped or killed run
    python 03_tf_od_api/train.py --smoke            # synthetic data, about a minute, learns
    python 03_tf_od_api/train.py --weights none --strategy mirrored  # data-parallel: every local GPU
    python 03_tf_od_api/detect.py --model-dir runs/03_tf_od_api/saved_model photo.jpg
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import config_checks  # framework-free: the checks of every config value
import numpy as np

from data import checkpoints, outputs
from data.cli import ChapterParser, UserError, require, run_main, seed_everything
from data.detection_eval import coco_map, coco_map_ci95
from data.fruits import BOX_CLASSES
from data.runclock import RunClock
from parallel import tf_strategy

CHAPTER = "03_tf_od_api"
CONFIG_PATH = Path(__file__).with_name("config.toml")

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
    import records

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
        split["test"] = [example["filename"].decode() for example in records.read_records(folder / "test.record")]
    elif resume and (output_dir / "split.json").is_file():  # keep the test names the run began with, if any
        split.update((k, v) for k, v in outputs.read_split(output_dir / "split.json").items() if k == "test")
    outputs.write_split(output_dir, split, resume=resume)
    return train, val


# --- Model -------------------------------------------------------------------------


def make_detector(cfg: dict, class_names: list[str], output_dir: Path):
    """(detector, arch): KerasHub's COCO RetinaNet with new heads, or one from random weights.
    A resumed run builds the same model; start_state puts the checkpoint's weights in."""
    import model as detector_lib

    checkpoint = output_dir / "checkpoint.npz"
    require(not cfg["resume"] or checkpoint.is_file(),  # checked before any photo is read
            f"--resume: no checkpoint at {checkpoint}; start without --resume")
    if cfg["weights"] == "coco":
        return detector_lib.build_coco(cfg, len(class_names))
    arch = detector_lib.scratch_arch(cfg, len(class_names))
    return detector_lib.build_scratch(arch, cfg["prior_probability"]), arch


# --- Train -------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint, so --resume continues from it."""
    epoch: int = 0              # epochs trained
    best_map50: float = -1.0    # the best validation mAP@0.5 so far; its weights are best.weights.h5
    best_epoch: int = 0
    history: dict = field(default_factory=dict)  # fit()'s losses, one value an epoch
    val_curve: dict = field(default_factory=lambda: {"epoch": [], "map50": [], "map": []})


def train(detector, arch, train_split, val_split, cfg, output_dir: Path, progress: Progress, clock) -> None:
    """fit() in chunks of eval_every epochs; after each, validation mAP, keep the best
    weights, checkpoint. Stops after the chunk during which --time-limit-minutes passed."""
    import pipeline

    steps = len(train_split.images) // cfg["batch_size"]
    while progress.epoch < cfg["epochs"]:
        first, last = progress.epoch + 1, min(cfg["epochs"], progress.epoch + cfg["eval_every"])
        start = time.monotonic()
        history = detector.fit(pipeline.train_dataset(train_split, cfg, arch, first, last), epochs=last,
                               initial_epoch=first - 1, steps_per_epoch=steps, verbose=0).history
        clock.add_training(time.monotonic() - start)
        for key, values in history.items():
            progress.history.setdefault(key, []).extend(float(v) for v in values)
        if not all(math.isfinite(v) for v in history["loss"]):
            raise UserError(f"the loss became {history['loss'][-1]} by epoch {last}; try a lower --learning-rate")
        val = score(predict(detector, val_split.images, arch), val_split, arch)
        progress.epoch = last
        for key in ("map50", "map"):
            progress.val_curve[key].append(val[key])
        progress.val_curve["epoch"].append(last)
        best = val["map50"] > progress.best_map50  # the rule that keeps an epoch: a higher val mAP@0.5
        if best:
            progress.best_map50, progress.best_epoch = val["map50"], last
            save_weights(detector, output_dir / "best.weights.h5")
        clock.lap()
        save_checkpoint(detector, arch, progress, clock, output_dir)  # before the line: a kill after it can resume
        print(f"epoch {last:3d}  loss {history['loss'][-1]:.3f}  val mAP@0.5 {val['map50']:.3f}  "
              f"mAP {val['map']:.3f}{'  (best)' if best else ''}  {clock.wall_seconds / 60:.1f} min", flush=True)
        if clock.out_of_time() and progress.epoch < cfg["epochs"]:  # the cosine is cut short
            print(clock.stop_message(last, cfg["epochs"]))
            break


# --- Evaluate ----------------------------------------------------------------------


def predict(detector, images: np.ndarray, arch: dict, batch_size: int = 8) -> list[dict]:
    """Boxes (model-input pixels), 0-based labels and scores for squashed 0..255 images,
    through the same per-class NMS as the export (model.PerClassNMS)."""
    import pipeline

    found = detector.predict(pipeline.inference_dataset(images, arch, batch_size), verbose=0)
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


def evaluate_and_export(detector, arch, cfg, folder: Path, output_dir: Path, progress: Progress, val) -> dict:
    """The kept weights back in; final validation; the export; the test photos, once."""
    import exporting
    import figures
    import model as detector_lib
    import pipeline

    if (output_dir / "best.weights.h5").is_file():
        detector.load_weights(output_dir / "best.weights.h5")
    final_val = score(predict(detector, val.images, arch), val, arch)
    metrics: dict = {}
    saved_model = detector_lib.export_saved_model(detector, arch, output_dir / "saved_model",
                                                  folder / "label_map.pbtxt")
    # exporting.parity: the exported graph against the Keras model, on the photos scored anyway
    if cfg["evaluate_test"]:
        test = pipeline.load_split(folder / "test.record", arch["image_size"])
        test_predictions = predict(detector, test.images, arch)
        test_metrics = score(test_predictions, test, arch, with_ci=True)
        for key in ("map50", "map", "map75"):
            metrics[key], metrics[f"{key}_ci95"] = test_metrics[key], test_metrics[f"{key}_ci95"]
        for name in arch["class_names"]:
            metrics[f"ap50_{name}"], metrics[f"ap_{name}"] = test_metrics[f"ap50_{name}"], test_metrics[f"ap_{name}"]
        metrics.update(exporting.parity(saved_model, test, test_predictions, arch["image_size"]))
        outputs.plot_truth_vs_prediction(figures.truth_vs_prediction(test, test_predictions, arch, cfg),
                                         output_dir / "test_predictions.png", cfg["score_threshold"], cell=2.6)
    else:  # a tuning run: no stale test grid next to this model
        (output_dir / "test_predictions.png").unlink(missing_ok=True)
        metrics.update(exporting.parity(saved_model, val, predict(detector, val.images, arch), arch["image_size"]))
    outputs.plot_curves(progress.history, output_dir / "loss_curves.png", title="training losses (focal + box)")
    outputs.plot_val_curve(progress.val_curve, (("map50", "mAP@0.5"), ("map", "mAP@[.5:.95]")),
                           output_dir / "val_map.png")
    metrics.update(val_map50=final_val["map50"], val_map=final_val["map"], best_epoch=progress.best_epoch)
    return metrics


# --- Save --------------------------------------------------------------------------


def save_weights(detector, path: Path) -> None:
    """Keras wants the name to end in .weights.h5, so the atomic rename is done here."""
    tmp = path.with_name(f".{path.name[:-len('.weights.h5')]}.tmp.weights.h5")
    detector.save_weights(tmp)
    tmp.replace(path)


def save_checkpoint(detector, arch: dict, progress: Progress, clock: RunClock, output_dir: Path) -> None:
    """checkpoint.npz: the weights, AdamW's moments and step count, the progress, times and arch."""
    checkpoints.save_arrays(output_dir / "checkpoint.npz", {**asdict(progress), **clock.state(), "arch": arch},
                            detector.get_weights(), [v.numpy() for v in detector.optimizer.variables])


def start_state(detector, strategy, cfg: dict, output_dir: Path, clock: RunClock) -> Progress:
    """The run's progress: fresh, or with --resume the checkpoint's weights, optimizer state,
    progress and times (the clock goes on from the time the run had spent)."""
    if not cfg["resume"]:
        return Progress()
    with strategy.scope():  # every replica's copy
        detector.optimizer.build(detector.trainable_variables)  # AdamW's moments exist from here
        state, weights, variables = checkpoints.load_arrays(output_dir / "checkpoint.npz", len(detector.weights),
                                                            len(detector.optimizer.variables))
        detector.set_weights(weights)
        for variable, value in zip(detector.optimizer.variables, variables, strict=True):
            variable.assign(value)
    clock.wall_seconds += state["wall_seconds"]
    clock.add_training(state["train_seconds"])
    progress = Progress(**{key: state[key] for key in asdict(Progress())})
    print(f"resumed from {output_dir / 'checkpoint.npz'} after epoch {progress.epoch}")
    return progress


def main(argv=None) -> dict:
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    clock = RunClock(cfg["time_limit_minutes"])  # the run's wall time, records and decoding included
    config_checks.check_config(cfg)
    args.output_dir = tf_strategy.worker_output_dir(args.output_dir, cfg)  # the chief's, or scratch
    output_dir = outputs.prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite,
                                            resume=cfg["resume"], smoke=args.smoke,
                                            data_dir=str(args.data_dir))
    import figures  # the framework only now: --help and flag errors answer at once
    import keras
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
    figures.save_augmented(output_dir, train_split, cfg, arch)
    progress = start_state(detector, strategy, cfg, output_dir, clock)
    outputs.training_started(output_dir)  # data, device and weights checked: a failure now keeps the checkpoint
    train(detector, arch, train_split, val, cfg, output_dir, progress, clock)
    metrics = evaluate_and_export(detector, arch, cfg, folder, output_dir, progress, val)
    metrics.update(train_seconds=clock.train_seconds,
                   wall_seconds=clock.elapsed(),  # the whole run: a resumed run adds the time before --resume
                   epochs=progress.epoch, weights=cfg["weights"], image_size=arch["image_size"],
                   num_train=len(train_split.images), num_val=len(val.images),
                   **outputs.run_facts(frameworks=("tensorflow", "keras", "keras-hub"), device=device,
                                     device_name=device_name), **tf_strategy.run_facts(strategy, detector))
    outputs.write_metrics(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
