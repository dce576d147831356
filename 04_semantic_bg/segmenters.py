"""The segmentation models of chapter 04, and the checkpoint format both scripts share.

- `unet`: a small residual U-Net that trains from scratch on a CPU (train.py's default).
- `lraspp_mobilenet_v3_large`, `deeplabv3_resnet50`, `deeplabv3_resnet101`: torchvision's
  models, with their COCO weights (21 VOC classes; person is class 15) or random init.

A checkpoint is a dict that says how to rebuild its model (`arch`, `num_classes`,
`model_kwargs`), which output channel is the person, and at what resolution the model
was trained, so composite.py can load whatever train.py wrote. It also holds what both
scripts share at run time: the device and thread choice, and inference (a photo in, a
person probability out). Imported by train.py, fitting.py and composite.py; the scripts
import it only after parsing their flags, so `--help` and flag errors stay fast.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from matting import fit_longest_side  # the chapter's own modules sit beside this one
from torch import nn

from data.cli import UserError
from data.distributed import cores_per_process
from data.outputs import atomic_path

TORCHVISION_ARCHS = ("lraspp_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101")
ARCHS = ("unet", *TORCHVISION_ARCHS)
VOC_PERSON = 15  # index of "person" in the 21 VOC labels of the COCO_WITH_VOC_LABELS_V1 weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "dl-study/04_semantic_bg/v1"
CPU = torch.device("cpu")
COCO_WORKING_SIZE = 640  # longest side; close to torchvision's 520-px shorter side on a 4:3 photo


# --- Device and threads ------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """"auto": CUDA when torch sees a GPU, else the CPU; "cuda" without one is a user error."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise UserError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU on this machine; "
                        "use --device cpu (or auto)")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16). There bf16
    autocast speeds training up (04's runs on a 2-core Xeon with AMX: 6.4 s an epoch with
    validation every 10, against 7.5-9.7 s in float32 with validation every 5); elsewhere
    training stays in float32 (bf16 without such units was not measured)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: absent = no
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def set_threads(num_threads: int) -> None:
    """torch's CPU threads; 0 means every core this process may use (shared among the
    processes torchrun starts on this machine)."""
    torch.set_num_threads(num_threads or cores_per_process())


