"""The detector and its inference, shared by train.py, detect.py and analyse.py.

The model is torchvision's FCOS, built one of three ways (below). Beside it: choosing the
device, decoding photos into tensors with their boxes (`preload`), predicting boxes
(`predict`, `detect_photo`) and drawing them (`draw_boxes`).

Why FCOS: it is anchor-free (one point per feature-map cell predicts the distances to the
four box sides, plus a class and a "centerness" score), so there are no anchor sizes and
ratios to tune for 240 photos of round apples and long bananas, and it is a single stage
(no region proposals), which keeps a CPU epoch short. Its head already uses GroupNorm,
which does not care about the small batches a CPU affords.

- `--weights coco`: torchvision's FCOS ResNet-50 FPN trained on COCO (which has apple,
  banana and orange among its 80 classes), built as torchvision builds it for those weights
  (frozen BatchNorm: COCO's statistics are kept, as a batch of 8 is too few to re-estimate
  them; the stem and the first ResNet stage frozen), and its last classification layer
  replaced by a fresh one for our 3 classes (COCO's head tower is kept). The weights come
  through torch.hub's cache, `$TORCH_HOME/hub/checkpoints` (`~/.cache/torch/...`).
- `--weights none`: the same kind of model from random weights, made small enough to
  train on 2 CPU cores: ResNet-18 with trainable BatchNorm (a batch of 8+ images gives
  usable batch statistics), a 128-channel FPN on the coarse levels only (P4..P7, strides
  16..128: the fruit fill a large part of most photos, so the stride-8 level would cost
  the most compute for the fewest objects) and a 3-conv head.
- `--weights PATH`: a checkpoint written by train.py; its `arch` dict rebuilds the model.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.fcos import (
    FCOS_ResNet50_FPN_Weights,
    FCOSClassificationHead,
    FCOSRegressionHead,
)
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from data import outputs
from data.cli import UserError
from data.distributed import cores_per_process
from data.fruits import BOX_CLASSES, BOX_COLORS, FruitRecord
from data.images import read_rgb, resize_rgb

CLASS_NAMES = BOX_CLASSES  # FCOS has no background class: labels are 0..2


def scratch_arch(cfg: dict) -> dict:
    """Everything needed to rebuild a from-scratch model (stored in every checkpoint)."""
    return {"kind": "fcos_resnet18_scratch", "image_size": cfg["image_size"],
            "fpn_channels": cfg["fpn_channels"], "head_convs": cfg["head_convs"],
            "num_classes": len(CLASS_NAMES)}


def coco_arch(cfg: dict) -> dict:
    return {"kind": "fcos_resnet50_coco", "image_size": cfg["image_size"],
            "num_classes": len(CLASS_NAMES)}


def _common(arch: dict) -> dict:
    # Images arrive already resized to image_size x image_size, so the model's own resize
    # is a no-op. A low score threshold keeps the low-confidence boxes that mAP needs.
    size = arch["image_size"]
    return {"min_size": size, "max_size": size, "score_thresh": 0.05, "nms_thresh": 0.5,
            "detections_per_img": 100}


def build_model(arch: dict) -> nn.Module:
    """An untrained model for `arch` (weights come from COCO or a checkpoint, or not at all)."""
    if arch["kind"] == "fcos_resnet50_coco":
        model = coco_architecture(arch)
        _replace_classifier(model, arch["num_classes"])
        return model
    if arch["kind"] != "fcos_resnet18_scratch":
        raise UserError(f"unknown model kind {arch['kind']!r} in checkpoint")
    channels = arch["fpn_channels"]
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        body, return_layers={"layer3": "0", "layer4": "1"}, in_channels_list=[256, 512],
        out_channels=channels, extra_blocks=LastLevelP6P7(channels, channels))
    # One point per cell; the size sets the level's object-size range (FCOS assigns a box
    # to the level whose stride*4..stride*8 range holds its largest side distance).
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((1.0,),) * 4)
    model = FCOS(backbone, num_classes=arch["num_classes"], anchor_generator=anchors,
                 **_common(arch))
    head = model.head
    head.classification_head = FCOSClassificationHead(channels, 1, arch["num_classes"],
                                                      num_convs=arch["head_convs"])
    head.regression_head = FCOSRegressionHead(channels, 1, num_convs=arch["head_convs"])
    return model


COCO_WEIGHTS = FCOS_ResNet50_FPN_Weights.COCO_V1
PRIOR_PROBABILITY = 0.01  # the new classifier's starting score for every class (focal loss's prior)


def coco_architecture(arch: dict) -> nn.Module:
    """FCOS ResNet-50 FPN exactly as `fcos_resnet50_fpn(weights=COCO_V1)` builds it (frozen
    BatchNorm, trainable_layers=3), with COCO's 91 outputs, before any weights are loaded."""
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    return FCOS(backbone, num_classes=len(COCO_WEIGHTS.meta["categories"]), **_common(arch))


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """A fresh last classification layer for our classes, initialised as torchvision's FCOS
    initialises its own: weights N(0, 0.01^2), bias -log((1 - p) / p), so that every point
    starts at a score of p = 1% (the focal loss's prior: the first steps are not swamped by
    the background)."""
    head = model.head.classification_head
    head.cls_logits = nn.Conv2d(head.cls_logits.in_channels, head.num_anchors * num_classes,
                                kernel_size=3, padding=1)
    nn.init.normal_(head.cls_logits.weight, std=0.01)
    nn.init.constant_(head.cls_logits.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    head.num_classes = num_classes


def coco_weights_file() -> Path:
    """Where torch.hub keeps the downloaded COCO weights: $TORCH_HOME/hub/checkpoints/<url's name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(COCO_WEIGHTS.url).name


def coco_model(cfg: dict) -> tuple[nn.Module, dict]:
    """FCOS ResNet-50 FPN with COCO weights and a new 3-class classifier; fails in one line.

    torch.hub downloads the file once (checking its hash) and reads the cached copy after."""
    arch, cached = coco_arch(cfg), coco_weights_file()
    fix = "delete it to download it again"
    was_cached = cached.is_file()
    socket.setdefaulttimeout(30)  # a dead network should fail in seconds, not hang
    try:
        state = COCO_WEIGHTS.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, timeouts, a damaged cached file
        if was_cached:
            raise UserError(f"{cached}: cannot read the cached COCO weights "
                            f"({exc.__class__.__name__}); {fix}") from None
        raise UserError(
            f"could not download torchvision's COCO weights to {cached} ({exc.__class__.__name__}: "
            f"{exc}); offline? copy that file from a machine with internet, train from scratch "
            "with --weights none, or give a checkpoint with --weights PATH") from None
    model = coco_architecture(arch)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:  # other keys or shapes, not a dict
        raise UserError(f"{cached}: not torchvision's FCOS ResNet-50 FPN COCO weights "
                        f"({' '.join(str(exc).split())[:200]}...); {fix}") from None
    _replace_classifier(model, arch["num_classes"])
    return model, arch


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(checkpoint, dict) or "arch" not in checkpoint or "model" not in checkpoint:
        raise UserError(f"{path}: not a checkpoint written by 03b_xml_detection/train.py")
    return checkpoint


def load_checkpoint_model(path: str | Path, use_ema: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the model stored in a train.py checkpoint (EMA weights when present)."""
    checkpoint = read_checkpoint(path)
    arch = checkpoint["arch"]
    model = build_model(arch)
    state = checkpoint.get("ema") if use_ema and checkpoint.get("ema") else checkpoint["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    return model, arch


def make_model(weights: str, cfg: dict) -> tuple[nn.Module, dict]:
    """Resolve --weights: 'coco', 'none', or a checkpoint path."""
    if weights == "coco":
        return coco_model(cfg)
    if weights == "none":
        arch = scratch_arch(cfg)
        return build_model(arch), arch
    model, arch = load_checkpoint_model(weights)
    if arch["image_size"] != cfg["image_size"]:
        arch = {**arch, "image_size": cfg["image_size"]}
        model.transform.min_size = (cfg["image_size"],)
        model.transform.max_size = cfg["image_size"]
    return model, arch


def fp32_outside_the_network(model: nn.Module) -> nn.Module:
    """Under bf16 autocast, keep FCOS's losses and box decoding in float32.

    Autocast runs the convolutions in bfloat16, whose 8-bit mantissa cannot hold a box
    side of 300 px to the pixel; the losses (focal, GIoU, centerness) and the decoding of
    boxes from the head's outputs therefore get float32 copies of those outputs. A no-op
    when autocast is off (float32 tensors are passed through as they are). Call it on each
    copy of the model (the EMA's too): the wrappers hold that copy's own methods.
    """
    compute_loss, postprocess = model.compute_loss, model.postprocess_detections

    def loss_fp32(targets, head_outputs, anchors, num_anchors_per_level):
        with torch.autocast("cuda", enabled=False):
            head_outputs = {k: v.float() for k, v in head_outputs.items()}
            anchors = [a.float() for a in anchors]  # built in the features' dtype
            return compute_loss(targets, head_outputs, anchors, num_anchors_per_level)

    def postprocess_fp32(head_outputs, anchors, image_sizes):
        with torch.autocast("cuda", enabled=False):
            head_outputs = {k: [v.float() for v in vs] for k, vs in head_outputs.items()}
            # Here each image's anchors come split by pyramid level: a list of tensors.
            anchors = [[level.float() for level in per_image] for per_image in anchors]
            return postprocess(head_outputs, anchors, image_sizes)

    model.compute_loss, model.postprocess_detections = loss_fp32, postprocess_fp32
    return model


def foreground_over_processes(model: nn.Module, ddp) -> nn.Module:
    """Under DDP, divide FCOS's losses by the foreground points of the whole global batch.

    FCOS divides each loss by the number of foreground points (points inside a box) of its
    batch; under DDP each process would count only its own slice, and the averaged gradient
    would weigh a slice with few fruit up. Scaled by (own count) / (mean count over the
    processes), as detectron2 does, N processes' averaged gradient is one process's over
    the whole batch. A no-op in a world of one. `ddp`: a parallel.torch_ddp.Processes."""
    if ddp.size == 1:
        return model
    compute_loss = model.head.compute_loss

    def loss_over_processes(targets, head_outputs, anchors, matched_idxs):
        own = sum(int((matched >= 0).sum()) for matched in matched_idxs)
        (total,) = ddp.sum([own])
        scale = max(1, own) * ddp.size / max(1, total)  # torchvision divided by max(1, own)
        losses = compute_loss(targets, head_outputs, anchors, matched_idxs)
        return {key: value * scale for key, value in losses.items()}

    model.head.compute_loss = loss_over_processes
    return model


# --- Device ------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA when PyTorch sees a GPU, else the CPU), 'cpu' or 'cuda'."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here "
                        "(torch.cuda.is_available() is False); use --device cpu or --device auto")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def set_threads(num_threads: int) -> int:
    """CPU threads for PyTorch's own kernels (0 = every core this process may use, shared
    among the processes torchrun starts on this machine)."""
    threads = num_threads or cores_per_process()
    torch.set_num_threads(threads)
    return threads


# --- Photos and boxes ----------------------------------------------------------------


class Photos(NamedTuple):
    """Decoded photos: (N,3,S,S) uint8 images, and per photo its boxes (K,4) and labels (K,)."""
    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]

    def truth(self) -> list[dict]:
        """Ground truth in the numpy form `data.detection_eval` scores against."""
        return [{"boxes": b.numpy(), "labels": lab.numpy()}
                for b, lab in zip(self.boxes, self.labels, strict=True)]


