"""How train.py fits and measures the segmenter: loss, schedule, epochs, validation, best state.

One job per function: `make_schedule` (AdamW, linear warm-up, cosine decay), `make_ema`
(an average of the weights, updated each step; off by default), `train_step` (one batch),
`run_epoch` (one pass over the shuffled training photos), `evaluate` (pooled scores of a
set of photos), `validate` (the whole val photos and their close-ups), and
`train`, which strings them together and keeps the state of the epoch with the best
`selection_score`. train.py imports this module after parsing its flags, so `--help`
never waits for torch.

Under torchrun (parallel.torch_ddp) each process steps on its slice of every global batch
(data.distributed) with the model in DDP, the losses and the running IoU are summed over
the processes, and rank 0 alone validates and keeps the best state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from matting import uncertain_share  # the chapter's own modules sit beside this one
from scoring import Scores, score_photo
from segmenters import (
    build_model,
    cpu_has_bf16,
    prepare_model,
    probability_at_size,
    to_device,
    to_tensor,
)
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from data import distributed
from data.cli import UserError
from parallel import torch_ddp

# (N, 2) keys (epoch, index of a training photo) -> (images (N, h, w, 3) uint8, masks (N, h, w) uint8):
# augmented views, each drawn from its key alone (so any process draws the same view)
MakeViews = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

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


# --- Loss and schedule ------------------------------------------------------------------


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


# --- Records ------------------------------------------------------------------------------


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


def selection_score(val: Scores, close_ups: Scores) -> float:
    """What picks the epoch kept: the mean of the val person IoU (whole street photos) and
    the val close-up IoU (portrait crops of the same photos). Either alone would let the
    chosen epoch give up one scale for the other; the mean weighs both uses equally."""
    return (val.iou + close_ups.iou) / 2


@dataclass
class Best:
    """The epoch with the highest `selection_score` so far, and a copy of its weights."""

    score: float = -1.0
    epoch: int = 0
    state: dict | None = None

    def offer(self, score: float, epoch: int, model: nn.Module) -> None:
        if score > self.score:
            self.score, self.epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


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


# --- Train --------------------------------------------------------------------------------


def train_step(fit: Fit, images: np.ndarray, masks: np.ndarray, epoch: int):
    """One optimizer step on one batch; returns (loss, logits, target) for the running scores."""
    x, target = to_tensor(images, fit.device), to_device(masks, fit.device).long()
    # bf16 keeps float32's range, so no loss scaling is needed; BatchNorm and the loss run in float32
    with torch.autocast(device_type=fit.device.type, dtype=torch.bfloat16, enabled=fit.mixed_precision):
        logits = fit.stepped(x)
    loss = segmentation_loss(logits.float(), target, fit.dice_weight)
    # the mean over the processes: a non-finite loss in any one stops them all at this step
    shown = fit.ddp.mean(loss.detach())
    if not torch.isfinite(shown):
        raise UserError(f"the loss became {shown.item()} at epoch {epoch}; try a lower --learning-rate")
    fit.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP the gradients arrive averaged over the processes
    fit.optimizer.step()
    fit.schedule.step()
    if fit.ema is not None:
        fit.ema.update_parameters(fit.model)
    return shown, logits, target


def epoch_batches(order: np.ndarray, batch_size: int, ddp: torch_ddp.Processes) -> list[np.ndarray]:
    """This process's photos of each global batch cut from `order`: each batch split over the
    processes (data.distributed). torch 2.14.1's channels-last conv backward on CPU segfaults
    on odd batch sizes (measured): a short last batch keeps a multiple of 2 photos per
    process (the rest are seen next epoch)."""
    return distributed.split_batches(order, batch_size, ddp.world, short_multiple=2 * ddp.size)


def run_epoch(fit: Fit, num_photos: int, make_views: MakeViews, batch_size: int, rng,
              running: Running, epoch: int) -> None:
    """One pass over the training photos in a fresh random order: every process draws the
    same order from the same `rng`, and steps on its own slice of each global batch."""
    fit.model.train()
    for batch in epoch_batches(rng.permutation(num_photos), batch_size, fit.ddp):
        keys = np.stack([np.full_like(batch, epoch), batch], axis=1)
        loss, logits, target = train_step(fit, *make_views(keys), epoch)
        running.add(loss.item(), logits.argmax(1).bool(), target.bool())


def validate(fit: Fit, val_sets: tuple[list, list], cfg: dict) -> tuple[Scores, Scores]:
    """One validation pass: the scores of the val photos and of their close-ups."""
    val_photos, val_close_ups = val_sets
    return (evaluate(fit.scored, val_photos, cfg, fit.device),
            evaluate(fit.scored, val_close_ups, cfg, fit.device))


def train(fit: Fit, num_photos: int, make_views: MakeViews, val_sets: tuple[list, list], cfg: dict,
          rng) -> tuple[History, Best, int]:
    """`cfg["epochs"]` epochs, or fewer when `time_limit_minutes` runs out (the epoch that passes
    it is the last); validates every `eval_every` epochs and after the last, keeps the best
    state (the EMA's, when there is one) and loads it into the model at the end. `val_sets`:
    (val photos, val close-ups). Returns (History, Best, the number of epochs run)."""
    history, best, running = History(), Best(), Running()
    start, limit = time.monotonic(), 60 * cfg["time_limit_minutes"]
    progress = tqdm(range(1, cfg["epochs"] + 1), desc="train", leave=False)
    for epoch in progress:
        run_epoch(fit, num_photos, make_views, cfg["batch_size"], rng, running, epoch)
        out_of_time = fit.ddp.any(0 < limit < time.monotonic() - start)  # all stop together
        if epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"] or out_of_time:
            running.intersection, running.union = fit.ddp.sum([running.intersection, running.union])
            if fit.ddp.is_main:  # rank 0 alone validates (the others wait at their next step)
                val, close_ups = validate(fit, val_sets, cfg)
                history.add(running, val, close_ups)
                best.offer(selection_score(val, close_ups), epoch, fit.scored)
                progress.set_postfix(loss=f"{history.loss[-1]:.3f}", val_iou=f"{val.iou:.3f}",
                                     close_up_iou=f"{close_ups.iou:.3f}")
                print(f"epoch {epoch:4d}  loss {history.loss[-1]:.4f}  train IoU {history.iou[-1]:.3f}"
                      f"  val IoU {val.iou:.3f}  val BF1 {val.boundary_f1:.3f}"
                      f"  val close-up IoU {close_ups.iou:.3f}", flush=True)
            running = Running()
        if out_of_time:
            print(f"stopped after epoch {epoch} of {cfg['epochs']}: --time-limit-minutes "
                  f"{cfg['time_limit_minutes']} reached", flush=True)
            break
    if fit.ddp.is_main:
        fit.model.load_state_dict(best.state)
    return history, best, epoch


# --- Evaluate -----------------------------------------------------------------------------


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
