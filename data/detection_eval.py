"""COCO-style mAP for detection and instance segmentation, framework-free: numpy in, dict out.

Ground truth and predictions are converted to the COCO format in memory and scored by
pycocotools' COCOeval, the reference implementation, rather than a hand-written AP.

    from data.detection_eval import coco_map
    metrics = coco_map(ground_truth, predictions, class_names=["apple", "banana", "orange"])
    metrics["map50"], metrics["map"], metrics["ap50_apple"]

One dict per image, in the same order in both lists:
- ground truth: `boxes` (N, 4) xmin, ymin, xmax, ymax in pixels; `labels` (N,) ints in
  0..C-1; for `iou_type="segm"` also `masks` (N, H, W) bool.
- predictions: `boxes`, `labels`, `scores` (M,); for segm also `masks` (M, H, W), bool or
  probabilities (thresholded at 0.5).

Returned keys: `map` (mAP@[.5:.95]), `map50` (mAP@0.5, the Pascal VOC metric), `map75`,
`ap50_<class>` and `ap_<class>` per class (None for a class with no ground truth), and
`num_images`, `num_ground_truth`, `num_predictions`.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np

IOU_TYPES = ("bbox", "segm")


def _as_array(value, shape_tail: tuple[int, ...], dtype) -> np.ndarray:
    array = np.asarray(value if value is not None else np.zeros((0, *shape_tail)), dtype=dtype)
    return array.reshape(-1, *shape_tail) if shape_tail else array.reshape(-1)


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _image_size(entry: dict, fallback: tuple[int, int]) -> tuple[int, int]:
    masks = entry.get("masks")
    if masks is not None and np.asarray(masks).ndim == 3 and np.asarray(masks).shape[0]:
        return tuple(np.asarray(masks).shape[1:])
    return tuple(entry.get("size", fallback))


def to_coco(ground_truth: Sequence[dict], predictions: Sequence[dict], num_classes: int,
            iou_type: str = "bbox") -> tuple[dict, list[dict]]:
    """Build a COCO ground-truth dataset dict and a COCO results list (1-based ids)."""
    images, annotations, results = [], [], []
    for image_id, (truth, pred) in enumerate(zip(ground_truth, predictions, strict=True), start=1):
        boxes = _as_array(truth.get("boxes"), (4,), np.float64)
        labels = _as_array(truth.get("labels"), (), np.int64)
        if len(boxes) != len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"image {image_id}: labels must be in 0..{num_classes - 1}")
        height, width = _image_size(truth, (1, 1))
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        masks = truth.get("masks")
        for index, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            x0, y0, x1, y1 = box.tolist()
            annotation = {"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": int(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                          "area": max(x1 - x0, 0.0) * max(y1 - y0, 0.0), "iscrowd": 0}
            if iou_type == "segm":
                mask = np.asarray(masks[index]) > 0.5
                annotation["segmentation"] = _rle(mask)
                annotation["area"] = float(mask.sum())
            annotations.append(annotation)

        pred_boxes = _as_array(pred.get("boxes"), (4,), np.float64)
        pred_labels = _as_array(pred.get("labels"), (), np.int64)
        scores = _as_array(pred.get("scores"), (), np.float64)
        if not len(pred_boxes) == len(pred_labels) == len(scores):
            raise ValueError(f"image {image_id}: predictions need as many boxes, labels and scores")
        pred_masks = pred.get("masks")
        for index, (box, label, score) in enumerate(zip(pred_boxes, pred_labels, scores, strict=True)):
            x0, y0, x1, y1 = box.tolist()
            result = {"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
                      "bbox": [x0, y0, x1 - x0, y1 - y0]}
            if iou_type == "segm":
                result["segmentation"] = _rle(np.asarray(pred_masks[index]) > 0.5)
            results.append(result)
    categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def _evaluated(ground_truth: Sequence[dict], predictions: Sequence[dict], num_classes: int,
               iou_type: str):
    """(COCO dataset dict, results list, COCOeval after evaluate(), or None when there is
    nothing to score). COCOeval's printing is swallowed: a chapter prints what it needs."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, not {iou_type!r}")
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} predicted")
    dataset, results = to_coco(ground_truth, predictions, num_classes, iou_type)
    if not results or not dataset["annotations"]:
        return dataset, results, None
    with contextlib.redirect_stdout(io.StringIO()):
        coco_truth = COCO()
        coco_truth.dataset = dataset
        coco_truth.createIndex()
        evaluator = COCOeval(coco_truth, coco_truth.loadRes(results), iou_type)
        evaluator.evaluate()
    return dataset, results, evaluator


def _mean_ap(p: np.ndarray) -> float:
    valid = p[p > -1]  # -1: no ground truth of that class (in this sample)
    return float(valid.mean()) if valid.size else 0.0


def _summary(precision: np.ndarray) -> dict:
    """precision[t, r, k]: IoU threshold t (0.50, 0.55, ... 0.95), recall r, class k."""
    return {"map": _mean_ap(precision), "map50": _mean_ap(precision[0]),
            "map75": _mean_ap(precision[5])}


