"""A photo of a handwritten digit, prepared the way the MNIST digits were made.

MNIST's digits were scanned black ink on white paper, then (LeCun et al.): inverted to
white ink on black, cropped to the digit, scaled to fit a 20x20 box keeping the aspect
ratio (with anti-aliasing, hence the grey edges), and centred in 28x28 by their centre of
mass. A network trained on MNIST has only ever seen digits like that, so a photo has to
go through the same steps before the network can read it:

    from digits import prepare_digit
    image = prepare_digit(read_rgb("photo.jpg"))   # (28, 28) uint8, white ink on black

Framework-free (numpy and Pillow), so it is tested without TensorFlow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from data.cli import UserError

FIELD = 28  # the MNIST image side
BOX = 20  # the digit's longer side inside it
# MNIST strokes are 2.8 px wide on average (2 x area / perimeter, the first 200 test
# digits). A fine pen photographed large would shrink to a faint hairline in the 20-px
# box, so strokes under half this width are widened to it.
STROKE_IN_BOX = 2.5
WORK_SIDE = 160  # large photos are shrunk to this before the strokes are measured


def to_ink(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 -> float ink in 0..1: 1 where the pen wrote, 0 on the paper.

    Dark ink on light paper is inverted (MNIST is white on black); a photo that is already
    light ink on a dark background is kept as it is. The paper's own grey level (its
    median) is subtracted and the strongest stroke scaled to 1, so a photo taken in dim
    light still has a black background and full-strength ink.
    """
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    counts = np.bincount(gray.ravel(), minlength=256)  # a histogram: fast on a 12 MP photo
    median = int(np.searchsorted(np.cumsum(counts), gray.size / 2))
    mean = counts @ np.arange(256) / gray.size
    # The paper covers most of the photo, so the median pixel is paper; ink on the
    # minority side pulls the mean away from it: below it for dark ink on light paper.
    if mean <= median:
        gray, median = 255 - gray, 255 - median  # dark on light (the usual case): invert
    ink = np.clip(gray.astype(np.int16) - median, 0, None).astype(np.float32)
    peak = ink.max()
    return ink / peak if peak > 0 else ink


def otsu_threshold(values: np.ndarray) -> float:
    """The level that best separates values in 0..1 into two groups (Otsu's method)."""
    hist = np.bincount(np.round(values.ravel() * 255).astype(np.uint8), minlength=256)
    levels = np.arange(256) / 255
    weight = np.cumsum(hist).astype(np.float64)
    mean = np.cumsum(hist * levels)
    total_weight, total_mean = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight - mean * total_weight) ** 2 / (weight * (total_weight - weight))
    return float(levels[int(np.nanargmax(between[:-1]))])


def crop_to_digit(ink: np.ndarray) -> np.ndarray:
    """Cut the ink image down to the box around the strokes; faint paper texture becomes 0."""
    if ink.max() <= 0.0:
        raise UserError("no ink found: the image is blank or one flat colour")
    level = otsu_threshold(ink)
    strokes = ink > level
    rows, cols = np.flatnonzero(strokes.any(axis=1)), np.flatnonzero(strokes.any(axis=0))
    cropped = ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    # Below half the threshold is paper, not pen: MNIST's background is exactly 0.
    return np.where(cropped > level / 2, cropped, 0.0)


def shrink(ink: np.ndarray, longest: int = WORK_SIDE) -> np.ndarray:
    """Max-pool a large crop down to about `longest` px: a hairline survives at full
    strength (an average would fade it), and the steps after this stay fast."""
    factor = -(-max(ink.shape) // longest)
    if factor <= 1:
        return ink
    height, width = (-(-side // factor) * factor for side in ink.shape)
    padded = np.pad(ink, ((0, height - ink.shape[0]), (0, width - ink.shape[1])))
    return padded.reshape(height // factor, factor, width // factor, factor).max(axis=(1, 3))


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels: 2 x area / perimeter (a stroke of length L, width w
    has area L*w and a perimeter of about 2L)."""
    strokes = ink > 0.5
    padded = np.pad(strokes, 1)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    perimeter = int((strokes & ~inner).sum())
    return 2.0 * strokes.sum() / perimeter if perimeter else 0.0


def thicken(ink: np.ndarray) -> np.ndarray:
    """Widen strokes under half MNIST's width (a fine pen photographed large) to its width."""
    target = STROKE_IN_BOX * max(ink.shape) / BOX  # MNIST's width, in this image's pixels
    width = stroke_width(ink)
    if width >= target / 2:  # within MNIST's own range of pens: leave it as written
        return ink
    size = 2 * round((target - width) / 2) + 1  # a max filter of size k widens by k - 1
    padded = np.pad(ink, size // 2)  # room for the strokes at the edges to grow outwards
    grown = Image.fromarray((padded * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(size))
    return np.asarray(grown, dtype=np.float64) / 255.0


def fit_in_box(ink: np.ndarray) -> np.ndarray:
    """Scale so that the longer side is 20 px, keeping the aspect ratio (anti-aliased)."""
    height, width = ink.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray((ink * 255).astype(np.uint8))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float64) / 255.0


def centre_by_mass(box: np.ndarray) -> np.ndarray:
    """Place the box in a 28x28 field so that its centre of mass is at the field's centre."""
    height, width = box.shape
    mass = box.sum()
    rows, cols = np.indices(box.shape)
    centre_row = (rows * box).sum() / mass if mass else (height - 1) / 2
    centre_col = (cols * box).sum() / mass if mass else (width - 1) / 2
    # MNIST's training digits have their centre of mass at pixel index (14.0, 14.0). The
    # shift keeps the digit inside the field, and is sub-pixel (bilinear): a whole-pixel
    # rounding would move a 2-px stroke by half its width.
    top = float(np.clip(FIELD / 2 - centre_row, 0, FIELD - height))
    left = float(np.clip(FIELD / 2 - centre_col, 0, FIELD - width))
    image = Image.fromarray(box.astype(np.float32))  # mode "F": 32-bit float pixels
    moved = image.transform((FIELD, FIELD), Image.Transform.AFFINE, (1, 0, -left, 0, 1, -top),
                            resample=Image.Resampling.BILINEAR)
    return np.asarray(moved, dtype=np.float64)


def prepare_digit(rgb: np.ndarray) -> np.ndarray:
    """A photo (H, W, 3) uint8 -> the (28, 28) uint8 MNIST-style digit a network reads."""
    ink = thicken(shrink(crop_to_digit(to_ink(rgb))))
    field = centre_by_mass(fit_in_box(ink))
    return np.clip(np.round(field * 255), 0, 255).astype(np.uint8)
