"""03b: find apples, bananas and oranges in your own photos with a model train.py saved.

What it does
    Reads each image with the shared reader (any format Pillow opens: PNG behind a .jpg
    name, RGBA, palette, EXIF-rotated phone photos), squashes it to the model's square
    input exactly as training did, runs the detector, maps the boxes back to the
    original pixels, saves `<name>_detections.png` with the boxes drawn, and prints one
    line per box:  image  class  score  xmin ymin xmax ymax  (original pixels).

How to run
    python 03b_xml_detection/detect.py --model-path runs/03b_xml_detection/model.pt photo.jpg
    python 03b_xml_detection/detect.py --model-path ckpt.pt --score-threshold 0.5 a.jpg b.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data.cli import REPO_ROOT, UserError, run_main
from data.images import read_rgb, resize_rgb
from data.outputs import atomic_path

# --- Config ------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like the chapter scripts
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv):
    parser = Parser(description=__doc__.strip().splitlines()[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--model-path", type=Path, required=True,
                        help="model.pt or checkpoint.pt written by train.py")
    parser.add_argument("--output-dir", type=Path,
                        default=REPO_ROOT / "runs" / "03b_xml_detection-detect",
                        help="where the drawn images go")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="keep boxes at least this confident")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="drawn images are shrunk to this longest side")
    args = parser.parse_args(argv)
    if not 0 <= args.score_threshold <= 1:
        parser.error(f"--score-threshold must be between 0 and 1, got {args.score_threshold}")
    return args


# --- Model / Evaluate ---------------------------------------------------------------


def detect(model, image: np.ndarray, size: int, torch) -> dict:
    """Detections for one RGB uint8 image, in its own pixel coordinates."""
    height, width = image.shape[:2]
    pixels = torch.tensor(resize_rgb(image, (size, size))).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        out = model([pixels])[0]
    scale = np.array([width / size, height / size] * 2, dtype=np.float32)
    return {"boxes": out["boxes"].numpy() * scale, "labels": out["labels"].numpy(),
            "scores": out["scores"].numpy()}


# --- Save --------------------------------------------------------------------------


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    import model as detector  # 03b_xml_detection/model.py, shared with train.py
    import torch
    from train import draw_boxes

    torch.set_num_threads(2)
    model, arch = detector.load_checkpoint_model(args.model_path)
    model.eval()
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {args.output_dir}: {exc.strerror}") from None
    lines = []
    for path in args.images:
        image = read_rgb(path)  # UserError naming the file if it is not an image
        found = detect(model, image, arch["image_size"], torch)
        keep = found["scores"] >= args.score_threshold
        boxes, labels, scores = found["boxes"][keep], found["labels"][keep], found["scores"][keep]
        shrink = min(1.0, args.max_side / max(image.shape[:2]))
        small = resize_rgb(image, (max(1, round(image.shape[1] * shrink)), max(1, round(image.shape[0] * shrink))))
        drawn = draw_boxes(small, boxes * shrink, labels, scores)
        target = args.output_dir / f"{path.stem}_detections.png"
        from PIL import Image

        with atomic_path(target) as tmp:
            Image.fromarray(drawn).save(tmp, format="PNG")
        for box, label, score in zip(boxes, labels, scores, strict=True):
            x0, y0, x1, y1 = (round(float(v)) for v in box)
            lines.append(f"{path}  {detector.CLASS_NAMES[int(label)]}  {score:.3f}  {x0} {y0} {x1} {y1}")
            print(lines[-1])
        if not len(boxes):
            print(f"{path}  no fruit found (score >= {args.score_threshold})")
        print(f"drew {len(boxes)} boxes on {target}", file=sys.stderr)
    return lines


if __name__ == "__main__":
    run_main(main)
