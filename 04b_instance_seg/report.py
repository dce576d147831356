"""What a run reports besides its figures of merit: how it ran, and its plots.

- `run_summary`: metrics.json's keys after the test figures: the epoch kept and its validation
  mAPs, the times, the data's sizes, and the run's facts (versions, device, replicas).
- `save_figures`: loss_curves.png, val_map.png and the test grid test_predictions.png, drawn
  with data/outputs.py's shared plots (each overlay is instances.overlay); nothing on screen.
"""

from __future__ import annotations

from pathlib import Path

import instances

from data import outputs
from parallel import tf_strategy


def run_summary(state: dict, data, cfg: dict, device: str, device_name: str, strategy, model) -> dict:
    return {**{f"val_{k}": v for k, v in state["best"].items() if k != "epoch"},
            "best_epoch": state["best"]["epoch"], "epochs": state["epoch"],
            "train_seconds": state["train_seconds"], "wall_seconds": state["wall_seconds"],
            "num_train": data.num_train, "num_val": len(data.val), "num_test": len(data.split["test"]),
            "dataset": cfg["dataset"], "weights": cfg["weights"],
            **outputs.run_facts(("tensorflow", "keras", "keras-hub"), device, device_name),
            **tf_strategy.run_facts(strategy, model)}


VAL_CURVES = (("mask_map50", "mask mAP@0.5"), ("box_map50", "box mAP@0.5"), ("mask_map", "mask mAP@[.5:.95]"))


def save_figures(output_dir: Path, state: dict, cfg: dict, class_names, test=None, predictions=None) -> None:
    """The loss and validation curves; with `test` (examples.Example list) and its predictions,
    true instances beside predicted ones for `grid_images` test pictures spread over the set."""
    outputs.plot_curves(state["history"], output_dir / "loss_curves.png", title="training losses (mean per epoch)")
    outputs.plot_val_curve(state["val_curve"], VAL_CURVES, output_dir / "val_map.png")
    if test is None:  # a --no-evaluate-test run draws no test grid, and leaves no earlier one
        (output_dir / "test_predictions.png").unlink(missing_ok=True)
        return
    pairs = []
    for i in outputs.spread(len(test), cfg["grid_images"]):
        zoom = max(1, 256 // max(test[i].image.shape[:2]))  # shapes pictures are drawn at 2x
        pairs.append((test[i].name,
                      instances.overlay(test[i].image, test[i].truth(), class_names, show_scores=False, zoom=zoom),
                      instances.overlay(test[i].image, predictions[i], class_names, cfg["score_threshold"],
                                        zoom=zoom)))
    outputs.plot_truth_vs_prediction(pairs, output_dir / "test_predictions.png", cfg["score_threshold"],
                                     what="test images")
