"""The detector shared by train.py and the export: KerasHub's RetinaNet on the TensorFlow backend.

RetinaNet (Lin et al. 2017) is one of the detectors the Object Detection API's model zoo
offered ("SSD ResNet50 FPN" is RetinaNet by another name). KerasHub 0.32 builds it from a
backbone with pyramid outputs, an FPN, and two heads shared across levels; `compile()`
supplies a Huber box loss and a focal classification loss; `predict()` decodes the box
deltas against the anchors and runs NMS. Facts checked in the installed 0.32 source:

- labels are 0-based, with -1 as padding (`compute_loss`: positive anchors are those whose
  matched label is > -1); the label map's ids start at 1, so records.py subtracts 1;
- `compile(metrics=...)` raises "User metrics not yet supported", so mAP is computed
  outside `fit` with `data.detection_eval.coco_map`;
- the prior-probability bias of the focal loss (-log((1-pi)/pi)) is set on the *box*
  head (`PredictionHead(use_prior_probability=True)` in `box_head`), not the class head,
  whose bias stays 0 (sigmoid 0.5 on ~20k anchors: a huge first loss). `init_heads` below
  puts it where the focal-loss paper says, and zeroes the box bias;
- the FPN upsamples by 2 and adds, so the image size must divide by 2**max_level;
- the heads and the FPN are 256 channels wide whatever the backbone (hard-coded);
- KerasHub's `NonMaxSuppression` is class-agnostic (one NMS over each anchor's best
  class); the OD API's RetinaNet runs NMS per class. `PerClassNMS` below does it the API's
  way, for evaluation and the export alike;
- `model.export()` saves only the raw forward pass (deltas and logits): no resizing, no
  box decoding, no NMS. `export_saved_model` below puts all of these in the graph, behind
  the OD API's exported-model signature.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import keras
import keras_hub
import tensorflow as tf

from data import outputs
from data.cli import UserError, usable_cores
from parallel import tf_strategy

BOX_FORMAT = "xyxy"      # pixels of the model input, as data.detection_eval wants them
COCO_PRESET = "retinanet_resnet50_fpn_coco"


# --- Building ------------------------------------------------------------------------


def scratch_arch(cfg: dict, num_classes: int) -> dict:
    """Everything needed to rebuild the from-scratch detector (saved with the model)."""
    return {"kind": "scratch", "num_classes": num_classes, "image_size": cfg["image_size"],
            "resnet_blocks": list(cfg["resnet_blocks"]),
            "min_level": cfg["min_level"], "max_level": cfg["max_level"],
            "anchor_size": cfg["anchor_size"], "head_convs": cfg["head_convs"],
            "min_score": cfg["min_score"],
            # inputs 0..255 -> -1..1: no pretrained statistics to match
            "scale": 1 / 127.5, "offset": -1.0}


def _anchors(arch: dict):
    # 3 scales x 3 aspect ratios per cell, RetinaNet's own; the base size is a config key.
    return keras_hub.layers.AnchorGenerator(
        BOX_FORMAT, min_level=arch["min_level"], max_level=arch["max_level"], num_scales=3,
        aspect_ratios=[0.5, 1.0, 2.0], anchor_size=arch["anchor_size"])


class PerClassNMS(keras.layers.Layer):
    """The OD API's multiclass NMS (`batch_multiclass_non_max_suppression`, which the
    API's RetinaNet configs use): boxes clipped to the image, each class's boxes
    suppressed among themselves (IoU 0.5), then the best `max_detections` of all classes
    kept, padded to that length. `tf.image.combined_non_max_suppression` is that
    operation. A box scoring over `min_score` for two classes can be kept for both.

    KerasHub's detector calls it as its `prediction_decoder`, with boxes in pixels of the
    model input (BOX_FORMAT) and class logits; it returns KerasHub's keys."""

    def __init__(self, min_score: float, max_detections: int = 100, iou_threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.bounding_box_format = BOX_FORMAT
        self.min_score, self.max_detections, self.iou_threshold = min_score, max_detections, iou_threshold

    def call(self, box_prediction, class_prediction, images):
        size = tf.cast(tf.shape(images)[1:3], tf.float32)  # height, width
        scale = tf.stack([size[1], size[0], size[1], size[0]])
        boxes = tf.clip_by_value(box_prediction / scale, 0.0, 1.0)  # normalised, inside the image
        boxes, scores, classes, count = tf.image.combined_non_max_suppression(
            tf.gather(boxes, [1, 0, 3, 2], axis=-1)[:, :, None, :],  # yxyx, one box for all classes
            tf.sigmoid(class_prediction), max_output_size_per_class=self.max_detections,
            max_total_size=self.max_detections, iou_threshold=self.iou_threshold,
            score_threshold=self.min_score, clip_boxes=False)
        return {"boxes": tf.gather(boxes, [1, 0, 3, 2], axis=-1) * scale, "confidence": scores,
                "labels": tf.cast(classes, tf.int32), "num_detections": count}

    def get_config(self):
        return {**super().get_config(), "min_score": self.min_score,
                "max_detections": self.max_detections, "iou_threshold": self.iou_threshold}


def decoder(min_score: float, max_detections: int = 100) -> PerClassNMS:
    # A low score threshold keeps the low-confidence boxes that mAP needs (KerasHub's
    # default of 0.5 would cut the precision-recall curve short).
    return PerClassNMS(min_score, max_detections)


def build_scratch(arch: dict, prior: float = 0.01):
    """ResNet (basic blocks) + FPN + RetinaNet heads from random weights."""
    size, blocks = arch["image_size"], arch["resnet_blocks"]
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64 * 2**i for i in range(len(blocks))],
        stackwise_num_blocks=blocks, stackwise_num_strides=[1] + [2] * (len(blocks) - 1),
        block_type="basic_block", image_shape=(size, size, 3))
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=arch["min_level"], max_level=arch["max_level"],
        use_p5=False, image_shape=(size, size, 3))
    anchors = _anchors(arch)
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=arch["num_classes"], bounding_box_format=BOX_FORMAT,
        anchor_generator=anchors, pre_logits_num_conv_layers=arch["head_convs"],
        prediction_decoder=decoder(arch["min_score"]))
    init_heads(detector, prior)
    return detector


