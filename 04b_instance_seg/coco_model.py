"""torchvision's COCO Mask R-CNN, `maskrcnn_resnet50_fpn` (v1), in Keras 3, layer for layer.

Each Keras layer is named after the torchvision module it matches (its state-dict prefix),
so convert_coco.py's arrays load by name. Follow one photo through `CocoMaskRCNN.detect`:

1. **Pre-processing** (`GeneralizedRCNNTransform`, models/detection/transform.py): pixels
   to 0..1, ImageNet mean and std, bilinear resize (no antialiasing) so that the short side
   is 800 unless the long side would pass 1333, zero padding at the bottom and right up to
   multiples of 32.
2. **ResNet-50** (models/resnet.py, `Bottleneck`: the stride on the 3x3 conv) with
   `FrozenBatchNorm2d` (ops/misc.py; COCO_V1 sets its eps to 0). PyTorch pads a strided conv
   or pool the same on all sides (7x7/2 by 3, 3x3/2 by 1); Keras' "same" would pad only the
   bottom and right of an even-sized map, so those layers get an explicit ZeroPadding2D.
   The max pool's zero padding equals PyTorch's -inf padding because it follows a ReLU.
3. **FPN** (ops/feature_pyramid_network.py): 1x1 lateral convs, nearest 2x upsampling and
   addition top down, a 3x3 conv per level, and `LastLevelMaxPool` (1x1 max pool, stride 2)
   for a fifth level, P6, used by the RPN only.
4. **RPN** (models/detection/rpn.py, anchor_utils.py): one 3x3 conv + ReLU, then per anchor
   an objectness logit and four deltas. Anchors: one size per level (32..512), ratios
   0.5/1/2, rounded base boxes, stride = padded image size // map size (so P6's stride is
   not always 64). Proposals as `filter_proposals`: the 1000 best logits *per level*,
   decoded (box coder weights 1/1/1/1, dw and dh clipped at log(1000/16)), clipped to the
   resized photo, boxes under 1e-3 px dropped, NMS 0.7 by level, the best 1000 kept.
5. **Box head** (roi_heads.py, faster_rcnn.py `TwoMLPHead`, `FastRCNNPredictor`): 7x7
   torchvision RoIAlign (tv_roi_align.py), fc6 and fc7 of 1024 with ReLU, 91 class logits
   and 91 x 4 deltas. `postprocess_detections`: softmax, deltas decoded with weights
   10/10/5/5, boxes clipped, background dropped, scores > 0.05, boxes under 1e-2 px dropped,
   NMS 0.5 per class, the best 100 kept.
6. **Mask head** (mask_rcnn.py `MaskRCNNHeads`, `MaskRCNNPredictor`): 14x14 RoIAlign of the
   detected boxes, four 3x3 convs of 256 with ReLU, a 2x2 stride-2 transposed conv with
   ReLU, a 1x1 conv to 91 mask logits; the detected class's channel, through a sigmoid.
7. **Back to the photo** (transform.py `postprocess`, roi_heads.py `paste_masks_in_image`):
   boxes scaled by photo size / resized size; each 28x28 mask padded by one pixel, its box
   grown by 30/28 and truncated to integers, the mask resized bilinearly to that box and
   pasted. The masks stay soft (0..1): thresholding at 0.5 is the caller's, as in torchvision.

`torchvision.ops.batched_nms` is matched too: on the CPU, over 1000 boxes it runs NMS per
group; otherwise one NMS over boxes shifted apart by group (its "coordinate trick").
Steps 1-6 run as one TensorFlow graph, traced once for any photo size; step 7 is NumPy.

    model = load_converted(convert_coco.converted_file())
    found = predict(model, photo)   # boxes (N, 4), labels (N,), scores (N,), masks (N, H, W)
"""

from __future__ import annotations

import math

import convert_coco
import keras
import numpy as np
import tensorflow as tf
import tv_roi_align

from data.cli import UserError

MIN_SIZE, MAX_SIZE, SIZE_DIVISIBLE = 800, 1333, 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ANCHOR_SIZES, ASPECT_RATIOS = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
RPN_PRE_NMS, RPN_POST_NMS, RPN_NMS_IOU, RPN_MIN_SIZE = 1000, 1000, 0.7, 1e-3
BOX_SCORE_MIN, BOX_NMS_IOU, DETECTIONS, BOX_MIN_SIZE = 0.05, 0.5, 100, 1e-2
RPN_CODER, BOX_CODER = (1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)
DELTA_CLIP = math.log(1000.0 / 16)
ROI_SIZE, MASK_ROI_SIZE, MASK_SIZE = 7, 14, 28
FPN_CHANNELS = 256


