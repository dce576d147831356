"""02b: a fruit CNN with augmentation, the fix the 2020 study proposed, done well.

What it teaches: the study's first CNN (02) overfit 240 photos; it proposed an image
generator, a validation set and a bigger network. Each is done properly here: a seeded,
stratified validation split of the training photos decides every choice (the 60 test photos
are read once, for the kept model); Keras preprocessing layers augment, never the hue (colour
tells apple from orange); a from-scratch net with batch norm, global average pooling and
dropout (model.py); a warm-up + cosine schedule run to its end, keeping the best validation
epoch, with label smoothing and class weights for the small "mixed" class (training.py).
`--weights imagenet` fine-tunes a keras.applications backbone instead. `--audit` ranks the
training photos by loss to test the study's "noisy dataset" complaint; with an `exclude`
list it also trains without them and keeps the run that wins on validation.

How to run (from the repository root):
    python 02b_fruit_cnn_aug/train.py                    # from scratch, into runs/02b_fruit_cnn_aug/
    python 02b_fruit_cnn_aug/train.py --seed 1 --output-dir runs/02b_fruit_cnn_aug-seed1
    python 02b_fruit_cnn_aug/train.py --weights imagenet --output-dir runs/02b-imagenet
    python 02b_fruit_cnn_aug/train.py --audit --config 02b_fruit_cnn_aug/audited.toml --output-dir runs/02b-audit
    python 02b_fruit_cnn_aug/train.py --no-evaluate-test --output-dir runs/02b-tune  # tuning: test unread
    python 02b_fruit_cnn_aug/train.py --smoke            # synthetic data, seconds
    python 02b_fruit_cnn_aug/train.py --strategy mirrored  # data-parallel: every local GPU (or 2 CPU replicas)
    python 02b_fruit_cnn_aug/predict.py --model-path runs/02b_fruit_cnn_aug/model.keras photo.jpg
    python 02b_fruit_cnn_aug/compare.py RUN... --against RUN...  # paired, photo by photo
Figures, seeds, the earlier settings and the audit's findings: 02b_fruit_cnn_aug/README.md.
"""

from __future__ import annotations

import ctypes.util
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data import classify, cli, fruits, outputs, splits, synthetic
from data.cli import ChapterParser, require, run_main, seed_everything
from data.intervals import paired_bootstrap
from parallel import tf_strategy

CHAPTER = "02b_fruit_cnn_aug"
CONFIG_PATH = Path(__file__).with_name("config.toml")
BACKBONES = ("mobilenet_v3_small", "efficientnet_b0")
FLIPS = ("horizontal_and_vertical", "horizontal", "vertical", "none")
DEVICES = ("auto", "cpu", "cuda")
# --smoke draws its pictures: 32 training pictures per class (104 train, 24 val) so that the
# small smoke model learns in seconds, and 25 test pictures per class, enough test photos
# (100) to tell a model that learned from chance (the smoke test's bar).
SMOKE_TRAIN_PER_CLASS, SMOKE_TEST_PER_CLASS = 32, 25

