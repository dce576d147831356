"""The TensorFlow Object Detection API's file formats: TFRecords of tf.train.Example and a label map.

Shared by make_tfrecords.py (writes them), train.py (reads them with tf.data) and the tests.
The feature keys are the API's own (`create_pascal_tf_record.py`), so a record written here
reads like one written for the API, and the other way round:

    image/height, image/width      int64   the stored image's size in pixels
    image/filename, image/source_id bytes  the photo's file name
    image/encoded, image/format    bytes   JPEG bytes of the upright RGB photo, b"jpeg"
    image/object/bbox/xmin|xmax|ymin|ymax  float  one per box, normalised to 0..1
    image/object/class/text        bytes   one per box: b"apple"
    image/object/class/label       int64   one per box: its id in the label map (from 1)

The label map (label_map.pbtxt) is the API's text proto: `item { id: 1 name: 'apple' }`.
The API reserves id 0 for the background; KerasHub's RetinaNet wants 0-based labels with
-1 for padding, so `parse_example` returns `label - 1` next to the file's own ids.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from photos import Photo

from data.cli import UserError
from data.images import read_rgb_image
from data.outputs import atomic_path

SPLITS = ("train", "val", "test")


# --- Label map -----------------------------------------------------------------------


def label_map_text(class_names: Sequence[str]) -> str:
    return "".join(f"item {{\n  id: {i}\n  name: '{name}'\n}}\n" for i, name in enumerate(class_names, 1))


def write_label_map(path: str | os.PathLike, class_names: Sequence[str]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(label_map_text(class_names))
    return Path(path)


_ITEM = re.compile(r"item\s*\{([^}]*)\}", re.S)


def read_label_map(path: str | os.PathLike) -> dict[int, str]:
    """{id: name} from a label_map.pbtxt (ids from 1, as the Object Detection API requires)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read label map {path}: {exc.strerror or exc}") from None
    items = {}
    for body in _ITEM.findall(text):
        found_id = re.search(r"\bid\s*:\s*(\d+)", body)
        found_name = re.search(r"\b(?:display_)?name\s*:\s*['\"]([^'\"]+)['\"]", body)
        if not found_id or not found_name:
            raise UserError(f"{path}: an item lacks an id or a name: {body.strip()!r}")
        items[int(found_id.group(1))] = found_name.group(1)
    if not items or sorted(items) != list(range(1, len(items) + 1)):
        raise UserError(f"{path}: label map ids must be 1..N without gaps, got {sorted(items)}")
    return items


def class_names_from(path: str | os.PathLike) -> list[str]:
    label_map = read_label_map(path)
    return [label_map[i] for i in sorted(label_map)]


# --- Writing -------------------------------------------------------------------------


def _bytes(values: Iterable[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _floats(values) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _ints(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def encode_photo(photo: Photo, max_side: int) -> tuple[bytes, int, int, int, int]:
    """JPEG bytes of the upright RGB photo, shrunk so its longer side is <= max_side (0: as is).

    Returns (jpeg, stored width, stored height, original width, original height). The
    shared reader turns PNG-behind-.jpg, RGBA, CMYK and EXIF-rotated files into plain RGB,
    which any JPEG decoder (tf.io.decode_jpeg) then reads.
    """
    image = read_rgb_image(photo.image_path)
    width, height = image.size
    if max_side and max(width, height) > max_side:
        image.thumbnail((max_side, max_side), reducing_gap=None)  # keeps the aspect ratio
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), image.size[0], image.size[1], width, height


def make_example(photo: Photo, class_names: Sequence[str], max_side: int) -> tf.train.Example:
    """One tf.train.Example with the Object Detection API's feature keys."""
    jpeg, width, height, orig_width, orig_height = encode_photo(photo, max_side)
    boxes = np.asarray(photo.boxes, np.float64).reshape(-1, 4)
    name = photo.image_path.name.encode()
    feature = {
        "image/height": _ints([height]),
        "image/width": _ints([width]),
        "image/filename": _bytes([name]),
        "image/source_id": _bytes([name]),
        "image/encoded": _bytes([jpeg]),
        "image/format": _bytes([b"jpeg"]),
        # normalised coordinates do not change when the photo is shrunk
        "image/object/bbox/xmin": _floats(boxes[:, 0] / orig_width),
        "image/object/bbox/xmax": _floats(boxes[:, 2] / orig_width),
        "image/object/bbox/ymin": _floats(boxes[:, 1] / orig_height),
        "image/object/bbox/ymax": _floats(boxes[:, 3] / orig_height),
        "image/object/class/text": _bytes(n.encode() for n in photo.names),
        "image/object/class/label": _ints(class_names.index(n) + 1 for n in photo.names),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_records(path: str | os.PathLike, photos: Sequence[Photo], class_names: Sequence[str],
                  max_side: int) -> int:
    """Write one .record file (atomically); returns the number of examples."""
    with atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
        for photo in photos:
            writer.write(make_example(photo, class_names, max_side).SerializeToString())
    return len(photos)


# --- Reading -------------------------------------------------------------------------

FEATURES = {
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
    "image/source_id": tf.io.FixedLenFeature([], tf.string),
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/class/text": tf.io.VarLenFeature(tf.string),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """A serialized Example -> {"image": uint8 HxWx3, "boxes": (N,4) normalised xyxy,
    "labels": (N,) int32 0-based, "label_ids": the file's 1-based ids, "texts", "filename"}."""
    parsed = tf.io.parse_single_example(serialized, FEATURES)
    dense = {key: tf.sparse.to_dense(value) if isinstance(value, tf.SparseTensor) else value
             for key, value in parsed.items()}
    image = tf.io.decode_jpeg(dense["image/encoded"], channels=3)
    boxes = tf.stack([dense["image/object/bbox/xmin"], dense["image/object/bbox/ymin"],
                      dense["image/object/bbox/xmax"], dense["image/object/bbox/ymax"]], axis=-1)
    label_ids = tf.cast(dense["image/object/class/label"], tf.int32)
    return {"image": image, "boxes": tf.reshape(boxes, [-1, 4]), "labels": label_ids - 1,
            "label_ids": label_ids, "texts": dense["image/object/class/text"],
            "filename": dense["image/filename"]}


def read_records(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Every example of a .record file, parsed, as numpy (small files: tests and evaluation)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TFRecord file not found: {path}; run 03_tf_od_api/make_tfrecords.py first")
    try:
        return [{key: value.numpy() for key, value in parse_example(item).items()}
                for item in tf.data.TFRecordDataset(str(path))]
    except tf.errors.OpError as exc:
        raise UserError(f"{path}: not a readable TFRecord of detection examples "
                        f"({exc.message.splitlines()[0]})") from None


# --- Writing a dataset ---------------------------------------------------------------


def write_dataset(out_dir: str | os.PathLike, splits: dict[str, list[Photo]],
                  class_names: Sequence[str], max_side: int) -> dict[str, int]:
    """<out_dir>/{train,val,test}.record and label_map.pbtxt; returns the count per split.
    The photos are checked before (photos.check_photos); this writes what it is given."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out_dir}: {exc.strerror}") from None
    counts = {split: write_records(out_dir / f"{split}.record", photos, class_names, max_side)
              for split, photos in splits.items()}
    write_label_map(out_dir / "label_map.pbtxt", class_names)
    return counts
