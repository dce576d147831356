"""02: a fruit CNN, the study's first attempt reproduced faithfully.

What it teaches
    Classify the Kaggle fruit photos (mbkinaci/fruit-images-for-object-detection) into
    apple, banana, orange and mixed; the class is the file-name prefix. 240 training
    images (75/73/72/20) and 60 test images (19/18/18/5). This is the study's recipe as it
    was: a plain Conv/MaxPool stack, Flatten, Dense, softmax; Adam and categorical
    cross-entropy; a fixed number of epochs; no augmentation and no validation set
    ("the dataset is too small"). The study got 61.7% test accuracy and blamed
    overfitting and a noisy dataset. The recipe is kept; only its mechanics are made
    correct: every image is read as upright RGB through the shared reader (37 files
    named .jpg are PNG, some RGBA or palette), resized by squashing the whole photo to a
    square with antialiased bilinear resampling (no crop, so no fruit is cut off),
    scaled to [0, 1] inside the model, and everything is seeded.

    The training curves are the lesson: training accuracy reaches 100% by epoch 15 and
    the loss goes to ~0, so the network has memorised the 240 photos; what it still gets
    wrong on test is the class it saw least ("mixed", 20 images), which it names by its
    dominant fruit. With no validation set there is no honest per-epoch curve to draw,
    so only the training curves are plotted; the test split is touched once. 02b fixes it.

How to run
    python 02_fruit_cnn/train.py                      # real data, about a minute
    python 02_fruit_cnn/train.py --smoke              # synthetic data, ~10 s
    python 02_fruit_cnn/train.py --epochs 50 --image-size 128

What to expect (measured on 2 shared CPU cores)
    python 02_fruit_cnn/train.py --data-dir /tmp/dd
    -> test accuracy 0.883 (53/60): apple 0.947, banana 0.889, orange 1.000, mixed 0.200
       (1 of 5); training accuracy 1.000; 30 epochs in 33-65 s.
    --seed 1 / --seed 2: 0.867 / 0.900 (mixed 0 of 5 both times).
    The study's 61.7% is not reproduced: read correctly, its recipe gives 87-90%. Two
    likely 2020 slips (pixels left in 0..255; RGBA files with the alpha dropped) were
    tried with temporary code edits that no flag reproduces, and neither came near 61.7%.
    The study's own code is not available to check further.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from data import cli, fruits, outputs
from data.cli import ChapterParser, require, run_main, seed_everything

CHAPTER = "02_fruit_cnn"
CONFIG_PATH = Path(__file__).with_name("config.toml")

# --- Config ------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    cli.require_at_least(cfg, "image_size", 16)
    cli.require_at_least(cfg, "epochs", 1)
    cli.require_at_least(cfg, "batch_size", 1)
    cli.require_positive(cfg, "learning_rate")
    cli.require_at_least(cfg, "dense_units", 1)
    require(len(cfg["filters"]) >= 1 and all(f >= 1 for f in cfg["filters"]),
            f"--filters must be one or more positive integers, got {cfg['filters']}")
    # Each conv (valid padding) and pool shrinks the side; it must not vanish.
    side = cfg["image_size"]
    for _ in cfg["filters"]:
        side = (side - 2) // 2
    require(side >= 1, f"--image-size {cfg['image_size']} is too small for {len(cfg['filters'])} conv blocks")


# --- Data --------------------------------------------------------------------------
# data.fruits.load_fruits_or_smoke gives the records (the real set, or with --smoke a
# synthetic one in the same layout); data.fruits.decode_images reads each photo once as
# RGB through the shared reader and squashes it to a square with antialiased bilinear
# resampling. Both are called from main().


# --- Model -------------------------------------------------------------------------


def build_model(keras, image_size: int, filters: list[int], dense_units: int):
    """The study's network: [Conv3x3 + ReLU, MaxPool] x len(filters), Flatten, Dense, softmax."""
    layers = keras.layers
    model = keras.Sequential(name="study_cnn")
    model.add(keras.Input((image_size, image_size, 3)))
    model.add(layers.Rescaling(1.0 / 255))  # uint8 pixels in, [0, 1] floats to the convs
    for count in filters:
        model.add(layers.Conv2D(count, 3, activation="relu"))
        model.add(layers.MaxPooling2D())
    model.add(layers.Flatten())
    model.add(layers.Dense(dense_units, activation="relu"))
    model.add(layers.Dense(len(fruits.CLASSES), activation="softmax"))
    return model


