"""Annotated photos on their way into TFRecords: the fruit set's split or a LabelImg folder.

Framework-free (no TensorFlow), so that make_tfrecords.py finds a bad file, a box outside
its image or an unknown class, and says so in one line, before TensorFlow loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.cli import UserError
from data.images import image_size


@dataclass
class Photo:
    """One annotated photo on its way into a record: boxes in pixels of the upright image."""

    image_path: Path
    xml_path: Path
    boxes: np.ndarray     # (N, 4) float32 xmin, ymin, xmax, ymax
    names: list[str]      # class name of each box


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def fruit_splits(data_dir: str | os.PathLike, val_fraction: float, seed: int,
                 smoke_dir: Path | None = None) -> dict[str, list[Photo]]:
    """The fruit set as train / val / test photos. Validation is the seeded, stratified
    share of the 240 training photos that 03b_xml_detection holds out (the same call to
    `stratified_split` over the file-name classes, in the loader's order); test is the
    set's own 60 photos. With `smoke_dir`, a tiny synthetic set in the same layout."""
    from data import fruits, synthetic
    from data.splits import stratified_split

    if smoke_dir is not None:
        synthetic.write_fruits(smoke_dir, train_per_class=6, test_per_class=4, seed=seed)
        train, test = fruits.load_fruits(smoke_dir, fetch=False)
    else:
        train, test = fruits.load_fruits(data_dir)
    train_idx, val_idx = stratified_split([r.label for r in train], val_fraction, seed)

    def photos(records):
        return [Photo(r.image_path, r.xml_path, r.boxes, r.box_labels) for r in records]

    return {"train": photos([train[i] for i in train_idx]), "val": photos([train[i] for i in val_idx]),
            "test": photos(test)}


def voc_folder_photos(folder: str | os.PathLike) -> list[Photo]:
    """Every image in a LabelImg folder that has a VOC .xml beside it (same file stem)."""
    from data.voc import read_voc

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--voc-dir {folder} is not a folder")
    images = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    photos = []
    for xml_path in sorted(folder.glob("*.xml")):
        annotation = read_voc(xml_path)  # one-line AnnotationError naming the file
        image_path = images.get(xml_path.stem) or (folder / annotation.filename if annotation.filename else None)
        if image_path is None or not image_path.is_file():
            raise UserError(f"{xml_path}: no image {xml_path.stem}.jpg/.png (or <filename>) beside it")
        width, height = image_size(image_path)
        if annotation.width and annotation.height and (annotation.width, annotation.height) != (width, height):
            print(f"note: {xml_path.name} says {annotation.width}x{annotation.height}, "
                  f"the image is {width}x{height}; using the image")
        photos.append(Photo(image_path, xml_path, annotation.boxes, annotation.names))
    if not photos:
        raise UserError(f"no .xml annotations in {folder}; label the images with LabelImg (Pascal VOC) first")
    return photos


def voc_folder_splits(folder, val_fraction: float, seed: int, test_folder=None) -> dict[str, list[Photo]]:
    """A user's LabelImg folder as train / val (seeded, stratified by each photo's first
    class), plus test when a second folder is given."""
    from data.splits import stratified_split

    photos = voc_folder_photos(folder)
    if len(photos) < 2:
        raise UserError(f"{folder}: {len(photos)} annotated image; need at least 2 to hold one out")
    first_class = [p.names[0] if p.names else "" for p in photos]
    train_idx, val_idx = stratified_split(first_class, val_fraction, seed)
    if not len(val_idx):  # every class has one photo: hold out one photo anyway
        train_idx, val_idx = train_idx[:-1], train_idx[-1:]
    splits = {"train": [photos[i] for i in train_idx], "val": [photos[i] for i in val_idx]}
    if test_folder is not None:
        splits["test"] = voc_folder_photos(test_folder)
    return splits


def check_photos(splits: dict[str, list[Photo]], class_names: Sequence[str]) -> None:
    """Every box inside its image and of a known class; one line naming the file if not."""
    for photos in splits.values():
        for photo in photos:
            unknown = sorted(set(photo.names) - set(class_names))
            if unknown:
                raise UserError(f"{photo.xml_path}: unknown class(es) {unknown}; "
                                f"known: {', '.join(class_names)} (see --classes)")
            width, height = image_size(photo.image_path)
            boxes = np.asarray(photo.boxes, np.float64).reshape(-1, 4)
            outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
            if outside.any():
                box = boxes[np.flatnonzero(outside)[0]].round(1).tolist()
                raise UserError(f"{photo.xml_path}: box {box} lies outside its {width}x{height} image "
                                f"{photo.image_path.name}")
