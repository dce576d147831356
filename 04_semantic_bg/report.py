"""What train.py reports of a run, besides model.pt: the figures of metrics.json, per_photo.json,
the plots, and the closing line. `sets` is train.py's `Sets` (the run's photos by set), `scores`
the pooled scores of each set measured after training, by the same names.
numpy/matplotlib only: no torch here.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from photos import photo_rows, save_grids, set_figures

from data.outputs import plot_curves


def run_metrics(scores: dict, sets, best, epochs_run: int, train_seconds: float) -> dict:
    """The figures of the run: test (with 95% intervals) unless --no-evaluate-test, then val."""
    metrics = {}
    if "test" in scores:
        metrics = set_figures(scores["test"], scores["test_close_ups"], sets.test_close_ups)
    val = scores["val"]
    return {**metrics, "val_person_iou": val.iou, "val_close_up_iou": scores["val_close_ups"].iou,
            "val_pixel_accuracy": val.pixel_accuracy, "val_boundary_f1": val.boundary_f1,
            "best_epoch": best.epoch, "epochs_run": epochs_run, "train_seconds": train_seconds,
            "num_train": len(sets.train), "num_val": len(sets.val), "num_test": len(sets.test or []),
            "num_val_close_ups": len(sets.val_close_ups), "num_test_close_ups": len(sets.test_close_ups or [])}


def per_photo(scores: dict, sets) -> dict[str, list[dict]]:
    """IoU and uncertain share of every photo and close-up scored after training."""
    return {part: photo_rows(photos, scores[part]) for part, photos in sets.measured().items()}


def save_plots(history, scores: dict, sets, output_dir: Path, cfg: dict) -> None:
    """curves.png, and predictions.png, worst.png and close_ups.png of the test photos (val
    with --no-evaluate-test); the close-ups shown are spread over the whole set."""
    plot_curves(asdict(history), output_dir / "curves.png",
                xlabel=f"validation pass (every {cfg['eval_every']} epochs)")
    part = "test" if sets.test is not None else "val"
    save_grids(getattr(sets, part), scores[part], getattr(sets, f"{part}_close_ups"), scores[f"{part}_close_ups"],
               output_dir, part, cfg["grid_images"])


def print_summary(scores: dict, sets, best, epochs_run: int, train_seconds: float, output_dir: Path) -> None:
    part = "test" if sets.test is not None else "val"
    print(f"{part} person IoU {scores[part].iou:.4f}  close-up IoU {scores[f'{part}_close_ups'].iou:.4f}  "
          f"pixel accuracy {scores[part].pixel_accuracy:.4f}  boundary F1 {scores[part].boundary_f1:.4f}  "
          f"(best epoch {best.epoch} of {epochs_run}, {train_seconds:.0f} s) -> {output_dir}")
