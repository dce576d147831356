"""RoIAlign exactly as torchvision computes it, for the COCO model (coco_model.py).

torchvision's `MultiScaleRoIAlign` (ops/poolers.py) and its CPU kernel `roi_align`
(csrc/ops/cpu/roi_align_kernel.cpp, with `aligned=False` and `sampling_ratio=2` in
`maskrcnn_resnet50_fpn` v1), step by step:

1. **Level** (`LevelMapper`): a box of area A pools from level
   floor(4 + log2(sqrt(A) / 224) + 1e-6), clipped to 2..5 (P2..P5; the max-pool level is
   for the RPN only). The levels' scales 1/4..1/32 are what `_setup_scales` infers for any
   photo over ~75 pixels.
2. **Bins**: the box, times the level's scale (no half-pixel shift: `aligned=False`), is
   at least 1x1 and split into P x P bins; each bin averages a 2 x 2 grid of samples at
   start + (i + 0.5) * bin / 2, so along each side the 2P samples are evenly spaced.
3. **Samples**: bilinear, in pixel-index coordinates (pixel i's centre is at i), with
   torchvision's edge rules: a sample more than one pixel outside the map (y < -1, y > H,
   and the same for x) is 0; one within that pixel is clamped to the edge row or column.

`tf.image.crop_and_resize` samples an evenly spaced grid bilinearly, so it does step 3 for
all 2P x 2P samples of a box at once if the map is first padded by one edge-replicating
row and column on each side: in the padded map the clamped band [-1, 0] becomes [0, 1],
between two copies of row 0, and crop_and_resize's own rule (outside [0, H + 1]: the
extrapolation value, 0) is torchvision's "more than one pixel outside". A 2 x 2 average
then gives the P x P bins.

The compact from-scratch model uses roi_align.py instead: a different alignment
(`aligned=True`, half-pixel corrected) that it was trained with, and a variant that keeps
gradients sound for training.
"""

from __future__ import annotations

import tensorflow as tf

CANONICAL_SCALE, CANONICAL_LEVEL = 224.0, 4.0  # LevelMapper's defaults (FPN paper, eq. 1)
MIN_LEVEL, MAX_LEVEL = 2, 5  # pools from P2..P5: featmap_names ["0", "1", "2", "3"]
SAMPLING_RATIO = 2


def roi_align(feature, boxes, output_size: int, spatial_scale: float, sampling_ratio: int = SAMPLING_RATIO,
              box_indices=None):
    """torchvision.ops.roi_align(aligned=False).

    feature (N, H, W, C); boxes (K, 4) x1, y1, x2, y2 in input pixels; box_indices (K,): the
    image of each box (default: all the first) -> (K, P, P, C).
    """
    height = tf.cast(tf.shape(feature)[1], tf.float32)
    width = tf.cast(tf.shape(feature)[2], tf.float32)
    x1, y1, x2, y2 = tf.unstack(tf.cast(boxes, tf.float32) * spatial_scale, axis=1)
    bin_w = tf.maximum(x2 - x1, 1.0) / output_size  # malformed boxes count as 1 x 1
    bin_h = tf.maximum(y2 - y1, 1.0) / output_size
    samples = output_size * sampling_ratio
    first_x, first_y = x1 + 0.5 * bin_w / sampling_ratio, y1 + 0.5 * bin_h / sampling_ratio
    last_x = x1 + (samples - 0.5) * bin_w / sampling_ratio
    last_y = y1 + (samples - 0.5) * bin_h / sampling_ratio
    # In the padded map, index y + 1 is input row y; crop_and_resize wants box corners
    # normalised by (size - 1) = H + 1 of the padded map.
    padded = tf.pad(feature, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    normalised = tf.stack([(first_y + 1.0) / (height + 1.0), (first_x + 1.0) / (width + 1.0),
                           (last_y + 1.0) / (height + 1.0), (last_x + 1.0) / (width + 1.0)], axis=1)
    if box_indices is None:
        box_indices = tf.zeros(tf.shape(boxes)[:1], tf.int32)
    crops = tf.image.crop_and_resize(padded, normalised, box_indices, [samples, samples],
                                     method="bilinear", extrapolation_value=0.0)
    channels = feature.shape[-1]
    crops = tf.reshape(crops, [-1, output_size, sampling_ratio, output_size, sampling_ratio, channels])
    return tf.reduce_mean(crops, axis=[2, 4])


def box_levels(boxes):
    """LevelMapper: the pyramid level (2..5) each (K, 4) box pools from."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    log2 = tf.math.log(tf.sqrt(area) / CANONICAL_SCALE) / tf.math.log(2.0)
    level = tf.floor(CANONICAL_LEVEL + log2 + 1e-6)
    return tf.cast(tf.clip_by_value(level, MIN_LEVEL, MAX_LEVEL), tf.int32)


def multiscale_roi_align(pyramid: list, boxes, output_size: int):
    """MultiScaleRoIAlign: (K, 4) boxes -> (K, P, P, C), each from the level its size picks.

    `pyramid` is [P2, P3, P4, P5], each (1, h, w, C) at stride 4, 8, 16, 32.
    """
    levels = box_levels(boxes)
    positions, crops = [], []
    for offset, feature in enumerate(pyramid):
        level = MIN_LEVEL + offset
        position = tf.cast(tf.where(levels == level)[:, 0], tf.int32)
        positions.append(position)
        crops.append(roi_align(feature, tf.gather(boxes, position), output_size, 2.0 ** -level))
    return tf.dynamic_stitch(positions, crops)  # back in the boxes' order


def multiscale_roi_align_for_training(pyramid: list, boxes, box_indices, output_size: int):
    """The same crops for a batch while training: (K, 4) boxes of the images `box_indices`.

    Every level crops every box, and a 0/1 weight keeps the level each box pools from:
    no level ever gets an empty box list, on which crop_and_resize's gradient kernel aborts
    the process (tensorflow#65721). Four times the crops, but R boxes, not a thousand.
    """
    levels = box_levels(boxes)
    crops = 0.0
    for offset, feature in enumerate(pyramid):
        level = MIN_LEVEL + offset
        chosen = tf.cast(levels == level, tf.float32)[:, None, None, None]
        crops += chosen * roi_align(feature, boxes, output_size, 2.0 ** -level, box_indices=box_indices)
    return crops
