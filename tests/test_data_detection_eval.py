"""The shared COCO evaluator on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from data.detection_eval import box_iou, coco_map

CLASSES = ["apple", "banana", "orange"]


def truth(boxes, labels, **extra):
    return {"boxes": np.array(boxes, float), "labels": np.array(labels), **extra}


def pred(boxes, labels, scores, **extra):
    return {"boxes": np.array(boxes, float), "labels": np.array(labels),
            "scores": np.array(scores, float), **extra}


GT = [truth([[10, 10, 60, 60], [100, 100, 180, 150]], [0, 1]),
      truth([[20, 30, 90, 80]], [2])]


def test_perfect_prediction_scores_one():
    perfect = [pred(g["boxes"], g["labels"], [0.9] * len(g["labels"])) for g in GT]
    metrics = coco_map(GT, perfect, CLASSES)
    assert metrics["map50"] == pytest.approx(1.0) and metrics["map"] == pytest.approx(1.0)
    assert all(metrics[f"ap50_{c}"] == pytest.approx(1.0) for c in CLASSES)
    assert metrics["num_ground_truth"] == 3 and metrics["num_predictions"] == 3


def test_shifted_box_below_half_iou_is_a_miss():
    shifted = np.array([[40, 10, 90, 60]], float)  # 50x50 box moved 30 px: IoU 20/80 = 0.25
    assert box_iou(GT[0]["boxes"][:1], shifted)[0, 0] == pytest.approx(0.25)
    preds = [pred(np.vstack([shifted, GT[0]["boxes"][1:]]), [0, 1], [0.9, 0.9]),
             pred(GT[1]["boxes"], [2], [0.9])]
    metrics = coco_map(GT, preds, CLASSES)
    assert metrics["ap50_apple"] == pytest.approx(0.0)
    assert metrics["ap50_banana"] == pytest.approx(1.0) and metrics["ap50_orange"] == pytest.approx(1.0)
    assert metrics["map50"] == pytest.approx(2 / 3)


def test_slightly_shifted_box_counts_at_half_but_not_at_strict_iou():
    gt = [truth([[0, 0, 100, 100]], [0])]
    off = [pred([[20, 0, 120, 100]], [0], [0.8])]  # IoU 80/120 = 0.667
    metrics = coco_map(gt, off, CLASSES)
    assert metrics["map50"] == pytest.approx(1.0)
    assert metrics["map75"] == pytest.approx(0.0)
    assert 0.0 < metrics["map"] < 1.0
    assert metrics["ap50_banana"] is None  # no ground truth for that class


def test_wrong_class_and_ranking_of_false_positives():
    gt = [truth([[0, 0, 50, 50]], [0])]
    wrong_class = [pred([[0, 0, 50, 50]], [1], [0.9])]
    assert coco_map(gt, wrong_class, CLASSES)["ap50_apple"] == pytest.approx(0.0)
    # a false positive ranked *below* the true positive does not hurt AP ...
    low_fp = [pred([[0, 0, 50, 50], [200, 200, 250, 250]], [0, 0], [0.9, 0.1])]
    assert coco_map(gt, low_fp, CLASSES)["ap50_apple"] == pytest.approx(1.0)
    # ... ranked above it, it does (precision 1/2 at full recall)
    high_fp = [pred([[0, 0, 50, 50], [200, 200, 250, 250]], [0, 0], [0.1, 0.9])]
    assert coco_map(gt, high_fp, CLASSES)["ap50_apple"] == pytest.approx(0.5, abs=0.01)


def test_no_predictions_is_zero_not_an_error():
    empty = [pred(np.zeros((0, 4)), [], []) for _ in GT]
    metrics = coco_map(GT, empty, CLASSES)
    assert metrics["map50"] == 0.0 and metrics["ap50_apple"] == 0.0


def test_segm_masks():
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 5:25, 5:25] = True
    gt = [truth([[5, 5, 25, 25]], [0], masks=mask)]
    assert coco_map(gt, [pred([[5, 5, 25, 25]], [0], [0.9], masks=mask)], CLASSES,
                    iou_type="segm")["map"] == pytest.approx(1.0)
    moved = np.roll(mask, 12, axis=2)  # overlap 8/32 columns: IoU 160/640 = 0.25
    assert coco_map(gt, [pred([[17, 5, 37, 25]], [0], [0.9], masks=moved)], CLASSES,
                    iou_type="segm")["map50"] == pytest.approx(0.0)


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="labels must be in"):
        coco_map([truth([[0, 0, 5, 5]], [3])], [pred([], [], [])], CLASSES)
    with pytest.raises(ValueError, match="ground-truth images"):
        coco_map(GT, GT[:1], CLASSES)
    with pytest.raises(ValueError, match="iou_type"):
        coco_map(GT, GT, CLASSES, iou_type="keypoints")


def test_error_counts_sort_each_box_into_one_kind():
    from data.detection_eval import class_agnostic, error_counts

    truth = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float),
              "labels": np.array([0, 1, 1])}]
    pred = [{"boxes": np.array([[0, 0, 10, 10],      # true (apple on the apple)
                                [0, 0, 10, 11],      # duplicate apple
                                [20, 20, 30, 30],    # wrong class: apple on the banana
                                [80, 80, 90, 90],    # background, predicted banana
                                [50, 50, 60, 60]],   # below the score threshold: ignored
                               float),
             "labels": np.array([0, 0, 0, 1, 1]), "scores": np.array([0.9, 0.8, 0.7, 0.6, 0.1])}]
    counts = error_counts(truth, pred, ["apple", "banana"], score_threshold=0.3)
    assert counts == {"found": 1, "wrong_class_only": 1, "missed": 1, "true": 1, "duplicate": 1,
                      "wrong_class": 1, "background": 1, "background_apple": 0, "background_banana": 1}
    assert class_agnostic(pred)[0]["labels"].tolist() == [0, 0, 0, 0, 0]
    assert pred[0]["labels"].tolist() == [0, 0, 0, 1, 1]  # the input is left alone
