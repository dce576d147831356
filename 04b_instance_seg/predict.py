"""04b: find and outline every object in your own photos, with your trained model or COCO's.

What it does
    Reads each image with the shared reader (any format Pillow opens: PNG behind a .jpg
    name, RGBA, CMYK, palette, EXIF-rotated phone photos) and runs Mask R-CNN on it:
    - `--weights trained` (default): the compact model train.py saved; the photo is
      letterboxed to its square input exactly as training did;
    - `--weights coco`: torchvision's COCO Mask R-CNN (80 kinds of object) in Keras
      (coco_model.py); the first run converts torchvision's weights (convert_coco.py,
      downloading them if needed) and says so.
    Each mask is pasted back at the photo's full size. It saves `<name>_instances.png` (each
    instance in its own colour, with its box and score), `<name>_mask<k>.png` per instance
    (white where the mask is >= 0.5), and predictions.json (per photo, each instance's label,
    score, box [x1, y1, x2, y2] in photo pixels and mask file), and prints one line each:
        image  class  score  xmin ymin xmax ymax  mask_pixels      (original pixels)

How to run
    python 04b_instance_seg/predict.py --model-path runs/04b_instance_seg/model.weights.h5 photo.jpg
    python 04b_instance_seg/predict.py --weights coco --score-threshold 0.7 a.jpg b.png
    (model.json, written beside the weights by train.py, tells it the compact architecture.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data.cli import REPO_ROOT, UserError, run_main
from data.images import read_rgb
from data.outputs import atomic_path, write_json

# --- Config --------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--weights", choices=("trained", "coco"), default="trained",
                        help="trained: the compact model of --model-path; coco: torchvision's "
                             "COCO Mask R-CNN, converted once")
    parser.add_argument("--model-path", type=Path,
                        default=REPO_ROOT / "runs" / "04b_instance_seg" / "model.weights.h5",
                        help="with --weights trained: model.weights.h5 written by train.py (model.json beside it)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "04b_instance_seg-predict",
                        help="where the overlays, masks and predictions.json go")
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


# --- Model: each detector maps a photo to its boxes, labels, scores and (N, H, W) bool masks ---


def trained_detector(model_path: Path):
    import model as maskrcnn

    model = maskrcnn.load_model(model_path)  # the compact model, or a fine-tune (train.py --weights coco)

    def detect(photo, threshold: float) -> dict:
        found = maskrcnn.detect_instances(model, [photo], 1)[0]
        keep = found["scores"] >= threshold
        return {key: value[keep] for key, value in found.items()}

    return detect, model.arch["class_names"]


def coco_detector():
    """torchvision's COCO model in Keras. Masks are pasted one by one, only for the instances
    kept: 100 full-size soft masks of a 12-megapixel photo would take 5 GB."""
    import coco_model
    import coco_names
    import convert_coco

    model = coco_model.load_converted(convert_coco.ensure_converted())

    def detect(photo, threshold: float) -> dict:
        found = coco_model.predict(model, photo, paste=False)
        keep = found["scores"] >= threshold
        height, width = photo.shape[:2]
        masks = [coco_model.paste_mask(mask, box, height, width) >= 0.5
                 for mask, box in zip(found["masks"][keep], found["boxes"][keep], strict=True)]
        return {"boxes": found["boxes"][keep], "labels": found["labels"][keep], "scores": found["scores"][keep],
                "masks": np.stack(masks) if masks else np.zeros((0, height, width), bool)}

    return detect, coco_names.CATEGORIES


# --- Save ----------------------------------------------------------------------------------


def save_png(pixels: np.ndarray, target: Path) -> None:
    from PIL import Image

    with atomic_path(target) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def save_instances(path: Path, photo, kept: dict, names, output_dir: Path) -> list[dict]:
    """The overlay and one mask PNG per instance; prints a line each; returns their records."""
    import instances

    save_png(instances.overlay(photo, kept, names), output_dir / f"{path.stem}_instances.png")
    records = []
    for k, (box, label, score, mask) in enumerate(zip(kept["boxes"], kept["labels"], kept["scores"],
                                                      kept["masks"], strict=True)):
        mask_file = f"{path.stem}_mask{k}.png"
        save_png(mask.astype(np.uint8) * 255, output_dir / mask_file)
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        print(f"{path}  {names[int(label)]}  {score:.3f}  {x0} {y0} {x1} {y1}  {int(mask.sum())}")
        records.append({"label": names[int(label)], "label_id": int(label), "score": float(score),
                        "box": [float(v) for v in box], "mask": mask_file})
    return records


def main(argv=None) -> dict:
    args = parse_args(argv)
    photos = [read_rgb(path) for path in args.images]  # UserError naming a file that is not an image
    import tensorflow as tf  # imported only after the flags and images check out

    tf.config.threading.set_intra_op_parallelism_threads(args.num_threads)
    detect, names = coco_detector() if args.weights == "coco" else trained_detector(args.model_path)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {args.output_dir}: {exc.strerror}") from None
    predictions = {}
    for path, photo in zip(args.images, photos, strict=True):
        kept = detect(photo, args.score_threshold)
        predictions[str(path)] = save_instances(path, photo, kept, names, args.output_dir)
        if not predictions[str(path)]:
            print(f"{path}  no instance scored >= {args.score_threshold}")
        print(f"drew {len(kept['scores'])} instances on {args.output_dir / f'{path.stem}_instances.png'}",
              file=sys.stderr)
    write_json(args.output_dir / "predictions.json",
               {"weights": args.weights, "score_threshold": args.score_threshold, "photos": predictions})
    return predictions


if __name__ == "__main__":
    run_main(main)
