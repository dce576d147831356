"""Training targets: box coding, anchor matching, sampling, and the second stage's RoI targets.

Boxes are (x0, y0, x1, y1) in input pixels everywhere, with x1 and y1 exclusive, the
convention of `data.pennfudan` and of COCO. Every tensor has a fixed shape, so the whole
training step is one traced graph: ground truth is padded to G boxes per image with a
`valid` flag, and "choose at most k of these" is done with random keys and `top_k`
rather than with tensors whose length depends on the image.

From Keras: `keras.utils.bounding_boxes.encode_box_to_deltas` / `decode_deltas_to_boxes`
(the standard (dx, dy, log dw, log dh) coding). Written here:
- the matching, because KerasHub's `BoxMatcher` forces a positive match for *every* column
  of the IoU matrix, padding columns included: an image padded to G boxes (or with no box
  at all) would get a positive anchor for each padding slot;
- the sampling, which needs fixed shapes (see above).
"""

from __future__ import annotations

import math

import tensorflow as tf
from keras.utils import bounding_boxes

from parallel import tf_strategy

RPN_VARIANCE = (1.0, 1.0, 1.0, 1.0)
HEAD_VARIANCE = (0.1, 0.1, 0.2, 0.2)  # the usual scaling of the second stage's deltas
MAX_LOG_SCALE = math.log(1000.0 / 16)  # clamp log(dw), log(dh): exp() must never overflow


# --- Box coding --------------------------------------------------------------------------


def encode(references, boxes, variance=RPN_VARIANCE):
    """Deltas (dx, dy, log dw, log dh) / variance that move `references` onto `boxes`."""
    return bounding_boxes.encode_box_to_deltas(references, boxes, anchor_format="xyxy",
                                               box_format="xyxy", encoding_format="center_xywh",
                                               variance=list(variance))


def decode(references, deltas, variance=RPN_VARIANCE):
    """The inverse of `encode`, with the size deltas clamped so a wild prediction stays finite."""
    limit = tf.constant([math.inf, math.inf, MAX_LOG_SCALE / variance[2], MAX_LOG_SCALE / variance[3]])
    deltas = tf.minimum(deltas, limit)
    return bounding_boxes.decode_deltas_to_boxes(references, deltas, anchor_format="xyxy",
                                                 box_format="xyxy", encoded_format="center_xywh",
                                                 variance=list(variance))


def clip_boxes(boxes, size: int, min_size: float = 1.0):
    """Clip to the S x S input and keep at least `min_size` px of width and height.

    A box of zero width would put nothing into RoIAlign's bins (and NaN into a box delta).
    """
    x0, y0, x1, y1 = tf.unstack(tf.clip_by_value(boxes, 0.0, float(size)), axis=-1)
    x0 = tf.minimum(x0, size - min_size)
    y0 = tf.minimum(y0, size - min_size)
    return tf.stack([x0, y0, tf.maximum(x1, x0 + min_size), tf.maximum(y1, y0 + min_size)], axis=-1)


def pairwise_iou(a, b):
    """IoU of (..., N, 4) boxes against (..., M, 4) boxes: (..., N, M)."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    top_left = tf.maximum(a[..., :2], b[..., :2])
    bottom_right = tf.minimum(a[..., 2:], b[..., 2:])
    inter = tf.reduce_prod(tf.maximum(bottom_right - top_left, 0.0), axis=-1)
    area_a = tf.reduce_prod(tf.maximum(a[..., 2:] - a[..., :2], 0.0), axis=-1)
    area_b = tf.reduce_prod(tf.maximum(b[..., 2:] - b[..., :2], 0.0), axis=-1)
    return inter / tf.maximum(area_a + area_b - inter, 1e-6)


# --- Matching and sampling ------------------------------------------------------------------


def match(candidates, gt_boxes, gt_valid, positive_iou: float, negative_iou: float,
          best_is_positive: bool):
    """Label each candidate box 1 (object), 0 (background) or -1 (ignored) against ground truth.

    candidates (B, N, 4) or (N, 4); gt_boxes (B, G, 4); gt_valid (B, G) bool.
    A candidate is positive at IoU >= positive_iou with some true box, background below
    negative_iou, ignored in between. With `best_is_positive` (the RPN rule), the candidates
    that overlap a true box best are positive too, so a small or odd-shaped object is never
    left without an anchor. Padding slots (gt_valid False) match nothing.
    Returns (labels (B, N) int32, index of the best true box (B, N) int32, its IoU (B, N)).
    """
    if candidates.shape.rank == 2:
        candidates = tf.broadcast_to(candidates[None], [tf.shape(gt_boxes)[0], *candidates.shape])
    iou = tf.where(gt_valid[:, None, :], pairwise_iou(candidates, gt_boxes), -1.0)
    best_iou = tf.reduce_max(iou, axis=-1)
    best_gt = tf.argmax(iou, axis=-1, output_type=tf.int32)
    positive = best_iou >= positive_iou
    if best_is_positive:
        gt_best = tf.reduce_max(iou, axis=1, keepdims=True)  # (B, 1, G): each true box's best IoU
        is_best = (iou >= gt_best) & (gt_best > 0.0) & gt_valid[:, None, :]
        positive |= tf.reduce_any(is_best, axis=-1)
        best_gt = tf.where(positive & ~(best_iou >= positive_iou),
                           tf.argmax(tf.cast(is_best, tf.int32), axis=-1, output_type=tf.int32), best_gt)
    labels = tf.where(positive, 1, tf.where(best_iou < negative_iou, 0, -1))
    return labels, best_gt, best_iou


def _keep_highest(keys, allowed, count, most: int):
    """Where `allowed`, keep the `count` highest keys of each row (count <= most); (B, N) bool."""
    keys = tf.where(allowed, keys, -1.0)
    k = min(most, int(keys.shape[-1]))
    top = tf.math.top_k(keys, k=k).values  # (B, k), sorted high to low
    kth = tf.gather(top, tf.clip_by_value(count - 1, 0, k - 1), axis=1, batch_dims=1)
    return allowed & (keys >= kth[:, None]) & (count > 0)[:, None]


def sample(labels, total: int, positive_fraction: float, seed):
    """Choose `total` labelled candidates per image, at most total * positive_fraction positive.

    Random keys from a stateless generator seeded with `seed` (a (2,) int tensor: the run's
    seed and the step), so a resumed run draws exactly what an uninterrupted one would.
    Returns (positive_chosen, negative_chosen), both (B, N) bool.
    """
    keys = tf_strategy.uniform_rows(tf.shape(labels), seed)  # an image's own, on any replica
    batch = tf.shape(labels)[0]
    max_positive = int(total * positive_fraction)
    positive = _keep_highest(keys, labels == 1, tf.fill([batch], max_positive), max_positive)
    num_positive = tf.reduce_sum(tf.cast(positive, tf.int32), axis=1)
    negative = _keep_highest(keys, labels == 0, total - num_positive, total)
    return positive, negative


# --- First stage: anchors -> RPN targets --------------------------------------------------


def rpn_targets(anchors, gt_boxes, gt_valid, cfg: dict, seed):
    """Objectness labels, box deltas and the sampled anchors' weights for the RPN losses."""
    labels, best_gt, _ = match(anchors, gt_boxes, gt_valid, cfg["rpn_positive_iou"],
                               cfg["rpn_negative_iou"], best_is_positive=True)
    positive, negative = sample(labels, cfg["rpn_anchors_per_image"], 0.5, seed)
    matched = tf.gather(gt_boxes, best_gt, axis=1, batch_dims=1)  # (B, A, 4)
    deltas = encode(anchors[None], matched, RPN_VARIANCE)
    return {"objectness": tf.cast(positive, tf.float32), "deltas": deltas,
            "positive": positive, "sampled": positive | negative}


