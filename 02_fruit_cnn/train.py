"""02: a fruit CNN, the study's first attempt reproduced faithfully.

What it teaches: the 2020 study's recipe as it was, with only its mechanics made correct.
The Kaggle fruit photos (240 for training, 60 for test) are classified into apple, banana,
orange and mixed; the class is the file-name prefix. A plain Conv/MaxPool stack, Flatten,
Dense and softmax (model.py); Adam on categorical cross-entropy for a fixed number of epochs;
no augmentation and no validation set ("the dataset is too small"). Every photo is read as
upright RGB by the shared reader, squashed whole to a square (no crop), scaled to [0, 1]
inside the model, and every draw is seeded, with TensorFlow's deterministic ops. The
training curves are the lesson: the network memorises the 240 photos. With no validation
set only the training curves are drawn; the test split is touched once. 02b fixes it.

How to run (from the repository root):
    python 02_fruit_cnn/train.py                      # real data, into runs/02_fruit_cnn/
    python 02_fruit_cnn/train.py --seed 1 --output-dir runs/02_fruit_cnn-seed1
    python 02_fruit_cnn/train.py --epochs 50 --image-size 128 --output-dir runs/02-e50
    python 02_fruit_cnn/train.py --smoke              # synthetic data, ~10 s
    python 02_fruit_cnn/train.py --strategy mirrored  # data-parallel: every local GPU (or 2 CPU replicas)
    python 02_fruit_cnn/predict.py --model-path runs/02_fruit_cnn/model.keras photo.jpg
A run writes config.json, split.json (the photo names), metrics.json (each accuracy with its
Wilson 95% interval), test_predictions.json (one row per test photo), model.keras and the
plots; a folder that holds a finished run is refused without --overwrite.

The measured figures, the seeds and what became of the study's 61.7%: 02_fruit_cnn/README.md.
"""

from __future__ import annotations

import ctypes.util
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data import classify, cli, fruits, outputs
from data.cli import ChapterParser, require, run_main, seed_everything
from parallel import tf_strategy

CHAPTER = "02_fruit_cnn"
CONFIG_PATH = Path(__file__).with_name("config.toml")
DEVICES = ("auto", "cpu", "cuda")

# --- Config ------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    cli.require_at_least(cfg, "image_size", 16)
    cli.require_at_least(cfg, "epochs", 1)
    cli.require_at_least(cfg, "batch_size", 1)
    cli.require_positive(cfg, "learning_rate")
    cli.require_at_least(cfg, "dense_units", 1)
    cli.require_at_least(cfg, "num_threads", 0)
    require(cfg["device"] in DEVICES, f"--device must be one of {', '.join(DEVICES)}; got {cfg['device']!r}")
    # Without the NVIDIA driver no TensorFlow build can use a GPU: say so before the import.
    require(cfg["device"] != "cuda" or ctypes.util.find_library("cuda") is not None,
            "--device cuda: no NVIDIA driver (libcuda) on this machine; use --device auto or cpu")
    require(len(cfg["filters"]) >= 1 and all(f >= 1 for f in cfg["filters"]),
            f"--filters must be one or more positive integers, got {cfg['filters']}")
    # Each conv (valid padding) and pool shrinks the side; it must not vanish.
    side = cfg["image_size"]
    for _ in cfg["filters"]:
        side = (side - 2) // 2
    require(side >= 1, f"--image-size {cfg['image_size']} is too small for {len(cfg['filters'])} conv blocks")
    tf_strategy.check_config(cfg)


# --- Data --------------------------------------------------------------------------


class FruitData(NamedTuple):
    train_records: list
    train_images: np.ndarray  # (N, size, size, 3) uint8
    train_labels: np.ndarray  # (N,) class indices into fruits.CLASSES
    test_records: list        # empty in a --no-evaluate-test run: the test files stay unread
    test_images: np.ndarray
    test_labels: np.ndarray


