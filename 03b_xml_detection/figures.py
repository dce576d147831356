"""The run's figures (data/outputs.py draws them): the training losses and the validation mAP
per epoch, and the test photos' ground truth beside the predictions.
"""

from __future__ import annotations

from pathlib import Path

from model import draw_boxes

from data import outputs

VAL_CURVES = (("map50", "mAP@0.5 (EMA)"), ("map", "mAP@[.5:.95] (EMA)"),
              ("map50_raw", "mAP@0.5 (raw weights)"))


def plot_curves(history: dict, val_curve: dict, output_dir: Path) -> None:
    """loss_curves.png (each training loss per epoch) and val_map.png."""
    outputs.plot_curves(history, output_dir / "loss_curves.png", title="training losses")
    outputs.plot_val_curve(val_curve, VAL_CURVES, output_dir / "val_map.png")


def plot_test_grid(test, records: list, predictions: list[dict], cfg: dict, path: Path) -> None:
    """Ground truth | prediction pairs (boxes scored >= --score-threshold), spread over the
    name-sorted test set: `test` the decoded photos (model.Photos), `records` their files."""
    pairs = []
    for i in outputs.spread(len(test.images), cfg["grid_images"]):
        image, pred = test.images[i].permute(1, 2, 0).numpy(), predictions[i]
        shown = pred["scores"] >= cfg["score_threshold"]
        pairs.append((records[i].image_path.stem,
                      draw_boxes(image, test.boxes[i].numpy(), test.labels[i].numpy()),
                      draw_boxes(image, pred["boxes"][shown], pred["labels"][shown], pred["scores"][shown])))
    outputs.plot_truth_vs_prediction(pairs, path, cfg["score_threshold"], columns=8)
