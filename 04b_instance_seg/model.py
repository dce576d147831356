"""Mask R-CNN in Keras 3 (TensorFlow backend): one image from pixels to instance masks.

Follow one S x S image through `MaskRCNN`:

1. **Backbone** (`build_backbone`): a ResNet from KerasHub (`keras_hub.models.ResNetBackbone`)
   gives feature maps C2..C5 at strides 4, 8, 16, 32. From scratch it is a small ResNet;
   `--weights imagenet` loads KerasHub's ImageNet ResNet-18 preset instead, its BatchNorm frozen.
2. **FPN** (`build_network`): 1x1 lateral convs, a top-down path (upsample and add) and a
   3x3 conv per level give P2..P5 with `fpn_channels` each (P6, a stride-2 pool of P5,
   only for the RPN when `rpn_max_level = 6`).
3. **RPN**: one small conv head slides over every level and predicts, for each anchor
   (`keras_hub.layers.AnchorGenerator`: one size per level, a few aspect ratios), an
   objectness logit and four box deltas.
4. **Proposals** (`propose`): the top-scoring anchors are decoded into boxes (Keras'
   `decode_deltas_to_boxes`), clipped, and thinned by NMS (`tf.image.combined_non_max_suppression`).
5. **RoIAlign** (`roi_align.py`): a 7x7 crop of the right pyramid level for every proposal
   (14x14 for the mask head), with the half-pixel correction `crop_and_resize` needs and
   torchvision's rule at the map's edge.
6. **Box head**: two dense layers, then class scores (background + classes) and one set of
   box deltas per class. **Mask head**: `mask_head_convs` 3x3 convs (the paper has 4, the
   shapes config 2), a 2x up-convolution, and one 28x28 mask logit map per class.
7. **Detections** (`detect`): per-class NMS on the refined boxes, then the mask head on the
   kept boxes; `instances.py` pastes each 28x28 mask into its whole box in the full-size photo.

Training (`compute_losses`) adds the targets of `targets.py` and five losses: RPN class, RPN
box, head class, head box, mask. All shapes are fixed (ground truth padded to G boxes, R
sampled RoIs, D detections), so each step is a single traced graph.

Taken from libraries, because they do it well: the ResNet backbone and anchor generator
(KerasHub), box encoding and decoding (Keras), NMS and bilinear crops (TensorFlow).
Written here, because no maintained Keras 3 package has them: the FPN and heads (a few
layers each), the training targets, RoIAlign's alignment, and mask pasting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import instances
import keras
import numpy as np
import roi_align
import targets
import tensorflow as tf

from data.cli import UserError
from parallel import tf_strategy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROI_SIZE, MASK_ROI_SIZE, MASK_SIZE = 7, 14, 28
IMAGENET_PRESET = "resnet_18_imagenet"
# That preset's network (KerasHub's timm converter, `convert_resnet.py`, for "resnet18").
RESNET_18 = {"input_conv_filters": [64], "input_conv_kernel_sizes": [7],
             "stackwise_num_filters": [64, 128, 256, 512], "stackwise_num_blocks": [2, 2, 2, 2],
             "stackwise_num_strides": [1, 2, 2, 2], "block_type": "basic_block", "use_pre_activation": False}
# The keys of the run's config that define the network and its inference (saved as model.json).
ARCH_KEYS = ("image_size", "fpn_channels", "anchor_size", "aspect_ratios", "rpn_max_level",
             "box_head_units", "mask_head_convs", "rpn_pre_nms_test", "rpn_post_nms_test",
             "rpn_nms_iou", "detections_per_image", "detection_min_score", "detection_nms_iou")


# --- Backbone ------------------------------------------------------------------------------


def scratch_backbone_config(cfg: dict) -> dict:
    """A ResNet of `basic_block`s with the run's widths and depths.

    KerasHub requires 64 filters in the first stack, and its first basic block has no
    projection shortcut, so the stem has 64 filters too.
    """
    return {"input_conv_filters": [64], "input_conv_kernel_sizes": [7],
            "stackwise_num_filters": list(cfg["backbone_filters"]),
            "stackwise_num_blocks": list(cfg["backbone_blocks"]),
            "stackwise_num_strides": [1, 2, 2, 2], "block_type": "basic_block",
            "use_pre_activation": False}


def build_backbone(weights: str, backbone_config: dict | None):
    """(keras_hub ResNetBackbone, its config). `weights` is "none" or "imagenet".

    The ImageNet backbone's BatchNorm layers are frozen (scale, shift and statistics), as
    torchvision's FrozenBatchNorm2d and matterport's train_bn=False do: 4-8 pictures per
    step are too few to estimate a BatchNorm's statistics, and ImageNet's are good ones.
    The from-scratch backbone has no statistics worth keeping; its BatchNorm trains."""
    import keras_hub

    if weights == "imagenet":
        backbone = load_imagenet_backbone()
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # Keras then also runs it in inference mode
        return backbone, {key: backbone.get_config()[key] for key in RESNET_18}
    return keras_hub.models.ResNetBackbone(**backbone_config), backbone_config


def imagenet_cache_folder() -> str:
    """Where kagglehub keeps the downloaded preset ($KAGGLEHUB_CACHE, else ~/.cache/kagglehub)."""
    import keras_hub
    from kagglehub.cache import get_cached_path
    from kagglehub.handle import parse_model_handle

    handle = keras_hub.models.ResNetBackbone.presets[IMAGENET_PRESET]["kaggle_handle"]
    return get_cached_path(parse_model_handle(handle.removeprefix("kaggle://")))


def load_imagenet_backbone():
    """KerasHub's preset, downloaded once into kagglehub's cache; each failure is one line."""
    import keras_hub
    import requests

    folder = imagenet_cache_folder()
    try:
        backbone = keras_hub.models.ResNetBackbone.from_preset(IMAGENET_PRESET)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        if isinstance(exc, requests.RequestException):  # no connection, a proxy, a timeout
            raise UserError(f"--weights imagenet: cannot download {IMAGENET_PRESET}, offline? ({reason}); "
                            f"connect once, or copy {folder} from a machine that has it, "
                            "or use --weights none") from None
        if isinstance(exc, FileNotFoundError):  # KerasHub's word for a file Kaggle does not serve
            raise UserError(f"--weights imagenet: {IMAGENET_PRESET} not found on Kaggle ({reason}); "
                            "update keras-hub, or use --weights none") from None
        # Anything else: a cached file cut short, corrupt, or of another model.
        raise UserError(f"--weights imagenet: the cached {IMAGENET_PRESET} in {folder} does not load "
                        f"({reason}); delete that folder to download it again") from None
    found = {key: backbone.get_config().get(key) for key in RESNET_18}
    if found != RESNET_18:
        raise UserError(f"--weights imagenet: {folder} holds another network ({found['block_type']}, "
                        f"blocks {found['stackwise_num_blocks']}), not ResNet-18; delete that folder "
                        "to download it again")
    return backbone


# --- Network: backbone + FPN + RPN head, and the two RoI heads ------------------------------


def build_network(backbone, arch: dict, num_anchors: int) -> keras.Model:
    """images (B, S, S, 3) in 0..255 -> [P2, P3, P4, P5, rpn_logits (B, A), rpn_deltas (B, A, 4)]."""
    layers, channels = keras.layers, arch["fpn_channels"]
    images = keras.Input((arch["image_size"], arch["image_size"], 3), name="images")
    x = layers.Rescaling(1 / 255)(images)
    x = layers.Normalization(mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD])(x)
    extractor = keras.Model(backbone.inputs, [backbone.pyramid_outputs[f"P{k}"] for k in range(2, 6)])
    c2, c3, c4, c5 = extractor(x)
    pyramid = [layers.Conv2D(channels, 1, name="fpn_lateral5")(c5)]
    for level, c in ((4, c4), (3, c3), (2, c2)):  # top-down: coarse meaning meets fine detail
        lateral = layers.Conv2D(channels, 1, name=f"fpn_lateral{level}")(c)
        pyramid.insert(0, layers.Add()([lateral, layers.UpSampling2D(2)(pyramid[0])]))
    pyramid = [layers.Conv2D(channels, 3, padding="same", name=f"fpn_output{level}")(p)
               for level, p in zip(range(2, 6), pyramid, strict=True)]
    rpn_levels = list(pyramid)
    if arch["rpn_max_level"] == 6:
        rpn_levels.append(layers.MaxPooling2D(1, strides=2, name="fpn_p6")(pyramid[-1]))
    shared = layers.Conv2D(channels, 3, padding="same", activation="relu", name="rpn_conv")
    small = keras.initializers.RandomNormal(stddev=0.01)
    objectness = layers.Conv2D(num_anchors, 1, kernel_initializer=small, name="rpn_objectness")
    deltas = layers.Conv2D(4 * num_anchors, 1, kernel_initializer=small, name="rpn_deltas")
    logits, boxes = [], []
    for p in rpn_levels:
        hidden = shared(p)
        logits.append(layers.Reshape((-1,))(objectness(hidden)))
        boxes.append(layers.Reshape((-1, 4))(deltas(hidden)))
    outputs = [*pyramid, layers.Concatenate(axis=1)(logits), layers.Concatenate(axis=1)(boxes)]
    return keras.Model(images, outputs, name="backbone_fpn_rpn")


def build_box_head(arch: dict, num_classes: int) -> keras.Model:
    """(K, 7, 7, C) crops -> class logits (K, 1 + classes), deltas (K, classes * 4)."""
    layers = keras.layers
    crops = keras.Input((ROI_SIZE, ROI_SIZE, arch["fpn_channels"]))
    x = layers.Flatten()(crops)
    for index in range(2):
        x = layers.Dense(arch["box_head_units"], activation="relu", name=f"box_fc{index + 1}")(x)
    logits = layers.Dense(num_classes + 1, name="box_class",
                          kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))(x)
    deltas = layers.Dense(4 * num_classes, name="box_deltas",
                          kernel_initializer=keras.initializers.RandomNormal(stddev=0.001))(x)
    return keras.Model(crops, [logits, deltas], name="box_head")


def build_mask_head(arch: dict, num_classes: int) -> keras.Model:
    """(K, 14, 14, C) crops -> (K, 28, 28, classes) mask logits."""
    layers, channels = keras.layers, arch["fpn_channels"]
    crops = keras.Input((MASK_ROI_SIZE, MASK_ROI_SIZE, channels))
    x = crops
    for index in range(arch["mask_head_convs"]):
        x = layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"mask_conv{index + 1}")(x)
    x = layers.Conv2DTranspose(channels, 2, strides=2, activation="relu", name="mask_upsample")(x)
    logits = layers.Conv2D(num_classes, 1, name="mask_logits")(x)
    return keras.Model(crops, logits, name="mask_head")


def make_anchors(arch: dict) -> np.ndarray:
    """(A, 4) xyxy anchors for levels 2..rpn_max_level, in the order the RPN outputs them."""
    import keras_hub

    generator = keras_hub.layers.AnchorGenerator(
        bounding_box_format="xyxy", min_level=2, max_level=arch["rpn_max_level"], num_scales=1,
        aspect_ratios=list(arch["aspect_ratios"]), anchor_size=arch["anchor_size"])
    per_level = generator(np.zeros((arch["image_size"], arch["image_size"], 3), np.float32))
    return np.concatenate([np.asarray(per_level[f"P{k}"]) for k in range(2, arch["rpn_max_level"] + 1)])


# --- The model -------------------------------------------------------------------------------


def smooth_l1(x, beta: float):
    x = tf.abs(x)
    return tf.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


class MaskRCNN(keras.Model):
    """The network plus the tensor code around it: proposals, targets, losses and detection.

    `arch` holds the ARCH_KEYS, `class_names` and `backbone` (the ResNet config); training
    also reads the target and sampling keys of the run's config (see config.toml).
    """

    def __init__(self, arch: dict, backbone=None, **kwargs):
        super().__init__(**kwargs)
        self.arch = dict(arch)
        self.num_classes = len(arch["class_names"])
        if backbone is None:
            backbone, _ = build_backbone("none", arch["backbone"])
        self.anchors = tf.constant(make_anchors(arch), tf.float32)
        num_anchors = len(arch["aspect_ratios"])
        self.network = build_network(backbone, arch, num_anchors)
        self.box_head = build_box_head(arch, self.num_classes)
        self.mask_head = build_mask_head(arch, self.num_classes)
        if self.network.outputs[-1].shape[1] != self.anchors.shape[0]:
            raise UserError(f"--image-size {arch['image_size']}: the RPN sees "
                            f"{self.network.outputs[-1].shape[1]} anchors but the generator made "
                            f"{self.anchors.shape[0]}; use a multiple of 32")
        self.built = True

    def whole_image_box(self):
        size = float(self.arch["image_size"])
        return tf.constant([0.0, 0.0, size, size])

    def propose(self, rpn_logits, rpn_deltas, pre_nms: int, post_nms: int):
        """The post_nms best boxes per image after NMS: (B, N, 4) and a (B, N) valid flag."""
        rpn_logits, rpn_deltas = tf.stop_gradient(rpn_logits), tf.stop_gradient(rpn_deltas)
        top = tf.math.top_k(rpn_logits, k=min(pre_nms, int(self.anchors.shape[0])))
        anchors = tf.gather(self.anchors, top.indices)
        deltas = tf.gather(rpn_deltas, top.indices, axis=1, batch_dims=1)
        boxes = targets.clip_boxes(targets.decode(anchors, deltas), self.arch["image_size"])
        nms = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :], tf.sigmoid(top.values)[..., None], max_output_size_per_class=post_nms,
            max_total_size=post_nms, iou_threshold=self.arch["rpn_nms_iou"], score_threshold=0.0,
            clip_boxes=False)  # (coordinates are pixels, not 0..1)
        valid = tf.range(post_nms)[None, :] < nms.valid_detections[:, None]
        return tf.where(valid[..., None], nms.nmsed_boxes, self.whole_image_box()), valid

    def run_box_head(self, pyramid, boxes):
        """(B, R, 4) boxes -> class logits (B, R, 1 + classes) and deltas (B, R, classes, 4)."""
        batch, count = tf.shape(boxes)[0], boxes.shape[1]
        crops = roi_align.multilevel_roi_align(pyramid, boxes, ROI_SIZE)
        logits, deltas = self.box_head(tf.reshape(crops, [-1, *crops.shape[2:]]))
        return (tf.reshape(logits, [batch, count, self.num_classes + 1]),
                tf.reshape(deltas, [batch, count, self.num_classes, 4]))

    def run_mask_head(self, pyramid, boxes, classes):
        """(B, M, 4) boxes and 1-based classes -> (B, M, 28, 28) mask logits of that class."""
        batch, count = tf.shape(boxes)[0], boxes.shape[1]
        crops = roi_align.multilevel_roi_align(pyramid, boxes, MASK_ROI_SIZE)
        logits = self.mask_head(tf.reshape(crops, [-1, *crops.shape[2:]]))
        logits = tf.reshape(logits, [batch, count, MASK_SIZE, MASK_SIZE, self.num_classes])
        channel = tf.clip_by_value(classes - 1, 0, self.num_classes - 1)
        return tf.gather(tf.transpose(logits, [0, 1, 4, 2, 3]), channel, axis=2, batch_dims=2)

    def compute_losses(self, images, gt_boxes, gt_classes, gt_masks, gt_valid, cfg: dict, seed,
                       proposal_valid_override=None):
        """The five Mask R-CNN losses for one batch (see targets.py for the targets). Each is a
        mean over what was sampled (anchors, RoIs, masks), counted over the global batch
        (tf_strategy.global_sum): under a tf.distribute strategy, a replica's losses are then
        its part of the batch's, and the parts add up to the losses one device computes."""
        *pyramid, rpn_logits, rpn_deltas = self.network(images, training=True)
        rpn = targets.rpn_targets(self.anchors, gt_boxes, gt_valid, cfg, seed)
        sampled = tf.cast(rpn["sampled"], tf.float32)
        anchors_seen = tf.maximum(tf_strategy.global_sum(sampled), 1.0)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(rpn["objectness"], rpn_logits)
        losses = {"rpn_class": tf.reduce_sum(bce * sampled) / anchors_seen}
        box_error = tf.reduce_sum(smooth_l1(rpn_deltas - rpn["deltas"], 1 / 9), axis=-1)
        losses["rpn_box"] = tf.reduce_sum(box_error * tf.cast(rpn["positive"], tf.float32)) / anchors_seen

        proposals, valid = self.propose(rpn_logits, rpn_deltas, cfg["rpn_pre_nms_train"],
                                        cfg["rpn_post_nms_train"])
        if proposal_valid_override is not None:  # tests: "the RPN found nothing"
            valid &= proposal_valid_override
        rois = targets.roi_targets(proposals, valid, gt_boxes, gt_classes, gt_valid, cfg, seed)
        logits, deltas = self.run_box_head(pyramid, rois["rois"])
        weight = tf.cast(rois["valid"], tf.float32)
        rois_seen = tf.maximum(tf_strategy.global_sum(weight), 1.0)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(rois["classes"], logits)
        losses["head_class"] = tf.reduce_sum(ce * weight) / rois_seen
        channel = tf.clip_by_value(rois["classes"] - 1, 0, self.num_classes - 1)
        class_deltas = tf.gather(deltas, channel, axis=2, batch_dims=2)
        box_error = tf.reduce_sum(smooth_l1(class_deltas - rois["deltas"], 1.0), axis=-1)
        losses["head_box"] = tf.reduce_sum(box_error * tf.cast(rois["positive"], tf.float32)) / rois_seen

        # The mask head learns from positive RoIs only. They come first, in random order
        # (targets.roi_targets), so the first `mask_rois_per_image` are a random few of them.
        count = min(cfg["mask_rois_per_image"], int(cfg["rois_per_image"] * cfg["roi_positive_fraction"]))
        mask_rois, positive = rois["rois"][:, :count], tf.cast(rois["positive"][:, :count], tf.float32)
        mask_logits = self.run_mask_head(pyramid, mask_rois, rois["classes"][:, :count])
        truth = targets.mask_targets(gt_masks, mask_rois, rois["matched"][:, :count], MASK_SIZE,
                                     roi_align.crop_and_resize_aligned)
        per_roi = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(truth, mask_logits), axis=[2, 3])
        losses["mask"] = tf.reduce_sum(per_roi * positive) / tf.maximum(tf_strategy.global_sum(positive), 1.0)
        return losses

    def detect(self, images, proposal_valid_override=None):
        """Boxes (B, D, 4), scores, 1-based classes, 28x28 mask probabilities, and a valid flag."""
        *pyramid, rpn_logits, rpn_deltas = self.network(images, training=False)
        arch = self.arch
        proposals, valid = self.propose(rpn_logits, rpn_deltas, arch["rpn_pre_nms_test"],
                                        arch["rpn_post_nms_test"])
        if proposal_valid_override is not None:
            valid &= proposal_valid_override
        logits, deltas = self.run_box_head(pyramid, proposals)
        per_class = tf.broadcast_to(proposals[:, :, None, :], tf.shape(deltas))
        boxes = targets.clip_boxes(targets.decode(per_class, deltas, targets.HEAD_VARIANCE),
                                   arch["image_size"])
        scores = tf.nn.softmax(logits)[..., 1:] * tf.cast(valid, tf.float32)[..., None]
        count = arch["detections_per_image"]
        nms = tf.image.combined_non_max_suppression(
            boxes, scores, max_output_size_per_class=count, max_total_size=count,
            iou_threshold=arch["detection_nms_iou"], score_threshold=arch["detection_min_score"],
            clip_boxes=False)
        kept = tf.range(count)[None, :] < nms.valid_detections[:, None]
        boxes = tf.where(kept[..., None], nms.nmsed_boxes, self.whole_image_box())
        classes = tf.cast(nms.nmsed_classes, tf.int32) + 1
        masks = tf.sigmoid(self.run_mask_head(pyramid, boxes, classes))
        return {"boxes": boxes, "scores": nms.nmsed_scores, "classes": classes, "masks": masks,
                "valid": kept}