# --- Second stage: proposals -> RoIs with class, box and mask targets ---------------------


def roi_targets(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, cfg: dict, seed):
    """Sample `rois_per_image` RoIs from the proposals plus the true boxes, positives first.

    Returns rois (B, R, 4), `valid` and `positive` flags, class targets (0 = background),
    box deltas to the matched true box, and `matched` (its index, for the mask target).
    Slots with nothing to sample hold a whole-image box with weight 0: RoIAlign always
    gets R real boxes per image, never zero boxes (the crop gradient kernel aborts on an
    empty box list, tensorflow#65721) and never a degenerate one.
    """
    total = cfg["rois_per_image"]
    candidates = tf.concat([proposals, gt_boxes], axis=1)  # the true boxes are always candidates
    candidate_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    labels, best_gt, _ = match(candidates, gt_boxes, gt_valid, cfg["roi_positive_iou"],
                               cfg["roi_positive_iou"], best_is_positive=False)
    labels = tf.where(candidate_valid, labels, -1)
    positive, negative = sample(labels, total, cfg["roi_positive_fraction"], seed)
    # One ordering for everything: chosen positives (keys 2..3), chosen negatives (1..2), rest.
    keys = tf_strategy.uniform_rows(tf.shape(labels), seed + 1)
    keys = tf.where(positive, 2.0 + keys, tf.where(negative, 1.0 + keys, keys - 1.0))
    top = tf.math.top_k(keys, k=total)
    order, valid, is_positive = top.indices, top.values > 0.0, top.values >= 2.0
    rois = tf.gather(candidates, order, axis=1, batch_dims=1)
    matched = tf.gather(best_gt, order, axis=1, batch_dims=1)
    classes = tf.where(is_positive, tf.gather(gt_classes, matched, axis=1, batch_dims=1), 0)
    size = float(cfg["image_size"])
    whole_image = tf.constant([0.0, 0.0, size, size])
    rois = tf.where(valid[..., None], clip_boxes(rois, cfg["image_size"]), whole_image)
    deltas = encode(rois, tf.gather(gt_boxes, matched, axis=1, batch_dims=1), HEAD_VARIANCE)
    return {"rois": tf.stop_gradient(rois), "valid": valid, "positive": is_positive,
            "classes": classes, "deltas": deltas, "matched": matched}


def mask_targets(gt_masks, rois, matched, mask_size: int, crop):
    """Each RoI's true mask, cropped to the RoI and resized to mask_size x mask_size (0/1).

    gt_masks (B, G, S, S) at input resolution; rois (B, M, 4); matched (B, M). `crop` is
    roi_align.crop_and_resize_aligned, so targets and features are sampled at the same
    points of each box (the half-pixel convention).
    """
    batch, num_gt = tf.shape(gt_masks)[0], tf.shape(gt_masks)[1]
    per_roi = tf.shape(rois)[1]
    images = tf.reshape(tf.cast(gt_masks, tf.float32), [-1, *gt_masks.shape[2:], 1])
    box_indices = tf.reshape(tf.range(batch)[:, None] * num_gt + matched, [-1])
    crops = crop(images, tf.reshape(rois, [-1, 4]), box_indices, mask_size, stride=1.0)
    crops = tf.reshape(crops, [batch, per_roi, mask_size, mask_size])
    return tf.cast(crops >= 0.5, tf.float32)
