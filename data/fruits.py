"""The Kaggle fruit set (mbkinaci/fruit-images-for-object-detection) as plain records.

240 training and 60 test photos, each with a Pascal VOC XML file. The image class is the
file-name prefix: apple, banana, orange, or mixed (several kinds of fruit in one photo).
The boxes inside the XML are only apple, banana and orange.

Quirks handled here: 37 XML files say width=0 height=0, so the size always comes from
the image itself; 37 `.jpg` files are really PNG (read through `data.images`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import download, synthetic
from data.cli import UserError
from data.images import image_size, read_rgb, resize_rgb
from data.voc import read_voc

CLASSES = ("apple", "banana", "orange", "mixed")   # image classes (file-name prefix)
BOX_CLASSES = ("apple", "banana", "orange")        # object classes in the XML
BOX_COLORS = {"apple": (220, 20, 60), "banana": (230, 200, 0), "orange": (255, 120, 0)}  # for drawings
SPLIT_FOLDERS = {"train": "train_zip/train", "test": "test_zip/test"}


@dataclass
class FruitRecord:
    image_path: Path
    xml_path: Path
    label: str            # image class from the file-name prefix
    width: int            # real image size (EXIF orientation applied)
    height: int
    boxes: np.ndarray     # (N, 4) float32 xmin, ymin, xmax, ymax in pixels
    box_labels: list[str]

    @property
    def class_index(self) -> int:
        return CLASSES.index(self.label)


def label_from_name(path: Path) -> str:
    prefix = path.stem.split("_")[0].lower()
    if prefix not in CLASSES:
        raise UserError(f"{path}: file name should start with one of {CLASSES}")
    return prefix


def load_split(root: str | os.PathLike, split: str) -> list[FruitRecord]:
    """Records of one split ('train' or 'test') under a folder laid out like the zip."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = Path(root) / SPLIT_FOLDERS[split]
    if not folder.is_dir():
        raise UserError(f"fruit {split} folder not found: {folder}; run: python data/download.py fruits")
    records = []
    for image_path in sorted(folder.glob("*.jpg"), key=_natural):
        xml_path = image_path.with_suffix(".xml")
        if not xml_path.is_file():
            raise UserError(f"{image_path}: no annotation {xml_path.name} beside it")
        annotation = read_voc(xml_path)
        width, height = image_size(image_path)
        unknown = set(annotation.names) - set(BOX_CLASSES)
        if unknown:
            raise UserError(f"{xml_path}: unknown object class(es) {sorted(unknown)}")
        boxes = annotation.boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)   # a few boxes overhang the border
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        records.append(FruitRecord(image_path, xml_path, label_from_name(image_path),
                                   width, height, boxes, annotation.names))
    if not records:
        raise UserError(f"no .jpg images in {folder}")
    return records


def _natural(path: Path) -> tuple[str, int]:
    stem, _, number = path.stem.rpartition("_")
    return (stem, int(number)) if number.isdigit() else (path.stem, -1)


def load_fruits(data_dir: str | os.PathLike | None = None, fetch: bool = True,
                test: bool = True) -> tuple[list[FruitRecord], list[FruitRecord]]:
    """(train, test) records from <data_dir>/fruits, downloading the set first if `fetch`.
    With `test=False` the test folder is never opened (a tuning run) and test is []."""
    root = download.ensure("fruits", data_dir) if fetch else Path(data_dir) / "fruits"
    return load_split(root, "train"), (load_split(root, "test") if test else [])


def load_fruits_or_smoke(data_dir: str | os.PathLike | None, smoke: bool, output_dir: Path,
                         seed: int, test: bool = True) -> tuple[list[FruitRecord], list[FruitRecord]]:
    """(train, test) records: the real set, or with `smoke` a tiny synthetic one written
    under `output_dir` in the real layout (8 train / 3 test pictures per class) and read
    back through the same loader. `test=False`: see `load_fruits`."""
    if smoke:
        smoke_dir = Path(output_dir) / "smoke-data"
        synthetic.write_fruits(smoke_dir, train_per_class=8, test_per_class=3, seed=seed)
        return load_fruits(smoke_dir, fetch=False, test=test)
    return load_fruits(data_dir, test=test)


def decode_images(records: list[FruitRecord], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image once through the shared reader and resize it to a square
    (bilinear, antialiased): (N, size, size, 3) uint8 and (N,) class indices."""
    images = np.stack([resize_rgb(read_rgb(r.image_path), (image_size, image_size))
                       for r in records])
    return images, np.array([r.class_index for r in records])


def plot_misclassified(images, records: list[FruitRecord], predicted, labels, path) -> Path:
    """The test photos the classifier got wrong, each captioned 'name -> predicted class'."""
    from data.outputs import plot_image_grid

    wrong = np.flatnonzero(np.asarray(predicted) != np.asarray(labels))
    return plot_image_grid(
        [images[i] for i in wrong],
        [f"{records[i].image_path.stem}\n-> {CLASSES[predicted[i]]}" for i in wrong],
        path, columns=6, colors=["crimson"] * len(wrong))