# --- Layers ----------------------------------------------------------------------------------


class FrozenBatchNorm(keras.layers.Layer):
    """torchvision.ops.FrozenBatchNorm2d: fixed statistics and affine, never updated.

    y = x * scale + (bias - running_mean * scale), scale = weight / sqrt(running_var + eps).
    """

    def __init__(self, eps: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps

    def build(self, input_shape):
        channels = (input_shape[-1],)
        self.weight = self.add_weight(shape=channels, initializer="ones", trainable=False, name="weight")
        self.bias = self.add_weight(shape=channels, initializer="zeros", trainable=False, name="bias")
        self.running_mean = self.add_weight(shape=channels, initializer="zeros", trainable=False,
                                            name="running_mean")
        self.running_var = self.add_weight(shape=channels, initializer="ones", trainable=False,
                                           name="running_var")

    def call(self, x):
        scale = self.weight * keras.ops.rsqrt(self.running_var + self.eps)
        return x * scale + (self.bias - self.running_mean * scale)


def conv_bn(x, filters: int, kernel: int, name: str, stride: int = 1, relu: bool = True,
            bn_name: str | None = None):
    """Conv (no bias) + FrozenBatchNorm (+ ReLU), padded as PyTorch pads: kernel // 2 each side."""
    layers = keras.layers
    if kernel > 1 and stride > 1:
        x = layers.ZeroPadding2D(kernel // 2)(x)
    padding = "same" if kernel > 1 and stride == 1 else "valid"  # stride 1: "same" is symmetric
    x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, name=name)(x)
    x = FrozenBatchNorm(name=bn_name or name.replace("conv", "bn"))(x)
    return layers.ReLU()(x) if relu else x


def bottleneck(x, width: int, stride: int, name: str):
    """torchvision's Bottleneck (ResNet v1.5): 1x1, 3x3 (strided), 1x1 x4, plus the shortcut."""
    shortcut = x
    if stride != 1 or x.shape[-1] != 4 * width:
        shortcut = conv_bn(x, 4 * width, 1, f"{name}.downsample.0", stride, relu=False,
                           bn_name=f"{name}.downsample.1")
    y = conv_bn(x, width, 1, f"{name}.conv1")
    y = conv_bn(y, width, 3, f"{name}.conv2", stride)
    y = conv_bn(y, 4 * width, 1, f"{name}.conv3", relu=False)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def build_features() -> keras.Model:
    """Padded normalised images (1, H, W, 3) -> [C2..C5, P2..P6, 5 objectness maps, 5 delta maps]."""
    layers = keras.layers
    images = keras.Input((None, None, 3), name="images")
    x = conv_bn(images, 64, 7, "backbone.body.conv1", stride=2)
    x = layers.MaxPooling2D(3, strides=2)(layers.ZeroPadding2D(1)(x))
    body = []
    for index, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        for block in range(blocks):
            stride = 2 if block == 0 and index > 0 else 1
            x = bottleneck(x, width, stride, f"backbone.body.layer{index + 1}.{block}")
        body.append(x)
    laterals = [layers.Conv2D(FPN_CHANNELS, 1, name=f"backbone.fpn.inner_blocks.{i}.0")(c)
                for i, c in enumerate(body)]
    inner = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):  # top-down: coarse meaning meets fine detail
        inner.insert(0, layers.Add()([lateral, layers.UpSampling2D(2, interpolation="nearest")(inner[0])]))
    pyramid = [layers.Conv2D(FPN_CHANNELS, 3, padding="same", name=f"backbone.fpn.layer_blocks.{i}.0")(p)
               for i, p in enumerate(inner)]
    pyramid.append(layers.MaxPooling2D(1, strides=2, name="backbone.fpn.extra_blocks")(pyramid[-1]))
    shared = layers.Conv2D(FPN_CHANNELS, 3, padding="same", activation="relu", name="rpn.head.conv.0.0")
    anchors = len(ASPECT_RATIOS)
    objectness = layers.Conv2D(anchors, 1, name="rpn.head.cls_logits")
    deltas = layers.Conv2D(4 * anchors, 1, name="rpn.head.bbox_pred")
    hidden = [shared(p) for p in pyramid]
    return keras.Model(images, [*body, *pyramid, *[objectness(h) for h in hidden],
                                *[deltas(h) for h in hidden]], name="resnet50_fpn_rpn")


