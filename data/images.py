"""The one image reader every chapter uses: any file Pillow can open, always RGB uint8.

Real datasets are messier than their file names say. The fruit set alone has PNG bytes
behind `.jpg` names, RGBA and palette images and photos of up to 3160x4605 pixels.
`read_rgb` handles all of these:

- the format is detected from the bytes, never from the extension;
- EXIF orientation is applied, so a phone photo stands the right way up;
- RGBA / LA / palette-with-transparency are composited onto white (a transparent
  background is usually black underneath, which would teach a model the wrong thing);
- CMYK, grayscale, 16-bit and float images are converted to 8-bit RGB;
- a decompression-bomb guard refuses images over `max_pixels` before decoding them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data.cli import UserError

# 50 megapixels: far above the largest fruit photo (14.6 MP) and any phone photo we
# expect, far below what would exhaust memory (a 50 MP RGB array is 150 MB).
DEFAULT_MAX_PIXELS = 50_000_000


class ImageReadError(UserError):
    """An image file that cannot be read; the message names the file."""


def _open(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError,
            OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageReadError(
            f"{path}: {width}x{height} is over the {max_pixels:,}-pixel limit "
            "(possible decompression bomb); resize it first"
        )
    return image


def image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as read_rgb would return it (EXIF rotation applied), from the header."""
    with _open(path, max_pixels) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency onto white."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def read_rgb_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as an upright RGB Pillow image (see the module docstring)."""
    with _open(path, max_pixels) as image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(f"{path}: corrupt or truncated image ({exc})") from None


def read_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an upright RGB uint8 array of shape (H, W, 3)."""
    return np.asarray(read_rgb_image(path, max_pixels), dtype=np.uint8)


def resize_rgb(image: np.ndarray | Image.Image, size: tuple[int, int],
               method: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize to (width, height). Bilinear with Pillow's antialiasing filter support, so
    large photos are smoothed, not aliased, when they shrink to a training size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.asarray(image.resize(size, method, reducing_gap=None), dtype=np.uint8)