def coco_map(ground_truth: Sequence[dict], predictions: Sequence[dict],
             class_names: Sequence[str], iou_type: str = "bbox") -> dict:
    """Score predictions against ground truth with pycocotools; see the module docstring."""
    dataset, results, evaluator = _evaluated(ground_truth, predictions, len(class_names), iou_type)
    metrics: dict = {"num_images": len(dataset["images"]),
                     "num_ground_truth": len(dataset["annotations"]),
                     "num_predictions": len(results)}
    has_truth = {k: any(a["category_id"] == k + 1 for a in dataset["annotations"])
                 for k in range(len(class_names))}
    if evaluator is None:  # nothing predicted (or nothing to find): every AP is 0
        metrics.update(map=0.0, map50=0.0, map75=0.0)
        for k, name in enumerate(class_names):
            metrics[f"ap50_{name}"] = 0.0 if has_truth[k] else None
            metrics[f"ap_{name}"] = 0.0 if has_truth[k] else None
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    # precision[t, r, k, a, m]: area range a (0 = all), max detections m (-1 = 100).
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    metrics.update(_summary(precision))
    for k, name in enumerate(class_names):
        metrics[f"ap50_{name}"] = _mean_ap(precision[0, :, k]) if has_truth[k] else None
        metrics[f"ap_{name}"] = _mean_ap(precision[:, :, k]) if has_truth[k] else None
    return metrics


def coco_map_ci95(ground_truth: Sequence[dict], predictions: Sequence[dict],
                  class_names: Sequence[str], iou_type: str = "bbox",
                  keys: Sequence[str] = ("map50", "map"), reps: int = 200, seed: int = 0) -> dict:
    """Bootstrap 95% intervals of pooled mAP figures over images: {"map50_ci95": [lo, hi], ...}.

    Each resample draws the images with replacement and recomputes the pooled mAP, as
    `coco_map` does on the whole set. The image-to-box matching does not depend on which
    other images are in the sample, so COCOeval matches once and only its accumulation
    (sorting every kept box by score into a precision/recall curve) is redone per
    resample, over the area range "all" and 100 boxes per image. 200 resamples of 60
    images take a few seconds.
    """
    unknown = set(keys) - {"map", "map50", "map75"}
    if unknown:
        raise ValueError(f"coco_map_ci95 keys must be map, map50 or map75, not {sorted(unknown)}")
    _, _, evaluator = _evaluated(ground_truth, predictions, len(class_names), iou_type)
    if evaluator is None:
        return {f"{key}_ci95": [0.0, 0.0] for key in keys}
    params = evaluator.params
    num_images, num_areas = len(params.imgIds), len(params.areaRng)
    # evalImgs is ordered class, area range, image; keep area range 0 ("all") only.
    per_class = [evaluator.evalImgs[k * num_areas * num_images: k * num_areas * num_images + num_images]
                 for k in range(len(params.catIds))]
    params.areaRng, params.areaRngLbl = params.areaRng[:1], params.areaRngLbl[:1]
    params.maxDets = params.maxDets[-1:]
    all_ids = list(params.imgIds)
    rng = np.random.default_rng(seed)
    samples = {key: [] for key in keys}
    for _ in range(reps):
        picks = rng.integers(0, num_images, size=num_images)
        params.imgIds = [all_ids[i] for i in picks]
        evaluator._paramsEval = copy.deepcopy(params)
        evaluator.evalImgs = [entries[i] for entries in per_class for i in picks]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.accumulate()
        summary = _summary(evaluator.eval["precision"][:, :, :, 0, -1])
        for key in keys:
            samples[key].append(summary[key])
    return {f"{key}_ci95": [float(v) for v in np.percentile(samples[key], [2.5, 97.5])]
            for key in keys}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N, 4) and (M, 4) xyxy boxes; handy for drawing and debugging."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def class_agnostic(items: Sequence[dict]) -> list[dict]:
    """The same boxes with every label set to 0: score localisation alone with coco_map."""
    return [{**item, "labels": np.zeros(len(item["labels"]), np.int64)} for item in items]


def error_counts(ground_truth: Sequence[dict], predictions: Sequence[dict], class_names: Sequence[str],
                 score_threshold: float = 0.3, iou_threshold: float = 0.5) -> dict:
    """What the boxes scored >= score_threshold get right and wrong, image by image.

    Per true box: `found` (a box of its class overlaps it), `wrong_class_only`, `missed`.
    Per kept box, highest score first, each true box matched once: `true`, `duplicate`
    (its class, but that fruit is already matched), `wrong_class` (overlaps only true boxes
    of other classes) and `background` (IoU below the threshold with every true box), the
    last also per predicted class as `background_<class>`.
    """
    counts = dict.fromkeys(("found", "wrong_class_only", "missed", "true", "duplicate",
                            "wrong_class", "background"), 0)
    counts.update({f"background_{name}": 0 for name in class_names})
    for truth, pred in zip(ground_truth, predictions, strict=True):
        t_boxes, t_labels = np.asarray(truth["boxes"]).reshape(-1, 4), np.asarray(truth["labels"])
        keep = np.asarray(pred["scores"]) >= score_threshold
        p_boxes = np.asarray(pred["boxes"]).reshape(-1, 4)[keep]
        p_labels, p_scores = np.asarray(pred["labels"])[keep], np.asarray(pred["scores"])[keep]
        overlap = box_iou(t_boxes, p_boxes) >= iou_threshold  # (true, kept)
        same = overlap & (t_labels[:, None] == p_labels[None, :])
        counts["found"] += int(same.any(1).sum())
        counts["wrong_class_only"] += int((overlap.any(1) & ~same.any(1)).sum())
        counts["missed"] += int((~overlap.any(1)).sum())
        matched: set[int] = set()
        for j in np.argsort(-p_scores, kind="stable"):
            free = [i for i in np.flatnonzero(same[:, j]) if i not in matched]
            if free:
                matched.add(int(free[0]))
                counts["true"] += 1
            elif same[:, j].any():
                counts["duplicate"] += 1
            elif overlap[:, j].any():
                counts["wrong_class"] += 1
            else:
                counts["background"] += 1
                counts[f"background_{class_names[int(p_labels[j])]}"] += 1
    return counts