def init_heads(detector, prior: float) -> None:
    """He-normal head convs (there is no norm layer in the heads: KerasHub's N(0, 0.05)
    would grow the signal ~2.4x per layer); logits N(0, 0.01); class bias at the prior."""
    rng = keras.random.SeedGenerator(1)
    for head, bias in ((detector.classification_head, -math.log((1 - prior) / prior)),
                       (detector.box_head, 0.0)):
        for conv in head.conv_layers:
            fan_in = math.prod(conv.kernel.shape[:-1])
            conv.kernel.assign(keras.random.normal(conv.kernel.shape, stddev=math.sqrt(2 / fan_in), seed=rng))
            if conv.bias is not None:
                conv.bias.assign(keras.ops.zeros_like(conv.bias))
        logits = head.prediction_layer
        logits.kernel.assign(keras.random.normal(logits.kernel.shape, stddev=0.01, seed=rng))
        logits.bias.assign(keras.ops.full_like(logits.bias, bias))


def build_coco(cfg: dict, num_classes: int):
    """KerasHub's COCO RetinaNet (ResNet-50 FPN, P3-P7), fetched and cached by KerasHub
    (kagglehub), with new heads for our classes. `from_preset(num_classes=...)` loads the
    backbone and the FPN only; both heads are built anew, and `init_heads` starts them as
    the from-scratch model's. Returns (detector, arch)."""
    socket.setdefaulttimeout(30)  # a dead network should fail in seconds, not hang
    try:
        # anchor_generator / label_encoder None: KerasHub's defaults, which are the preset's
        # anchors (P3-P7, size 4, 3 scales, ratios 0.5/1/2), built in our box format. The
        # preset's are yxyx, and when the label encoder's format differs from the model's,
        # compute_loss converts the batch's boxes in place, which fit() refuses ("should
        # not modify its Python input arguments").
        detector = keras_hub.models.RetinaNetObjectDetector.from_preset(
            COCO_PRESET, num_classes=num_classes, bounding_box_format=BOX_FORMAT,
            anchor_generator=None, label_encoder=None, prediction_decoder=decoder(cfg["min_score"]))
    except Exception as exc:
        raise UserError(_load_failure(exc)) from None
    _check_architecture(detector)
    # The tf.data pipeline squashes and normalises the photos itself, with the preset's own
    # mean and standard deviation (read here); KerasHub's preprocessor, which fit() and
    # predict() would apply on top, would pad and resize them to 800 px and normalise twice.
    converter = detector.preprocessor.image_converter
    arch = {"kind": "coco", "num_classes": num_classes, "image_size": cfg["image_size"],
            "min_score": cfg["min_score"],
            "scale": _as_list(converter.scale), "offset": _as_list(converter.offset)}
    detector.preprocessor = None
    # BatchNorm frozen (moving statistics and scale/offset kept): the preset's weights were
    # trained so (torchvision's RetinaNet uses FrozenBatchNorm2d), and batches of 8 photos
    # are too few to re-estimate ImageNet/COCO statistics.
    for layer in detector.backbone.image_encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    init_heads(detector, cfg["prior_probability"])
    return detector, arch