def load_data(data_dir: Path, smoke: bool, output_dir: Path, cfg: dict) -> FruitData:
    """Decode every photo once through the shared reader, squashed to a square.

    The real set, or with --smoke a tiny synthetic one in the same layout (8 train / 3 test
    pictures per class). The test folder is listed and decoded only when evaluate_test.
    """
    train_records, test_records = fruits.load_fruits_or_smoke(data_dir, smoke, output_dir, cfg["seed"],
                                                       test=cfg["evaluate_test"])
    start = time.monotonic()
    train_images, train_labels = fruits.decode_images(train_records, cfg["image_size"])
    test_images, test_labels = (fruits.decode_images(test_records, cfg["image_size"])
                                if test_records else (np.zeros((0,)), np.zeros((0,), int)))
    print(f"decoded {len(train_records)} train + {len(test_records)} test images to "
          f"{cfg['image_size']}x{cfg['image_size']} in {time.monotonic() - start:.1f}s")
    return FruitData(train_records, train_images, train_labels, test_records, test_images,
                     test_labels)


# --- Model and training: model.py (the network, Adam and a fixed number of epochs) ----


# --- Evaluate ----------------------------------------------------------------------


def evaluate(data: FruitData, train_probs: np.ndarray, test_probs: np.ndarray | None) -> dict:
    """Test accuracy overall and per class with Wilson 95% intervals, and the train accuracy
    at the end (the gap between the two is the lesson)."""
    metrics = {"final_train_accuracy": float(np.mean(train_probs.argmax(1) == data.train_labels))}
    if test_probs is not None:
        metrics.update(classify.accuracy_metrics("test", data.test_labels, test_probs.argmax(1),
                                                 fruits.CLASSES))
    return metrics


# --- Save --------------------------------------------------------------------------


def save_outputs(output_dir: Path, history: dict, data: FruitData, test_probs) -> None:
    # Training curves only: the study had no validation set, and the test split is
    # touched once, at the end, never per epoch.
    outputs.plot_curves(history, output_dir / "curves.png")
    if test_probs is None:
        return
    names = [r.image_path.name for r in data.test_records]
    outputs.write_json(output_dir / "test_predictions.json", classify.prediction_rows(
        names, data.test_labels, test_probs, fruits.CLASSES))
    predicted = test_probs.argmax(1)
    cm = outputs.confusion_matrix(data.test_labels, predicted, len(fruits.CLASSES))
    outputs.plot_confusion(cm, fruits.CLASSES, output_dir / "confusion.png", title="02 test")
    fruits.plot_misclassified(data.test_images, data.test_records, predicted, data.test_labels,
                              output_dir / "misclassified.png")


def main(argv=None) -> dict:
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    check_config(cfg)
    args.output_dir = tf_strategy.worker_output_dir(args.output_dir, cfg)  # the chief's, or scratch
    output_dir = outputs.prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite,
                                            smoke=args.smoke, data_dir=str(args.data_dir))
    # TensorFlow takes seconds to import: only now, so --help and flag errors answer at once.
    import model

    device, device_name = model.set_up_tensorflow(cfg["device"], cfg["num_threads"], cfg["seed"])
    strategy = tf_strategy.make_strategy(cfg)  # "default": one device, as a plain run
    seed_everything(cfg["seed"])
    data = load_data(args.data_dir, args.smoke, output_dir, cfg)
    outputs.write_split(output_dir, {"train": [r.image_path.name for r in data.train_records],
                                     "test": [r.image_path.name for r in data.test_records]})

    with strategy.scope():  # the weights and Adam's state, one copy per replica
        net = model.build_model(cfg["image_size"], cfg["filters"], cfg["dense_units"])
        net.summary(print_fn=print)
        # Device and data are ready: from here a failure keeps the run's files. Before this
        # line it leaves nothing, so the retry needs no --overwrite.
        outputs.training_started(output_dir)
        history, seconds = model.fit(net, data.train_images, data.train_labels, cfg)

    test_probs = model.probabilities(net, data.test_images) if cfg["evaluate_test"] else None
    metrics = evaluate(data, model.probabilities(net, data.train_images), test_probs)
    metrics.update(train_seconds=seconds, epochs=len(history["loss"]),
                   num_train=len(data.train_records), num_test=len(data.test_records),
                   **outputs.run_facts(("tensorflow", "keras"), device, device_name),
                   **tf_strategy.run_facts(strategy, net))

    model.save(net, output_dir / "model.keras")
    save_outputs(output_dir, history, data, test_probs)
    outputs.write_metrics(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
