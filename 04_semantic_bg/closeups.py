"""Close-ups of the PennFudan people, in numpy and OpenCV only (no torch).

PennFudanPed shows small, full-body pedestrians in street scenes; the photos people put on a
new background are portraits. This module makes close-ups out of the photos we have:

- `portrait_crops`: the close-up measure. Around each annotated person at least
  `min_height` px tall and clear of the photo's border (a person cut by the border cannot
  be framed), one crop per framing of FRAMINGS (head to waist, head to knees):
  an upright 3:4 frame with a little headroom, cut at the framing line, resized as a phone
  photo is shared (its longest side PHOTO_SIDE). Its mask holds *every* person pixel inside
  the frame, not only the framed person's. A fixed rule, no randomness: the same photos
  always give the same crops. PennFudanPed leaves some people unlabeled (mostly ones half
  hidden behind a labeled one, as in FudanPed00006 and 00007); in a close-up they count as
  background, so finding them costs IoU there as it does on the whole photos.
- `closeup_window`: for training, a square window around one person in which person pixels
  fill a chosen share of the frame (portrait framings from the head down, and, down to
  `top_drop` of the person's height below the head, tighter zooms on the upper body).
- `empty_window`: for training, a square window with no person pixel at all.

    crops = portrait_crops(image, instance_masks, min_height=100)   # list[CloseUp]
    crops[0].framing, crops[0].box, crops[0].image, crops[0].mask
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from matting import fit_longest_side  # the chapter's own modules sit beside this one

# Where each framing cuts a standing person, as a share of their height from the top of the
# head: the waist line of an adult lies at about 0.4 of the height, the knees at about 0.72;
# a portrait is cut a little below.
FRAMINGS = {"head_to_waist": 0.45, "head_to_knees": 0.75}
HEADROOM = 0.08     # share of the frame's height left above the head
ASPECT = 3 / 4      # width / height of an upright phone photo
BORDER = 2          # px: a person this close to an edge of the photo is cut off by it
PHOTO_SIDE = 640    # longest side of a close-up: a phone photo as shared, scaled down so scoring
                    # stays cheap; one size for all, so each close-up weighs the same when pooled


@dataclass
class CloseUp:
    """One portrait crop: which person and framing, where it lies, and what it shows."""

    person: int                  # index of the framed person in the photo's instance masks
    framing: str                 # a key of FRAMINGS
    box: tuple[int, int, int, int]  # top, left, height, width in the source photo's pixels
    image: np.ndarray            # (h, w, 3) uint8 at the close-up's size (longest side PHOTO_SIDE)
    mask: np.ndarray             # (h, w) bool: every person pixel of the frame


def person_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 (x1 and y1 exclusive) of a person's mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def framable(box, shape: tuple[int, int], min_height: int) -> bool:
    """Whether a person's box (x0, y0, x1, y1) can be framed in a close-up: at least
    `min_height` px tall, and at least BORDER px from every edge of a photo of `shape`."""
    x0, y0, x1, y1 = box
    height, width = shape
    return y1 - y0 >= min_height and min(x0, y0) >= BORDER and x1 <= width - BORDER \
        and y1 <= height - BORDER


def fit_span(start: float, length: int, limit: int) -> tuple[int, int]:
    """A span of `length` px starting near `start`, shifted (or, if longer, cut) to fit 0..limit."""
    length = min(length, limit)
    start = round(min(max(start, 0), limit - length))
    return start, length


def portrait_box(instance: np.ndarray, cut: float) -> tuple[int, int, int, int]:
    """(top, left, height, width): the 3:4 frame from just above the head down to `cut` of the
    person's height, centered on the framed part of the body, kept inside the photo."""
    _, y0, _, y1 = person_box(instance)
    span = cut * (y1 - y0)
    height = span / (1 - HEADROOM)
    _, xs = np.nonzero(instance[y0:int(np.ceil(y0 + span))])
    top, height = fit_span(y0 - HEADROOM * height, round(height), instance.shape[0])
    left, width = fit_span(xs.mean() - ASPECT * height / 2, round(ASPECT * height), instance.shape[1])
    return top, left, height, width


