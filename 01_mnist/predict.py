"""01: read your own handwritten digits with a network trained on MNIST.

    python 01_mnist/predict.py --model-path runs/01_mnist/model.keras photo.jpg scan.png

For each photo it prints the digit, its probability and the runner-up. A network trained
on MNIST has only seen MNIST-like digits, so each photo is first prepared the way MNIST
was made (digits.py): grayscale, dark ink on light paper inverted to white on black,
cropped to the digit, fitted into a 20x20 box keeping its aspect ratio, and centred by
its centre of mass in 28x28. The prepared 28x28 images are saved in --output-dir
(default runs/01_mnist-predict/): <photo name>_28x28.png each, prepared.png with all of
them and their answers, and predictions.json. Look at them when an answer is wrong:
they are exactly what the network saw.

Any photo the shared reader reads works (PNG behind a .jpg name, CMYK, EXIF-rotated
phone photos, transparency). Best results: one digit, thick dark pen on plain paper,
cropped so that little else is in the picture.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from digits import prepare_digit
from PIL import Image

from data import outputs
from data.cli import REPO_ROOT, UserError, run_main
from data.images import read_rgb

DEFAULT_MODEL = REPO_ROOT / "runs" / "01_mnist" / "model.keras"
DEFAULT_OUTPUT = REPO_ROOT / "runs" / "01_mnist-predict"


class Answer(NamedTuple):
    photo: Path
    prepared: Path  # the 28x28 image the network saw
    digit: int
    probability: float
    runner_up: int
    runner_up_probability: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("photos", nargs="+", type=Path, help="photos or scans of one handwritten digit each")
    parser.add_argument("--model-path", type=Path, default=DEFAULT_MODEL,
                        help=f"a model.keras saved by 01_mnist/train.py (default: {DEFAULT_MODEL.relative_to(REPO_ROOT)})")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where the prepared 28x28 images go (default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)})")
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")
    return parser


def check_model_file(path: Path) -> None:
    """Refuse another chapter's model before Keras loads (seconds): a .keras file is a zip
    whose config.json records the input shape. network.load checks everything again."""
    if not path.is_file():
        raise UserError(f"model file not found: {path} (train one first: python 01_mnist/train.py)")
    try:
        with zipfile.ZipFile(path) as archive:
            shape = json.loads(archive.read("config.json")).get("build_config", {}).get("input_shape")
    except (zipfile.BadZipFile, KeyError, ValueError, AttributeError):
        raise UserError(f"{path} is not a .keras model archive (01_mnist/train.py saves model.keras)") from None
    if shape is not None and list(shape[1:]) != [28, 28, 1]:
        raise UserError(f"{path} is not an MNIST model of 01_mnist: it takes inputs of shape "
                        f"{shape[1:]}, not [28, 28, 1] (train one with 01_mnist/train.py)")


def prepare_photos(photos: list[Path], output_dir: Path) -> tuple[np.ndarray, list[Path]]:
    """Read and prepare every photo (a bad one stops the run before the model loads);
    save each prepared digit as <name>_28x28.png."""
    images, paths, used = [], [], set()
    for photo in photos:
        rgb = read_rgb(photo)  # its errors name the file
        try:
            image = prepare_digit(rgb)
        except UserError as exc:  # a blank photo
            raise UserError(f"{photo}: {exc}") from None
        name = f"{photo.stem}_28x28.png"
        for count in range(2, len(photos) + 2):  # two photos with one name: keep both
            if name not in used:
                break
            name = f"{photo.stem}_{count}_28x28.png"
        used.add(name)
        with outputs.atomic_path(output_dir / name) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        images.append(image)
        paths.append(output_dir / name)
    return np.stack(images), paths


def answers(photos: list[Path], prepared: list[Path], probs: np.ndarray) -> list[Answer]:
    result = []
    for photo, path, row in zip(photos, prepared, probs, strict=True):
        first, second = np.argsort(-row, kind="stable")[:2]
        result.append(Answer(photo, path, int(first), float(row[first]), int(second), float(row[second])))
    return result


def save_answers(found: list[Answer], images: np.ndarray, output_dir: Path) -> None:
    titles = [f"{a.photo.name[:18]}\n{a.digit} ({a.probability:.0%})" for a in found]
    outputs.plot_image_grid(list(images), titles, output_dir / "prepared.png", cmap="gray",
                            title="what the network saw, and its answer")
    outputs.write_json(output_dir / "predictions.json", [a._asdict() for a in found])


def main(argv=None) -> list[Answer]:
    args = build_parser().parse_args(argv)
    check_model_file(args.model_path)
    try:  # files of the same name from an earlier run are replaced; nothing else is touched
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --output-dir {args.output_dir}: {exc.strerror}") from None
    output_dir = args.output_dir
    images, prepared = prepare_photos(args.photos, output_dir)
    # Keras loads here, after the photos are read, so a bad photo or flag answers at once.
    import network

    model = network.load(args.model_path)
    found = answers(args.photos, prepared, network.probabilities(model, images))
    save_answers(found, images, output_dir)
    for a in found:
        print(f"{a.photo}: {a.digit} ({a.probability:.1%}), runner-up {a.runner_up} "
              f"({a.runner_up_probability:.1%}); prepared image {a.prepared}")
    print(f"prepared 28x28 images, prepared.png and predictions.json in {output_dir}")
    return found


if __name__ == "__main__":
    run_main(main)
