"""What an image classifier got right, and what it says about one photo; framework-free.

Shared by the classification chapters, which hand in plain numpy arrays:

- `accuracy_metrics(prefix, labels, predicted, class_names)`: overall and per-class
  accuracy, each with its Wilson 95% interval, as flat `metrics.json` keys
  (`test_accuracy`, `test_accuracy_ci95`, `test_accuracy_mixed`, `test_accuracy_mixed_ci95`,
  `test_num_mixed`, ...). A class with no photo gets `None`, not a made-up 0 or 1;
- `prediction_rows(names, labels, probabilities, class_names)`: one row per photo (name,
  true class, predicted class, its probability) for `test_predictions.json`, so that two
  runs can later be compared photo by photo (`data.intervals.paired_bootstrap`);
- `top2_line(name, probabilities, class_names)`: the line a predict script prints;
- `read_classifier_input(path, image_size)`: a photo file as the classifier saw its training
  photos: upright RGB through `data.images.read_rgb`, squashed to a square;
- `predict_parser(doc, chapter)`: the flags every predict script shares (`--model-path`,
  `--device`, `--num-threads`, the photos), with argparse's errors on one line;
- `check_keras_model_chapter(path, chapter)`: a one-line refusal of a model file that another
  chapter saved (the Keras chapters name their model after the chapter), before Keras loads.

    metrics = accuracy_metrics("test", labels, probs.argmax(1), ("apple", "banana"))
    print(top2_line("photo.jpg", probs[0], ("apple", "banana")))
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.cli import REPO_ROOT, OneLineParser, UserError
from data.images import read_rgb, resize_rgb
from data.intervals import wilson_ci95


def wilson(successes: int, total: int) -> list[float]:
    """data.intervals.wilson_ci95 with its exact ends: 0 of n starts at 0, n of n ends at 1
    (where the formula's rounding gives 5.6e-17 and 0.9999999999999999)."""
    low, high = wilson_ci95(successes, total)
    return [0.0 if successes == 0 else low, 1.0 if successes == total else high]


def accuracy_metrics(prefix: str, labels: Sequence[int], predicted: Sequence[int],
                     class_names: Sequence[str]) -> dict:
    """Accuracy overall and per class, with Wilson 95% intervals, under `prefix`_ keys."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if labels.shape != predicted.shape or labels.size == 0:
        raise ValueError("labels and predicted need the same, non-zero length")
    correct = labels == predicted
    metrics = {f"{prefix}_accuracy": float(correct.mean()),
               f"{prefix}_accuracy_ci95": wilson(int(correct.sum()), len(correct)),
               f"{prefix}_correct": int(correct.sum())}
    for index, name in enumerate(class_names):
        mine = labels == index
        count, right = int(mine.sum()), int(correct[mine].sum())
        metrics[f"{prefix}_accuracy_{name}"] = right / count if count else None
        metrics[f"{prefix}_accuracy_{name}_ci95"] = wilson(right, count) if count else None
        metrics[f"{prefix}_num_{name}"] = count
    return metrics


def prediction_rows(names: Sequence[str], labels: Sequence[int], probabilities: np.ndarray,
                    class_names: Sequence[str]) -> list[dict]:
    """One row per photo: name, true and predicted class, the predicted class's probability."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not len(names) == len(labels) == len(probabilities):
        raise ValueError("names, labels and probabilities need the same length")
    predicted = probabilities.argmax(axis=1)
    return [{"name": str(name), "true": class_names[int(label)],
             "predicted": class_names[int(guess)], "probability": round(float(row[guess]), 6)}
            for name, label, guess, row in zip(names, labels, predicted, probabilities, strict=True)]


def top2_line(name: str, probabilities: Sequence[float], class_names: Sequence[str]) -> str:
    """'photo.jpg: banana 93.1% (runner-up: mixed 5.2%)' from one photo's class probabilities."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(class_names),):
        raise ValueError(f"expected {len(class_names)} probabilities, got shape {probabilities.shape}")
    first, second = np.argsort(-probabilities, kind="stable")[:2]
    return (f"{name}: {class_names[first]} {probabilities[first]:.1%} "
            f"(runner-up: {class_names[second]} {probabilities[second]:.1%})")


def read_classifier_input(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """A photo as (image_size, image_size, 3) uint8: upright RGB, squashed (never cropped) to a
    square with antialiased bilinear resampling, exactly as the fruit chapters decode theirs."""
    return resize_rgb(read_rgb(Path(path)), (image_size, image_size))


def check_keras_model_chapter(path: str | os.PathLike, chapter: str) -> Path:
    """Refuse, in one line and before Keras is imported, a file that is not a `.keras` model
    saved by `chapter`'s train.py (which names its model after the chapter)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--model-path {path}: no such file; train one first with "
                        f"python {chapter}/train.py")
    try:
        with zipfile.ZipFile(path) as archive:
            name = json.loads(archive.read("config.json"))["config"]["name"]
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError, OSError):
        raise UserError(f"--model-path {path}: not a Keras .keras model file; give the "
                        f"model.keras that python {chapter}/train.py saved") from None
    if name != chapter:
        raise UserError(f"--model-path {path}: a model of {name!r}, not of {chapter}; use that "
                        f"chapter's predict.py, or a model.keras saved by {chapter}/train.py")
    return path


def predict_parser(doc: str | None, chapter: str) -> argparse.ArgumentParser:
    """--model-path (default runs/<chapter>/model.keras), --device, --num-threads, PHOTO..."""
    parser = OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="+", type=Path, metavar="PHOTO",
                        help="image files (any format the shared reader opens)")
    parser.add_argument("--model-path", type=Path, default=REPO_ROOT / "runs" / chapter / "model.keras",
                        help=f"model.keras saved by {chapter}/train.py (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="a CUDA GPU when TensorFlow sees one (auto), or force one (default: auto)")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="CPU threads for TensorFlow; 0 = all cores (default: 0)")
    return parser


def check_photos(photos: Sequence[Path]) -> None:
    """Every photo named on the command line exists (before the framework is imported)."""
    missing = [str(p) for p in photos if not Path(p).is_file()]
    if missing:
        raise UserError(f"no such photo: {', '.join(missing)}")
