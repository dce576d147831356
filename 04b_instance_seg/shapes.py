"""The "shapes" teaching set: squares, circles and triangles drawn on the fly, seeded.

Like the classic Mask R-CNN shapes sample, every picture is drawn from a few random numbers:
a coloured background and 1 to `max_shapes` shapes, each a square, a circle or a triangle
of its own colour, size, position and (for squares and triangles) rotation. Unlike it,
everything comes from a seeded numpy generator, so a seed fixes the validation and test
pictures exactly, and shapes may overlap: a later shape hides part of an earlier one, and
the earlier shape's mask is what is left visible. A shape that would hide more than half of
another is redrawn elsewhere (or left out), so every instance stays recognisable.

numpy and Pillow only: the data side never imports a framework.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("square", "circle", "triangle")
MIN_VISIBLE = 0.5  # every instance keeps at least half of its own area visible
MIN_COLOR_DISTANCE = 120  # sum of |RGB differences| between a shape and the background


@dataclass
class Picture:
    """One drawn picture: (S, S, 3) uint8 pixels, (N, S, S) bool masks, (N,) class ids."""

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float32 x0, y0, x1, y1 around each visible mask (x1, y1 exclusive)."""
        return boxes_from_masks(self.masks)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    boxes = np.zeros((len(masks), 4), np.float32)
    for index, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        boxes[index] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return boxes


def _color_far_from(background: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    while True:
        color = rng.integers(0, 256, 3)
        if np.abs(color - background).sum() >= MIN_COLOR_DISTANCE:
            return tuple(int(c) for c in color)


def _polygon(kind: str, cx: float, cy: float, half: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a square (4) or an equilateral triangle (3) around (cx, cy), rotated."""
    corners = 4 if kind == "square" else 3
    radius = half * (np.sqrt(2) if kind == "square" else 1.15)
    start = angle + (np.pi / 4 if kind == "square" else -np.pi / 2)
    return [(cx + radius * np.cos(start + 2 * np.pi * k / corners),
             cy + radius * np.sin(start + 2 * np.pi * k / corners)) for k in range(corners)]


def _shape_mask(kind: str, size: int, cx: float, cy: float, half: float, angle: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=1)
    else:
        draw.polygon(_polygon(kind, cx, cy, half, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def draw_picture(rng: np.random.Generator, size: int = 128, max_shapes: int = 4,
                 min_half: int = 8, max_half: int = 28) -> Picture:
    """One random picture; `half` is half a shape's side (or its radius), in pixels."""
    background = rng.integers(0, 256, 3)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    visible: list[np.ndarray] = []  # what is still visible of each shape drawn so far
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        label = int(rng.integers(len(CLASSES)))
        color = _color_far_from(background, rng)
        for _attempt in range(10):  # find a place that hides no earlier shape too much
            half = float(rng.integers(min_half, max_half + 1))
            cx, cy = rng.uniform(half, size - half, 2)
            mask = _shape_mask(CLASSES[label], size, cx, cy, half, rng.uniform(0, 2 * np.pi))
            after = [v & ~mask for v in visible]
            if mask.sum() >= 20 and all(a.sum() >= MIN_VISIBLE * v.sum()
                                        for a, v in zip(after, visible, strict=True)):
                visible = [*after, mask]
                labels.append(label)
                image[mask] = color
                break
    noise = rng.normal(0, 4, image.shape)  # a little sensor noise, so flat colours are not exact
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return Picture(image, np.stack(visible), np.asarray(labels, np.int64))


def draw_pictures(count: int, seed: int | list[int], size: int = 128, max_shapes: int = 4) -> list[Picture]:
    """`count` pictures from one seeded generator: the same seed, the same pictures."""
    rng = np.random.default_rng(seed)
    return [draw_picture(rng, size, max_shapes) for _ in range(count)]
