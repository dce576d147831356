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
- `model.export()` saves only the raw forward pass (deltas and logits): no resizing, no
  box decoding, no NMS. `export_saved_model` below puts all of these in the graph.
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


def decoder(min_score: float, max_detections: int = 100):
    # A low score threshold keeps the low-confidence boxes that mAP needs (KerasHub's
    # default of 0.5 would cut the precision-recall curve short). Class-agnostic NMS at IoU 0.5.
    return keras_hub.layers.NonMaxSuppression(
        bounding_box_format=BOX_FORMAT, from_logits=True, iou_threshold=0.5,
        confidence_threshold=min_score, max_detections=max_detections)


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
    """KerasHub's COCO RetinaNet (ResNet-50 FPN) with a new head for our classes.
    Offline, it stops at once with one line naming --weights none."""
    socket.setdefaulttimeout(30)  # a dead network should fail in seconds, not hang
    try:
        detector = keras_hub.models.RetinaNetObjectDetector.from_preset(
            COCO_PRESET, num_classes=num_classes, bounding_box_format=BOX_FORMAT,
            prediction_decoder=decoder(cfg["min_score"]))
    except Exception as exc:  # no network, no Kaggle access, a truncated download
        reason = str(exc).splitlines()[0][:100] if str(exc) else ""
        raise UserError(f"could not load KerasHub's COCO weights '{COCO_PRESET}' "
                        f"({exc.__class__.__name__}: {reason}); offline? train from scratch "
                        "with --weights none") from None
    converter = detector.preprocessor.image_converter
    arch = {"kind": "coco", "num_classes": num_classes, "image_size": cfg["image_size"],
            "min_score": cfg["min_score"],
            "scale": _as_list(converter.scale), "offset": _as_list(converter.offset)}
    return detector, arch


def _as_list(value):
    if value is None:
        return 0.0
    return [float(v) for v in keras.ops.convert_to_numpy(value).reshape(-1)] \
        if hasattr(value, "shape") or isinstance(value, list | tuple) else float(value)


def compile_detector(detector, cfg: dict, steps_per_epoch: int) -> None:
    """AdamW with a linear warm-up and a cosine decay; RetinaNet's two losses."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(total - 1, max(1, cfg["warmup_epochs"] * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg["learning_rate"] / 100, decay_steps=max(1, total - warmup),
        alpha=0.01, warmup_target=cfg["learning_rate"], warmup_steps=warmup)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg["weight_decay"],
                                       global_clipnorm=cfg["grad_clip"])
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


def export_saved_model(detector, arch: dict, path: str | os.PathLike, label_map: str | os.PathLike) -> Path:
    """A SavedModel that stands alone: uint8 image (or encoded bytes) in, boxes in the
    photo's pixels, 1-based class ids (as in the label map) and scores out; resizing,
    normalisation, box decoding and NMS are in the graph. label_map.pbtxt goes to
    assets.extra/, where TF Serving keeps a model's extra files."""
    size = arch["image_size"]

    def detect(image):
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        batch = normalize(model_input(image, size), arch)[None]
        found = detector.decode_predictions(detector(batch, training=False), batch)
        count = tf.cast(found["num_detections"][0], tf.int32)
        scale = tf.cast(tf.stack([width, height, width, height]), tf.float32) / size
        return {"boxes": found["boxes"][0, :count] * scale,
                "classes": tf.cast(found["labels"][0, :count], tf.int32) + 1,
                "scores": found["confidence"][0, :count]}

    def detect_encoded(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return detect(image)

    archive = keras.export.ExportArchive()
    archive.track(detector)
    archive.add_endpoint("serving_default", detect,
                         input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")])
    archive.add_endpoint("detect_encoded", detect_encoded,
                         input_signature=[tf.TensorSpec([], tf.string, name="encoded_image")])
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tf.io.gfile.rmtree(str(tmp))
    archive.write_out(str(tmp), verbose=False)
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

