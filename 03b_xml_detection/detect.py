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

import sys
from pathlib import Path

from shared_flags import check_common, inference_parser

from data.cli import UserError, run_main
from data.images import read_rgb, resize_rgb
from data.outputs import atomic_path, print_detections

# --- Config ------------------------------------------------------------------------


def parse_args(argv):
    parser = inference_parser(__doc__, "03b_xml_detection-detect",
                              "model.pt or checkpoint.pt written by train.py")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--max-side", type=int, default=1024,
                        help="drawn images are shrunk to this longest side")
    return check_common(parser, parser.parse_args(argv))


# --- Save --------------------------------------------------------------------------


def save_drawing(image, boxes, labels, scores, max_side: int, target: Path) -> None:
    from model import draw_boxes
    from PIL import Image

    shrink = min(1.0, max_side / max(image.shape[:2]))
    small = resize_rgb(image, (max(1, round(image.shape[1] * shrink)), max(1, round(image.shape[0] * shrink))))
    with atomic_path(target) as tmp:
        Image.fromarray(draw_boxes(small, boxes * shrink, labels, scores)).save(tmp, format="PNG")


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    import model as detector  # torch: imported only after the flags are parsed

    device = detector.pick_device(args.device)
    detector.set_threads(args.num_threads)
    model, arch = detector.load_checkpoint_model(args.model_path)
    model.to(device)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {args.output_dir}: {exc.strerror}") from None
    lines = []
    for path in args.images:
        image = read_rgb(path)  # UserError naming the file if it is not an image
        found = detector.detect_photo(model, image, arch["image_size"], device)
        keep = found["scores"] >= args.score_threshold
        boxes, labels, scores = found["boxes"][keep], found["labels"][keep], found["scores"][keep]
        target = args.output_dir / f"{path.stem}_detections.png"
        save_drawing(image, boxes, labels, scores, args.max_side, target)
        lines += print_detections(path, boxes, labels, scores, detector.CLASS_NAMES,
                                  args.score_threshold)
        print(f"drew {len(boxes)} boxes on {target}", file=sys.stderr)
    return lines


if __name__ == "__main__":
    run_main(main)