def start_torch(device_choice: str, num_threads: int, seed: int, deterministic: bool = True) -> torch.device:
    """Pick the device, set the threads, seed torch. On the CPU, `deterministic` makes a run
    repeat exactly for a seed. A GPU run is never bit-exact: the backward pass of bilinear
    upsampling has no deterministic CUDA kernel, so there cuDNN may pick its fastest kernels."""
    device = pick_device(device_choice)
    set_threads(num_threads)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(deterministic)
    else:
        torch.backends.cudnn.benchmark = True  # training crops have one shape: tuned once
    return device


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """On the device, channels-last in memory: ~1.7x faster convolutions on a CPU, and the
    layout tensor cores prefer on a GPU."""
    return model.to(device=device, memory_format=torch.channels_last)


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
    weights (downloading them once, see `coco_weights_file`); it raises UserError when they
    cannot be downloaded or the cached file cannot be used."""
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
    model = _coco_model(arch, builder, weights_enum.COCO_WITH_VOC_LABELS_V1)
    model.aux_classifier = None  # DeepLabV3's auxiliary head: unused here, so not kept
    if num_classes == 2:
        _person_head_from_voc(model, arch)
    return LogitsOnly(model)


def coco_weights_file(weights) -> Path:
    """Where torch.hub keeps the file of `weights` (a torchvision Weights enum member) once
    downloaded: $TORCH_HOME/hub/checkpoints/ (~/.cache/torch/hub/checkpoints/ by default),
    under the file name of its URL. Copied there on an offline machine, it is used as is:
    torch.hub checks a file's hash only while downloading it."""
    from urllib.parse import urlparse

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _coco_model(arch: str, builder, weights) -> nn.Module:
    """torchvision's `builder(weights=weights)`: the COCO model, its file downloaded once into
    torch.hub's cache. Every failure is one line: a cached file that cannot be used (corrupt, or
    another model's weights) is named, to be deleted and downloaded again; else the download failed."""
    try:
        return builder(weights=weights)
    except Exception as exc:  # URLError, HTTPError, OSError, hash mismatch, unpickling, wrong keys
        lines = str(exc).strip().splitlines()
        reason = lines[0][:120] if lines else exc.__class__.__name__
        cached = coco_weights_file(weights)
        if cached.is_file():
            wrong_model = reason.startswith("Error(s) in loading state_dict")  # load_state_dict's words
            problem = ("holds weights that do not fit the model" if wrong_model
                       else f"is not a readable weights file ({reason})")
            raise UserError(f"{cached} {problem}: it is not torchvision's {arch} COCO file; delete it, "
                            "and the next run downloads it again") from None
        raise UserError(
            f"could not download the COCO weights for {arch} ({reason}); offline, copy "
            f"{cached.name} from a machine that has it into {cached.parent}, or train a model with "
            "04_semantic_bg/train.py --weights none and give composite.py its model.pt as "
            "--weights PATH") from None


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


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy array as a tensor on `device`; to a GPU from pinned memory, without blocking."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def to_tensor(images: np.ndarray, device: torch.device = CPU) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> ImageNet-normalized (N, 3, H, W) float, channels-last in memory.
    The bytes travel to the device as uint8 (4x less to copy) and are normalized there."""
    x = to_device(images, device).float().div_(255)
    x = (x - torch.tensor(IMAGENET_MEAN, device=device)) / torch.tensor(IMAGENET_STD, device=device)
    return x.permute(0, 3, 1, 2)  # a permuted NHWC tensor *is* channels-last: no copy


def person_probability(model: nn.Module, image: np.ndarray, person_class: int = 1,
                       flip: bool = False, device: torch.device = CPU) -> np.ndarray:
    """(h, w) float32 probability of `person_class` for one (h, w, 3) uint8 photo.

    The photo is reflect-padded to the model's stride multiple and cropped back;
    `flip` averages with the mirrored photo's prediction (test-time augmentation).
    """
    multiple = getattr(model, "multiple", 1)
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="reflect")
    batch = np.stack([padded, padded[:, ::-1]]) if flip else padded[None]
    with torch.inference_mode():
        person = model(to_tensor(batch, device)).float().softmax(1)[:, person_class].cpu().numpy()
    probability = (person[0] + person[1][:, ::-1]) / 2 if flip else person[0]
    return np.ascontiguousarray(probability[:height, :width], dtype=np.float32)


def probability_at_size(model: nn.Module, small_image: np.ndarray, full_size: tuple[int, int],
                        person_class: int = 1, flip: bool = False,
                        device: torch.device = CPU) -> np.ndarray:
    """Person probability (H, W) at a photo's full size, from its working-size version.
    Bilinear upsampling of the *probability* (not of a 0/1 mask) keeps the edge smooth."""
    probability = person_probability(model, small_image, person_class, flip, device)
    return cv2.resize(probability, (full_size[1], full_size[0]), interpolation=cv2.INTER_LINEAR)


def segment_photo(model: nn.Module, image: np.ndarray, person_class: int, working_size: int,
                  device: torch.device = CPU) -> np.ndarray:
    """Person probability (H, W) at a photo's full size, from a pass at the working size
    (its longest side = working_size)."""
    height, width = image.shape[:2]
    small_height, small_width = fit_longest_side(height, width, working_size)
    small = cv2.resize(image, (small_width, small_height), interpolation=cv2.INTER_AREA)
    return probability_at_size(model, small, (height, width), person_class, device=device)


def load_segmenter(weights: str, arch: str, working_size: int) -> tuple[nn.Module, int, int, str]:
    """For inference: (model, person channel, working size, description). `weights` is coco,
    random (untrained: to time a model or smoke-test the plumbing), or a train.py checkpoint;
    working_size 0 picks the model's own (640 for COCO, the training size for a checkpoint)."""
    if weights == "coco":
        model = build_model(arch, num_classes=21, pretrained=True).eval()
        return model, VOC_PERSON, working_size or COCO_WORKING_SIZE, f"{arch} (COCO)"
    if weights == "random":
        model = build_model(arch, num_classes=2).eval()
        size = working_size or (320 if arch == "unet" else COCO_WORKING_SIZE)
        return model, 1, size, f"{arch} (random init)"
    model, checkpoint = load_checkpoint(Path(weights))
    size = working_size or checkpoint["image_size"]
    return model, checkpoint["person_class"], size, f"{checkpoint['arch']} ({weights})"


# --- Checkpoints ----------------------------------------------------------------------


def save_checkpoint(path: Path, model: nn.Module, arch: str, num_classes: int, person_class: int,
                    image_size: int, model_kwargs: dict, **extra) -> Path:
    """Write atomically: an interrupted run never leaves a half-written .pt behind."""
    state = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes,
             "person_class": person_class, "image_size": image_size,
             "model_kwargs": model_kwargs,
             "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, **extra}
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