def preload(records: list[FruitRecord], size: int, desc: str) -> Photos:
    """Decode every photo once, squashed to size x size, its boxes scaled per axis."""
    images, boxes, labels = [], [], []
    for record in tqdm(records, desc=desc, leave=False):
        pixels = resize_rgb(read_rgb(record.image_path), (size, size))
        images.append(torch.tensor(pixels).permute(2, 0, 1).contiguous())
        scale = np.array([size / record.width, size / record.height] * 2, dtype=np.float32)
        boxes.append(torch.from_numpy(record.boxes * scale))
        labels.append(torch.tensor([BOX_CLASSES.index(n) for n in record.box_labels]))
    return Photos(torch.stack(images), boxes, labels)


# --- Inference -----------------------------------------------------------------------


def predict(model: nn.Module, images: torch.Tensor, device: torch.device,
            batch_size: int = 8) -> list[dict]:
    """Boxes, labels and scores (numpy) for (N,3,S,S) uint8 images, in S x S pixels.

    Always float32, also on a GPU: the ranking of the scores decides the mAP."""
    model.eval()
    results = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device).float() / 255
            for out in model(list(batch)):
                results.append({k: v.cpu().numpy() for k, v in out.items()})
    return results


def detect_photo(model: nn.Module, image: np.ndarray, size: int, device: torch.device) -> dict:
    """Detections for one RGB uint8 image of any size, in its own pixel coordinates."""
    height, width = image.shape[:2]
    pixels = torch.tensor(resize_rgb(image, (size, size))).permute(2, 0, 1)
    (found,) = predict(model, pixels[None], device)
    found["boxes"] = found["boxes"] * np.array([width / size, height / size] * 2, dtype=np.float32)
    return found


def draw_boxes(image: np.ndarray, boxes, labels, scores=None) -> np.ndarray:
    """Fruit boxes with 'class score' captions on an RGB uint8 image."""
    return outputs.draw_boxes(image, boxes, labels, CLASS_NAMES, scores, BOX_COLORS)
