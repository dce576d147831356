"""02b: a fruit CNN with augmentation, the fix the 2020 study proposed, done well.

What it teaches
    The study's first CNN (02) overfit 240 photos; its proposed fixes were an image
    generator to enlarge the data, a validation set and a bigger network. This script
    does each one properly:
    - a seeded, stratified validation split carved from the 240 training images (saved
      as split.json); every choice is made on it, and the 60 test images are read once;
    - augmentation with Keras preprocessing layers in a tf.data pipeline: flips,
      rotation, zoom, shifts, brightness, contrast (never hue: colour separates apple
      from orange);
    - a from-scratch network with batch norm, global average pooling and dropout;
      a warm-up + cosine learning-rate schedule; early stopping that restores the
      weights of the best validation accuracy; label smoothing; class weights for the
      small "mixed" class (20 images against ~73 per fruit);
    - `--weights imagenet` fine-tunes a keras.applications backbone instead: what a
      user with internet should run. `--weights PATH` loads that backbone from a file;
    - `--audit` answers the study's "noisy dataset" complaint with evidence: a contact
      sheet of the training images ordered by the model's loss, and the test accuracy
      with and without the training files listed in `exclude`.

How to run
    python 02b_fruit_cnn_aug/train.py                    # from scratch, the measured default
    python 02b_fruit_cnn_aug/train.py --weights imagenet # fine-tune MobileNetV3 (internet)
    python 02b_fruit_cnn_aug/train.py --audit            # + contact sheet, +- exclusions
    python 02b_fruit_cnn_aug/train.py --smoke            # synthetic data, seconds

What to expect (measured on 2 shared CPU cores)
    python 02b_fruit_cnn_aug/train.py --data-dir /tmp/dd
    -> test accuracy 0.917 (55/60): apple 1.000, banana 0.944, orange 0.944, mixed 0.400
       (2 of 5); val accuracy 0.979 (best epoch 81 of 100); training 563 s.
       02's recipe on the same test split: 0.867-0.900, mixed 0-1 of 5.
    The validation curve swings wildly (0.54-0.96) while the learning rate is high and
    settles as the cosine schedule lowers it; the best epochs are in the calm tail.

What the audit found (the ranking that --audit draws as audit.png, computed for the
default run's model; the full --audit run itself was not measured)
    Ranked by the trained model's loss, only 2 of 240 training images disagree with
    their label: banana_35 (a face drawn from two peaches and a banana: mixed by the
    dataset's own rule) and orange_13 (a yellow close-up, called banana). banana_61 (a
    banana with a red apple) ranks 6th. A limit to know: the loss of an image the model
    trained on is low even when its label is wrong: mixed_20, a single drawn orange
    labelled mixed, ranks 153rd. Illustrations are in the test split too, so they are
    data to learn, not noise. The three label errors are in audited.toml:
    python 02b_fruit_cnn_aug/train.py --data-dir /tmp/dd --config 02b_fruit_cnn_aug/audited.toml
    -> test accuracy 0.933 (56/60): apple 0.947, banana 1.000, orange 1.000, mixed 0.400;
       val 1.000 (47 images; banana_35 left it); stopped at epoch 87, best 62; 539 s.
       One test image more than without the exclusions: within the noise of 60 images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from data import cli, fruits, outputs, splits
from data.cli import ChapterParser, UserError, require, run_main, seed_everything

CHAPTER = "02b_fruit_cnn_aug"
CONFIG_PATH = Path(__file__).with_name("config.toml")
BACKBONES = {"mobilenet_v3_small": "MobileNetV3Small", "efficientnet_b0": "EfficientNetB0"}
FLIPS = ("horizontal_and_vertical", "horizontal", "vertical", "none")
NUM_CLASSES = len(fruits.CLASSES)

# --- Config ------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    cli.require_at_least(cfg, "image_size", 32)
    require(0 < cfg["val_fraction"] < 1, f"--val-fraction must be in (0, 1), got {cfg['val_fraction']}")
    for key in ("epochs", "patience", "batch_size", "audit_count"):
        cli.require_at_least(cfg, key, 1)
    for key in ("learning_rate", "finetune_learning_rate"):
        require(cfg[key] > 0, f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    for key in ("dropout", "label_smoothing", "rotation", "zoom", "translation", "brightness",
                "contrast", "saturation"):
        require(0 <= cfg[key] < 1, f"--{key.replace('_', '-')} must be in [0, 1), got {cfg[key]}")
    require(cfg["mixup_alpha"] >= 0, f"--mixup-alpha must be >= 0, got {cfg['mixup_alpha']}")
    require(cfg["flip"] in FLIPS, f"--flip must be one of {', '.join(FLIPS)}; got {cfg['flip']!r}")
    require(cfg["backbone"] in BACKBONES,
            f"--backbone must be one of {', '.join(BACKBONES)}; got {cfg['backbone']!r}")
    require(len(cfg["filters"]) >= 1 and all(f >= 1 for f in cfg["filters"]),
            f"--filters must be one or more positive integers, got {cfg['filters']}")
    require(cfg["weights"] in ("none", "imagenet") or Path(cfg["weights"]).is_file(),
            f"--weights must be none, imagenet or a path to a weights file; got {cfg['weights']!r}")


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


def split_training_images(records, cfg: dict, excluded: dict[str, str]):
    """Stratified train/val indices into `records`, minus the excluded files.

    The split is drawn over all training images first, so that editing `exclude` never
    reshuffles it; excluded files then leave whichever side they fell on.
    """
    names = [r.image_path.name for r in records]
    unknown = sorted(set(excluded) - set(names))
    require(not unknown, f"exclude lists files that are not training images: {', '.join(unknown)}")
    train_idx, val_idx = splits.stratified_split([r.label for r in records],
                                                 cfg["val_fraction"], cfg["seed"])
    keep = np.array([name not in excluded for name in names])
    return train_idx[keep[train_idx]], val_idx[keep[val_idx]]


def build_augmenter(keras, cfg: dict):
    """Random transforms for training batches; each image gets its own draw."""
    layers, seed = keras.layers, cfg["seed"]
    steps = [] if cfg["flip"] == "none" else [layers.RandomFlip(cfg["flip"], seed=seed)]
    if cfg["rotation"]:
        steps.append(layers.RandomRotation(cfg["rotation"], fill_mode="reflect", seed=seed))
    if cfg["zoom"]:
        steps.append(layers.RandomZoom(cfg["zoom"], fill_mode="reflect", seed=seed))
    if cfg["translation"]:
        steps.append(layers.RandomTranslation(cfg["translation"], cfg["translation"],
                                              fill_mode="reflect", seed=seed))
    if cfg["brightness"]:
        steps.append(layers.RandomBrightness(cfg["brightness"], value_range=(0, 255), seed=seed))
    if cfg["contrast"]:
        steps.append(layers.RandomContrast(cfg["contrast"], value_range=(0, 255), seed=seed))
    if cfg["saturation"]:  # factor 0.5 is "unchanged" for this layer
        half = cfg["saturation"] / 2
        steps.append(layers.RandomSaturation((0.5 - half, 0.5 + half), value_range=(0, 255),
                                             seed=seed))
    return keras.Sequential(steps or [layers.Identity()], name="augment")


def make_dataset(tf, images, labels, cfg: dict, augmenter=None):
    """A tf.data pipeline; with an augmenter: shuffled, augmented, optionally mixed up."""
    onehot = np.eye(NUM_CLASSES, dtype="float32")[labels]
    data = tf.data.Dataset.from_tensor_slices((images, onehot))
    if augmenter is None:
        return data.batch(cfg["batch_size"]).prefetch(tf.data.AUTOTUNE)
    data = data.shuffle(len(images), seed=cfg["seed"], reshuffle_each_iteration=True)
    # A sequential map: parallel calls would draw the random transforms in a different
    # order each run, and the seed would no longer fix the result. prefetch still
    # overlaps the augmentation with training.
    data = data.batch(cfg["batch_size"]).map(
        lambda x, y: (augmenter(tf.cast(x, "float32"), training=True), y))
    if cfg["mixup_alpha"] > 0:
        data = data.map(lambda x, y: mixup(tf, x, y, cfg["mixup_alpha"]))
    return data.prefetch(tf.data.AUTOTUNE)


def mixup(tf, images, labels, alpha: float):
    """Blend each example with another from the batch, weight ~ Beta(alpha, alpha)."""
    count = tf.shape(images)[0]
    a, b = tf.random.gamma([count], alpha), tf.random.gamma([count], alpha)
    weight = a / (a + b)
    partner = tf.random.shuffle(tf.range(count))
    wx, wy = tf.reshape(weight, [-1, 1, 1, 1]), tf.reshape(weight, [-1, 1])
    return (wx * images + (1 - wx) * tf.gather(images, partner),
            wy * labels + (1 - wy) * tf.gather(labels, partner))


# --- Model -------------------------------------------------------------------------


def build_model(keras, cfg: dict):
    """From scratch when --weights none, else a keras.applications backbone + new head.

    Both take pixels in [0, 255]: the scratch model rescales itself, and MobileNetV3 and
    EfficientNet carry their own preprocessing layers.
    """
    layers = keras.layers
    inputs = keras.Input((cfg["image_size"], cfg["image_size"], 3))
    if cfg["weights"] == "none":
        x = layers.Rescaling(1.0 / 255)(inputs)
        # A stride-2 stem conv halves the image before the costly layers, which run on a
        # quarter of the pixels (a one-off timing, not a flag, showed epochs over 2x faster).
        x = conv_bn_relu(layers, x, cfg["filters"][0], strides=2)
        for count in cfg["filters"][1:]:  # two 3x3 convs see a 5x5 patch per block
            x = conv_bn_relu(layers, x, count)
            x = conv_bn_relu(layers, x, count)
            x = layers.MaxPooling2D()(x)
        x = layers.GlobalAveragePooling2D()(x)  # no Flatten->Dense: far fewer weights to overfit
    else:
        backbone = load_backbone(keras, cfg)
        x = backbone(inputs, training=False)  # keep ImageNet's batch-norm statistics
    x = layers.Dropout(cfg["dropout"])(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="fruit_cnn" if cfg["weights"] == "none" else "finetune")


def conv_bn_relu(layers, x, filters: int, strides: int = 1):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    # momentum 0.9, not 0.99: with ~6 steps per epoch the running statistics used at
    # evaluation must follow the weights within an epoch or two.
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x)


def load_backbone(keras, cfg: dict):
    constructor = getattr(keras.applications, BACKBONES[cfg["backbone"]])
    size = cfg["image_size"]
    try:
        return constructor(input_shape=(size, size, 3), include_top=False,
                           weights=cfg["weights"], pooling="avg")
    except Exception as exc:  # keras.utils.get_file raises a bare Exception when offline
        if cfg["weights"] == "imagenet":
            reason = " ".join(str(exc).split())[:300]  # keep it to one line
            raise UserError(f"could not download the ImageNet weights for {cfg['backbone']} "
                            f"({reason}); offline, train from scratch with --weights none"
                            ) from None
        raise UserError(f"--weights {cfg['weights']}: not {cfg['backbone']} weights "
                        f"(include_top=False): {exc}") from None


# --- Train -------------------------------------------------------------------------


def balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    """n / (k * n_c): each class carries the same total weight in the loss."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return {c: float(len(labels) / (NUM_CLASSES * max(n, 1))) for c, n in enumerate(counts)}


