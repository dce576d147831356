"""The pictures train.py learns from and is scored on, each as an `Example` in its own pixels.

Two sources: shapes drawn on the fly from a seed (shapes.py), and the Penn-Fudan street photos
read from the data folder (data.pennfudan; with --smoke, a small synthetic stand-in written into
the run's folder first). How they are split into train / validation / test is train.py's `Data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapes

from data import pennfudan, synthetic


@dataclass
class Example:
    """One picture in its own pixels: what is scored. `labels` are 0-based class indices."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (N, 4) float32 x0, y0, x1, y1
    labels: np.ndarray  # (N,) int64
    masks: np.ndarray  # (N, H, W) bool

    def truth(self) -> dict:
        return {"boxes": self.boxes, "labels": self.labels, "masks": self.masks}


def draw_shapes(count: int, seed: list[int], cfg: dict, prefix: str) -> list[Example]:
    """`count` shapes pictures, the same ones for the same seed, named `<prefix>-0000`, ..."""
    pictures = shapes.draw_pictures(count, seed, cfg["image_size"], cfg["max_shapes"])
    return [Example(f"{prefix}-{i:04d}", p.image, p.boxes, p.labels, p.masks)
            for i, p in enumerate(pictures)]


def pennfudan_records(data_dir: Path, smoke: bool, output_dir: Path, seed: int) -> list:
    """The Penn-Fudan photos' records (decoded later, by `pennfudan_example`); with --smoke, 24
    synthetic street scenes written into the run's folder instead."""
    if smoke:
        synthetic.write_pennfudan(output_dir / "smoke-data", count=24, seed=seed)
        return pennfudan.load_pennfudan(output_dir / "smoke-data", fetch=False)
    return pennfudan.load_pennfudan(data_dir)


def pennfudan_example(record) -> Example:
    """A photo and its pedestrians (class 0, "person"), each box the tight box of its mask."""
    masks = record.instance_masks()
    return Example(record.image_path.stem, record.image(), pennfudan.boxes_from_masks(masks),
                   np.zeros(len(masks), np.int64), masks)
