"""How chapter 04 scores a person mask against the truth (numpy/OpenCV only, no torch).

- person IoU and pixel accuracy are *pooled*: the intersections, unions and correct pixels
  of all photos are summed first, so a big photo counts by its pixels, as in the
  PASCAL VOC and Cityscapes benchmarks;
- boundary F1 (Csurka et al. 2013's BF score) is computed per photo and averaged: how much
  of the predicted outline lies within `tolerance` px of the true one, and vice versa.

Their 95% intervals resample the *photos* (a seeded bootstrap): pixels of one photo are
far from independent, so a Wilson interval over pixels would be much too narrow. The
close-ups of one photo share its people and its light, so their interval resamples the
source photos, each with all its close-ups (`grouped_iou_ci95`).

Each photo also keeps its *uncertain share* (matting.uncertain_share: of the pixels the
model gives any chance of person, the share it is unsure of), what composite.py reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from data.intervals import bootstrap_ci95, pooled_ratio_ci95


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's own edge pixels: the mask minus its 3x3 erosion."""
    mask = mask.astype(np.uint8)
    return (mask - cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)) > 0


def boundary_f1(predicted: np.ndarray, truth: np.ndarray, tolerance: float) -> float:
    """F1 of outline pixels matched within `tolerance` px (Csurka et al. 2013's BF score)."""
    edge_predicted, edge_truth = outline(predicted), outline(truth)
    if not edge_predicted.any() and not edge_truth.any():
        return 1.0
    if not edge_predicted.any() or not edge_truth.any():
        return 0.0

    def distance_to(edge):  # distance of every pixel to the nearest pixel of `edge`
        return cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3)

    precision = (distance_to(edge_truth)[edge_predicted] <= tolerance).mean()
    recall = (distance_to(edge_predicted)[edge_truth] <= tolerance).mean()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


@dataclass
class PhotoScore:
    """What one photo adds to the pooled figures."""

    intersection: int
    union: int
    correct: int
    pixels: int
    boundary_f1: float
    uncertain_share: float = 0.0

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.union else 1.0


def score_photo(predicted: np.ndarray, truth: np.ndarray, tolerance: float,
                uncertain_share: float = 0.0) -> PhotoScore:
    return PhotoScore(intersection=int((predicted & truth).sum()), union=int((predicted | truth).sum()),
                      correct=int((predicted == truth).sum()), pixels=truth.size,
                      boundary_f1=boundary_f1(predicted, truth, tolerance),
                      uncertain_share=uncertain_share)


@dataclass
class Scores:
    """The scores of a set of photos (and, if kept, their predicted masks)."""

    photos: list[PhotoScore] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)

    @property
    def iou(self) -> float:
        return sum(p.intersection for p in self.photos) / max(sum(p.union for p in self.photos), 1)

    @property
    def pixel_accuracy(self) -> float:
        return sum(p.correct for p in self.photos) / max(sum(p.pixels for p in self.photos), 1)

    @property
    def boundary_f1(self) -> float:
        return float(np.mean([p.boundary_f1 for p in self.photos]))

    def intervals(self, reps: int = 1000, seed: int = 0) -> dict[str, list[float]]:
        """95% bootstrap intervals over the photos, each pooled as its figure is."""
        f1 = np.array([p.boundary_f1 for p in self.photos])
        return {
            "person_iou_ci95": pooled_ratio_ci95([p.intersection for p in self.photos],
                                                 [p.union for p in self.photos], reps, seed),
            "pixel_accuracy_ci95": pooled_ratio_ci95([p.correct for p in self.photos],
                                                     [p.pixels for p in self.photos], reps, seed),
            "boundary_f1_ci95": bootstrap_ci95(lambda idx: float(f1[idx].mean()), len(f1), reps, seed),
        }


def grouped_iou_ci95(photos: list[PhotoScore], groups: list[str], reps: int = 1000,
                     seed: int = 0) -> list[float]:
    """95% bootstrap interval of the pooled IoU, resampling whole groups (the close-ups cut
    from one photo) rather than single items, which are not independent of each other."""
    names = sorted(set(groups))
    intersections, unions = np.zeros(len(names)), np.zeros(len(names))
    for photo, group in zip(photos, groups, strict=True):
        intersections[names.index(group)] += photo.intersection
        unions[names.index(group)] += photo.union
    return pooled_ratio_ci95(intersections, unions, reps, seed)