# --- Train -------------------------------------------------------------------------


def train(keras, model, x_train, y_train, cfg) -> tuple[dict, float]:
    model.compile(optimizer=keras.optimizers.Adam(cfg["learning_rate"]),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    targets = keras.utils.to_categorical(y_train, len(fruits.CLASSES))
    start = time.monotonic()
    # No validation_data: the study had none. verbose=2 prints one line per epoch.
    history = model.fit(x_train, targets, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                        shuffle=True, verbose=2)
    return history.history, time.monotonic() - start


# --- Evaluate ----------------------------------------------------------------------


def evaluate(model, x_test, y_test, x_train, y_train) -> tuple[dict, np.ndarray, np.ndarray]:
    """Test metrics (overall and per class) and the train accuracy at the end, for the gap."""
    predicted = model.predict(x_test, verbose=0).argmax(axis=1)
    cm = outputs.confusion_matrix(y_test, predicted, len(fruits.CLASSES))
    metrics = {"test_accuracy": float(np.mean(predicted == y_test))}
    for index, name in enumerate(fruits.CLASSES):
        metrics[f"test_accuracy_{name}"] = float(cm[index, index] / max(cm[index].sum(), 1))
    train_predicted = model.predict(x_train, verbose=0).argmax(axis=1)
    metrics["final_train_accuracy"] = float(np.mean(train_predicted == y_train))
    return metrics, cm, predicted


# --- Save --------------------------------------------------------------------------


def save_plots(output_dir: Path, history: dict, cm: np.ndarray, test_records, x_test,
               y_test, predicted) -> None:
    # Training curves only: the study had no validation set, and the test split is
    # touched once, at the end, never per epoch.
    outputs.plot_curves(history, output_dir / "curves.png")
    outputs.plot_confusion(cm, fruits.CLASSES, output_dir / "confusion.png", title="02 test")
    fruits.plot_misclassified(x_test, test_records, predicted, y_test, output_dir / "misclassified.png")


def main(argv=None) -> dict:
    parser = ChapterParser(__doc__, CONFIG_PATH, CHAPTER)
    cfg, args = parser.parse_config(argv)
    check_config(cfg)
    output_dir = outputs.prepare_output_dir(args.output_dir, cfg, smoke=args.smoke,
                                            data_dir=str(args.data_dir))
    # Import the framework only now, so --help and flag errors answer at once.
    import keras

    seed_everything(cfg["seed"])
    keras.utils.set_random_seed(cfg["seed"])

    train_records, test_records = fruits.load_fruits_or_smoke(
        args.data_dir, args.smoke, output_dir, cfg["seed"])
    start = time.monotonic()
    x_train, y_train = fruits.decode_images(train_records, cfg["image_size"])
    x_test, y_test = fruits.decode_images(test_records, cfg["image_size"])
    print(f"decoded {len(x_train)} train + {len(x_test)} test images to "
          f"{cfg['image_size']}x{cfg['image_size']} in {time.monotonic() - start:.1f}s")

    model = build_model(keras, cfg["image_size"], cfg["filters"], cfg["dense_units"])
    model.summary(print_fn=print)
    history, seconds = train(keras, model, x_train, y_train, cfg)
    metrics, cm, predicted = evaluate(model, x_test, y_test, x_train, y_train)
    metrics.update(train_seconds=seconds, epochs=len(history["loss"]),
                   num_train=len(x_train), num_test=len(x_test))

    with outputs.atomic_path(output_dir / "model.keras") as tmp:
        model.save(tmp)
    save_plots(output_dir, history, cm, test_records, x_test, y_test, predicted)
    outputs.write_metrics(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
