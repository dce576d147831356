"""torchvision's COCO Mask R-CNN fine-tuned on train.py's data: `train.py --weights coco`.

The recipe of torchvision's PennFudanPed tutorial (TorchVision Object Detection Finetuning):
everything from COCO_V1 (coco_model.py, converted by convert_coco.py) except new predictors
for the run's classes: the box predictor (`cls_score`, `bbox_pred`) and the mask predictor
(`conv5_mask`, `mask_fcn_logits`). As `maskrcnn_resnet50_fpn(weights=...)` does by default,
the stem and layer1 stay frozen (trainable_backbone_layers=3) and every BatchNorm stays frozen.

`CocoFineTune` has the compact model's interface (model.py `MaskRCNN`), so train.py trains,
evaluates, checkpoints and saves it with the same code:
- input: train.py's letterboxed square batches (B, S, S, 3), 0..255. torchvision would resize
  each photo to a short side of 800; here S (`image_size`, a multiple of 32) is the size, so
  its transform is the identity and the same graph serves every batch;
- `compute_losses`: torchvision's five losses (rpn_class, rpn_box with smooth L1 beta 1/9 over
  the sampled anchors; head_class; head_box, smooth L1 beta 1/9 over all RoIs; mask, binary
  cross-entropy on the positive RoIs) on targets.py's fixed-shape targets, whose config keys
  (rpn_positive_iou, rois_per_image, ...) set the sampling; mask targets are the true masks
  RoIAligned as torchvision's `project_masks_on_boxes` does (2 x 2 samples per bin);
- `detect`: coco_model's inference per image (per-level top-k, batched NMS), with the run's
  rpn_*_test and detection_* keys, padded to `detections_per_image`.
"""

from __future__ import annotations

import json
from pathlib import Path

import coco_model
import convert_coco
import keras
import targets
import tensorflow as tf
import tv_roi_align

from data.cli import UserError
from parallel import tf_strategy

KIND = "torchvision maskrcnn_resnet50_fpn fine-tuned"
NEW_LAYERS = ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
              "roi_heads.mask_predictor.conv5_mask", "roi_heads.mask_predictor.mask_fcn_logits")
FROZEN_PREFIXES = ("backbone.body.conv1", "backbone.body.layer1.")  # trainable_backbone_layers=3
ARCH_KEYS = ("image_size", "rpn_pre_nms_test", "rpn_post_nms_test", "rpn_nms_iou",
             "detections_per_image", "detection_min_score", "detection_nms_iou")


def smooth_l1(x, beta: float):
    x = tf.abs(x)
    return tf.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