def keep_best_on_validation(keras, patience: int):
    """Early stopping on val accuracy that restores the best weights at the end.

    48 validation images make accuracy move in steps of 2%, so many epochs tie; a tie
    goes to the lower val loss (Keras' EarlyStopping would keep the first, often a
    lucky epoch in the noisy high-learning-rate phase).
    """

    class Keeper(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.best_weights = (-1.0, 0.0), 0, None

        def on_epoch_end(self, epoch, logs=None):
            score = (logs["val_accuracy"], -logs["val_loss"])
            if score > self.best:
                self.best, self.best_epoch = score, epoch
                self.best_weights = self.model.get_weights()
            elif epoch - self.best_epoch >= patience:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)
                print(f"restored the weights of epoch {self.best_epoch + 1}: val accuracy "
                      f"{self.best[0]:.3f}, val loss {-self.best[1]:.3f}")

    return Keeper()


def train(keras, tf, model, data: dict, train_idx, val_idx, cfg: dict):
    """Fit with early stopping on val accuracy; returns (history, seconds, best epoch)."""
    steps_per_epoch = -(-len(train_idx) // cfg["batch_size"])
    peak = cfg["learning_rate"] if cfg["weights"] == "none" else cfg["finetune_learning_rate"]
    warmup = min(5, cfg["epochs"] // 4) * steps_per_epoch  # a few calm epochs while BN settles
    schedule = keras.optimizers.schedules.CosineDecay(
        peak / 10, decay_steps=max(cfg["epochs"] * steps_per_epoch - warmup, 1),
        warmup_target=peak, warmup_steps=warmup)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg["label_smoothing"]),
                  metrics=["accuracy"])
    x, y = data["images"], data["labels"]
    train_data = make_dataset(tf, x[train_idx], y[train_idx], cfg, build_augmenter(keras, cfg))
    val_data = make_dataset(tf, x[val_idx], y[val_idx], cfg)
    stopper = keep_best_on_validation(keras, cfg["patience"])
    class_weight = balanced_class_weights(y[train_idx]) if cfg["class_weights"] else None
    start = time.monotonic()
    history = model.fit(train_data, validation_data=val_data, epochs=cfg["epochs"],
                        class_weight=class_weight, callbacks=[stopper], verbose=2)
    return history.history, time.monotonic() - start, stopper.best_epoch + 1