# --- Config ------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    cli.require_at_least(cfg, "image_size", 32)
    require(0 < cfg["val_fraction"] < 1, f"--val-fraction must be in (0, 1), got {cfg['val_fraction']}")
    for key in ("epochs", "batch_size", "audit_count"):
        cli.require_at_least(cfg, key, 1)
    cli.require_at_least(cfg, "patience", 0)
    cli.require_at_least(cfg, "num_threads", 0)
    for key in ("learning_rate", "finetune_learning_rate"):
        cli.require_positive(cfg, key)
    for key in ("dropout", "label_smoothing", "rotation", "zoom", "translation", "brightness",
                "contrast", "saturation"):
        require(0 <= cfg[key] < 1, f"--{key.replace('_', '-')} must be in [0, 1), got {cfg[key]}")
    require(cfg["mixup_alpha"] >= 0, f"--mixup-alpha must be >= 0, got {cfg['mixup_alpha']}")
    for key, allowed in (("flip", FLIPS), ("backbone", BACKBONES), ("device", DEVICES)):
        require(cfg[key] in allowed, f"--{key} must be one of {', '.join(allowed)}; got {cfg[key]!r}")
    # Without the NVIDIA driver no TensorFlow build can use a GPU: say so before the import.
    require(cfg["device"] != "cuda" or ctypes.util.find_library("cuda") is not None,
            "--device cuda: no NVIDIA driver (libcuda) on this machine; use --device auto or cpu")
    require(len(cfg["filters"]) >= 1 and all(f >= 1 for f in cfg["filters"]),
            f"--filters must be one or more positive integers, got {cfg['filters']}")
    require(cfg["weights"] in ("none", "imagenet") or Path(cfg["weights"]).is_file(),
            f"--weights must be none, imagenet or a path to a weights file; got {cfg['weights']!r}")
    tf_strategy.check_config(cfg)


def parse_exclusions(entries: list[str]) -> dict[str, str]:
    """`exclude` entries of the form "file name: reason" -> {file name: reason}."""
    excluded = {}
    for entry in entries:
        name, colon, reason = entry.partition(":")
        require(bool(colon and name.strip() and reason.strip()),
                f"exclude entry {entry!r} should read 'file name: reason'")
        excluded[name.strip()] = reason.strip()
    return excluded


# --- Data --------------------------------------------------------------------------


class FruitData(NamedTuple):
    records: list             # the 240 training photos (FruitRecord), train and val
    images: np.ndarray        # (N, size, size, 3) uint8
    labels: np.ndarray        # (N,) class indices into fruits.CLASSES
    test_records: list        # empty in a --no-evaluate-test run: the test files stay unread
    test_images: np.ndarray
    test_labels: np.ndarray


class Split(NamedTuple):
    train: np.ndarray         # indices into FruitData.records that the model trains on
    val: np.ndarray           # indices of the validation photos (never excluded)
    every_train: np.ndarray   # the training indices before the exclusions


def load_data(data_dir: Path, smoke: bool, output_dir: Path, cfg: dict) -> FruitData:
    """Decode every photo once through the shared reader, squashed to a square.

    The real set (downloaded on first use), or with --smoke a small synthetic one drawn in
    the same layout and read back through the same loader. The test folder is listed and
    decoded only when evaluate_test.
    """
    if smoke:
        data_dir = output_dir / "smoke-data"
        synthetic.write_fruits(data_dir, SMOKE_TRAIN_PER_CLASS, SMOKE_TEST_PER_CLASS, cfg["seed"])
    records, test_records = fruits.load_fruits(data_dir, fetch=not smoke, test=cfg["evaluate_test"])
    start = time.monotonic()
    images, labels = fruits.decode_images(records, cfg["image_size"])
    test_images, test_labels = (fruits.decode_images(test_records, cfg["image_size"])
                                if test_records else (np.zeros((0,)), np.zeros((0,), int)))
    print(f"decoded {len(records)} train + {len(test_records)} test images in "
          f"{time.monotonic() - start:.1f}s")
    return FruitData(records, images, labels, test_records, test_images, test_labels)


def split_training_images(records, cfg: dict, excluded: dict[str, str]) -> Split:
    """Stratified train/val indices into `records`; the excluded files leave training only.

    The split is drawn over all training images first, so that editing `exclude` never
    reshuffles it, and validation keeps every photo that fell into it, excluded or not:
    runs with and without the exclusions are then compared on the very same photos.
    """
    names = [r.image_path.name for r in records]
    unknown = sorted(set(excluded) - set(names))
    require(not unknown, f"exclude lists files that are not training images: {', '.join(unknown)}")
    train_idx, val_idx = splits.stratified_split([r.label for r in records],
                                                 cfg["val_fraction"], cfg["seed"])
    in_val = sorted(names[i] for i in val_idx if names[i] in excluded)
    if in_val:
        print(f"exclude: {', '.join(in_val)} fell into validation and stay there, with their "
              "labels as given (exclusions leave the training photos only)")
    keep = np.array([name not in excluded for name in names])
    return Split(train_idx[keep[train_idx]], val_idx, train_idx)


