"""The photos chapter 04 measures: loaded once at the working resolution, scored, and drawn.

train.py and evaluate.py share these, so a model scored afterwards by evaluate.py is
scored exactly as train.py scores it at the end of its run: `load_photos` and
`load_close_ups` (the photos and their portrait close-ups, at the model's working size, each
with its full-resolution mask for scoring), `set_figures` (the pooled figures of a set with
their 95% intervals) and `save_grids` (predictions.png, worst.png and close_ups.png). numpy/OpenCV
only: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import closeups  # the chapter's own modules sit beside this one
import cv2
import numpy as np
from matting import fit_longest_side
from scoring import Scores, grouped_iou_ci95
from tqdm import tqdm

from data.outputs import plot_image_grid

# --- Load ---------------------------------------------------------------------------


class Cutout(NamedTuple):
    """One person cut out of a training photo, for copy-paste augmentation."""

    patch: np.ndarray  # (h, w, 3) uint8: the person's bounding box
    mask: np.ndarray   # (h, w) uint8 0/1: which of its pixels are the person


@dataclass
class Photo:
    """One photo (or close-up) at the working resolution, plus its full-resolution mask for
    scoring; a training photo also keeps its full-resolution image for close-up views."""

    name: str
    image: np.ndarray         # (h, w, 3) uint8, longest side = image_size
    mask: np.ndarray          # (h, w) uint8 0/1
    full_mask: np.ndarray     # (H, W) bool at the photo's own size
    people: list[Cutout] = field(default_factory=list)
    source: str = ""          # a close-up: the photo it was cut from (its bootstrap group)
    # training photos only: the full-size image close-ups are cut from (sharper than `image`),
    # and the boxes (x0, y0, x1, y1, full size) of the people tall enough for a close-up
    full_image: np.ndarray | None = None
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


def shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average, then threshold: the fair small version of a mask (not nearest-pixel)."""
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5


def at_working_size(name: str, image: np.ndarray, full_mask: np.ndarray, image_size: int,
                    **fields) -> Photo:
    """A Photo of `image`: resized so its longest side is image_size, as the model sees it."""
    height, width = fit_longest_side(*image.shape[:2], image_size)
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return Photo(name, small, shrink_mask(full_mask, (width, height)).astype(np.uint8), full_mask, **fields)


def cut_people(small: np.ndarray, instances: np.ndarray) -> list[Cutout]:
    """Each person of the photo, at the working size, for copy-paste."""
    people = []
    for instance in instances:
        person = shrink_mask(instance, small.shape[1::-1])
        ys, xs = np.nonzero(person)
        if len(ys) >= 64:  # skip slivers: tiny, cut-off people paste as noise
            box = np.s_[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            people.append(Cutout(small[box].copy(), person[box].astype(np.uint8)))
    return people


def load_photos(records, image_size: int, closeup_min_height: int = 0, train: bool = False) -> list[Photo]:
    """Read and resize every photo once: epochs then cost no disk or decode time. Training
    photos keep their full-size image and the boxes of the people a close-up can frame."""
    photos = []
    for record in tqdm(records, desc="loading", leave=False):
        image, instances = record.image(), record.instance_masks()
        photo = at_working_size(record.image_path.stem, image, record.person_mask(), image_size)
        if train:
            photo.people = cut_people(photo.image, instances)
            boxes = [closeups.person_box(instance) for instance in instances]
            photo.full_image = image
            photo.boxes = [box for box in boxes if closeups.framable(box, image.shape[:2], closeup_min_height)]
        photos.append(photo)
    return photos


def load_close_ups(records, image_size: int, closeup_min_height: int) -> list[Photo]:
    """The close-up measure: the portrait crops (closeups.portrait_crops) of every person in
    `records` tall enough and clear of the border, each as a photo of its own."""
    photos = []
    for record in tqdm(records, desc="close-ups", leave=False):
        stem = record.image_path.stem
        for crop in closeups.portrait_crops(record.image(), record.instance_masks(), closeup_min_height):
            name = f"{stem} #{crop.person + 1} {crop.framing.replace('head_', '').replace('_', ' ')}"
            photos.append(at_working_size(name, crop.image, crop.mask, image_size, source=stem))
    return photos


# --- Draw ---------------------------------------------------------------------------


def overlay(photo: Photo, predicted: np.ndarray) -> np.ndarray:
    """Green: person found; red: background called person; blue: person missed."""
    height, width = photo.mask.shape
    predicted = cv2.resize(predicted.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    truth = photo.mask > 0
    out = photo.image.astype(np.float32)
    for where, color in ((predicted & truth, (0, 200, 0)), (predicted & ~truth, (230, 0, 0)),
                         (~predicted & truth, (0, 90, 255))):
        out[where] = 0.5 * out[where] + 0.5 * np.array(color, np.float32)
    return out.astype(np.uint8)


def save_predictions(photos: list[Photo], masks: list[np.ndarray], path: Path, title: str) -> None:
    images, titles = [], []
    for photo, predicted in zip(photos, masks, strict=True):
        union = (predicted | photo.full_mask).sum()
        iou = (predicted & photo.full_mask).sum() / union if union else 1.0
        images.append(overlay(photo, predicted))
        titles.append(f"{photo.name} IoU {iou:.2f}")
    plot_image_grid(images, titles, path, columns=4, cell=2.6,
                    title=f"{title}: green hit, red false person, blue missed")


def save_grids(photos: list[Photo], scores: Scores, close_ups: list[Photo], close_up_scores: Scores,
               output_dir: Path, part: str, grid_images: int) -> None:
    """predictions.png (the first grid_images photos), worst.png (the grid_images photos with
    the lowest IoU, lowest first: where to look for what the model gets wrong) and
    close_ups.png (grid_images close-ups spread over the whole set) of the `part` photos;
    the scores must have kept their masks."""
    count = min(grid_images, len(photos))
    save_predictions(photos[:count], scores.masks[:count], output_dir / "predictions.png",
                     f"{part} predictions")
    worst = np.argsort([score.iou for score in scores.photos], kind="stable")[:count]
    save_predictions([photos[i] for i in worst], [scores.masks[i] for i in worst], output_dir / "worst.png",
                     f"{part}: lowest IoU first")
    shown = np.linspace(0, len(close_ups) - 1, min(grid_images, len(close_ups))).round().astype(int)
    save_predictions([close_ups[i] for i in shown], [close_up_scores.masks[i] for i in shown],
                     output_dir / "close_ups.png", f"{part} close-ups")


# --- Figures ------------------------------------------------------------------------


def set_figures(scores: Scores, close_up_scores: Scores, close_ups: list[Photo]) -> dict:
    """The figures of one measured set of photos (train.py's test figures): pooled person IoU,
    close-up IoU, pixel accuracy and boundary F1, each with its 95% bootstrap interval."""
    return {"person_iou": scores.iou, "close_up_iou": close_up_scores.iou,
            "pixel_accuracy": scores.pixel_accuracy, "boundary_f1": scores.boundary_f1, **scores.intervals(),
            # resampling the photos, each with all its close-ups
            "close_up_iou_ci95": grouped_iou_ci95(close_up_scores.photos, [photo.source for photo in close_ups])}


def photo_rows(photos: list[Photo], scores: Scores) -> list[dict]:
    """per_photo.json's rows for a set: each photo's name, IoU and uncertain share."""
    return [{"name": photo.name, "iou": score.iou, "uncertain_share": score.uncertain_share}
            for photo, score in zip(photos, scores.photos, strict=True)]
