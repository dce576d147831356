"""The training machinery of 03b (as in torchvision's references/detection/engine.py):
determinism and device, the data loader, AdamW with warm-up + cosine, the weight EMA, one
epoch of steps, and the checkpoint.

On a CUDA GPU the network runs under bfloat16 autocast (same exponent range as float32,
so no loss scaling is needed), while FCOS's losses and box decoding stay in float32
(`model.fp32_outside_the_network`). On the CPU everything is float32 and, for a given
seed and thread count, bit-for-bit repeatable.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from augment import FruitBoxes, collate
from model import Photos
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from data import outputs
from data.cli import UserError

# --- Determinism and device ----------------------------------------------------------


def make_repeatable(seed: int, device: torch.device) -> None:
    """Seed torch; on the CPU also forbid the few nondeterministic kernels.

    On CUDA, FCOS's FPN upsampling has no deterministic backward kernel, so a GPU run is
    seeded but not bit-for-bit repeatable (nor equal to a CPU run)."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def seed_worker(worker_id: int) -> None:
    # Each DataLoader worker gets torch seed base_seed + id from the loader's generator;
    # numpy and random follow it, so any number of workers repeats for a seed.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(photos: Photos, cfg: dict, device: torch.device,
                generator: torch.Generator) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        FruitBoxes(photos, cfg, train=True), batch_size=cfg["batch_size"], shuffle=True,
        drop_last=True, collate_fn=collate, generator=generator, num_workers=cfg["num_workers"],
        worker_init_fn=seed_worker, pin_memory=device.type == "cuda")


# --- Optimizer, schedule, EMA --------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps to the peak, then cosine down to 1% of it at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: dict, steps_per_epoch: int):
    """AdamW (no weight decay on norms and biases, as is standard) and its LambdaLR."""
    decay = [p for p in model.parameters() if p.ndim > 1 and p.requires_grad]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["learning_rate"])
    total = cfg["epochs"] * steps_per_epoch
    warmup = max(1, cfg["warmup_epochs"] * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
    return optimizer, scheduler


def ema_decay_at(step: int, decay: float) -> float:
    # Ramp the decay up (the YOLOv5 trick) so the EMA does not drag the random initial
    # weights along: 0.63 * decay after 200 steps, the full decay after ~1000 (an 80-epoch
    # run has 1920 steps of 8 photos).
    return decay * (1 - math.exp(-step / 200))


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of the weights and the BatchNorm statistics (use_buffers)."""
    def update(averaged: list, current: list, count: torch.Tensor) -> None:
        keep = ema_decay_at(int(count), decay)  # once per step, not once per tensor
        for avg, new in zip(averaged, current, strict=True):
            avg.copy_(avg + (1 - keep) * (new - avg))

    return AveragedModel(model, use_buffers=True, multi_avg_fn=update)


# --- One epoch -----------------------------------------------------------------------


@dataclass
class Trainer:
    """What the training steps need, in one record."""
    model: torch.nn.Module
    ema: AveragedModel
    loader: torch.utils.data.DataLoader
    generator: torch.Generator  # the loader's batch order and worker seeds; saved for --resume
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    grad_clip: float
    epochs: int
    bf16: bool  # autocast the network to bfloat16 (CUDA only)


def train_one_epoch(run: Trainer, epoch: int) -> dict:
    """One pass over the augmented training photos; the mean of each loss."""
    run.model.train()
    totals: dict[str, float] = {}
    bar = tqdm(run.loader, desc=f"epoch {epoch}/{run.epochs}", leave=False)
    for step, (images, targets) in enumerate(bar):
        images = [image.to(run.device, non_blocking=True).float() / 255 for image in images]
        targets = [{k: v.to(run.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
            losses = run.model(images, targets)  # the model normalizes the images itself
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise UserError(
                f"the loss became {loss.item()} at epoch {epoch}, step {step} "
                f"({', '.join(f'{k} {v.item():.3g}' for k, v in losses.items())}); "
                "try a lower --learning-rate")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.ema.update_parameters(run.model)
        for key, value in {"loss": loss, **losses}.items():
            totals[key] = totals.get(key, 0.0) + value.item()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {key: value / len(run.loader) for key, value in totals.items()}


# --- Checkpoint ----------------------------------------------------------------------


def save_checkpoint(path: Path, **state) -> None:
    with outputs.atomic_path(path) as tmp:
        torch.save(state, tmp)


def rng_state() -> torch.Tensor:
    return torch.get_rng_state()


def restore_rng(state: torch.Tensor) -> None:
    torch.set_rng_state(state)
