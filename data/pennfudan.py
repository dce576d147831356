"""Penn-Fudan pedestrians: 170 photos, 423 people, each with a per-instance mask.

In `PedMasks/<name>_mask.png` pixel value 0 is background and k = 1, 2, ... is person k.
Boxes are computed from the masks (as torchvision's detection tutorial does), so they
always agree with them. Use the data for study and tests only (see its readme).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data import download
from data.cli import UserError
from data.images import read_rgb


@dataclass
class PedRecord:
    image_path: Path
    mask_path: Path

    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return read_rgb(self.image_path)

    def instance_masks(self) -> np.ndarray:
        """(N, H, W) bool, one mask per person."""
        return instance_masks(self.mask_path)

    def person_mask(self) -> np.ndarray:
        """(H, W) bool: every person merged, for semantic segmentation."""
        return read_mask_ids(self.mask_path) > 0

    def boxes(self) -> np.ndarray:
        """(N, 4) float32 xmin, ymin, xmax, ymax (xmax/ymax exclusive)."""
        return boxes_from_masks(self.instance_masks())


def read_mask_ids(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L", "I", "I;16"):
                raise UserError(f"{path}: a mask must be a single-channel image, got mode {mask.mode}")
            return np.asarray(mask).astype(np.int32)
    except FileNotFoundError:
        raise UserError(f"mask not found: {path}") from None
    except OSError as exc:
        raise UserError(f"{path}: corrupt mask ({exc})") from None


def instance_masks(path: str | os.PathLike) -> np.ndarray:
    ids = read_mask_ids(path)
    values = np.unique(ids)
    values = values[values > 0]
    return ids[None] == values[:, None, None]


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def load_split(root: str | os.PathLike) -> list[PedRecord]:
    root = Path(root)
    images = sorted((root / "PNGImages").glob("*.png"))
    if not images:
        raise UserError(f"no PNG images in {root / 'PNGImages'}; run: python data/download.py pennfudan")
    records = []
    for image_path in images:
        mask_path = root / "PedMasks" / f"{image_path.stem}_mask.png"
        if not mask_path.is_file():
            raise UserError(f"{image_path}: its mask {mask_path} is missing")
        records.append(PedRecord(image_path, mask_path))
    return records


def load_pennfudan(data_dir: str | os.PathLike | None = None, fetch: bool = True) -> list[PedRecord]:
    """All 170 records from <data_dir>/PennFudanPed, downloading first if `fetch`."""
    root = download.ensure("pennfudan", data_dir) if fetch else Path(data_dir) / "PennFudanPed"
    return load_split(root)