def detect_instances(model: MaskRCNN, photos: list[np.ndarray], batch_size: int) -> list[dict]:
    """Instances in each photo, in its own pixels: boxes, 0-based labels, scores, (N, H, W) masks.

    Photos are letterboxed to the model's input and run in batches of a fixed size (the
    last one padded), so the detection graph is traced once.
    """
    size = model.arch["image_size"]
    if not hasattr(model, "detect_graph"):
        model.detect_graph = tf.function(model.detect, autograph=False)
    results = []
    for start in range(0, len(photos), batch_size):
        chunk = photos[start:start + batch_size]
        boxed = [instances.letterbox(photo, size) for photo in chunk]
        batch = np.zeros((batch_size, size, size, 3), np.float32)
        batch[:len(chunk)] = [b.image for b in boxed]
        found = {key: value.numpy() for key, value in model.detect_graph(batch).items()}
        for index, (photo, b) in enumerate(zip(chunk, boxed, strict=True)):
            results.append(instances.to_instances(found, index, b.scale, *photo.shape[:2]))
    return results


# --- Saving and loading ----------------------------------------------------------------------


def save_model(model: MaskRCNN, path: Path) -> None:
    """<path> (.weights.h5, Keras' format) and model.json beside it (what predict.py rebuilds)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # Keras wants the .weights.h5 ending
    model.save_weights(tmp)
    os.replace(tmp, path)
    from data.outputs import write_json

    write_json(path.with_name("model.json"), model.arch)


def load_model(path: Path) -> MaskRCNN:
    path = Path(path)
    arch_path = path.with_name("model.json")
    if not path.is_file() or not arch_path.is_file():
        raise UserError(f"--model-path {path}: need a .weights.h5 file with model.json beside it "
                        "(both written by train.py)")
    arch = json.loads(arch_path.read_text())
    if "kind" in arch:  # train.py --weights coco saved its fine-tune of torchvision's COCO model
        import coco_finetune

        return coco_finetune.load_model(path)
    model = MaskRCNN(arch)
    try:
        model.load_weights(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot load these weights into the model of model.json ({exc})") from None
    return model