class CocoFineTune(keras.Model):
    def __init__(self, arch: dict, **kwargs):
        super().__init__(**kwargs)
        self.arch = dict(arch, kind=KIND)
        self.num_classes = len(arch["class_names"])
        if arch["image_size"] % coco_model.SIZE_DIVISIBLE:
            raise UserError(f"--image-size {arch['image_size']}: --weights coco needs a multiple of 32")
        self.features = coco_model.build_features()
        self.box_head = coco_model.build_box_head(self.num_classes + 1)
        self.mask_head = coco_model.build_mask_head(self.num_classes + 1)
        for layer in self.features.layers:
            if layer.name.startswith(FROZEN_PREFIXES):
                layer.trainable = False
        size = arch["image_size"]
        self.level_anchors = [  # P2..P6 of a size x size input: ceil(size / stride) cells a side
            coco_model.grid_anchors(tf.zeros([1, -(-size // stride), -(-size // stride), 1]),
                                    tf.constant([size, size]), anchor)
            for stride, anchor in zip((4, 8, 16, 32, 64), coco_model.ANCHOR_SIZES, strict=True)]
        self.anchors = tf.concat(self.level_anchors, axis=0)
        self.built = True

    def network(self, images, training: bool):
        """0..255 images -> (pyramid P2..P6, RPN logits (B, A), RPN deltas (B, A, 4))."""
        x = (images / 255.0 - tf.constant(coco_model.IMAGENET_MEAN)) / tf.constant(coco_model.IMAGENET_STD)
        outputs = self.features(x, training=training)
        batch = tf.shape(images)[0]
        logits = tf.concat([tf.reshape(o, [batch, -1]) for o in outputs[9:14]], axis=1)
        deltas = tf.concat([tf.reshape(d, [batch, -1, 4]) for d in outputs[14:19]], axis=1)
        return outputs[4:9], outputs[9:14], outputs[14:19], logits, deltas

    def proposals(self, objectness, deltas, index: int, pre_nms: int, post_nms: int):
        """Image `index`'s proposals, padded to post_nms: (post_nms, 4) and a valid flag."""
        size = self.arch["image_size"]
        boxes, _ = coco_model.rpn_proposals([o[index] for o in objectness], [d[index] for d in deltas],
                                            self.level_anchors, tf.constant([size, size]), pre_nms,
                                            post_nms, self.arch["rpn_nms_iou"])
        count = tf.shape(boxes)[0]
        valid = tf.range(post_nms) < count
        return tf.pad(boxes, [[0, post_nms - count], [0, 0]], constant_values=0.0), valid

    def compute_losses(self, images, gt_boxes, gt_classes, gt_masks, gt_valid, cfg: dict, seed):
        pyramid, objectness, deltas, rpn_logits, rpn_deltas = self.network(images, training=True)
        rpn = targets.rpn_targets(self.anchors, gt_boxes, gt_valid, cfg, seed)
        sampled = tf.cast(rpn["sampled"], tf.float32)
        anchors_seen = tf.maximum(tf_strategy.global_sum(sampled), 1.0)  # model.compute_losses says why
        bce = tf.nn.sigmoid_cross_entropy_with_logits(rpn["objectness"], rpn_logits)
        losses = {"rpn_class": tf.reduce_sum(bce * sampled) / anchors_seen}
        box_error = tf.reduce_sum(smooth_l1(rpn_deltas - rpn["deltas"], 1 / 9), axis=-1)
        losses["rpn_box"] = tf.reduce_sum(box_error * tf.cast(rpn["positive"], tf.float32)) / anchors_seen

        batch = images.shape[0]
        objectness, deltas = [tf.stop_gradient(o) for o in objectness], [tf.stop_gradient(d) for d in deltas]
        found = [self.proposals(objectness, deltas, b, cfg["rpn_pre_nms_train"], cfg["rpn_post_nms_train"])
                 for b in range(batch)]
        proposals, valid = tf.stack([f[0] for f in found]), tf.stack([f[1] for f in found])
        rois = targets.roi_targets(proposals, valid, gt_boxes, gt_classes, gt_valid, cfg, seed)
        per_image = rois["rois"].shape[1]
        crops = tv_roi_align.multiscale_roi_align_for_training(
            pyramid[:4], tf.reshape(rois["rois"], [-1, 4]), tf.repeat(tf.range(batch), per_image),
            coco_model.ROI_SIZE)
        logits, box_deltas = self.box_head(crops, training=True)
        weight = tf.reshape(tf.cast(rois["valid"], tf.float32), [-1])
        rois_seen = tf.maximum(tf_strategy.global_sum(weight), 1.0)
        classes = tf.reshape(rois["classes"], [-1])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(classes, logits)
        losses["head_class"] = tf.reduce_sum(ce * weight) / rois_seen
        class_deltas = tf.gather(tf.reshape(box_deltas, [-1, self.num_classes + 1, 4]), classes, axis=1,
                                 batch_dims=1)
        box_error = tf.reduce_sum(smooth_l1(class_deltas - tf.reshape(rois["deltas"], [-1, 4]), 1 / 9), axis=-1)
        positive = tf.reshape(tf.cast(rois["positive"], tf.float32), [-1])
        losses["head_box"] = tf.reduce_sum(box_error * positive) / rois_seen
        losses["mask"] = self.mask_loss(pyramid, gt_masks, rois, cfg)
        return losses

    def mask_loss(self, pyramid, gt_masks, rois, cfg: dict):
        """BCE of the true class's mask logits on the first positive RoIs (they come first)."""
        batch, count = gt_masks.shape[0], min(cfg["mask_rois_per_image"], cfg["rois_per_image"])
        boxes = tf.reshape(rois["rois"][:, :count], [-1, 4])
        images = tf.repeat(tf.range(batch), count)
        crops = tv_roi_align.multiscale_roi_align_for_training(pyramid[:4], boxes, images,
                                                               coco_model.MASK_ROI_SIZE)
        logits = tf.transpose(self.mask_head(crops, training=True), [0, 3, 1, 2])
        classes = tf.reshape(rois["classes"][:, :count], [-1])
        logits = tf.gather(logits, classes, axis=1, batch_dims=1)
        masks = tf.reshape(tf.cast(gt_masks, tf.float32), [-1, *gt_masks.shape[2:], 1])
        which = images * gt_masks.shape[1] + tf.reshape(rois["matched"][:, :count], [-1])
        truth = tv_roi_align.roi_align(masks, boxes, coco_model.MASK_SIZE, 1.0, box_indices=which)[..., 0]
        per_roi = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(truth, logits), axis=[1, 2])
        positive = tf.reshape(tf.cast(rois["positive"][:, :count], tf.float32), [-1])
        return tf.reduce_sum(per_roi * positive) / tf.maximum(tf_strategy.global_sum(positive), 1.0)

    def detect(self, images):
        """Boxes (B, D, 4), scores, 1-based classes, 28x28 mask probabilities, a valid flag."""
        arch, size, count = self.arch, self.arch["image_size"], self.arch["detections_per_image"]
        pyramid, objectness, deltas, _, _ = self.network(images, training=False)
        found = {"boxes": [], "scores": [], "classes": [], "masks": [], "valid": []}
        for b in range(images.shape[0]):
            levels = [p[b:b + 1] for p in pyramid[:4]]
            proposals, valid = self.proposals(objectness, deltas, b, arch["rpn_pre_nms_test"],
                                              arch["rpn_post_nms_test"])
            proposals = tf.boolean_mask(proposals, valid)
            crops = tv_roi_align.multiscale_roi_align(levels, proposals, coco_model.ROI_SIZE)
            logits, box_deltas = self.box_head(crops)
            boxes, scores, labels = coco_model.detections(
                logits, box_deltas, proposals, tf.constant([size, size]), arch["detection_min_score"],
                arch["detection_nms_iou"], count)
            crops = tv_roi_align.multiscale_roi_align(levels, boxes, coco_model.MASK_ROI_SIZE)
            masks = tf.transpose(self.mask_head(crops), [0, 3, 1, 2])
            masks = tf.sigmoid(tf.gather(masks, labels, axis=1, batch_dims=1))
            kept = tf.shape(boxes)[0]
            pad = [[0, count - kept]]
            found["boxes"].append(tf.pad(boxes, [*pad, [0, 0]], constant_values=1.0))
            found["scores"].append(tf.pad(scores, pad))
            found["classes"].append(tf.pad(labels, pad, constant_values=1))
            found["masks"].append(tf.pad(masks, [*pad, [0, 0], [0, 0]]))
            found["valid"].append(tf.range(count) < kept)
        return {key: tf.stack(value) for key, value in found.items()}


# --- Building, saving and loading ------------------------------------------------------------


def build_model(cfg: dict, class_names: list[str]) -> CocoFineTune:
    """The fine-tune's start: COCO_V1's weights (converted once) with new predictors."""
    arch = {key: cfg[key] for key in ARCH_KEYS} | {"class_names": list(class_names)}
    path = convert_coco.ensure_converted()
    arrays = coco_model.read_converted(path)
    model = CocoFineTune(arch)
    coco_model.set_converted_weights([model.features, model.box_head, model.mask_head], arrays, path,
                                     replaced=NEW_LAYERS)
    return model


def load_model(path: Path) -> CocoFineTune:
    """A fine-tuned model train.py saved (model.weights.h5 with model.json beside it; its "kind"
    key sends model.load_model here)."""
    path = Path(path)
    arch = json.loads(path.with_name("model.json").read_text())
    model = CocoFineTune(arch)
    try:
        model.load_weights(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot load these weights into the model of model.json ({exc})") from None
    return model
