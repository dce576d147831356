"""03b: where a trained detector goes wrong on the test photos (after the one reported run).

What it does
    Scores the model's test boxes twice with pycocotools, once as trained and once with
    every class merged into one "fruit" (how much of the loss is class confusion?), then
    sorts every box kept at --score-threshold into true / duplicate / wrong class /
    background, and every true box into found / found only with a wrong class / missed
    (`data.detection_eval.error_counts`). Nothing here feeds back into training.

How to run
    python 03b_xml_detection/analyse.py --model-path runs/03b_xml_detection/model.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data import fruits
from data.cli import REPO_ROOT, UserError, default_data_dir, run_main
from data.detection_eval import class_agnostic, coco_map, error_counts
from data.outputs import write_metrics


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like the chapter scripts
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv=None) -> dict:
    parser = Parser(description=__doc__.strip().splitlines()[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-path", type=Path, required=True, help="model.pt written by train.py")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="datasets folder (the fruit set is fetched into it if missing)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "03b_xml_detection-analysis")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="boxes counted in the tally")
    args = parser.parse_args(argv)
    if not 0 <= args.score_threshold <= 1:
        parser.error(f"--score-threshold must be between 0 and 1, got {args.score_threshold}")

    import model as detector  # 03b_xml_detection/model.py
    import torch
    from tqdm import tqdm
    from train import predict, preload

    torch.set_num_threads(2)
    net, arch = detector.load_checkpoint_model(args.model_path)
    data_dir = args.data_dir or default_data_dir()
    # Fetch only when the fruit folder is missing: an unpacked (or synthetic) one is read as is.
    _, test_records = fruits.load_fruits(data_dir, fetch=not (data_dir / "fruits" / "test_zip").is_dir())
    images, boxes, labels = preload(test_records, arch["image_size"], tqdm, "decode test")
    predictions = predict(net, images, torch)
    truth = [{"boxes": b.numpy(), "labels": lab.numpy()} for b, lab in zip(boxes, labels, strict=True)]
    aware = coco_map(truth, predictions, fruits.BOX_CLASSES)
    agnostic = coco_map(class_agnostic(truth), class_agnostic(predictions), ["fruit"])
    metrics = {"map50": aware["map50"], "map": aware["map"],
               "fruit_map50": agnostic["map50"], "fruit_map": agnostic["map"],
               "score_threshold": args.score_threshold, "num_true_boxes": sum(len(t["labels"]) for t in truth),
               **error_counts(truth, predictions, fruits.BOX_CLASSES, args.score_threshold)}
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {args.output_dir}: {exc.strerror}") from None
    write_metrics(args.output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
