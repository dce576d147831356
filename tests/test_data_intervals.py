"""data/intervals.py and coco_map_ci95: intervals checked against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from data.detection_eval import coco_map, coco_map_ci95
from data.intervals import bootstrap_ci95, paired_bootstrap, pooled_ratio_ci95, wilson_ci95


def test_wilson_known_answers():
    # 55/60: centre (p + z²/2n)/(1 + z²/n), half-width from the Wilson formula, by hand.
    assert wilson_ci95(55, 60) == pytest.approx([0.81931, 0.96388], abs=1e-4)
    assert wilson_ci95(53, 60) == pytest.approx([0.77821, 0.94232], abs=1e-4)
    low, high = wilson_ci95(0, 5)  # no successes: the interval still has width, from 0
    assert low == 0.0 and high == pytest.approx(0.43448, abs=1e-4)
    assert wilson_ci95(5, 5) == pytest.approx([1 - 0.43448, 1.0], abs=1e-4)
    with pytest.raises(ValueError):
        wilson_ci95(6, 5)


def test_bootstrap_of_a_constant_has_zero_width_and_a_seed_repeats():
    assert bootstrap_ci95(lambda idx: 0.7, 30) == [0.7, 0.7]
    values = np.random.default_rng(1).uniform(size=40)
    first = bootstrap_ci95(lambda idx: values[idx].mean(), 40, seed=3)
    assert first == bootstrap_ci95(lambda idx: values[idx].mean(), 40, seed=3)
    assert first != bootstrap_ci95(lambda idx: values[idx].mean(), 40, seed=4)
    assert first[0] < values.mean() < first[1]
    # The percentile interval of a mean is close to the normal one, ±1.96·sd/√n.
    half = 1.96 * values.std() / np.sqrt(40)
    assert first == pytest.approx([values.mean() - half, values.mean() + half], abs=0.02)


def test_pooled_ratio_weighs_items_by_their_denominator():
    assert pooled_ratio_ci95([5, 5, 5], [10, 10, 10]) == [0.5, 0.5]
    low, high = pooled_ratio_ci95([90, 1], [100, 10], reps=2000)
    assert low < 91 / 110 < high and high <= 0.9 and low >= 0.1


def test_paired_bootstrap_sees_a_difference_separate_intervals_miss():
    # B is right on 50 of 60 photos; A is right on those and 4 more.
    b = np.zeros(60)
    b[:50] = 1
    a = b.copy()
    a[50:54] = 1
    result = paired_bootstrap(lambda i: a[i].mean(), lambda i: b[i].mean(), 60)
    assert result["difference"] == pytest.approx(4 / 60)
    assert result["ci95"][0] > 0 and result["p_not_better"] < 0.05
    # ...while the two Wilson intervals overlap.
    assert wilson_ci95(54, 60)[0] < wilson_ci95(50, 60)[1]


def _detections(seed: int, count: int = 30):
    rng = np.random.default_rng(seed)
    truth, pred = [], []
    for _ in range(count):
        n = int(rng.integers(1, 4))
        corner = rng.uniform(0, 200, (n, 2))
        boxes = np.c_[corner, corner + rng.uniform(20, 60, (n, 2))]
        labels = rng.integers(0, 2, n)
        truth.append({"boxes": boxes, "labels": labels})
        noise = np.r_[boxes + rng.normal(0, 6, boxes.shape), [[0, 0, 30, 30]]]
        pred.append({"boxes": noise, "labels": np.r_[labels, [0]],
                     "scores": np.r_[rng.uniform(0.3, 1, n), [0.5]]})
    return truth, pred


def test_coco_map_ci95_brackets_the_figure_and_repeats_with_its_seed():
    truth, pred = _detections(0)
    full = coco_map(truth, pred, ["a", "b"])
    ci = coco_map_ci95(truth, pred, ["a", "b"], keys=("map50", "map"), reps=100, seed=0)
    for key in ("map50", "map"):
        low, high = ci[f"{key}_ci95"]
        assert low <= full[key] <= high and high - low > 0
    assert ci == coco_map_ci95(truth, pred, ["a", "b"], keys=("map50", "map"), reps=100, seed=0)


def test_coco_map_ci95_of_perfect_boxes_is_one_and_of_nothing_is_zero():
    truth, _ = _detections(1)
    perfect = [{**t, "scores": np.ones(len(t["labels"]))} for t in truth]
    assert coco_map_ci95(truth, perfect, ["a", "b"], reps=20) == {
        "map50_ci95": [1.0, 1.0], "map_ci95": [1.0, 1.0]}
    empty = [{"boxes": np.zeros((0, 4)), "labels": [], "scores": []} for _ in truth]
    assert coco_map_ci95(truth, empty, ["a", "b"], reps=20)["map50_ci95"] == [0.0, 0.0]
