"""The exported SavedModel checked against the Keras model it came from (used by train.py).

train.py exports the kept weights with model.export_saved_model and then calls `parity` on
photos it has predictions for (the test photos when they are scored anyway, else the
validation photos). metrics.json keeps the result as `export_*` keys: the largest box and
score differences, how many boxes the export found, and how many photos disagree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


def parity(saved_model_dir: Path, split, predictions: list[dict], size: int) -> dict:
    """Run the exported SavedModel on the record photos (uint8, their own size) as the OD
    API's tutorial does, and compare with the in-memory predictions: each exported box is
    paired with the nearest in-memory box of its class (per-class NMS can keep one box for
    two classes); the largest box (photo pixels) and score differences, and how many
    photos give a different number of boxes or a box with no partner of its class."""
    detect_fn = tf.saved_model.load(str(saved_model_dir))
    worst = {"export_max_box_diff_px": 0.0, "export_max_score_diff": 0.0, "export_mismatched_photos": 0,
             "export_num_boxes": 0}
    for photo, pred in zip(split.photos, predictions, strict=True):
        out = detect_fn(tf.convert_to_tensor(photo)[tf.newaxis, ...])
        count = int(out["num_detections"][0])
        height, width = photo.shape[:2]
        ymin, xmin, ymax, xmax = out["detection_boxes"][0, :count].numpy().T
        boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=1)
        labels = out["detection_classes"][0, :count].numpy().astype(np.int64) - 1
        memory = pred["boxes"] * np.array([width, height] * 2) / size
        worst["export_num_boxes"] += count
        if count != len(memory) or not count:
            worst["export_mismatched_photos"] += int(count != len(memory))
            continue
        distance = np.abs(boxes[:, None, :] - memory[None, :, :]).max(-1)  # (exported, memory)
        distance[labels[:, None] != pred["labels"][None, :]] = np.inf
        nearest = distance.argmin(1)
        if not np.isfinite(distance.min(1)).all():
            worst["export_mismatched_photos"] += 1
            continue
        worst["export_max_box_diff_px"] = max(worst["export_max_box_diff_px"], float(distance.min(1).max()))
        score_diff = np.abs(out["detection_scores"][0, :count].numpy() - pred["scores"][nearest]).max()
        worst["export_max_score_diff"] = max(worst["export_max_score_diff"], float(score_diff))
    return worst
