"""RoIAlign: a fixed-size feature crop for each box, from the pyramid level that suits its size.

Built on `tf.image.crop_and_resize`, which is *corner-aligned*: given a normalised box
(y0, x0, y1, x1) and a crop of n samples, it samples at y0 * (H - 1) + i * (y1 - y0) * (H - 1) / (n - 1)
in pixel-*index* coordinates, where index i is the centre of pixel i. Mask R-CNN's RoIAlign
wants the centres of n equal bins of the box in pixel-*corner* coordinates (pixel i covers
[i, i + 1)). So each box is first moved by half a bin and half a pixel (the conversion in
tensorpack's `model_box.py`):

    first sample  x0 + spacing / 2 - 0.5     last sample  x1 - spacing / 2 - 0.5
    with spacing = (x1 - x0) / n, then normalised by the map's (W - 1)

Without it every crop is shifted by about half a pixel and stretched by one bin, which
the mask head learns to undo badly (tests/test_04b_instance_seg_units.py checks a ramp).

At the border of a map, samples follow torchvision's RoIAlign (its CPU kernel's
`bilinear_interpolate`): a sample within one pixel outside [0, size - 1] takes the edge
value, one further out is 0. `crop_and_resize` would give 0 for both (its
`extrapolation_value`), so a small box touching the edge of a map would get a zero first
or last row of bins. Padding the map with a copy of its edge row and column (so pixel i
becomes i + 1, and the normaliser the padded map's W + 1) gives torchvision's rule exactly.

Two more choices, both deliberate:
- the boxes go through `tf.stop_gradient`: the proposals are inputs to the second stage,
  not something it should move (and crop_and_resize's box gradient is not needed);
- every level crops every box and a 0/1 weight keeps the level chosen for it, instead of
  gathering each level's boxes into a list of varying length: that list may be empty,
  and crop_and_resize's gradient kernel aborts the process on an empty box list
  (tensorflow#65721). A level with no boxes at all is skipped with `tf.cond`.
"""

from __future__ import annotations

import tensorflow as tf

CANONICAL_SIZE = 224.0  # a 224 px box goes to level 4 (FPN paper, eq. 1)
CANONICAL_LEVEL = 4


def crop_and_resize_aligned(features, boxes, box_indices, crop_size: int, stride: float):
    """Bilinear samples at the centres of a crop_size x crop_size grid of bins over each box.

    features (N, H, W, C) with `stride` input pixels per feature pixel; boxes (K, 4)
    x0, y0, x1, y1 in input pixels; box_indices (K,) which image each box belongs to.
    Returns (K, crop_size, crop_size, C).
    """
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32)) / stride
    x0, y0, x1, y1 = tf.unstack(boxes, axis=1)
    # One copy of the edge on every side (see the module docstring): pixel i is now i + 1.
    padded = tf.pad(features, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    norm_y = tf.cast(tf.shape(padded)[1], tf.float32) - 1.0
    norm_x = tf.cast(tf.shape(padded)[2], tf.float32) - 1.0
    spacing_x = (x1 - x0) / crop_size
    spacing_y = (y1 - y0) / crop_size
    normalised = tf.stack([(y0 + spacing_y / 2 + 0.5) / norm_y, (x0 + spacing_x / 2 + 0.5) / norm_x,
                           (y1 - spacing_y / 2 + 0.5) / norm_y, (x1 - spacing_x / 2 + 0.5) / norm_x],
                          axis=1)
    return tf.image.crop_and_resize(padded, normalised, box_indices, [crop_size, crop_size],
                                    method="bilinear", extrapolation_value=0.0)


def box_levels(boxes, min_level: int = 2, max_level: int = 5):
    """Pyramid level for each box: floor(4 + log2(sqrt(area) / 224)), clipped to the levels."""
    area = tf.maximum((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), 1e-6)
    level = tf.floor(CANONICAL_LEVEL + tf.math.log(tf.sqrt(area) / CANONICAL_SIZE) / tf.math.log(2.0))
    return tf.cast(tf.clip_by_value(level, min_level, max_level), tf.int32)


def multilevel_roi_align(features: list, boxes, crop_size: int, min_level: int = 2):
    """(B, R, 4) boxes -> (B, R, crop, crop, C) crops, each from the level its size picks.

    `features` are the pyramid maps P<min_level>, P<min_level + 1>, ... with strides 2**level.
    """
    batch, per_image = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat = tf.reshape(boxes, [-1, 4])
    box_indices = tf.repeat(tf.range(batch), per_image)
    levels = box_levels(flat, min_level, min_level + len(features) - 1)
    channels = features[0].shape[-1]
    empty = tf.zeros([tf.shape(flat)[0], crop_size, crop_size, channels])
    crops = []
    for offset, feature in enumerate(features):
        level = min_level + offset
        chosen = tf.cast(levels == level, tf.float32)[:, None, None, None]

        def crop(feature=feature, level=level, chosen=chosen):
            return chosen * crop_and_resize_aligned(feature, flat, box_indices, crop_size, 2.0**level)

        crops.append(tf.cond(tf.reduce_any(levels == level), crop, lambda: empty))
    crops = tf.add_n(crops)
    return tf.reshape(crops, [batch, per_image, crop_size, crop_size, channels])