def resize_pair(image: np.ndarray, mask: np.ndarray, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask with their longest side = `longest`: area-averaged when shrinking, cubic
    when enlarging (as a phone's own scaler); the mask resized as a fraction, then cut at 0.5."""
    height, width = mask.shape
    new_height, new_width = fit_longest_side(height, width, longest)
    enlarge = new_height > height
    image = cv2.resize(image, (new_width, new_height),
                       interpolation=cv2.INTER_CUBIC if enlarge else cv2.INTER_AREA)
    fraction = cv2.resize(mask.astype(np.float32), (new_width, new_height),
                          interpolation=cv2.INTER_LINEAR if enlarge else cv2.INTER_AREA)
    return image, fraction > 0.5


def portrait_crops(image: np.ndarray, instances: np.ndarray, min_height: int,
                   photo_side: int = PHOTO_SIDE) -> list[CloseUp]:
    """The close-ups of one photo: every framing of FRAMINGS around every person at least
    `min_height` px tall (smaller ones would be blown up from a few dozen pixels) and at
    least BORDER px from each edge of the photo.

    `image` (H, W, 3) uint8, `instances` (N, H, W) bool, one mask per person.
    """
    everyone = instances.any(axis=0)
    crops = []
    for index, instance in enumerate(instances):
        if not framable(person_box(instance), everyone.shape, min_height):
            continue
        for framing, cut in FRAMINGS.items():
            top, left, height, width = portrait_box(instance, cut)
            region = np.s_[top:top + height, left:left + width]
            crop, mask = resize_pair(image[region], everyone[region], photo_side)
            crops.append(CloseUp(index, framing, (top, left, height, width), crop, mask))
    return crops


# --- Training windows ----------------------------------------------------------------------


def window_sums(integral: np.ndarray, tops, lefts, side: float) -> tuple[np.ndarray, np.ndarray]:
    """(person pixels, pixels) inside square windows, each clipped to the photo; from
    `cv2.integral` of the mask, so each window costs four look-ups."""
    height, width = integral.shape[0] - 1, integral.shape[1] - 1
    y0 = np.clip(np.round(tops), 0, height).astype(int)
    x0 = np.clip(np.round(lefts), 0, width).astype(int)
    y1 = np.clip(np.round(np.asarray(tops) + side), 0, height).astype(int)
    x1 = np.clip(np.round(np.asarray(lefts) + side), 0, width).astype(int)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside, (y1 - y0) * (x1 - x0)


def closeup_window(person_mask: np.ndarray, box, share: float, rng,
                   top_drop: float = 0.0) -> tuple[float, float, float]:
    """(top, left, side): a square window around the person in `box` (x0, y0, x1, y1) in which
    person pixels (anyone's) fill about `share` of the frame.

    The candidates: sides from 0.2 to 1.6 times the person's height; tops just above the head
    (portrait framings) or, in steps of 10% of the height, down to `top_drop` of it lower
    (tighter zooms on the upper body that cut off the head; top_drop 0: none); a random
    sideways offset. The candidate nearest `share` wins. The parts of a window outside
    the photo are left out of its share.
    """
    x0, y0, x1, y1 = box
    height = y1 - y0
    integral = cv2.integral(person_mask.astype(np.uint8))
    sides = height * np.geomspace(0.2, 1.6, 15)
    center_x = (x0 + x1) / 2 + rng.uniform(-0.15, 0.15) * (x1 - x0)
    headroom = rng.uniform(0.02, 0.12)
    drops = np.arange(1, round(top_drop * 10) + 1) / 10  # 0.1, 0.2, ... top_drop
    best, best_gap = (y0, center_x - height / 2, float(height)), np.inf
    for side in sides:
        tops = np.concatenate([[y0 - headroom * side], y0 + drops * height])
        inside, pixels = window_sums(integral, tops, np.full(len(tops), center_x - side / 2), side)
        shares = np.where(pixels >= 0.5 * side * side, inside / np.maximum(pixels, 1), np.inf)
        gaps = np.abs(shares - share)
        if gaps.min() < best_gap:
            best, best_gap = (float(tops[gaps.argmin()]), center_x - side / 2, float(side)), gaps.min()
    return best


def empty_window(person_mask: np.ndarray, side_range: tuple[float, float], rng,
                 tries: int = 30) -> tuple[int, int, int] | None:
    """(top, left, side): a random square window inside the photo with no person pixel, its
    side drawn from `side_range` (shrinking after each miss); None when `tries` all miss."""
    height, width = person_mask.shape
    integral = cv2.integral(person_mask.astype(np.uint8))
    low, high = side_range
    for _ in range(tries):
        side = int(min(rng.uniform(low, high), height, width))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        inside, _ = window_sums(integral, np.array([top]), np.array([left]), side)
        if inside[0] == 0:
            return top, left, side
        high = max(low, 0.9 * high)
    return None