# --- Evaluate ----------------------------------------------------------------------


def accuracy_metrics(prefix: str, labels: np.ndarray, predicted: np.ndarray) -> tuple[dict, np.ndarray]:
    cm = outputs.confusion_matrix(labels, predicted, NUM_CLASSES)
    metrics = {f"{prefix}_accuracy": float(np.mean(predicted == labels))}
    for index, name in enumerate(fruits.CLASSES):
        metrics[f"{prefix}_accuracy_{name}"] = float(cm[index, index] / max(cm[index].sum(), 1))
    return metrics, cm


def fit_and_evaluate(keras, tf, cfg: dict, data: dict, train_idx, val_idx) -> dict:
    """Build, train, and measure one model: validation metrics, then the test split once."""
    keras.utils.set_random_seed(cfg["seed"])  # every run (audit: both) starts the same way
    model = build_model(keras, cfg)
    history, seconds, best_epoch = train(keras, tf, model, data, train_idx, val_idx, cfg)
    val_predicted = model.predict(data["images"][val_idx], verbose=0).argmax(axis=1)
    metrics, _ = accuracy_metrics("val", data["labels"][val_idx], val_predicted)
    test_predicted = model.predict(data["test_images"], verbose=0).argmax(axis=1)
    test_metrics, cm = accuracy_metrics("test", data["test_labels"], test_predicted)
    metrics.update(test_metrics, best_epoch=best_epoch, epochs_run=len(history["loss"]),
                   train_seconds=seconds, num_train=len(train_idx), num_val=len(val_idx))
    return {"model": model, "history": history, "metrics": metrics, "cm": cm,
            "test_predicted": test_predicted}


