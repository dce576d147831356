"""04b: find and outline every object in your own photos with a model train.py saved.

What it does
    Reads each image with the shared reader (any format Pillow opens: PNG behind a .jpg
    name, RGBA, palette, EXIF-rotated phone photos), letterboxes it to the model's square
    input exactly as training did, runs Mask R-CNN, pastes each 28x28 mask back at the
    photo's full size, saves `<name>_instances.png` (each instance in its own colour, with
    its box and score) and prints one line per instance:
        image  class  score  xmin ymin xmax ymax  mask_pixels      (original pixels)

How to run
    python 04b_instance_seg/predict.py --model-path runs/04b_instance_seg/model.weights.h5 photo.jpg
    python 04b_instance_seg/predict.py --model-path M --score-threshold 0.3 a.jpg b.png
    (model.json, written beside the weights by train.py, tells it the architecture.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.cli import REPO_ROOT, UserError, run_main
from data.images import read_rgb
from data.outputs import atomic_path

# --- Config --------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--model-path", type=Path,
                        default=REPO_ROOT / "runs" / "04b_instance_seg" / "model.weights.h5",
                        help="model.weights.h5 written by train.py (model.json beside it)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "04b_instance_seg-predict",
                        help="where the overlays go")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="instances scored below this are neither printed nor drawn")
    parser.add_argument("--num-threads", type=int, default=2, help="TensorFlow's intra-op threads")
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")
    args = parser.parse_args(argv)
    if not 0 <= args.score_threshold <= 1:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.num_threads < 1:
        parser.error(f"--num-threads must be at least 1, got {args.num_threads}")
    return args


# --- Save ----------------------------------------------------------------------------------


def save_overlay(drawing, target: Path) -> None:
    from PIL import Image

    with atomic_path(target) as tmp:
        Image.fromarray(drawing).save(tmp, format="PNG")


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    photos = [read_rgb(path) for path in args.images]  # UserError naming a file that is not an image
    import instances
    import model as maskrcnn
    import tensorflow as tf  # imported only after the flags and images check out

    tf.config.threading.set_intra_op_parallelism_threads(args.num_threads)
    model = maskrcnn.load_model(args.model_path)
    names = model.arch["class_names"]
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {args.output_dir}: {exc.strerror}") from None
    lines = []
    for path, photo, found in zip(args.images, photos, maskrcnn.detect_instances(model, photos, 1),
                                  strict=True):
        keep = found["scores"] >= args.score_threshold
        kept = {key: value[keep] for key, value in found.items()}
        target = args.output_dir / f"{path.stem}_instances.png"
        save_overlay(instances.overlay(photo, kept, names), target)
        for box, label, score, mask in zip(kept["boxes"], kept["labels"], kept["scores"], kept["masks"],
                                           strict=True):
            x0, y0, x1, y1 = (round(float(v)) for v in box)
            lines.append(f"{path}  {names[int(label)]}  {score:.3f}  {x0} {y0} {x1} {y1}  {int(mask.sum())}")
            print(lines[-1])
        if not keep.any():
            print(f"{path}  no instance scored >= {args.score_threshold}")
        print(f"drew {int(keep.sum())} instances on {target}", file=sys.stderr)
    return lines


if __name__ == "__main__":
    run_main(main)