def coco_cache_folder() -> Path:
    """Where kagglehub keeps the preset's files ($KAGGLEHUB_CACHE, else ~/.cache/kagglehub):
    models/<owner>/<model>/<framework>/<variation>/<version>."""
    import kagglehub.config

    handle = keras_hub.models.RetinaNetObjectDetector.presets[COCO_PRESET]["kaggle_handle"]
    return Path(kagglehub.config.get_cache_folder(), "models", *handle.removeprefix("kaggle://").split("/"))


def _load_failure(exc: Exception) -> str:
    """One line for a preset that did not load: no network, or a damaged cached file."""
    import requests

    reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    folder = coco_cache_folder()
    if isinstance(exc, requests.RequestException | ConnectionError | TimeoutError) \
            or exc.__class__.__module__.startswith("kagglehub"):
        return (f"could not download KerasHub's COCO weights '{COCO_PRESET}' ({reason}); offline? "
                f"copy {folder} from a machine that has it, or train from scratch with --weights none")
    bad = next((path for path in sorted(folder.glob("*")) if not _readable(path)), None)
    return (f"{bad or folder}: the cached '{COCO_PRESET}' does not load ({reason}); "
            f"delete {folder} to download it again")


def _readable(path: Path) -> bool:
    """A cached preset file parses: JSON, or an HDF5 weights file."""
    import json

    import h5py

    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".h5":
            with h5py.File(path, "r") as weights:
                weights.visititems(lambda _, item: item[()] if isinstance(item, h5py.Dataset) else None)
        return True
    except (OSError, ValueError):
        return False


def _check_architecture(detector) -> None:
    """The cached config must be the preset's: a ResNet-50 (bottleneck, 3-4-6-3) FPN on P3-P7."""
    encoder, backbone = detector.backbone.image_encoder, detector.backbone
    found = (list(getattr(encoder, "stackwise_num_blocks", None) or []), getattr(encoder, "block_type", None),
             backbone.min_level, backbone.max_level)
    if found != ([3, 4, 6, 3], "bottleneck_block", 3, 7):
        raise UserError(f"{coco_cache_folder() / 'config.json'}: a RetinaNet with {found}, not "
                        f"'{COCO_PRESET}' (ResNet-50 FPN, P3-P7); delete {coco_cache_folder()} "
                        "to download it again")


def _as_list(value):
    if value is None:
        return 0.0
    return [float(v) for v in keras.ops.convert_to_numpy(value).reshape(-1)] \
        if hasattr(value, "shape") or isinstance(value, list | tuple) else float(value)


def compile_detector(detector, cfg: dict, steps_per_epoch: int) -> None:
    """AdamW with a linear warm-up and a cosine decay; RetinaNet's two losses. Under a
    tf.distribute strategy's scope, Keras clips each replica's share of the gradient:
    tf_strategy.clip_norm_per_replica keeps their sum within grad_clip."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(total - 1, max(1, cfg["warmup_epochs"] * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg["learning_rate"] / 100, decay_steps=max(1, total - warmup),
        alpha=0.01, warmup_target=cfg["learning_rate"], warmup_steps=warmup)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg["weight_decay"],
                                       global_clipnorm=tf_strategy.clip_norm_per_replica(
                                           cfg["grad_clip"], tf.distribute.get_strategy()))
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    # Smooth L1 (beta 0.1) summed over the 4 deltas, as Detectron's RetinaNet: KerasHub's
    # default Huber(delta=1) is averaged over them and gives small errors ~40x less pull.
    delta = 0.1
    detector.compile(
        optimizer=optimizer,
        box_loss=keras.losses.Huber(delta=delta, reduction="sum"),
        classification_loss=keras.losses.BinaryFocalCrossentropy(
            apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=True, reduction="sum"),
        loss_weights={"bbox_regression": 4 / delta, "cls_logits": 1.0})


# --- Inputs --------------------------------------------------------------------------


def model_input(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 HxWx3 (any size) -> float32 size x size x 3, 0..255: the photo squashed to a
    square with an antialiased bilinear resize. Training, evaluation and the SavedModel
    all go through this one function."""
    return tf.image.resize(tf.cast(image, tf.float32), (size, size), antialias=True)


