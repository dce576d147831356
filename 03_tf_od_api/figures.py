"""The chapter's figures of photos with their boxes drawn (used by train.py).

`save_augmented` draws the first training batch as the model sees it (augmented_batch.png);
`truth_vs_prediction` draws the test photos picked for the grid, ground truth beside the
prediction, for data.outputs.plot_truth_vs_prediction (test_predictions.png).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pipeline

from data import outputs


def save_augmented(output_dir: Path, train_split, cfg: dict, arch: dict, count: int = 8) -> None:
    """The first training batch as the model sees it (before normalising), boxes drawn."""
    images, boxes, labels = pipeline.augmented_examples(train_split, cfg, arch, count)
    cells = [outputs.draw_boxes(image, b[lab >= 0], lab[lab >= 0].astype(int), arch["class_names"])
             for image, b, lab in zip(images, boxes, labels, strict=True)]
    outputs.plot_image_grid(cells, [f"augmented {i + 1}" for i in range(len(cells))],
                            output_dir / "augmented_batch.png", columns=4, cell=2.4,
                            title="training inputs: scale jitter, flips, colour; the boxes move along")


def truth_vs_prediction(split, predictions: list[dict], arch: dict, cfg: dict) -> list[tuple]:
    """(name, truth drawn, prediction drawn) for --grid-images photos spread over the split,
    on the record's own photo; predicted boxes scoring under --score-threshold are left out."""
    names, size, pairs = arch["class_names"], arch["image_size"], []
    for i in outputs.spread(len(split.photos), cfg["grid_images"]):
        photo, pred = split.photos[i], predictions[i]
        scale = np.array([photo.shape[1], photo.shape[0]] * 2) / size  # model input -> photo pixels
        shown = pred["scores"] >= cfg["score_threshold"]
        pairs.append((Path(split.filenames[i]).stem,
                      outputs.draw_boxes(photo, split.boxes[i] * scale, split.labels[i], names),
                      outputs.draw_boxes(photo, pred["boxes"][shown] * scale, pred["labels"][shown], names,
                                         pred["scores"][shown])))
    return pairs