def audit_training_images(model, data: dict, records, val_idx, output_dir: Path, count: int):
    """Score every training image; a contact sheet of the `count` with the highest loss."""
    probs = model.predict(data["images"], verbose=0)
    labels = data["labels"]
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))
    predicted = probs.argmax(axis=1)
    in_val = np.isin(np.arange(len(labels)), val_idx)
    order = np.argsort(-losses, kind="stable")
    rows = [{"file": records[i].image_path.name, "label": fruits.CLASSES[labels[i]],
             "predicted": fruits.CLASSES[predicted[i]], "loss": float(losses[i]),
             "part": "val" if in_val[i] else "train"} for i in order]
    outputs.write_json(output_dir / "audit.json", rows)
    top = order[:count]
    outputs.plot_image_grid(
        [data["images"][i] for i in top],
        [f"{r['file'][:-4]}{' (val)' if r['part'] == 'val' else ''}\n-> {r['predicted']} "
         f"loss {r['loss']:.1f}" for r in rows[:count]],
        output_dir / "audit.png", columns=8,
        colors=["crimson" if labels[i] != predicted[i] else "black" for i in top],
        title="training images by loss, highest first (red: prediction disagrees with label)")
    return int(np.sum(predicted != labels))


# --- Save --------------------------------------------------------------------------