# --- Model and training: model.py (the network) and training.py (augmentation,
# schedule, class weights, early stopping on validation) --------------------------


# --- Evaluate ----------------------------------------------------------------------


def compare_on_validation(every, fewer, val_labels: np.ndarray, seed: int) -> tuple[bool, dict]:
    """The audit's comparison, on validation only: the run on every training photo against
    the run without the excluded ones, paired on the same validation photos.

    The exclusions are kept only if they win on validation accuracy (a tie keeps every
    photo: a change must earn its place). Returns (keep the exclusions?, audit metrics).
    """
    right_every = every.val_probs.argmax(1) == val_labels
    right_fewer = fewer.val_probs.argmax(1) == val_labels
    paired = paired_bootstrap(lambda i: right_fewer[i].mean(), lambda i: right_every[i].mean(),
                              len(val_labels), reps=1000, seed=seed)
    keep = bool(right_fewer.mean() > right_every.mean())
    return keep, {"audit_val_accuracy_every_photo": float(right_every.mean()),
                  "audit_val_accuracy_with_exclusions": float(right_fewer.mean()),
                  "audit_val_difference": paired["difference"],
                  "audit_val_difference_ci95": paired["ci95"],
                  "audit_kept": "with_exclusions" if keep else "every_photo"}


def audit_training_images(probs: np.ndarray, data: FruitData, split: Split, output_dir: Path,
                          count: int) -> int:
    """Rank the training photos (train and val) by the model's loss: audit.json and a contact
    sheet (audit.png) of the `count` hardest. Returns how many disagree with their label."""
    labels = data.labels
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))
    predicted = probs.argmax(axis=1)
    in_val = np.isin(np.arange(len(labels)), split.val)
    order = np.argsort(-losses, kind="stable")
    rows = [{"file": data.records[i].image_path.name, "label": fruits.CLASSES[labels[i]],
             "predicted": fruits.CLASSES[predicted[i]], "loss": float(losses[i]),
             "part": "val" if in_val[i] else "train"} for i in order]
    outputs.write_json(output_dir / "audit.json", rows)
    top = order[:count]
    outputs.plot_image_grid(
        [data.images[i] for i in top],
        [f"{r['file'][:-4]}{' (val)' if r['part'] == 'val' else ''}\n-> {r['predicted']} "
         f"loss {r['loss']:.1f}" for r in rows[:count]],
        output_dir / "audit.png", columns=8,
        colors=["crimson" if labels[i] != predicted[i] else "black" for i in top],
        title="training images by loss, highest first (red: prediction disagrees with label)")
    return int(np.sum(predicted != labels))


def evaluate(run, data: FruitData, split: Split, test_probs: np.ndarray | None) -> dict:
    """Validation figures of the kept weights, then the test split's, each with its interval."""
    metrics = classify.accuracy_metrics("val", data.labels[split.val], run.val_probs.argmax(1),
                                        fruits.CLASSES)
    if test_probs is not None:
        metrics.update(classify.accuracy_metrics("test", data.test_labels, test_probs.argmax(1),
                                                 fruits.CLASSES))
    metrics.update(best_epoch=run.best_epoch, epochs_run=len(run.history["loss"]),
                   train_seconds=run.seconds, num_train=len(split.train),
                   num_val=len(split.val), num_test=len(data.test_records),
                   num_excluded=len(split.every_train) - len(split.train))
    return metrics


# --- Save --------------------------------------------------------------------------


