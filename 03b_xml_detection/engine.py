"""The training machinery of 03b (as in torchvision's references/detection/engine.py):
the device, threads and determinism, the data loader, AdamW with warm-up + cosine, the
weight EMA, one epoch of steps, and the checkpoint that --resume continues from.

On a CUDA GPU the network runs under bfloat16 autocast (same exponent range as float32,
so no loss scaling is needed), while FCOS's losses and box decoding stay in float32
(`model.fp32_outside_the_network`). On the CPU everything is float32 and, for a given
seed and thread count, bit-for-bit repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import model as detector
import torch
from augment import FruitBoxes, collate
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from data import outputs
from data.cli import UserError, require, seed_everything
from data.distributed import EpochBatches
from parallel import torch_ddp

# --- Device, threads and determinism -------------------------------------------------


def setup(cfg: dict) -> torch_ddp.Processes:
    """The device (one line if --device cuda finds no GPU), torchrun's process group if
    there is one (parallel.torch_ddp: rank 0 alone prints and writes), threads and seeds."""
    ddp = torch_ddp.setup(detector.pick_device(cfg["device"]))
    device = ddp.device
    threads = detector.set_threads(cfg["num_threads"])
    seed_everything(cfg["seed"])
    make_repeatable(cfg["seed"], device)
    name = detector.device_name(device)
    print(f"device: {device.type}{f' ({name})' if name else ''}, {threads} CPU threads"
          + (f", {ddp.size} processes" if ddp.size > 1 else ""))
    return ddp


def make_repeatable(seed: int, device: torch.device) -> None:
    """Seed torch; on the CPU also forbid the few nondeterministic kernels.

    On CUDA, FCOS's FPN upsampling has no deterministic backward kernel, so a GPU run is
    seeded but not bit-for-bit repeatable (nor equal to a CPU run)."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def make_loader(photos: detector.Photos, cfg: dict, ddp: torch_ddp.Processes) -> torch.utils.data.DataLoader:
    """This process's slice of each global batch (data.distributed.EpochBatches): the order
    from (seed, epoch), each picture's augmentation from (seed, epoch, index), so neither
    the number of processes nor of loader workers changes what is seen."""
    batches = EpochBatches(len(photos.images), cfg["batch_size"], cfg["seed"], ddp.world)
    return torch.utils.data.DataLoader(
        FruitBoxes(photos, cfg, train=True), batch_sampler=batches, collate_fn=collate,
        num_workers=cfg["num_workers"], pin_memory=ddp.device.type == "cuda")


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
    model: torch.nn.Module    # what is evaluated and saved
    stepped: torch.nn.Module  # what the steps run: the model in DDP under torchrun, else the model
    ddp: torch_ddp.Processes  # this process among the run's (a world of one without torchrun)
    ema: AveragedModel
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    grad_clip: float
    epochs: int
    bf16: bool  # autocast the network to bfloat16 (CUDA only)


def train_one_epoch(run: Trainer, epoch: int) -> dict:
    """One pass over the augmented training photos; the mean of each loss over all processes."""
    run.model.train()
    run.loader.batch_sampler.set_epoch(epoch)
    totals: dict[str, float] = {}
    bar = tqdm(run.loader, desc=f"epoch {epoch}/{run.epochs}", leave=False)
    for step, (images, targets) in enumerate(bar):
        images = [image.to(run.device, non_blocking=True).float() / 255 for image in images]
        targets = [{k: v.to(run.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
            losses = run.stepped(images, targets)  # the model normalizes the images itself
        loss = sum(losses.values())
        # Averaged over the processes: each logs the same number, and a non-finite loss in
        # any of them stops them all at this step (none is left waiting for the others).
        shown = dict(zip(["loss", *losses], run.ddp.mean(torch.stack([loss, *losses.values()]).detach()),
                         strict=True))
        if not torch.isfinite(shown["loss"]):
            raise UserError(
                f"the loss became {shown['loss'].item()} at epoch {epoch}, step {step} "
                f"({', '.join(f'{k} {v.item():.3g}' for k, v in shown.items() if k != 'loss')}); "
                "try a lower --learning-rate")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients arrive averaged over the processes
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.ema.update_parameters(run.model)
        for key, value in shown.items():
            totals[key] = totals.get(key, 0.0) + value.item()
        bar.set_postfix(loss=f"{shown['loss'].item():.3f}")
    return {key: value / len(run.loader) for key, value in totals.items()}


# --- Checkpoint ----------------------------------------------------------------------
# One torch.save'd dict: `arch` and `config` always; model.pt holds the EMA weights as
# `model`, checkpoint.pt also what --resume needs (write_checkpoint).


def save_checkpoint(path: Path, **state) -> None:
    with outputs.atomic_path(path) as tmp:
        torch.save(state, tmp)


def write_checkpoint(path: Path, run: Trainer, **progress) -> None:
    """Everything --resume needs to go on as if never stopped: the weights (raw and EMA), the
    optimizer, the schedule and torch's random state, beside `progress` (the run's arch,
    config, epoch, curves and times)."""
    save_checkpoint(path, **progress, model=run.model.state_dict(), ema=run.ema.module.state_dict(),
                    ema_full=run.ema.state_dict(), optimizer=run.optimizer.state_dict(),
                    scheduler=run.scheduler.state_dict(), rng=torch.get_rng_state())


def read_resume_checkpoint(path: Path) -> dict:
    """An interrupted run's checkpoint.pt (one line if it is a final model.pt instead)."""
    state = detector.read_checkpoint(path)
    missing = {"optimizer", "scheduler", "ema_full", "epoch"} - set(state)
    require(not missing, f"{path} holds final weights only (no {', '.join(sorted(missing))}); "
            "--resume needs the checkpoint.pt of an interrupted run, or use --weights PATH")
    return state


def restore(run: Trainer, state: dict) -> None:
    """Put an interrupted run's optimizer, schedule, EMA and torch's random state back."""
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.ema.load_state_dict(state["ema_full"])
    torch.set_rng_state(state["rng"])