def save_run(output_dir: Path, run: dict, data: dict, test_records) -> None:
    with outputs.atomic_path(output_dir / "model.keras") as tmp:
        run["model"].save(tmp)
    curves = {k: v for k, v in run["history"].items() if k.endswith(("loss", "accuracy"))}
    outputs.plot_curves(curves, output_dir / "curves.png", title="02b train / validation")
    outputs.plot_confusion(run["cm"], fruits.CLASSES, output_dir / "confusion.png", title="02b test")
    fruits.plot_misclassified(data["test_images"], test_records, run["test_predicted"],
                              data["test_labels"], output_dir / "misclassified.png")


def main(argv=None) -> dict:
    parser = ChapterParser(__doc__, CONFIG_PATH, CHAPTER)
    cfg, args = parser.parse_config(argv)
    check_config(cfg)
    excluded = parse_exclusions(cfg["exclude"])
    output_dir = outputs.prepare_output_dir(args.output_dir, cfg, smoke=args.smoke,
                                            data_dir=str(args.data_dir))
    # Import the framework only now, so --help and flag errors answer at once.
    import keras
    import tensorflow as tf

    seed_everything(cfg["seed"])
    keras.utils.set_random_seed(cfg["seed"])
    if cfg["weights"] != "none":  # fail now, not after decoding: a missing download is common
        build_model(keras, cfg)

    train_records, test_records = fruits.load_fruits_or_smoke(
        args.data_dir, args.smoke, output_dir, cfg["seed"])
    start = time.monotonic()
    images, labels = fruits.decode_images(train_records, cfg["image_size"])
    test_images, test_labels = fruits.decode_images(test_records, cfg["image_size"])
    data = {"images": images, "labels": labels, "test_images": test_images,
            "test_labels": test_labels}
    print(f"decoded {len(images)} train + {len(test_images)} test images in "
          f"{time.monotonic() - start:.1f}s")
    train_idx, val_idx = split_training_images(train_records, cfg, excluded)
    names = [r.image_path.name for r in train_records]
    outputs.write_json(output_dir / "split.json", {
        "seed": cfg["seed"], "val_fraction": cfg["val_fraction"],
        "train": [names[i] for i in train_idx], "val": [names[i] for i in val_idx],
        "excluded": excluded, "test": [r.image_path.name for r in test_records]})

    audit_metrics = {}
    if cfg["audit"]:  # first train on everything, and look at what the model finds hardest
        every_train, every_val = split_training_images(train_records, cfg, {})
        run = fit_and_evaluate(keras, tf, cfg, data, every_train, every_val)
        disagree = audit_training_images(run["model"], data, train_records, every_val,
                                         output_dir, cfg["audit_count"])
        audit_metrics = {f"no_exclusions_{k}": v for k, v in run["metrics"].items()}
        audit_metrics["audit_disagreements"] = disagree
        print(f"audit: {disagree} training images disagree with their label; see audit.png")
    if not cfg["audit"] or excluded:
        run = fit_and_evaluate(keras, tf, cfg, data, train_idx, val_idx)
    metrics = {**run["metrics"], "num_excluded": len(excluded), "num_test": len(test_images),
               **audit_metrics}

    save_run(output_dir, run, data, test_records)
    outputs.write_metrics(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
