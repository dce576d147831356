"""04 (train.py): train a person segmenter on PennFudanPed, the model composite.py uses.

What it teaches: semantic segmentation as per-pixel classification (person vs background)
from 120 photos, on a CPU: a small residual U-Net from scratch, heavy augmentation
(augment.py: zoom, tilt, color, copy-paste of people, close-ups of one person, views with no
person), CE + Dice under a warm-up cosine schedule, and keeping the epoch with the best mean of
the val person IoU and the val close-up IoU. That epoch is measured once on the test photos:
person IoU, pixel accuracy, boundary F1 and close-up IoU, pooled over every pixel at full
resolution, with bootstrap 95% intervals.

How to run:
    python 04_semantic_bg/train.py --smoke              # synthetic photos, about 10 s on 2 CPU cores
    python 04_semantic_bg/train.py                      # from scratch; on 2 CPU cores at most 44 min
    python 04_semantic_bg/train.py --no-evaluate-test --output-dir runs/04_semantic_bg-tune
    python 04_semantic_bg/evaluate.py --run-dir runs/04_semantic_bg-tune --split test  # scored once, later
    torchrun --nproc_per_node 2 04_semantic_bg/train.py # data-parallel (DDP): the global batch, split in 2

It writes model.pt (for composite.py --weights PATH), metrics.json, config.json, split.json,
per_photo.json and plots to --output-dir. Beside it: fitting.py (model, loss, schedule, EMA,
evaluate), report.py (the figures and plots), photos.py, closeups.py, segmenters.py.
Figures, ablations and the chapter's history: 04_semantic_bg/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import augment  # the chapter's own modules sit beside this script
import numpy as np
import report
from photos import Photo, load_close_ups, load_photos
from scoring import Scores
from tqdm import tqdm

from data import cli, distributed, outputs
from data.cli import ChapterParser, UserError, require, run_main, seed_everything
from data.outputs import prepare_output_dir, run_facts, write_json, write_split
from data.pennfudan import PedRecord, load_pennfudan
from data.runclock import RunClock
from data.synthetic import write_pennfudan

if TYPE_CHECKING:  # names for the annotations only: torch loads in main(), after the flags are parsed
    from fitting import Fit, History, Running
    from torch import nn

CHAPTER = "04_semantic_bg"
CONFIG_PATH = Path(__file__).with_name("config.toml")

# --- Config -------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    require(cfg["weights"] in ("none", "coco"), f"--weights must be none or coco, got {cfg['weights']!r}")
    require(cfg["weights"] == "none" or cfg["model"] != "unet",
            "--weights coco fine-tunes a torchvision model: add --model lraspp_mobilenet_v3_large "
            "(or deeplabv3_resnet50 / deeplabv3_resnet101); the U-Net trains from scratch")
    require(cfg["device"] in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {cfg['device']!r}")
    for key in ("epochs", "batch_size", "eval_every", "width"):
        cli.require_at_least(cfg, key, 1)
    for key, why in (("num_threads", "0 = all cores"), ("weight_decay", ""), ("time_limit_minutes", "0 = no limit")):
        cli.require_at_least(cfg, key, 0, why)
    for key in ("val_fraction", "test_fraction"):
        require(0 < cfg[key] < 1, f"--{key.replace('_', '-')} must be between 0 and 1, got {cfg[key]}")
    require(cfg["val_fraction"] + cfg["test_fraction"] < 1, "--val-fraction + --test-fraction must leave "
            "photos to train on")
    # The global batch; even per process: BatchNorm needs 2+ photos, and odd CPU batches segfault (fitting.py)
    distributed.per_process_batch(cfg["batch_size"], distributed.world_from_env().size, multiple_of=2,
                                  why="BatchNorm needs pairs, and odd CPU batches crash channels-last backward")
    cli.require_positive(cfg, "learning_rate")
    require(0 <= cfg["ema_decay"] < 1, f"--ema-decay must be in [0, 1) (0 = off), got {cfg['ema_decay']}")
    augment.check_views(cfg)  # crop size, zoom, copy-paste, and the close-up and no-person shares


# --- Data: the photos themselves (Photo, load_photos, load_close_ups) are in photos.py ---


@dataclass
class Split:
    """Which photos train, pick the best epoch (val), and give the final figures (test)."""

    train: list[PedRecord]
    val: list[PedRecord]
    test: list[PedRecord]

    def names(self) -> dict[str, list[str]]:
        return {part: [record.image_path.name for record in getattr(self, part)]
                for part in ("train", "val", "test")}


def read_records(data_dir: Path, smoke: bool, output_dir: Path, cfg: dict, write: bool) -> list[PedRecord]:
    if smoke:  # same loader, same code path, on photos drawn for the purpose (by rank 0)
        if write:
            write_pennfudan(output_dir / "smoke_data", count=cfg["smoke_images"], seed=cfg["seed"])
        return load_pennfudan(output_dir / "smoke_data", fetch=False)
    return load_pennfudan(data_dir)


def split_records(records: list[PedRecord], val_fraction: float, test_fraction: float, seed: int) -> Split:
    """A seeded shuffle: the first test_fraction of it is test, the next val_fraction val."""
    num_test, num_val = round(test_fraction * len(records)), round(val_fraction * len(records))
    require(num_test >= 1 and num_val >= 1 and len(records) > num_val + num_test,
            f"{len(records)} photos cannot give {num_val} val + {num_test} test photos and a train split; "
            "change --val-fraction / --test-fraction")
    order = np.random.default_rng(seed).permutation(len(records))
    test, val, train = np.split(order, [num_test, num_test + num_val])
    return Split(*([records[i] for i in part] for part in (train, val, test)))


@dataclass
class Sets:
    """Every set of photos of a run; the test ones are None with --no-evaluate-test."""

    train: list[Photo]
    val: list[Photo]
    val_close_ups: list[Photo]
    test: list[Photo] | None = None
    test_close_ups: list[Photo] | None = None

    def measured(self) -> dict[str, list[Photo]]:
        """The sets scored after training, by name (train is not)."""
        return {name: photos for name, photos in vars(self).items() if name != "train" and photos is not None}


def load_sets(split: Split, cfg: dict) -> Sets:
    size, tall = cfg["image_size"], cfg["closeup_min_height"]
    sets = Sets(load_photos(split.train, size, tall, train=True), load_photos(split.val, size),
                load_close_ups(split.val, size, tall))
    # --no-evaluate-test: the test photos are never read, so no choice can lean on them
    if cfg["evaluate_test"]:
        sets.test, sets.test_close_ups = load_photos(split.test, size), load_close_ups(split.test, size, tall)
    for part, close_ups in (("val", sets.val_close_ups), ("test", sets.test_close_ups)):
        require(close_ups is None or len(close_ups) > 0,
                f"no person in the {len(getattr(split, part))} {part} photos can be framed for a close-up "
                f"(at least --closeup-min-height {tall} px tall, clear of the border); lower "
                "--closeup-min-height")
    return sets


# --- Train: the views come from augment.py, the model, loss and optimizer from fitting.py ---


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


def train_step(fit: Fit, images: np.ndarray, masks: np.ndarray, epoch: int):
    """One optimizer step on one batch; returns (loss, logits, target) for the running scores."""
    import fitting  # torch: main() has imported it by now, after the flags were parsed
    import segmenters
    import torch

    x, target = segmenters.to_tensor(images, fit.device), segmenters.to_device(masks, fit.device).long()
    # bf16 keeps float32's range, so no loss scaling is needed; BatchNorm and the loss run in float32
    with torch.autocast(device_type=fit.device.type, dtype=torch.bfloat16, enabled=fit.mixed_precision):
        logits = fit.stepped(x)
    loss = fitting.segmentation_loss(logits.float(), target, fit.dice_weight)
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


def run_epoch(fit: Fit, num_photos: int, make_views: augment.MakeViews, batch_size: int, rng,
              running: Running, epoch: int) -> None:
    """One pass over the training photos in a fresh random order: every process draws the
    same order from the same `rng`, and steps on its own slice of each global batch."""
    import fitting  # torch: imported by main() already

    fit.model.train()
    for batch in fitting.epoch_batches(rng.permutation(num_photos), batch_size, fit.ddp):
        keys = np.stack([np.full_like(batch, epoch), batch], axis=1)
        loss, logits, target = train_step(fit, *make_views(keys), epoch)
        running.add(loss.item(), logits.argmax(1).bool(), target.bool())


def validate(fit: Fit, val_sets: tuple[list, list], cfg: dict) -> tuple[Scores, Scores]:
    """One validation pass: the scores of the val photos and of their close-ups."""
    import fitting  # torch: imported by main() already

    val_photos, val_close_ups = val_sets
    return (fitting.evaluate(fit.scored, val_photos, cfg, fit.device),
            fitting.evaluate(fit.scored, val_close_ups, cfg, fit.device))


def train(fit: Fit, num_photos: int, make_views: augment.MakeViews, val_sets: tuple[list, list], cfg: dict,
          rng, clock: RunClock) -> tuple[History, Best, int]:
    """`cfg["epochs"]` epochs, or fewer when the time limit runs out (`clock`: the epoch during
    which it passed is the last); validates every `eval_every` epochs and after the last, keeps
    the best state (the EMA's, when there is one) and loads it into the model at the end.
    `val_sets`: (val photos, val close-ups). Returns (History, Best, the number of epochs run)."""
    import fitting  # torch: imported by main() already

    history, best, running = fitting.History(), Best(), fitting.Running()
    progress = tqdm(range(1, cfg["epochs"] + 1), desc="train", leave=False)
    for epoch in progress:
        run_epoch(fit, num_photos, make_views, cfg["batch_size"], rng, running, epoch)
        out_of_time = fit.ddp.any(clock.out_of_time())  # all torchrun processes stop together
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
            running = fitting.Running()
        if out_of_time:
            print(clock.stop_message(epoch, cfg["epochs"]), flush=True)
            break
    if fit.ddp.is_main:
        fit.model.load_state_dict(best.state)
    return history, best, epoch


# --- The run, top to bottom: data, model, train, evaluate, save -----------------------


def main(argv=None) -> dict:
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    check_config(cfg)
    import fitting  # torch loads only now: --help and flag errors stay instant
    import segmenters

    from parallel import torch_ddp

    device = segmenters.start_torch(cfg["device"], cfg["num_threads"], cfg["seed"], cfg["deterministic"])
    ddp = torch_ddp.setup(device)  # under torchrun: this process's rank, device and process group
    device, output_dir = ddp.device, args.output_dir
    seed_everything(cfg["seed"])
    if ddp.is_main:  # rank 0 alone writes; the others read what it wrote
        prepare_output_dir(output_dir, cfg, overwrite=args.overwrite, smoke=args.smoke)
    with ddp.main_first():  # the smoke photos (or the download) are in place before the others read
        records = read_records(args.data_dir, args.smoke, output_dir, cfg, write=ddp.is_main)
    split = split_records(records, cfg["val_fraction"], cfg["test_fraction"], cfg["seed"])
    if ddp.is_main:
        write_split(output_dir, split.names())
    sets = load_sets(split, cfg)
    model, model_kwargs = fitting.make_model(cfg, device)
    fit = fitting.make_fit(model, cfg, len(sets.train), device, ddp)
    print(f"{cfg['model']} ({cfg['weights']}) on {device.type}{' (bf16 autocast)' if fit.mixed_precision else ''}: "
          f"{segmenters.count_parameters(model) / 1e6:.2f}M parameters; {len(split.train)} train / "
          f"{len(split.val)} val / {len(split.test)} test photos; {len(sets.val_close_ups)} val close-ups",
          flush=True)
    outputs.training_started(output_dir)  # data, device and weights in hand: a failure now keeps the run
    clock, rng = RunClock(cfg["time_limit_minutes"]), np.random.default_rng(cfg["seed"])
    history, best, epochs_run = train(fit, len(sets.train), augment.view_maker(sets.train, cfg),
                                      (sets.val, sets.val_close_ups), cfg, rng, clock)
    train_seconds = clock.lap()  # training and validation, from the first epoch to the last
    if not ddp.is_main:
        return {}  # rank 0 alone measures the model and saves the results
    scores = {part: fitting.evaluate(model, photos, cfg, device, keep_masks=True)
              for part, photos in sets.measured().items()}

    segmenters.save_checkpoint(output_dir / "model.pt", model, cfg["model"], num_classes=2, person_class=1,
                               image_size=cfg["image_size"], model_kwargs=model_kwargs, config=cfg,
                               best_epoch=best.epoch)
    metrics = {**report.run_metrics(scores, sets, best, epochs_run, train_seconds),
               "parameters": segmenters.count_parameters(model), "mixed_precision": fit.mixed_precision,
               "world_size": ddp.size,
               **run_facts(("torch", "torchvision"), device=device.type,
                           device_name=segmenters.device_name(device))}
    write_json(output_dir / "metrics.json", metrics)
    write_json(output_dir / "per_photo.json", report.per_photo(scores, sets))
    report.save_plots(history, scores, sets, output_dir, cfg)
    report.print_summary(scores, sets, best, epochs_run, train_seconds, output_dir)
    return metrics


if __name__ == "__main__":
    run_main(main)
