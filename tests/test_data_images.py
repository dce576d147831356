"""The shared image reader on every odd image mode the datasets (and users) throw at it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.images import ImageReadError, image_size, read_rgb, resize_rgb


def check_rgb(array, shape):
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape == (*shape, 3)


def test_png_bytes_behind_a_jpg_name(tmp_path):
    path = tmp_path / "apple_1.jpg"
    Image.new("RGB", (20, 10), (10, 200, 30)).save(path, format="PNG")
    array = read_rgb(path)
    check_rgb(array, (10, 20))
    assert tuple(array[5, 5]) == (10, 200, 30)  # lossless PNG: exact colour


def test_rgba_transparent_becomes_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.putpixel((1, 1), (255, 0, 0, 255))
    image.save(tmp_path / "a.png")
    array = read_rgb(tmp_path / "a.png")
    check_rgb(array, (8, 8))
    assert tuple(array[0, 0]) == (255, 255, 255) and tuple(array[1, 1]) == (255, 0, 0)


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert tuple(read_rgb(tmp_path / "p.png")[0, 0]) == (0, 0, 255)
    palette.save(tmp_path / "pt.png", transparency=1)
    assert tuple(read_rgb(tmp_path / "pt.png")[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("mode,value", [("L", 128), ("LA", (128, 255)), ("1", 1), ("I;16", 1000)])
def test_grayscale_modes(tmp_path, mode, value):
    image = Image.new(mode, (5, 4), value)
    if mode == "I;16":
        image.putpixel((0, 0), 0)
    image.save(tmp_path / "g.png")
    array = read_rgb(tmp_path / "g.png")
    check_rgb(array, (4, 5))
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    array = read_rgb(tmp_path / "c.jpg")
    check_rgb(array, (12, 12))
    red, green, blue = array[6, 6].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 5, 10))  # white stripe on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "e.jpg", exif=exif, quality=95)
    array = read_rgb(tmp_path / "e.jpg")
    check_rgb(array, (30, 10))  # displayed upright: portrait
    assert image_size(tmp_path / "e.jpg") == (10, 30)
    assert array[:4].mean() > 200  # the left stripe is now on top


def test_decompression_bomb_guard(tmp_path):
    Image.new("L", (400, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="pixel limit"):
        read_rgb(tmp_path / "big.png", max_pixels=100_000)
    check_rgb(read_rgb(tmp_path / "big.png", max_pixels=120_000), (300, 400))


def test_not_an_image_and_truncated_and_missing(tmp_path):
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageReadError, match=r"text.jpg"):
        read_rgb(tmp_path / "text.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match=r"t.jpg"):
        read_rgb(tmp_path / "t.jpg")
    with pytest.raises(ImageReadError, match="not found"):
        read_rgb(tmp_path / "none.png")


def test_resize_rgb():
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    out = resize_rgb(array, (30, 20))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
