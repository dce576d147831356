"""The tf.data input pipeline: TFRecords in, augmented padded batches out (used by train.py).

    TFRecordDataset -> parse_example (records.py) -> decode JPEG -> squash to a square
    -> in memory (decoded once) -> per epoch: seeded shuffle -> scale jitter (zoom in and
    out, mild aspect change) and horizontal flip with the boxes moved along -> colour
    jitter -> normalise -> fixed-size padded boxes (label -1) -> batch -> prefetch

Every random draw is a stateless op seeded by (seed, epoch, position), so a run, and a
run resumed from any epoch, sees the same augmented batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import model as detector_lib
import numpy as np
import records
import tensorflow as tf

from data.cli import UserError

MAX_BOXES = 32            # padding length per image (the fruit set has at most 9 boxes)
FILL = (124.0, 116.0, 104.0)  # grey-ish mean colour around a zoomed-out photo
DUMMY_BOX = (0.0, 0.0, 1.0, 1.0)  # padding box: 1 px, so no anchor ever matches it


@dataclass
class Split:
    """One decoded split. `images` are squashed to `size` (float32 0..255, or uint8 for the
    training copies); boxes are pixels of that square; `photos` are the records' own
    images (uint8, original aspect) for drawings and the SavedModel check."""

    images: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    filenames: list[str]
    photos: list[np.ndarray]


def load_split(path: str | Path, size: int, keep_photos: bool = True, as_uint8: bool = False) -> Split:
    """Read a .record with tf.data and decode every photo once."""
    if not Path(path).is_file():
        raise UserError(f"TFRecord file not found: {path}; run 03_tf_od_api/make_tfrecords.py "
                                "or leave --records-dir empty")
    dataset = tf.data.TFRecordDataset(str(path)).map(records.parse_example)
    images, boxes, labels, names, photos = [], [], [], [], []
    try:
        for example in dataset:
            image = detector_lib.model_input(example["image"], size)
            images.append(tf.cast(tf.round(image), tf.uint8).numpy() if as_uint8 else image.numpy())
            boxes.append(example["boxes"].numpy() * size)
            labels.append(example["labels"].numpy())
            names.append(example["filename"].numpy().decode())
            if keep_photos:
                photos.append(example["image"].numpy())
    except tf.errors.OpError as exc:
        raise UserError(f"{path}: not a readable TFRecord of detection examples "
                                f"({exc.message.splitlines()[0]})") from None
    if not images:
        raise UserError(f"{path} holds no examples")
    return Split(np.stack(images), boxes, labels, names, photos)


def _padded(split: Split, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, MAX_BOXES, 4) normalised boxes and (N, MAX_BOXES) labels, padded with -1 labels."""
    boxes = np.tile(np.array(DUMMY_BOX, np.float32), (len(split.boxes), MAX_BOXES, 1))
    labels = np.full((len(split.boxes), MAX_BOXES), -1.0, np.float32)
    for i, (b, lab) in enumerate(zip(split.boxes, split.labels, strict=True)):
        count = min(len(b), MAX_BOXES)
        boxes[i, :count] = b[:count] / size
        labels[i, :count] = lab[:count]
    return boxes, labels


def _jitter(image, boxes, labels, seeds, size: int, cfg: dict):
    """Resize by a random scale (and aspect), then pad to / crop from the square, moving
    the boxes with the pixels. Boxes left less than 30% visible are dropped."""
    scale = tf.random.stateless_uniform([], seeds[0], cfg["scale_min"], cfg["scale_max"])
    stretch = tf.exp(tf.random.stateless_uniform([], seeds[1], -1.0, 1.0) * math.log(1 + cfg["aspect_jitter"]))
    width = tf.maximum(8, tf.cast(tf.round(size * scale * tf.sqrt(stretch)), tf.int32))
    height = tf.maximum(8, tf.cast(tf.round(size * scale / tf.sqrt(stretch)), tf.int32))
    image = tf.image.resize(image, tf.stack([height, width]), antialias=True)
    canvas_w, canvas_h = tf.maximum(width, size), tf.maximum(height, size)
    pad_x = tf.random.stateless_uniform([], seeds[2], 0, canvas_w - width + 1, tf.int32)
    pad_y = tf.random.stateless_uniform([], seeds[3], 0, canvas_h - height + 1, tf.int32)
    fill = tf.constant(FILL, tf.float32)
    image = tf.pad(image - fill, [[pad_y, canvas_h - height - pad_y], [pad_x, canvas_w - width - pad_x], [0, 0]]) + fill
    crop_x = tf.random.stateless_uniform([], seeds[4], 0, canvas_w - size + 1, tf.int32)
    crop_y = tf.random.stateless_uniform([], seeds[5], 0, canvas_h - size + 1, tf.int32)
    image = image[crop_y:crop_y + size, crop_x:crop_x + size]
    shift = tf.cast(tf.stack([pad_x - crop_x, pad_y - crop_y] * 2), tf.float32)
    full = boxes * tf.cast(tf.stack([width, height] * 2), tf.float32) + shift
    clipped = tf.clip_by_value(full, 0.0, float(size))
    area = (full[:, 2] - full[:, 0]) * (full[:, 3] - full[:, 1])
    kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (labels >= 0) & (kept_area >= 0.3 * area) & (clipped[:, 2] - clipped[:, 0] >= 2) \
        & (clipped[:, 3] - clipped[:, 1] >= 2)
    dummy = tf.broadcast_to(tf.constant(DUMMY_BOX, tf.float32), tf.shape(clipped))
    return image, tf.where(keep[:, None], clipped, dummy), tf.where(keep, labels, -1.0)


