"""The segmentation models of chapter 04, and the checkpoint format both scripts share.

- `unet`: a small residual U-Net that trains from scratch on a CPU (train.py's default).
- `lraspp_mobilenet_v3_large`, `deeplabv3_resnet50`, `deeplabv3_resnet101`: torchvision's
  models, with their COCO weights (21 VOC classes; person is class 15) or random init.

A checkpoint is a dict that says how to rebuild its model (`arch`, `num_classes`,
`model_kwargs`), which output channel is the person, and at what resolution the model
was trained, so composite.py can load whatever train.py wrote. Imported by
train.py and composite.py (torch is imported by them first, after argument parsing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.cli import UserError
from data.outputs import atomic_path

TORCHVISION_ARCHS = ("lraspp_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101")
ARCHS = ("unet", *TORCHVISION_ARCHS)
VOC_PERSON = 15  # index of "person" in the 21 VOC labels of the COCO_WITH_VOC_LABELS_V1 weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "dl-study/04_semantic_bg/v1"


# --- A small U-Net --------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU with a shortcut: trains from scratch more steadily than plain convs."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else \
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class PoolingContext(nn.Module):
    """Adds image-level context at the bottleneck (as in PSPNet/ASPP): a person is tall,
    and whether a blob is a leg or a lamp post depends on what is far above it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.project(F.adaptive_avg_pool2d(x, 1))
        return x + pooled.expand_as(x)


class UNet(nn.Module):
    """Encoder of residual blocks (stride 2 each level), decoder with skip connections.

    `stem_stride=2` runs the first level at half resolution and upsamples the logits at
    the end: on a CPU the full-resolution layers cost the most and add little for masks.
    """

    def __init__(self, num_classes: int = 2, width: int = 16, levels: int = 5,
                 stem_stride: int = 2) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(levels)]
        self.stem_stride = stem_stride
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.encoder = nn.ModuleList(
            [ResidualBlock(widths[0], widths[0])]
            + [ResidualBlock(widths[i - 1], widths[i], stride=2) for i in range(1, levels)])
        self.context = PoolingContext(widths[-1])
        self.decoder = nn.ModuleList(
            [ResidualBlock(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels - 1))])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def multiple(self) -> int:
        """Input sides must be a multiple of this (the total downsampling)."""
        return self.stem_stride * 2 ** (len(self.encoder) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        skips = []
        x = self.stem(x)
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = self.context(skips.pop())
        for block in self.decoder:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        x = self.head(x)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


# --- Building any of the four ---------------------------------------------------------


def _torchvision_builder(arch: str):
    from torchvision.models import segmentation

    enum_names = {"lraspp_mobilenet_v3_large": "LRASPP_MobileNet_V3_Large_Weights",
                  "deeplabv3_resnet50": "DeepLabV3_ResNet50_Weights",
                  "deeplabv3_resnet101": "DeepLabV3_ResNet101_Weights"}
    return getattr(segmentation, arch), getattr(segmentation, enum_names[arch])


def _person_head_from_voc(model: nn.Module, arch: str) -> None:
    """Cut the 21-class VOC head down to 2 classes (background, person), keeping the
    trained rows 0 and 15: fine-tuning starts from a model that already finds people."""
    rows = torch.tensor([0, VOC_PERSON])
    heads = ([model.classifier.low_classifier, model.classifier.high_classifier]
             if arch.startswith("lraspp") else [model.classifier[4]])
    for conv in heads:
        conv.weight = nn.Parameter(conv.weight.detach()[rows].clone())
        conv.bias = nn.Parameter(conv.bias.detach()[rows].clone())
        conv.out_channels = 2


def build_model(arch: str, num_classes: int = 2, pretrained: bool = False,
                **model_kwargs) -> nn.Module:
    """A model whose forward returns logits (N, C, H, W). `pretrained` loads the COCO
    weights (downloading them once); it raises UserError when they cannot be fetched."""
    if arch not in ARCHS:
        raise UserError(f"unknown model '{arch}' (choose from {', '.join(ARCHS)})")
    if arch == "unet":
        if pretrained:
            raise UserError("the U-Net has no pretrained weights: use --weights none, or a "
                            f"--model from {', '.join(TORCHVISION_ARCHS)}")
        return UNet(num_classes=num_classes, **model_kwargs)
    builder, weights_enum = _torchvision_builder(arch)
    if not pretrained:  # weights_backbone=None: no ImageNet download for a random init
        return LogitsOnly(builder(weights=None, weights_backbone=None, num_classes=num_classes))
    try:
        model = builder(weights=weights_enum.COCO_WITH_VOC_LABELS_V1)
    except Exception as exc:  # URLError, HTTPError, OSError, hash mismatch: all mean "no weights"
        reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise UserError(
            f"could not download the COCO weights for {arch} ({reason}); offline, train a model "
            "with 04_semantic_bg/train.py --weights none and give composite.py its model.pt "
            "as --weights PATH") from None
    model.aux_classifier = None  # DeepLabV3's auxiliary head: unused here, so not kept
    if num_classes == 2:
        _person_head_from_voc(model, arch)
    return LogitsOnly(model)


class LogitsOnly(nn.Module):
    """torchvision segmentation models return {'out': ...}: make them return the tensor,
    as the U-Net does. They upsample to the input size themselves, so any size works."""

    multiple = 1

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- Inference ------------------------------------------------------------------------


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> ImageNet-normalized (N, 3, H, W) float, channels-last in memory."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2)  # a permuted NHWC tensor *is* channels-last: no copy


def person_probability(model: nn.Module, image: np.ndarray, person_class: int = 1,
                       flip: bool = False) -> np.ndarray:
    """(h, w) float32 probability of `person_class` for one (h, w, 3) uint8 photo.

    The photo is reflect-padded to the model's stride multiple and cropped back;
    `flip` averages with the mirrored photo's prediction (test-time augmentation).
    """
    multiple = getattr(model, "multiple", 1)
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="reflect")
    batch = np.stack([padded, padded[:, ::-1]]) if flip else padded[None]
    with torch.inference_mode():
        person = model(to_tensor(batch)).softmax(1)[:, person_class].numpy()
    probability = (person[0] + person[1][:, ::-1]) / 2 if flip else person[0]
    return np.ascontiguousarray(probability[:height, :width], dtype=np.float32)


# --- Checkpoints ----------------------------------------------------------------------


def save_checkpoint(path: Path, model: nn.Module, arch: str, num_classes: int, person_class: int,
                    image_size: int, model_kwargs: dict, **extra) -> Path:
    """Write atomically: an interrupted run never leaves a half-written .pt behind."""
    state = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes,
             "person_class": person_class, "image_size": image_size,
             "model_kwargs": model_kwargs, "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes; returns (model in eval mode, checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint written by 04_semantic_bg/train.py")
    model = build_model(checkpoint["arch"], checkpoint["num_classes"], **checkpoint["model_kwargs"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit {checkpoint['arch']} "
                        f"({str(exc).splitlines()[0]})") from None
    return model.eval(), checkpoint
