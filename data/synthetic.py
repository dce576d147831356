"""Tiny synthetic datasets in the *real on-disk formats*, for --smoke runs and tests.

Each writer produces files that the real loaders read back (IDX .gz digits, a VOC folder
of drawn fruit with XML, PennFudan-style PNGs with instance masks), so a smoke run goes
through the same code path as a real one, only smaller. Output is deterministic for a
given seed. The pictures are simple but learnable, so a smoke run's metrics mean something.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.mnist import FILES as MNIST_FILES
from data.mnist import IMAGES_MAGIC, LABELS_MAGIC

# --- MNIST-like digits ---------------------------------------------------------------


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def draw_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 28, 28) uint8 digits drawn with a font at random size/offset, with noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    fonts = {size: ImageFont.load_default(size=size) for size in range(16, 25, 2)}
    for i, label in enumerate(labels):
        canvas = Image.new("L", (28, 28), 0)
        font = fonts[int(rng.choice(list(fonts)))]
        ImageDraw.Draw(canvas).text((14 + rng.integers(-3, 4), 14 + rng.integers(-3, 4)),
                                    str(label), fill=255, font=font, anchor="mm")
        canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
        noise = rng.normal(0, 12, (28, 28))
        images[i] = np.clip(np.asarray(canvas, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_mnist(data_dir: str | os.PathLike, num_train: int = 600, num_test: int = 200,
                seed: int = 0) -> Path:
    """Write <data_dir>/mnist/*.gz in the IDX format; returns the mnist folder."""
    folder = Path(data_dir) / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, split_seed in (("train", num_train, seed), ("test", num_test, seed + 1)):
        images, labels = draw_digits(count, split_seed)
        images_name, labels_name = MNIST_FILES[split]
        (folder / images_name).write_bytes(gzip.compress(_idx_bytes(images, IMAGES_MAGIC), mtime=0))
        (folder / labels_name).write_bytes(gzip.compress(_idx_bytes(labels, LABELS_MAGIC), mtime=0))
    return folder


# --- Fruit photos with VOC XML -------------------------------------------------------

FRUIT_COLORS = {"apple": (200, 30, 40), "banana": (235, 210, 50), "orange": (245, 140, 20)}


def _draw_fruit(draw: ImageDraw.ImageDraw, kind: str, box: list[int], rng) -> None:
    x0, y0, x1, y1 = box
    jitter = rng.integers(-20, 21, 3)
    color = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(FRUIT_COLORS[kind], jitter, strict=True))
    if kind == "banana":  # a thick arc: long and curved, unlike the round fruit
        draw.arc(box, start=20, end=160, fill=color, width=max(3, (y1 - y0) // 4))
    else:
        draw.ellipse(box, fill=color)
        if kind == "apple":  # a stem
            cx = (x0 + x1) // 2
            draw.line([cx, y0, cx + 2, y0 + max(2, (y1 - y0) // 5)], fill=(90, 60, 20), width=2)
        else:  # orange peel dimples
            for _ in range(6):
                px, py = rng.integers(x0 + 3, max(x0 + 4, x1 - 3)), rng.integers(y0 + 3, max(y0 + 4, y1 - 3))
                draw.point((int(px), int(py)), fill=(220, 110, 10))


def _voc_xml(filename: str, width: int, height: int, objects: list[tuple[str, list[int]]]) -> str:
    items = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{b[0]}</xmin>\n\t\t\t<ymin>{b[1]}</ymin>\n"
        f"\t\t\t<xmax>{b[2]}</xmax>\n\t\t\t<ymax>{b[3]}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for name, b in objects
    )
    return (f"<annotation>\n\t<folder>images</folder>\n\t<filename>{filename}</filename>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n"
            f"\t</size>\n\t<segmented>0</segmented>\n{items}</annotation>\n")


def _fruit_scene(label: str, rng, size: tuple[int, int]) -> tuple[Image.Image, list[tuple[str, list[int]]]]:
    width, height = size
    background = tuple(int(v) for v in rng.integers(150, 256, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    kinds = list(rng.choice(list(FRUIT_COLORS), size=int(rng.integers(2, 4)), replace=False)) \
        if label == "mixed" else [label] * int(rng.integers(1, 3))
    objects = []
    for kind in kinds:
        side = int(rng.integers(min(size) // 4, min(size) // 2))
        x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        box = [x0, y0, x0 + side, y0 + (side if kind != "banana" else side // 2 + 4)]
        _draw_fruit(draw, kind, box, rng)
        objects.append((kind, box))
    return image, objects


def write_fruits(data_dir: str | os.PathLike, train_per_class: int = 8, test_per_class: int = 3,
                 seed: int = 0, image_size: tuple[int, int] = (128, 112)) -> Path:
    """Write <data_dir>/fruits/{train_zip/train,test_zip/test} like the Kaggle zip.

    The real set's quirks are reproduced on purpose: in each split one image is PNG bytes
    (RGBA) behind a .jpg name, one is a palette PNG, and one XML says width=0 height=0.
    """
    root = Path(data_dir) / "fruits"
    rng = np.random.default_rng(seed)
    for split, per_class in (("train_zip/train", train_per_class), ("test_zip/test", test_per_class)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        number = 0
        for label in ("apple", "banana", "orange", "mixed"):
            for _ in range(per_class):
                number += 1
                name = f"{label}_{number}"
                image, objects = _fruit_scene(label, rng, image_size)
                path = folder / f"{name}.jpg"
                xml_size = image.size
                if number == 1:  # PNG bytes, RGBA, behind a .jpg name
                    image.convert("RGBA").save(path, format="PNG")
                elif number == 2:  # palette PNG behind a .jpg name
                    image.convert("P", palette=Image.Palette.ADAPTIVE).save(path, format="PNG")
                else:
                    image.save(path, format="JPEG", quality=90)
                if number == 3:  # the XML lies about the size, as 37 real files do
                    xml_size = (0, 0)
                (folder / f"{name}.xml").write_text(_voc_xml(path.name, *xml_size, objects))
    return root


# --- PennFudan-style pedestrians -----------------------------------------------------


def write_pennfudan(data_dir: str | os.PathLike, count: int = 12, seed: int = 0,
                    image_size: tuple[int, int] = (160, 120)) -> Path:
    """Write <data_dir>/PennFudanPed/{PNGImages,PedMasks,Annotation} with 1-3 people each."""
    root = Path(data_dir) / "PennFudanPed"
    for sub in ("PNGImages", "PedMasks", "Annotation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = image_size
    for index in range(1, count + 1):
        name = f"FudanPed{index:05d}"
        noise = rng.normal(0, 18, (height, width, 3))
        base = rng.integers(120, 220, 3)
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
        mask = Image.new("L", image_size, 0)
        draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        boxes = []
        for person in range(1, int(rng.integers(1, 4)) + 1):
            h = int(rng.integers(height // 2, height - 4))
            w = max(8, h // 3)
            x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            color = tuple(int(v) for v in rng.integers(10, 90, 3))
            head = [x0 + w // 4, y0, x0 + 3 * w // 4, y0 + h // 5]
            body = [x0, y0 + h // 5, x0 + w - 1, y0 + h - 1]
            for shape in (head, body):
                (draw.ellipse if shape is head else draw.rectangle)(shape, fill=color)
                (mask_draw.ellipse if shape is head else mask_draw.rectangle)(shape, fill=person)
            boxes.append((x0 + 1, y0 + 1, x0 + w, y0 + h))
        image.save(root / "PNGImages" / f"{name}.png")
        mask.save(root / "PedMasks" / f"{name}_mask.png")
        lines = [f'Image filename : "PennFudanPed/PNGImages/{name}.png"',
                 f"Image size (X x Y x C) : {width} x {height} x 3"]
        lines += [f'Bounding box for object {k} "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : '
                  f"({b[0]}, {b[1]}) - ({b[2]}, {b[3]})" for k, b in enumerate(boxes, 1)]
        (root / "Annotation" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root
