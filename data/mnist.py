"""MNIST from its IDX files: 60,000 training and 10,000 test digits, 28x28 uint8.

The IDX format is a big-endian header (magic number, then one size per dimension)
followed by raw bytes. We check the magic numbers and the shapes, so a truncated or
wrong file is reported by name instead of producing garbage arrays.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import download
from data.cli import UserError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class IdxError(UserError):
    """A corrupt or wrong IDX file; the message names the file and the fix."""


@dataclass
class Mnist:
    x_train: np.ndarray  # (N, 28, 28) uint8
    y_train: np.ndarray  # (N,) uint8, 0..9
    x_test: np.ndarray
    y_test: np.ndarray


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped or plain) IDX file of unsigned bytes into an array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    fix = "delete it and run: python data/download.py mnist"
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise IdxError(f"MNIST file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxError(f"{path} is corrupt ({exc}); {fix}") from None
    if len(raw) < 8:
        raise IdxError(f"{path} is too short to be an IDX file; {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise IdxError(f"{path} has magic number {magic}, not an IDX file of bytes; {fix}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise IdxError(f"{path} holds {len(raw):,} bytes, its header promises {expected:,}; {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    images = read_idx(folder / images_name)
    labels = read_idx(folder / labels_name)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IdxError(f"{folder / images_name}: expected (N, 28, 28) images, got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise IdxError(f"{folder / labels_name}: {len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() > 9:
        raise IdxError(f"{folder / labels_name}: label {labels.max()} is not a digit")
    return images, labels


def load_mnist(data_dir: str | os.PathLike | None = None, fetch: bool = True) -> Mnist:
    """Load MNIST from <data_dir>/mnist, downloading it first if `fetch` and it is missing."""
    if fetch:
        folder = download.ensure("mnist", data_dir)
    else:
        folder = Path(data_dir) / "mnist"
    x_train, y_train = read_split(folder, "train")
    x_test, y_test = read_split(folder, "test")
    return Mnist(x_train, y_train, x_test, y_test)