def build_box_head(num_classes: int) -> keras.Model:
    """(K, 7, 7, 256) crops -> class logits (K, classes), deltas (K, classes * 4)."""
    layers = keras.layers
    crops = keras.Input((ROI_SIZE, ROI_SIZE, FPN_CHANNELS))
    x = layers.Flatten()(crops)  # (y, x, channel) order: the converter reorders fc6 to match
    x = layers.Dense(1024, activation="relu", name="roi_heads.box_head.fc6")(x)
    x = layers.Dense(1024, activation="relu", name="roi_heads.box_head.fc7")(x)
    # (nn.Linear's default init, kaiming uniform with a = sqrt(5), for a fine-tune's new predictor)
    init = keras.initializers.VarianceScaling(1 / 3, mode="fan_in", distribution="uniform")
    logits = layers.Dense(num_classes, kernel_initializer=init, name="roi_heads.box_predictor.cls_score")(x)
    deltas = layers.Dense(4 * num_classes, kernel_initializer=init, name="roi_heads.box_predictor.bbox_pred")(x)
    return keras.Model(crops, [logits, deltas], name="box_head")


def build_mask_head(num_classes: int) -> keras.Model:
    """(K, 14, 14, 256) crops -> (K, 28, 28, classes) mask logits."""
    layers = keras.layers
    crops = keras.Input((MASK_ROI_SIZE, MASK_ROI_SIZE, FPN_CHANNELS))
    x = crops
    for index in range(4):
        x = layers.Conv2D(256, 3, padding="same", activation="relu", name=f"roi_heads.mask_head.{index}.0")(x)
    # (torchvision's init, kaiming normal fan_out, for a fine-tune's new predictor)
    init = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")
    x = layers.Conv2DTranspose(256, 2, strides=2, activation="relu", kernel_initializer=init,
                               name="roi_heads.mask_predictor.conv5_mask")(x)
    logits = layers.Conv2D(num_classes, 1, kernel_initializer=init, name="roi_heads.mask_predictor.mask_fcn_logits")(x)
    return keras.Model(crops, logits, name="mask_head")


# --- Tensor functions: pre-processing, anchors, box coding, NMS --------------------------------


def resized_size(height: int, width: int) -> tuple[int, int]:
    """The size `_resize_image_and_masks` gives: floor(side * scale) (F.interpolate's rule)."""
    scale = min(MIN_SIZE / min(height, width), MAX_SIZE / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def preprocess(photo, size):
    """uint8 (H, W, 3) photo, its resized (h, w) -> (1, h and w padded to 32, 3) network input."""
    x = tf.cast(photo, tf.float32) / 255.0
    x = (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)  # normalised, then resized
    x = tf.image.resize(x[None], size, method="bilinear", antialias=False)
    padded = (size + SIZE_DIVISIBLE - 1) // SIZE_DIVISIBLE * SIZE_DIVISIBLE
    return tf.pad(x, [[0, 0], [0, padded[0] - size[0]], [0, padded[1] - size[1]], [0, 0]])


def cell_anchors(size: int) -> np.ndarray:
    """AnchorGenerator.generate_anchors for one size: (3, 4) boxes around 0, rounded (float32)."""
    h_ratios = np.sqrt(np.float32(ASPECT_RATIOS))
    w_ratios = np.float32(1) / h_ratios
    ws, hs = w_ratios * np.float32(size), h_ratios * np.float32(size)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))


def grid_anchors(feature, padded_hw, size: int):
    """(h * w * 3, 4) anchors of one level, in the order of the RPN's outputs: (y, x, anchor)."""
    grid = tf.shape(feature)[1:3]
    stride = padded_hw // grid  # integer division, as AnchorGenerator.forward
    shift_y, shift_x = tf.meshgrid(tf.range(grid[0]) * stride[0], tf.range(grid[1]) * stride[1], indexing="ij")
    shift_x, shift_y = tf.reshape(shift_x, [-1]), tf.reshape(shift_y, [-1])
    shifts = tf.cast(tf.stack([shift_x, shift_y, shift_x, shift_y], axis=1), tf.float32)
    return tf.reshape(shifts[:, None, :] + cell_anchors(size)[None], [-1, 4])


