"""03b: where a trained detector goes wrong, on the validation photos (the test photos once).

What it does
    Scores the model's boxes twice with pycocotools, once as trained and once with every
    class merged into one "fruit" (how much of the loss is class confusion?), then sorts
    every box kept at --score-threshold into true / duplicate / wrong class / background,
    and every true box into found / found only with a wrong class / missed
    (`data.detection_eval.error_counts`). By default on the validation photos of the
    model's own run (split.json beside the model, else the split its config makes): what
    is learned here may steer the next run. `--split test` is the final look, once, after
    the last change: it must not feed back into training.

How to run
    python 03b_xml_detection/analyse.py --model-path runs/03b_xml_detection/model.pt
    python 03b_xml_detection/analyse.py --model-path runs/03b_xml_detection/model.pt --split test \
        --output-dir runs/03b_xml_detection-analysis-test
"""

from __future__ import annotations

import json
from pathlib import Path

from shared_flags import check_common, inference_parser

from data import download, fruits
from data.cli import UserError, default_data_dir, run_main
from data.detection_eval import class_agnostic, coco_map, error_counts
from data.outputs import write_metrics
from data.splits import stratified_split


def parse_args(argv):
    parser = inference_parser(__doc__, "03b_xml_detection-analysis", "model.pt written by train.py")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="datasets folder (the fruit set is fetched into it if missing)")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="val: the model's validation photos; test: the final look, once")
    return check_common(parser, parser.parse_args(argv))


def val_records(train: list, model_path: Path, config: dict) -> list:
    """The validation photos of the model's run: split.json beside it, else its config's split."""
    saved = model_path.with_name("split.json")
    if saved.is_file():
        names = set(json.loads(saved.read_text())["val"])
        picked = [r for r in train if r.image_path.name in names]
        if len(picked) != len(names):
            raise UserError(f"{saved} names {len(names)} validation photos, but only {len(picked)} "
                            "are in --data-dir; give the data folder the model was trained on")
        return picked
    fraction = config.get("val_fraction", config.get("val_split", 0.2))
    _, val_idx = stratified_split([r.label for r in train], fraction, config.get("seed", 0))
    return [train[i] for i in val_idx]


def load_photos(args, config: dict) -> list:
    data_dir = args.data_dir or default_data_dir()
    # Fetch only when the fruit folder is missing: an unpacked (or synthetic) one is read as is.
    unpacked = (data_dir / "fruits" / "train_zip").is_dir()
    root = data_dir / "fruits" if unpacked else download.ensure("fruits", data_dir)
    if args.split == "test":
        return fruits.load_split(root, "test")
    return val_records(fruits.load_split(root, "train"), args.model_path, config)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import model as detector  # torch: imported only after the flags are parsed

    device = detector.pick_device(args.device)
    detector.set_threads(args.num_threads)
    net, arch = detector.load_checkpoint_model(args.model_path)
    net.to(device)
    records = load_photos(args, detector.read_checkpoint(args.model_path).get("config") or {})
    photos = detector.preload(records, arch["image_size"], f"decode {args.split}")
    predictions = detector.predict(net, photos.images, device)
    truth = photos.truth()
    aware = coco_map(truth, predictions, fruits.BOX_CLASSES)
    agnostic = coco_map(class_agnostic(truth), class_agnostic(predictions), ["fruit"])
    metrics = {"split": args.split, "num_photos": len(records),
               "map50": aware["map50"], "map": aware["map"],
               "fruit_map50": agnostic["map50"], "fruit_map": agnostic["map"],
               "score_threshold": args.score_threshold, "num_true_boxes": sum(len(t["labels"]) for t in truth),
               **error_counts(truth, predictions, fruits.BOX_CLASSES, args.score_threshold)}
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {args.output_dir}: {exc.strerror}") from None
    write_metrics(args.output_dir, metrics)
    print(f"{args.split}: mAP@0.5 {metrics['map50']:.3f}, as one 'fruit' class {metrics['fruit_map50']:.3f}")
    return metrics


if __name__ == "__main__":
    run_main(main)