def _flip_and_colour(image, boxes, labels, seeds, size: int, cfg: dict):
    flip = tf.random.stateless_uniform([], seeds[6]) < 0.5
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    flipped = tf.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], axis=-1)
    boxes = tf.where(flip & (labels >= 0)[:, None], flipped, boxes)
    jitter = cfg["color_jitter"]
    if jitter > 0:  # brightness, contrast, saturation; hue is left alone (apple vs orange)
        image = image / 255.0
        image = tf.image.stateless_random_brightness(image, jitter * 0.5, seeds[7])
        image = tf.image.stateless_random_contrast(image, 1 - jitter, 1 + jitter, seeds[8])
        image = tf.image.stateless_random_saturation(tf.clip_by_value(image, 0, 1), 1 - jitter, 1 + jitter, seeds[9])
        image = tf.clip_by_value(image, 0.0, 1.0) * 255.0
    return image, boxes, labels


def train_dataset(split: Split, cfg: dict, arch: dict, first_epoch: int, last_epoch: int) -> tf.data.Dataset:
    """Augmented batches for epochs first_epoch..last_epoch (1-based), drop_remainder."""
    size, batch_size, seed = arch["image_size"], cfg["batch_size"], cfg["seed"]
    images = tf.constant(split.images)  # (N, P, P, 3) uint8, P >= size: zoom-ins stay sharp
    boxes, labels = (tf.constant(a) for a in _padded(split, split.images.shape[1]))
    count = len(split.images)
    per_epoch = count // batch_size * batch_size

    def epoch_items(epoch):
        order = tf.argsort(tf.random.stateless_uniform([count], tf.stack([seed, epoch])))[:per_epoch]
        return tf.data.Dataset.from_tensor_slices((order, tf.fill([per_epoch], epoch), tf.range(per_epoch)))

    def augment(index, epoch, position):
        seeds = tf.random.experimental.stateless_split(tf.stack([seed, epoch * 100_003 + position]), 10)
        image = tf.cast(tf.gather(images, index), tf.float32)
        image, b, lab = _jitter(image, tf.gather(boxes, index), tf.gather(labels, index), seeds, size, cfg)
        image, b, lab = _flip_and_colour(image, b, lab, seeds, size, cfg)
        image = tf.ensure_shape(detector_lib.normalize(image, arch), [size, size, 3])
        return image, {"boxes": b, "labels": lab}

    # Without tf.data's autotuner: each fit() chunk ends by freeing this pipeline, and that
    # waited for the autotuner's thread to wake (measured: the smoke run sat idle 5 s after
    # each 15-epoch chunk, 66 s in all, 54 s without it, the same figures). Untuned, the map's
    # AUTOTUNE parallelism keeps its starting value, one call per core (up to 16).
    options = tf.data.Options()
    options.autotune.enabled = False
    epochs = tf.data.Dataset.range(first_epoch, last_epoch + 1).map(lambda e: tf.cast(e, tf.int32))
    return (epochs.flat_map(epoch_items)
            .map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
            .prefetch(2)
            .with_options(options))


def inference_dataset(images: np.ndarray, arch: dict, batch_size: int) -> tf.data.Dataset:
    """Normalized images (from squashed 0..255 ones) in batches, in order, for predict().
    Untuned, as train_dataset is: predict() on the arrays themselves waits on the autotuner
    too (measured under --strategy mirrored: idle 3-5 s per call)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    batches = tf.data.Dataset.from_tensor_slices(images.astype(np.float32)).batch(batch_size)
    return batches.map(lambda batch: detector_lib.normalize(batch, arch)).with_options(options)


def augmented_examples(split: Split, cfg: dict, arch: dict, count: int):
    """The first `count` augmented training images (0..255) and their boxes, for a figure."""
    display = {**arch, "scale": 1.0, "offset": 0.0}
    batch = next(iter(train_dataset(split, {**cfg, "batch_size": count}, display, 1, 1)))
    images, target = batch
    return images.numpy().clip(0, 255).astype(np.uint8), target["boxes"].numpy(), target["labels"].numpy()