def decode(deltas, boxes, weights):
    """BoxCoder.decode_single: (..., 4) deltas relative to (..., 4) boxes -> x1, y1, x2, y2."""
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    ctr_x, ctr_y = boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights
    dx, dy = deltas[..., 0] / weights[0], deltas[..., 1] / weights[1]
    dw = tf.minimum(deltas[..., 2] / weights[2], DELTA_CLIP)
    dh = tf.minimum(deltas[..., 3] / weights[3], DELTA_CLIP)
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = 0.5 * (tf.exp(dw) * widths), 0.5 * (tf.exp(dh) * heights)
    return tf.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
                    axis=-1)


def clip_boxes(boxes, image_hw):
    """clip_boxes_to_image: x into [0, w], y into [0, h]."""
    height, width = tf.cast(image_hw[0], tf.float32), tf.cast(image_hw[1], tf.float32)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    return tf.stack([tf.clip_by_value(x1, 0.0, width), tf.clip_by_value(y1, 0.0, height),
                     tf.clip_by_value(x2, 0.0, width), tf.clip_by_value(y2, 0.0, height)], axis=-1)


def large_enough(boxes, min_size: float):
    """remove_small_boxes: both sides at least min_size."""
    return (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)


def batched_nms(boxes, scores, groups, iou_threshold: float, group_ids):
    """torchvision.ops.batched_nms on the CPU: indices kept, best score first.

    Over 1000 boxes: NMS within each group, then sorted by score. Otherwise one NMS of the
    boxes shifted apart by group * (largest coordinate + 1), which keeps the same boxes
    up to float32 rounding, as torchvision does it.
    """
    def per_group():
        kept = []
        for group in group_ids:
            index = tf.where(groups == group)[:, 0]
            chosen = tf.image.non_max_suppression(tf.gather(boxes, index), tf.gather(scores, index),
                                                  tf.size(index), iou_threshold)
            kept.append(tf.gather(index, chosen))
        kept = tf.concat(kept, axis=0)
        return tf.gather(kept, tf.argsort(tf.gather(scores, kept), direction="DESCENDING", stable=True))

    def shifted():
        offsets = tf.cast(groups, tf.float32) * (tf.reduce_max(boxes) + 1.0)
        chosen = tf.image.non_max_suppression(boxes + offsets[:, None], scores, tf.size(scores), iou_threshold)
        return tf.cast(chosen, tf.int64)

    return tf.cond(tf.size(scores) > 1000, per_group, shifted)


def rpn_proposals(objectness: list, deltas: list, anchors: list, image_hw, pre_nms: int = RPN_PRE_NMS,
                  post_nms: int = RPN_POST_NMS, nms_iou: float = RPN_NMS_IOU):
    """RegionProposalNetwork.filter_proposals for one image: (N <= post_nms, 4) boxes, best first."""
    boxes, scores, levels = [], [], []
    for level, (logits, codes, level_anchors) in enumerate(zip(objectness, deltas, anchors, strict=True)):
        logits, codes = tf.reshape(logits, [-1]), tf.reshape(codes, [-1, 4])
        top = tf.math.top_k(logits, k=tf.minimum(pre_nms, tf.size(logits)))  # per level
        boxes.append(decode(tf.gather(codes, top.indices), tf.gather(level_anchors, top.indices), RPN_CODER))
        scores.append(top.values)
        levels.append(tf.fill(tf.shape(top.values), level))
    boxes = clip_boxes(tf.concat(boxes, axis=0), image_hw)
    scores, levels = tf.sigmoid(tf.concat(scores, axis=0)), tf.concat(levels, axis=0)
    keep = large_enough(boxes, RPN_MIN_SIZE)  # (the score threshold, 0.0, keeps every box)
    boxes, scores, levels = (tf.boolean_mask(t, keep) for t in (boxes, scores, levels))
    keep = batched_nms(boxes, scores, levels, nms_iou, range(len(objectness)))[:post_nms]
    return tf.gather(boxes, keep), tf.gather(scores, keep)


def detections(class_logits, box_deltas, proposals, image_hw, min_score: float = BOX_SCORE_MIN,
               nms_iou: float = BOX_NMS_IOU, count: int = DETECTIONS):
    """RoIHeads.postprocess_detections for one image: boxes, scores, labels (1-based), best first."""
    num_classes = class_logits.shape[-1]
    codes = tf.reshape(box_deltas, [-1, num_classes, 4])
    boxes = clip_boxes(decode(codes, proposals[:, None, :], BOX_CODER), image_hw)[:, 1:]
    scores = tf.nn.softmax(class_logits)[:, 1:]  # class 0 is the background
    labels = tf.broadcast_to(tf.range(1, num_classes), tf.shape(scores))
    boxes, scores, labels = tf.reshape(boxes, [-1, 4]), tf.reshape(scores, [-1]), tf.reshape(labels, [-1])
    keep = scores > min_score
    boxes, scores, labels = (tf.boolean_mask(t, keep) for t in (boxes, scores, labels))
    keep = large_enough(boxes, BOX_MIN_SIZE)
    boxes, scores, labels = (tf.boolean_mask(t, keep) for t in (boxes, scores, labels))
    keep = batched_nms(boxes, scores, labels, nms_iou, range(1, num_classes))[:count]
    return tf.gather(boxes, keep), tf.gather(scores, keep), tf.gather(labels, keep)


