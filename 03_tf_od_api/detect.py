"""03: run the exported SavedModel on your photos, with TensorFlow alone (no Keras, no KerasHub).

What it does
    The Object Detection API's last tutorial step: load the exported model with
    `tf.saved_model.load` and detect. The SavedModel that train.py writes holds the whole
    detector: resizing, normalisation, RetinaNet, box decoding and NMS. This script never
    imports keras or keras_hub, which shows the export stands alone. Importing TensorFlow
    2.21 imports Keras as well when it is installed (tensorflow/__init__.py loads
    keras.src.optimizers for its SavedModel registry, and skips it on ImportError), so this
    script makes those imports fail before TensorFlow loads: the model has to run without
    them, and a test checks that sys.modules holds no keras afterwards. Each photo is read
    with the shared reader (PNG behind a .jpg name, RGBA, CMYK, EXIF-rotated phone photos)
    and detected as the API's tutorial does it: `detect_fn = tf.saved_model.load(path)`,
    `detections = detect_fn(input_tensor)` with a uint8 [1, H, W, 3] batch, every output
    cut to `num_detections`; the normalised [ymin, xmin, ymax, xmax] boxes are turned into
    the photo's pixels. Prints one line per box:
        image  class  score  xmin ymin xmax ymax
    and saves `<name>_detections.png` with the boxes drawn.

How to run
    python 03_tf_od_api/detect.py --model-dir runs/03_tf_od_api/saved_model photo.jpg
    python 03_tf_od_api/detect.py --model-dir DIR --score-threshold 0.5 a.jpg b.png
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

import numpy as np

from data.cli import REPO_ROOT, OneLineParser, UserError, run_main
from data.images import read_rgb, resize_rgb
from data.outputs import atomic_path, draw_boxes, print_detections

# --- Config ------------------------------------------------------------------------


def parse_args(argv):
    parser = OneLineParser(description=__doc__.strip().splitlines()[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="the saved_model folder written by train.py")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "03_tf_od_api-detect",
                        help="where the drawn images go")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="keep boxes at least this confident")
    parser.add_argument("--max-side", type=int, default=1024, help="drawn images are shrunk to this longest side")
    args = parser.parse_args(argv)
    if not 0 <= args.score_threshold <= 1:
        parser.error(f"--score-threshold must be between 0 and 1, got {args.score_threshold}")
    return args


# --- Model -------------------------------------------------------------------------

BLOCKED = ("keras", "keras_hub", "tf_keras")


class _WithoutKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds keras and keras_hub as usual (TensorFlow asks where they live) but refuses to
    load them, so `import keras` raises ImportError in this process."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = self
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(f"detect.py runs the SavedModel without {module.__name__}")


def block_keras() -> None:
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    if loaded:  # only possible when main() is called from a process that imported them
        raise UserError(f"{loaded[0]} is already imported; run detect.py as its own process")
    if not any(isinstance(finder, _WithoutKeras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WithoutKeras())



def load_detector(model_dir: Path):
    """(detect_fn, class names) from the SavedModel and its label map."""
    if not (model_dir / "saved_model.pb").is_file():
        raise UserError(f"{model_dir} is not a SavedModel folder (no saved_model.pb); "
                        "give the saved_model folder that train.py wrote")
    import records  # the label-map reader (TensorFlow only)
    import tensorflow as tf

    try:
        detect_fn = tf.saved_model.load(str(model_dir))
    except Exception as exc:
        raise UserError(f"{model_dir}: cannot load the SavedModel ({exc.__class__.__name__})") from None
    if not callable(detect_fn):
        raise UserError(f"{model_dir}: not an Object Detection API export (it cannot be called on "
                        "an input_tensor); export it again with the current train.py")
    label_map = records.read_label_map(model_dir / "assets.extra" / "label_map.pbtxt")
    return detect_fn, [label_map[i] for i in sorted(label_map)]


def detect(detect_fn, image: np.ndarray) -> dict[str, np.ndarray]:
    """The OD API tutorial's inference step on one uint8 RGB photo: a batch of one in, every
    output cut to num_detections; boxes back from normalised [ymin, xmin, ymax, xmax] to
    the photo's pixels (xmin, ymin, xmax, ymax), classes as label-map ids (from 1)."""
    import tensorflow as tf

    input_tensor = tf.convert_to_tensor(image)[tf.newaxis, ...]
    detections = detect_fn(input_tensor)
    # [0]: num_detections has shape [1] (one per photo). The tutorial's int() of the whole
    # tensor needs NumPy < 2 (NumPy 2.4 makes no scalar of a 1-d array).
    num_detections = int(detections.pop("num_detections")[0])
    detections = {key: value[0, :num_detections].numpy() for key, value in detections.items()}
    height, width = image.shape[:2]
    ymin, xmin, ymax, xmax = detections["detection_boxes"].T
    return {"boxes": np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=1),
            "classes": detections["detection_classes"].astype(np.int64),
            "scores": detections["detection_scores"]}


# --- Save --------------------------------------------------------------------------


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    block_keras()  # before TensorFlow is imported
    detect_fn, class_names = load_detector(args.model_dir)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {args.output_dir}: {exc.strerror}") from None
    from PIL import Image

    lines = []
    for path in args.images:
        image = read_rgb(path)  # UserError naming the file if it is not an image
        found = detect(detect_fn, image)
        keep = found["scores"] >= args.score_threshold
        boxes, labels, scores = found["boxes"][keep], found["classes"][keep] - 1, found["scores"][keep]
        shrink = min(1.0, args.max_side / max(image.shape[:2]))
        small = resize_rgb(image, (max(1, round(image.shape[1] * shrink)), max(1, round(image.shape[0] * shrink))))
        drawn = draw_boxes(small, boxes * shrink, labels, class_names, scores)
        target = args.output_dir / f"{path.stem}_detections.png"
        with atomic_path(target) as tmp:
            Image.fromarray(drawn).save(tmp, format="PNG")
        lines += print_detections(path, boxes, labels, scores, class_names, args.score_threshold)
        print(f"drew {len(boxes)} boxes on {target}", file=sys.stderr)
    return lines


if __name__ == "__main__":
    run_main(main)