def save_outputs(output_dir: Path, run, data: FruitData, split: Split, test_probs) -> None:
    curves = {k: v for k, v in run.history.items() if k.endswith(("loss", "accuracy"))}
    outputs.plot_curves(curves, output_dir / "curves.png", title="02b train / validation")
    outputs.write_json(output_dir / "val_predictions.json", classify.prediction_rows(
        [data.records[i].image_path.name for i in split.val], data.labels[split.val],
        run.val_probs, fruits.CLASSES))
    if test_probs is None:  # a --no-evaluate-test tuning run
        return
    outputs.write_json(output_dir / "test_predictions.json", classify.prediction_rows(
        [r.image_path.name for r in data.test_records], data.test_labels, test_probs,
        fruits.CLASSES))
    predicted = test_probs.argmax(1)
    cm = outputs.confusion_matrix(data.test_labels, predicted, len(fruits.CLASSES))
    outputs.plot_confusion(cm, fruits.CLASSES, output_dir / "confusion.png", title="02b test")
    fruits.plot_misclassified(data.test_images, data.test_records, predicted, data.test_labels,
                              output_dir / "misclassified.png")


def write_split(output_dir: Path, data: FruitData, split: Split) -> None:
    names = [r.image_path.name for r in data.records]
    outputs.write_split(output_dir, {
        "train": [names[i] for i in split.train], "val": [names[i] for i in split.val],
        "test": [r.image_path.name for r in data.test_records],
        "excluded": sorted(set(names[i] for i in split.every_train) - set(names[i] for i in split.train))})


def main(argv=None) -> dict:
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    check_config(cfg)
    excluded = parse_exclusions(cfg["exclude"])
    args.output_dir = tf_strategy.worker_output_dir(args.output_dir, cfg)  # the chief's, or scratch
    output_dir = outputs.prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite,
                                            smoke=args.smoke, data_dir=str(args.data_dir))
    # TensorFlow takes seconds to import: only now, so --help and flag errors answer at once.
    import model
    import training

    device, device_name = model.set_up_tensorflow(cfg["device"], cfg["num_threads"], cfg["seed"])
    strategy = tf_strategy.make_strategy(cfg)  # "default": one device, as a plain run
    if cfg["weights"] != "none":  # fail now, not after decoding: a missing download is common
        model.build_model(cfg)
    seed_everything(cfg["seed"])
    data = load_data(args.data_dir, args.smoke, output_dir, cfg)
    split = split_training_images(data.records, cfg, excluded)

    # Device, weights and data are ready: from here a failure keeps the run's files. Before
    # this line it leaves nothing, so the retry needs no --overwrite.
    outputs.training_started(output_dir)
    run = training.fit_and_score(cfg, data.images, data.labels, split.train, split.val, strategy)
    audit_metrics = {}
    if cfg["audit"]:  # rank the photos by the loss of a model that trained on all of them
        every = run if not excluded else training.fit_and_score(
            cfg, data.images, data.labels, split.every_train, split.val, strategy)
        disagree = audit_training_images(model.probabilities(every.model, data.images), data,
                                         split, output_dir, cfg["audit_count"])
        print(f"audit: {disagree} training images disagree with their label; see audit.png")
        audit_metrics["audit_disagreements"] = disagree
        if excluded:
            keep, comparison = compare_on_validation(every, run, data.labels[split.val], cfg["seed"])
            audit_metrics.update(comparison)
            run, split = (run, split) if keep else (every, split._replace(train=split.every_train))

    write_split(output_dir, data, split)  # the photos the kept run trained and was scored on
    # The test photos, once, for the run that is kept.
    test_probs = model.probabilities(run.model, data.test_images) if cfg["evaluate_test"] else None
    metrics = {**evaluate(run, data, split, test_probs), **audit_metrics,
               **outputs.run_facts(("tensorflow", "keras"), device, device_name),
               **tf_strategy.run_facts(strategy, run.model)}
    model.save(run.model, output_dir / "model.keras")
    save_outputs(output_dir, run, data, split, test_probs)
    outputs.write_metrics(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
