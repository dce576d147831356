"""From photos to the network's square input and back: letterboxing, batching, mask pasting, drawing.

numpy and Pillow only. The network sees an S x S image: the photo scaled so its longer side
is S, in the top-left corner, the rest black ("letterboxing": the aspect ratio is kept, so
a pedestrian is not squashed). Its boxes and 28x28 masks come back in that frame;
`to_instances` divides the boxes by the scale and `paste_mask` draws each mask into its box
at the photo's full size, so every figure is scored on the original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.outputs import draw_boxes

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128)],
                   np.uint8)


@dataclass
class Letterboxed:
    """A photo at the network's input size: pixels, and the scale from photo to input."""

    image: np.ndarray  # (S, S, 3) uint8
    scale: float


def letterbox(image: np.ndarray, size: int) -> Letterboxed:
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = np.zeros((size, size, 3), np.uint8)
    if (new_w, new_h) == (width, height):
        canvas[:height, :width] = image
    else:
        canvas[:new_h, :new_w] = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                                          Image.Resampling.BILINEAR))
    return Letterboxed(canvas, scale)


def letterbox_masks(masks: np.ndarray, size: int, scale: float) -> np.ndarray:
    """(N, H, W) bool masks -> (N, S, S) uint8 0/1 in the letterboxed frame."""
    out = np.zeros((len(masks), size, size), np.uint8)
    for index, mask in enumerate(masks):
        height, width = mask.shape
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        if (new_w, new_h) == (width, height):
            out[index, :height, :width] = mask
        else:
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((new_w, new_h),
                                                                          Image.Resampling.BILINEAR)
            out[index, :new_h, :new_w] = np.asarray(resized) >= 128
    return out


def stack_frames(frames: list[dict], max_instances: int) -> dict:
    """Input frames (image, boxes, classes, masks) as one batch, each picture's ground truth
    padded to `max_instances` with a valid flag, so every batch has the same shapes."""
    batch_size, size = len(frames), frames[0]["image"].shape[0]
    batch = {"images": np.zeros((batch_size, size, size, 3), np.float32),
             "gt_boxes": np.zeros((batch_size, max_instances, 4), np.float32),
             "gt_classes": np.zeros((batch_size, max_instances), np.int32),
             "gt_masks": np.zeros((batch_size, max_instances, size, size), np.uint8),
             "gt_valid": np.zeros((batch_size, max_instances), bool)}
    for slot, item in enumerate(frames):
        count = min(len(item["classes"]), max_instances)
        batch["images"][slot] = item["image"]
        batch["gt_boxes"][slot, :count] = item["boxes"][:count]
        batch["gt_classes"][slot, :count] = item["classes"][:count]
        batch["gt_masks"][slot, :count] = item["masks"][:count]
        batch["gt_valid"][slot, :count] = True
    return batch


def paste_mask(mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """A box's m x m mask (probabilities) drawn into an H x W image: (H, W) float32.

    Pixel (px, py) covers [px, px + 1) x [py, py + 1); its centre px + 0.5 lies at
    (px + 0.5 - x0) / (x1 - x0) * m - 0.5 in mask pixel-index coordinates, the inverse of
    RoIAlign's sampling (roi_align.py). The mask is interpolated bilinearly there; pixels
    whose centre is outside the box stay 0.
    """
    m = mask.shape[0]
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.zeros((height, width), np.float32)
    xs = np.arange(max(0, int(np.floor(x0))), min(width, int(np.ceil(x1))))
    ys = np.arange(max(0, int(np.floor(y0))), min(height, int(np.ceil(y1))))
    xs = xs[(xs + 0.5 >= x0) & (xs + 0.5 < x1)]
    ys = ys[(ys + 0.5 >= y0) & (ys + 0.5 < y1)]
    if not len(xs) or not len(ys) or x1 <= x0 or y1 <= y0:
        return out

    def weights(centres, start, length):
        u = np.clip((centres + 0.5 - start) / length * m - 0.5, 0, m - 1)
        low = np.floor(u).astype(int)
        return low, np.minimum(low + 1, m - 1), (u - low).astype(np.float32)

    cx0, cx1, fx = weights(xs, x0, x1 - x0)
    cy0, cy1, fy = weights(ys, y0, y1 - y0)
    top = mask[cy0][:, cx0] * (1 - fx) + mask[cy0][:, cx1] * fx
    bottom = mask[cy1][:, cx0] * (1 - fx) + mask[cy1][:, cx1] * fx
    out[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] = top * (1 - fy)[:, None] + bottom * fy[:, None]
    return out


def to_instances(detections: dict, index: int, scale: float, height: int, width: int) -> dict:
    """Image `index` of a batch of detections -> boxes, 0-based labels, scores and (N, H, W)
    bool masks in the photo's own pixels (the format of data.detection_eval)."""
    kept = np.asarray(detections["valid"][index], bool)
    boxes = np.asarray(detections["boxes"][index], np.float32)[kept] / scale
    labels = np.asarray(detections["classes"][index])[kept].astype(np.int64) - 1
    scores = np.asarray(detections["scores"][index], np.float32)[kept]
    probabilities = np.asarray(detections["masks"][index], np.float32)[kept]
    masks = np.zeros((len(boxes), height, width), bool)
    for k, (box, probability) in enumerate(zip(boxes, probabilities, strict=True)):
        # The whole box, even where it runs into the letterbox padding: the mask spans it
        # all, and paste_mask keeps only the part inside the photo.
        masks[k] = paste_mask(probability, box, height, width) >= 0.5
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    return {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks}


def overlay(image: np.ndarray, instances: dict, class_names, score_threshold: float = 0.0,
            show_scores: bool = True, zoom: int = 1) -> np.ndarray:
    """Each instance's mask in its own colour (half transparent), its box and 'class score'.

    `zoom` > 1 enlarges a small picture (pixel for pixel) so the captions stay readable.
    """
    scores = instances.get("scores")
    keep = np.ones(len(instances["labels"]), bool) if scores is None else scores >= score_threshold
    canvas = np.kron(image, np.ones((zoom, zoom, 1))).astype(np.float32)
    for k in np.flatnonzero(keep):
        color = PALETTE[k % len(PALETTE)].astype(np.float32)
        mask = np.kron(instances["masks"][k], np.ones((zoom, zoom))).astype(bool)
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * color
    canvas = canvas.astype(np.uint8)
    shown_scores = scores[keep] if (show_scores and scores is not None) else None
    return draw_boxes(canvas, np.asarray(instances["boxes"])[keep] * zoom,
                      np.asarray(instances["labels"])[keep], class_names, shown_scores)