# --- The model -------------------------------------------------------------------------------


class CocoMaskRCNN(keras.Model):
    """The three networks (features, box head, mask head) and the graph code around them."""

    def __init__(self, num_classes: int = 91, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.features = build_features()
        self.box_head = build_box_head(num_classes)
        self.mask_head = build_mask_head(num_classes)
        self._graphs = {}
        self.built = True

    def detect(self, photo, size, stages: bool = False) -> dict:
        """Steps 1-6 of the module docstring for one uint8 photo and its resized (h, w)."""
        images = preprocess(photo, size)
        outputs = self.features(images, training=False)
        body, pyramid = outputs[:4], outputs[4:9]
        objectness, deltas = outputs[9:14], outputs[14:19]
        padded_hw = tf.shape(images)[1:3]
        anchors = [grid_anchors(p, padded_hw, s) for p, s in zip(pyramid, ANCHOR_SIZES, strict=True)]
        proposals, proposal_scores = rpn_proposals(objectness, deltas, anchors, size)
        crops = tv_roi_align.multiscale_roi_align(pyramid[:4], proposals, ROI_SIZE)
        class_logits, box_deltas = self.box_head(crops, training=False)
        boxes, scores, labels = detections(class_logits, box_deltas, proposals, size)
        crops = tv_roi_align.multiscale_roi_align(pyramid[:4], boxes, MASK_ROI_SIZE)
        mask_logits = tf.transpose(self.mask_head(crops, training=False), [0, 3, 1, 2])
        masks = tf.sigmoid(tf.gather(mask_logits, labels, axis=1, batch_dims=1))
        found = {"boxes": boxes, "scores": scores, "labels": labels, "masks": masks}
        if stages:  # what parity.py compares with torchvision, stage by stage
            found.update({"images": images, "proposals": proposals, "proposal_scores": proposal_scores,
                          "class_logits": class_logits, "box_deltas": box_deltas})
            found.update({f"C{k + 2}": c for k, c in enumerate(body)})
            found.update({f"P{k + 2}": p for k, p in enumerate(pyramid)})
            found.update({f"objectness{k + 2}": o for k, o in enumerate(objectness)})
            found.update({f"rpn_deltas{k + 2}": d for k, d in enumerate(deltas)})
        return found

    def detect_graph(self, stages: bool = False):
        """`detect` traced once for any photo size (a tf.function with an input signature)."""
        if stages not in self._graphs:
            signature = [tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int32)]
            self._graphs[stages] = tf.function(lambda photo, size: self.detect(photo, size, stages),
                                               input_signature=signature, autograph=False)
        return self._graphs[stages]


# --- Back to the photo (NumPy) -----------------------------------------------------------------


def resize_boxes(boxes: np.ndarray, resized_hw, photo_hw) -> np.ndarray:
    """transform.resize_boxes: x times photo width / resized width, y likewise (float32)."""
    ratio_h = np.float32(photo_hw[0]) / np.float32(resized_hw[0])
    ratio_w = np.float32(photo_hw[1]) / np.float32(resized_hw[1])
    return np.asarray(boxes, np.float32) * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)


