"""The torch pieces train.py's training loop is built from.

`make_model` (the segmenter to train, on its device), `segmentation_loss` (cross-entropy +
Dice), `make_schedule` (AdamW, linear warm-up, cosine decay), `make_ema` (an average of the
weights, updated each step; off by default), `uses_bf16` (bf16 autocast where it pays), the
records `Running` (the training loss and IoU) and `History` (what curves.png draws), the
`Fit` record that holds what every step needs, `epoch_batches` (this process's slice of each
global batch under torchrun) and `evaluate` (pooled scores of a set of photos, shared with
evaluate.py). The train step, the epoch, validation and the rule that keeps the best epoch
are in train.py, which imports this module after parsing its flags, so `--help` never waits
for torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from matting import uncertain_share  # the chapter's own modules sit beside this one
from scoring import Scores, score_photo
from segmenters import build_model, cpu_has_bf16, prepare_model, probability_at_size
from torch import nn
from torch.optim.swa_utils import AveragedModel

from data import distributed
from parallel import torch_ddp

# --- Model --------------------------------------------------------------------------------


def make_model(cfg: dict, device: torch.device) -> tuple[nn.Module, dict]:
    """The model to train, on `device`; returns (model, the kwargs that rebuild it)."""
    model_kwargs = {"width": cfg["width"]} if cfg["model"] == "unet" else {}
    model = build_model(cfg["model"], num_classes=2, pretrained=cfg["weights"] == "coco", **model_kwargs)
    return prepare_model(model, device), model_kwargs


def uses_bf16(cfg: dict, device: torch.device) -> bool:
    """bf16 autocast for training where it is safe and pays: a CUDA GPU that supports bf16, or
    a CPU with bf16 units (segmenters.cpu_has_bf16). Inference stays float32 everywhere."""
    if not cfg["mixed_precision"]:
        return False
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


# --- Loss, schedule and the weight EMA ------------------------------------------------------


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Cross-entropy per pixel, plus Dice (1 - soft overlap): Dice optimizes what IoU measures."""
    loss = F.cross_entropy(logits, target)
    if dice_weight:
        person = logits.softmax(1)[:, 1]
        truth = target.float()
        dice = 1 - (2 * (person * truth).sum() + 1) / (person.sum() + truth.sum() + 1)
        loss = loss + dice_weight * dice
    return loss


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor at `step`: a linear ramp to 1 over the warm-up, under a cosine
    that falls from 1 at step 0 to 0 at `total_steps` (the smaller of the two)."""
    ramp = (step + 1) / max(warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
    return min(ramp, cosine)


def make_schedule(model: nn.Module, cfg: dict, steps_per_epoch: int):
    """AdamW at the peak rate, scaled each step by `warmup_cosine`."""
    total, warmup = cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"],
                                  weight_decay=cfg["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
    return optimizer, schedule


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA's decay after `step` updates: (1 + step) / (10 + step), capped at `decay`
    (tf.train.ExponentialMovingAverage's rule), so the first updates follow the fast-moving
    weights closely instead of dragging the random initial ones along."""
    return min(decay, (1 + step) / (10 + step))


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the weights and the BatchNorm statistics (use_buffers),
    updated after each optimizer step: a smoother model than the last step's."""
    def update(averaged: list, current: list, count: torch.Tensor) -> None:
        keep = ema_decay_at(int(count), decay)
        for average, new in zip(averaged, current, strict=True):
            if average.is_floating_point():
                average.lerp_(new, 1 - keep)
            else:  # BatchNorm's batch counter: the latest count
                average.copy_(new)

    return AveragedModel(model, use_buffers=True, multi_avg_fn=update)


# --- Records: the running scores and the curves -------------------------------------------


@dataclass
class Running:
    """Training loss and IoU summed over the batches since the last validation pass."""

    loss: float = 0.0
    batches: int = 0
    intersection: int = 0
    union: int = 0

    def add(self, loss: float, predicted: torch.Tensor, target: torch.Tensor) -> None:
        self.loss += loss
        self.batches += 1
        self.intersection += (predicted & target).sum().item()
        self.union += (predicted | target).sum().item()


@dataclass
class History:
    """One entry per validation pass: what curves.png draws."""

    loss: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    val_iou: list[float] = field(default_factory=list)
    val_boundary_f1: list[float] = field(default_factory=list)
    val_close_up_iou: list[float] = field(default_factory=list)

    def add(self, running: Running, val: Scores, close_ups: Scores) -> None:
        self.loss.append(running.loss / max(running.batches, 1))
        self.iou.append(running.intersection / max(running.union, 1))
        self.val_iou.append(val.iou)
        self.val_boundary_f1.append(val.boundary_f1)
        self.val_close_up_iou.append(close_ups.iou)


# --- The fit: what every training step needs ----------------------------------------------


@dataclass
class Fit:
    """What every training step needs: the model, its optimizer and schedule, where it runs."""

    model: nn.Module
    stepped: nn.Module  # what the steps run: the model in DDP under torchrun, else the model
    ddp: torch_ddp.Processes  # this process among the run's (a world of one without torchrun)
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    mixed_precision: bool  # bf16 autocast of the forward pass (uses_bf16)
    dice_weight: float
    ema: AveragedModel | None = None  # the averaged weights (--ema-decay above 0)

    @property
    def scored(self) -> nn.Module:
        """The model validation scores and the best state keeps: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model


def make_fit(model: nn.Module, cfg: dict, num_photos: int, device: torch.device,
             ddp: torch_ddp.Processes | None = None) -> Fit:
    """The training record; `ddp`: this process among torchrun's (None: a world of one)."""
    ddp = ddp or torch_ddp.Processes(distributed.World(), device)
    steps_per_epoch = len(epoch_batches(np.arange(num_photos), cfg["batch_size"], ddp))
    optimizer, schedule = make_schedule(model, cfg, steps_per_epoch)
    ema = make_ema(model, cfg["ema_decay"]) if cfg["ema_decay"] > 0 else None
    return Fit(model, ddp.wrap(model), ddp, optimizer, schedule, device, uses_bf16(cfg, device),
               cfg["dice_weight"], ema)


def epoch_batches(order: np.ndarray, batch_size: int, ddp: torch_ddp.Processes) -> list[np.ndarray]:
    """This process's photos of each global batch cut from `order`: each batch split over the
    processes (data.distributed). torch 2.14.1's channels-last conv backward on CPU segfaults
    on odd batch sizes (measured): a short last batch keeps a multiple of 2 photos per
    process (the rest are seen next epoch)."""
    return distributed.split_batches(order, batch_size, ddp.world, short_multiple=2 * ddp.size)


# --- Evaluate: what validation, the test figures and evaluate.py score --------------------


def evaluate(model: nn.Module, photos: list, cfg: dict, device: torch.device,
             keep_masks: bool = False) -> Scores:
    """Each photo predicted at the working size, scored at its full size (see scoring.py)."""
    model.eval()
    scores = Scores()
    for photo in photos:
        probability = probability_at_size(model, photo.image, photo.full_mask.shape, person_class=1,
                                          flip=cfg["flip_tta"], device=device)
        predicted = probability > 0.5
        scores.photos.append(score_photo(predicted, photo.full_mask, cfg["boundary_tolerance"],
                                         uncertain_share(probability)))
        if keep_masks:
            scores.masks.append(predicted)
    return scores