def normalize(images: tf.Tensor, arch: dict) -> tf.Tensor:
    return images * tf.constant(arch["scale"], tf.float32) + tf.constant(arch["offset"], tf.float32)


# --- Export --------------------------------------------------------------------------


def detections(detector, arch: dict, images: tf.Tensor) -> dict[str, tf.Tensor]:
    """The OD API's detection outputs for a batch of uint8 photos (any size): each photo
    squashed and normalised as in training, RetinaNet, box decoding and per-class NMS.

        detection_boxes    float32 [B, N, 4]  normalised [ymin, xmin, ymax, xmax] in [0, 1]
        detection_scores   float32 [B, N]
        detection_classes  float32 [B, N]     label-map ids (from 1)
        num_detections     float32 [B]        how many of the N rows are detections

    N is the decoder's max_detections; rows past num_detections are padding. Normalised
    coordinates of the squashed square are those of the photo, whatever its shape."""
    size = arch["image_size"]
    batch = normalize(model_input(images, size), arch)
    found = detector.decode_predictions(detector(batch, training=False), batch)
    xyxy = found["boxes"] / size
    return {"detection_boxes": tf.clip_by_value(tf.gather(xyxy, [1, 0, 3, 2], axis=-1), 0.0, 1.0),
            "detection_scores": found["confidence"],
            "detection_classes": tf.cast(found["labels"], tf.float32) + 1.0,
            "num_detections": tf.cast(found["num_detections"], tf.float32)}


class ExportedDetector(tf.Module):
    """What the OD API's `exporter_main_v2.py` writes (input type image_tensor): a module
    whose `__call__`, also the `serving_default` signature, takes `input_tensor`, a uint8
    [1, H, W, 3] photo, and returns `detections(...)`. `detect_encoded` takes the photo's
    encoded bytes as a [1] string tensor (the API's encoded_image_string_tensor input)."""

    def __init__(self, detector, arch: dict):
        super().__init__(name="retinanet")
        self.model_variables = list(detector.variables)  # saved with the graph that reads them
        self._detect = lambda images: detections(detector, arch, images)

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
    def __call__(self, input_tensor):
        return self._detect(input_tensor)

    @tf.function(input_signature=[tf.TensorSpec([1], tf.string, name="input_tensor")])
    def detect_encoded(self, input_tensor):
        image = tf.io.decode_image(input_tensor[0], channels=3, expand_animations=False)
        return self._detect(image[None])


def export_saved_model(detector, arch: dict, path: str | os.PathLike, label_map: str | os.PathLike) -> Path:
    """Write the SavedModel (see ExportedDetector), atomically; label_map.pbtxt goes to
    assets.extra/, where TF Serving keeps a model's extra files."""
    module = ExportedDetector(detector, arch)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tf.io.gfile.rmtree(str(tmp))
    tf.saved_model.save(module, str(tmp), signatures={
        "serving_default": module.__call__.get_concrete_function(),
        "detect_encoded": module.detect_encoded.get_concrete_function()})
    (tmp / "assets.extra").mkdir(exist_ok=True)
    (tmp / "assets.extra" / "label_map.pbtxt").write_text(Path(label_map).read_text())
    if path.exists():
        tf.io.gfile.rmtree(str(path))
    tmp.rename(path)
    return path


# --- Device ------------------------------------------------------------------------------


def use_device(device: str, num_threads: int) -> tuple[str, str]:
    """Pick where TensorFlow runs, before it runs anything; returns (device, its name).

    "auto": the GPU when TensorFlow sees one, else the CPU; "cpu": GPUs hidden; "cuda": the
    GPU, or one line saying there is none. num_threads 0 keeps TensorFlow's default (all cores).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    gpus = tf.config.list_physical_devices("GPU")
    if device == "cuda" and not gpus:
        raise UserError("--device cuda: TensorFlow sees no GPU here (it needs the CUDA build "
                        "of TensorFlow and an NVIDIA driver); use --device cpu or auto")
    if num_threads:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)  # one op at a time: steadier steps
    if device == "cpu" or not gpus:
        tf.config.set_visible_devices([], "GPU")
        name = outputs.run_facts()["cpu"]
        print(f"TensorFlow runs on the CPU ({name}, {num_threads or usable_cores()} threads)")
        return "cpu", name
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    print(f"TensorFlow runs on the GPU ({name})")
    return "cuda", name