def _interpolation(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of F.interpolate(mode="bilinear", align_corners=False)."""
    scale = np.float32(size_in) / np.float32(size_out)
    source = np.maximum(scale * (np.arange(size_out, dtype=np.float32) + 0.5) - 0.5, 0)
    low = source.astype(np.int64)
    high = np.where(low < size_in - 1, low + 1, low)
    weight = (source - low).astype(np.float32)
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1 - weight)
    np.add.at(matrix, (np.arange(size_out), high), weight)
    return matrix


def paste_mask(mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """paste_masks_in_image for one 28x28 soft mask and its box in photo pixels -> (H, W) float32.

    The mask is padded by one pixel (30x30) and the box grown by 30/28 to match, then truncated
    to integers; the mask is resized bilinearly to (y2 - y1 + 1, x2 - x1 + 1) and pasted.
    """
    size = mask.shape[-1]
    padded = np.pad(np.asarray(mask, np.float32), 1)
    scale = np.float32((size + 2) / size)
    box = np.asarray(box, np.float32)
    half_w, half_h = (box[2] - box[0]) * np.float32(0.5) * scale, (box[3] - box[1]) * np.float32(0.5) * scale
    ctr_x, ctr_y = (box[2] + box[0]) * np.float32(0.5), (box[3] + box[1]) * np.float32(0.5)
    x1, y1, x2, y2 = (int(v) for v in (ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h))
    w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    resized = _interpolation(size + 2, h) @ padded @ _interpolation(size + 2, w).T
    pasted = np.zeros((height, width), np.float32)
    left, right, top, bottom = max(x1, 0), min(x2 + 1, width), max(y1, 0), min(y2 + 1, height)
    if left < right and top < bottom:
        pasted[top:bottom, left:right] = resized[top - y1:bottom - y1, left - x1:right - x1]
    return pasted


def predict(model: CocoMaskRCNN, photo: np.ndarray, paste: bool = True, stages: bool = False) -> dict:
    """Detections in one uint8 (H, W, 3) photo, in its pixels, as torchvision returns them:
    boxes (N, 4) x1 y1 x2 y2, labels (N,) COCO category ids, scores (N,), and soft masks
    (N, H, W) in 0..1 (with paste=False: the 28x28 masks, for the caller to paste one by one)."""
    height, width = photo.shape[:2]
    size = resized_size(height, width)
    found = model.detect_graph(stages)(tf.constant(photo, tf.uint8), tf.constant(size, tf.int32))
    found = {key: value.numpy() for key, value in found.items()}
    found["boxes"] = resize_boxes(found["boxes"], size, (height, width))
    if paste:
        masks = np.empty((len(found["boxes"]), height, width), np.float32)
        for k, (mask, box) in enumerate(zip(found["masks"], found["boxes"], strict=True)):
            masks[k] = paste_mask(mask, box, height, width)
        found["masks"] = masks
    found["resized_size"] = np.array(size)
    return found


# --- Loading converted weights -------------------------------------------------------------------


def load_converted(path) -> CocoMaskRCNN:
    """The model with the arrays convert_coco.py wrote.

    A file of another format or architecture raises UserError naming it and the fix.
    """
    arrays = read_converted(path)
    model = CocoMaskRCNN(arrays["roi_heads.box_predictor.cls_score/1"].shape[0])
    set_converted_weights([model.features, model.box_head, model.mask_head], arrays, path)
    return model


FIX = "delete it and rerun to convert torchvision's file again"


def read_converted(path):
    """The arrays of a converted file (an NpzFile, read lazily), its format checked."""
    try:
        arrays = np.load(path)
        file_format = str(arrays["format"])
        arrays["roi_heads.box_predictor.cls_score/1"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise UserError(f"{path} is not a converted Mask R-CNN file ({type(exc).__name__}); {FIX}") from None
    if file_format != convert_coco.FORMAT:
        raise UserError(f"{path} holds {file_format!r}, not {convert_coco.FORMAT!r}; {FIX}")
    return arrays


def set_converted_weights(networks: list, arrays, path, replaced: tuple[str, ...] = ()) -> None:
    """Each weighted layer takes the arrays "<its name>/<index>"; layers named in `replaced`
    keep their fresh weights (a fine-tune's new predictors). Every other array must be used."""
    used = {"format", "source_stamp"}
    for network in networks:
        for layer in network.layers:
            if not layer.weights or layer.name in replaced:
                continue
            keys = [f"{layer.name}/{index}" for index in range(len(layer.weights))]
            values = [arrays.get(key) for key in keys]
            shapes = [tuple(w.shape) for w in layer.weights]
            if any(v is None or v.shape != s for v, s in zip(values, shapes, strict=True)):
                raise UserError(f"{path} has no arrays of shapes {shapes} for layer {layer.name}: "
                                f"it was written for another architecture; {FIX}")
            layer.set_weights(values)
            used.update(keys)
    unused = sorted(key for key in set(arrays.files) - used if key.rsplit("/", 1)[0] not in replaced)
    if unused:
        raise UserError(f"{path} has arrays this model has no layer for ({unused[0]}, ...): "
                        f"it was written for another architecture; {FIX}")
