"""03b: a fruit detector trained on the dataset's own Pascal VOC XML boxes (PyTorch FCOS).

What it teaches
    The fruit set's XML files, which the 2020 study's TF Object Detection API attempt lost,
    are the whole point: every photo's boxes (apple, banana, orange) are read by `data.fruits`
    and torchvision's FCOS learns to find them. Top to bottom: a seeded, stratified validation
    share of the 240 training photos (the 60 test photos are scored once, at the end), the
    model (model.py), a trainer whose augmentation moves the boxes with the pixels
    (augment.py), epochs with validation mAP of the EMA weights, then COCO-style test mAP with
    bootstrap 95% intervals. engine.py holds the machinery (device, loader, AdamW schedule,
    EMA, one epoch of steps, checkpoints), figures.py the plots.

How to run
    python 03b_xml_detection/train.py --weights none   # from scratch, offline, ~41 min on 2 CPU cores
    python 03b_xml_detection/train.py --output-dir runs/03b-coco   # fine-tune COCO weights (needs internet)
    python 03b_xml_detection/train.py --smoke          # synthetic data, ~1 min, into runs/03b_xml_detection-smoke
    python 03b_xml_detection/train.py --weights none --resume      # continue a stopped run
    torchrun --nproc_per_node 2 03b_xml_detection/train.py --weights none   # data-parallel (DDP)
    python 03b_xml_detection/detect.py --model-path runs/03b_xml_detection/model.pt photo.jpg
    A run writes config.json, split.json, metrics.json, checkpoint.pt, model.pt and the plots.
The figures with their commands, the ablations and what limits the detector: README.md here.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import shared_flags

from data import fruits, outputs
from data.cli import ChapterParser, require, run_main
from data.detection_eval import coco_map, coco_map_ci95
from data.runclock import RunClock
from data.splits import stratified_split

CHAPTER = "03b_xml_detection"
CONFIG_PATH = Path(__file__).with_name("config.toml")

# --- Config ------------------------------------------------------------------------


def parse(argv) -> tuple[dict, object]:
    """config.toml, overridden by the flags; every value checked (shared_flags.check_config)."""
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    shared_flags.check_config(cfg)
    return cfg, args


# --- Data --------------------------------------------------------------------------


class Split(NamedTuple):
    """FruitRecords: the photos the model learns from, the validation and the test photos."""
    train: list
    val: list
    test: list


def load_records(args, cfg: dict, output_dir: Path, write: bool) -> tuple[list, list]:
    """(train, test) records: the real set, or with --smoke a tiny synthetic one (written by
    rank 0 alone). A --no-evaluate-test run never opens the test folder, not even its XML."""
    if args.smoke and not write:
        return fruits.load_fruits(output_dir / "smoke-data", fetch=False, test=cfg["evaluate_test"])
    return fruits.load_fruits_or_smoke(args.data_dir, args.smoke, output_dir, cfg["seed"],
                                       test=cfg["evaluate_test"])


def split_records(train: list, test: list, cfg: dict, output_dir: Path, write: bool) -> Split:
    """A stratified validation share of the training photos; every name saved in split.json."""
    fit_idx, val_idx = stratified_split([r.label for r in train], cfg["val_fraction"], cfg["seed"])
    require(len(fit_idx) >= cfg["batch_size"], f"--batch-size {cfg['batch_size']} is more than the "
            f"{len(fit_idx)} training photos; use a smaller --batch-size")
    split = Split([train[i] for i in fit_idx], [train[i] for i in val_idx], test)
    names = {part: [r.image_path.name for r in records] for part, records in split._asdict().items()}
    saved = output_dir / "split.json"
    if cfg["resume"] and saved.is_file() and not (names["test"] and json.loads(saved.read_text())["test"]):
        names["test"] = json.loads(saved.read_text())["test"]  # evaluate_test may change on resume
    if write:
        outputs.write_split(output_dir, names, resume=cfg["resume"])
    return split


def decode(split: Split, cfg: dict):
    """Decode the training photos (kept preload_scale larger, for crops) and validation photos."""
    import model as detector  # torch: imported only after the flags are parsed
    start = time.monotonic()
    size = cfg["image_size"]
    fit = detector.preload(split.train, round(size * cfg["preload_scale"]), "decode train")
    val = detector.preload(split.val, size, "decode val")
    print(f"decoded {len(split.train)} train, {len(split.val)} val photos in {time.monotonic() - start:.0f}s"
          + (f"; {len(split.test)} test photos kept for the end" if cfg["evaluate_test"] else ""))
    return fit, val


# --- Model -------------------------------------------------------------------------
# model.py builds FCOS (COCO weights, from scratch, or from a checkpoint).


class Start(NamedTuple):
    model: object
    arch: dict
    resume_state: dict | None  # the interrupted run's checkpoint, with --resume


def build_or_resume(cfg: dict, output_dir: Path, device) -> Start:
    """The model first: `--weights coco` offline should fail in seconds, before any data work."""
    import engine  # torch: imported only after the flags are parsed
    import model as detector
    state = None
    if cfg["resume"]:  # the checkpoint's own architecture and weights; --weights is ignored
        state = engine.read_resume_checkpoint(output_dir / "checkpoint.pt")
        arch = state["arch"]
        model = detector.build_model(arch)
        model.load_state_dict(state["model"])
    else:
        model, arch = detector.make_model(cfg["weights"], cfg)
    model.to(device)
    return Start(model, arch, state)


# --- Train -------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint, so --resume continues from it."""
    clock: RunClock  # --time-limit-minutes; train_seconds (the steps) in wall_seconds (+ validation)
    epoch: int = 0   # the last finished epoch
    history: dict = field(default_factory=dict)  # each training loss, its mean per epoch
    val_curve: dict = field(default_factory=lambda: {"epoch": [], "map50": [], "map": [], "map50_raw": []})


def make_trainer(start: Start, fit, cfg: dict, ddp, output_dir: Path) -> tuple[object, Progress]:
    """Loader, optimizer, schedule and EMA (engine.Trainer); with --resume, their saved
    states and the progress so far. Under torchrun the steps run the model in DDP."""
    import engine  # torch: imported only after the flags are parsed
    import model as detector
    loader = engine.make_loader(fit, cfg, ddp)
    optimizer, scheduler = engine.make_optimizer(start.model, cfg, len(loader))
    ema = engine.make_ema(start.model, cfg["ema_decay"])
    bf16 = ddp.device.type == "cuda" and cfg["mixed_precision"]
    if bf16:  # the network in bfloat16, FCOS's losses and box decoding in float32
        for model in (start.model, ema.module):
            detector.fp32_outside_the_network(model)
    stepped = ddp.wrap(detector.foreground_over_processes(start.model, ddp))
    trainer = engine.Trainer(start.model, stepped, ddp, ema, loader, optimizer, scheduler, ddp.device,
                             cfg["grad_clip"], cfg["epochs"], bf16)
    state = start.resume_state
    if state is None:
        return trainer, Progress(RunClock(cfg["time_limit_minutes"]))
    engine.restore(trainer, state)  # the optimizer, schedule, EMA and random state
    print(f"resumed from {output_dir / 'checkpoint.pt'} after epoch {state['epoch']}")
    clock = RunClock(cfg["time_limit_minutes"], state["wall_seconds"], state["train_seconds"])
    return trainer, Progress(clock, state["epoch"], state["history"], state["val_curve"])


def validate(trainer, val, progress: Progress) -> str:
    """Validation mAP of the EMA and the raw weights, added to the curve; a log fragment."""
    import model as detector  # torch: imported only after the flags are parsed
    ema = score(detector.predict(trainer.ema.module, val.images, trainer.device), val)
    raw = score(detector.predict(trainer.model, val.images, trainer.device), val)
    for key, value in (("epoch", progress.epoch), ("map50", ema["map50"]), ("map", ema["map"]),
                       ("map50_raw", raw["map50"])):
        progress.val_curve[key].append(value)
    return f"  val mAP@0.5 {ema['map50']:.3f} (raw {raw['map50']:.3f})  mAP {ema['map']:.3f}"


def train(trainer, progress: Progress, val, cfg: dict, arch: dict, output_dir: Path) -> Progress:
    """Epochs until --epochs, or the epoch during which the working time passed
    --time-limit-minutes (data.runclock); a checkpoint after each. Under torchrun rank 0
    validates and writes, and all processes decide the stop together."""
    import engine  # torch: imported only after the flags are parsed
    clock, main_rank = progress.clock, trainer.ddp.is_main
    clock.restart()  # the clock runs from the first epoch on (decoding the photos is not counted)
    for epoch in range(progress.epoch + 1, cfg["epochs"] + 1):
        started = time.monotonic()
        losses = engine.train_one_epoch(trainer, epoch)
        clock.add_training(time.monotonic() - started)
        progress.epoch = epoch
        for key, value in losses.items():
            progress.history.setdefault(key, []).append(value)
        line = f"epoch {epoch:3d}  loss {losses['loss']:.3f}  {clock.train_seconds / 60:.1f} min"
        last = epoch == cfg["epochs"] or clock.out_of_time()  # a run cut short is validated at its end
        if main_rank and (epoch % cfg["eval_every"] == 0 or last):
            line += validate(trainer, val, progress)
        clock.lap()
        if main_rank:
            engine.write_checkpoint(output_dir / "checkpoint.pt", trainer, arch=arch, config=cfg,
                                    epoch=epoch, history=progress.history,
                                    val_curve=progress.val_curve, **clock.state())
        print(line, flush=True)  # after the save: a run stopped now resumes from this epoch
        if trainer.ddp.any(clock.out_of_time()) and epoch < cfg["epochs"]:  # any process over
            print(clock.stop_message(epoch, cfg["epochs"]))  # the cosine is cut short
            break
    return progress


# --- Evaluate ----------------------------------------------------------------------


def score(predictions: list[dict], photos) -> dict:
    """COCO mAP; boxes stay in the squashed S x S frame (a per-axis scale leaves IoU unchanged)."""
    return coco_map(photos.truth(), predictions, fruits.BOX_CLASSES)


def one_class(items: list[dict], k: int) -> list[dict]:
    """Only the boxes of class k, relabelled 0: COCOeval scores each class on its own, so the
    mAP of this is exactly the class's AP, and its bootstrap is the class's interval."""
    return [{**{key: value[item["labels"] == k] for key, value in item.items()},
             "labels": np.zeros(int((item["labels"] == k).sum()), np.int64)} for item in items]


def test_metrics(predictions: list[dict], test, seed: int) -> dict:
    """Test mAP figures, per-class AP, and bootstrap 95% intervals over the test photos."""
    truth, names = test.truth(), fruits.BOX_CLASSES
    found = score(predictions, test)
    metrics = {key: found[key] for key in ("map50", "map", "map75")}
    metrics.update(coco_map_ci95(truth, predictions, names, keys=("map50", "map"), seed=seed))
    for k, name in enumerate(names):
        metrics[f"ap50_{name}"], metrics[f"ap_{name}"] = found[f"ap50_{name}"], found[f"ap_{name}"]
        if found[f"ap50_{name}"] is not None:
            interval = coco_map_ci95(one_class(truth, k), one_class(predictions, k), [name],
                                     keys=("map50",), seed=seed)
            metrics[f"ap50_{name}_ci95"] = interval["map50_ci95"]
    return metrics


def evaluate(trainer, split: Split, val, cfg: dict, output_dir: Path) -> dict:
    """Final validation figures; then, unless --no-evaluate-test, the test photos, once,
    with the EMA weights (what detect.py uses), and their prediction grid."""
    import figures  # torch: imported only after the flags are parsed
    import model as detector
    ema_model, device = trainer.ema.module, trainer.device
    final_val = score(detector.predict(ema_model, val.images, device), val)
    metrics = {"val_map50": final_val["map50"], "val_map": final_val["map"]}
    grid = output_dir / "test_predictions.png"
    if not cfg["evaluate_test"]:  # a tuning run: the test photos are never read
        grid.unlink(missing_ok=True)  # and no stale test grid from an earlier run is left beside it
        return metrics
    start = time.monotonic()
    test = detector.preload(split.test, cfg["image_size"], "decode test")
    predictions = detector.predict(ema_model, test.images, device)
    metrics = {**test_metrics(predictions, test, cfg["seed"]), **metrics}
    print(f"test mAP@0.5 {metrics['map50']:.3f} {metrics['map50_ci95']}, mAP {metrics['map']:.3f} "
          f"{metrics['map_ci95']} ({time.monotonic() - start:.0f}s with the intervals)")
    figures.plot_test_grid(test, split.test, predictions, cfg, grid)
    return metrics


# --- Save --------------------------------------------------------------------------


def save(output_dir: Path, trainer, arch: dict, progress: Progress, split: Split, cfg: dict,
         metrics: dict) -> dict:
    """model.pt (the EMA weights), the plots, and metrics.json with the run's facts."""
    import engine  # torch: imported only after the flags are parsed
    import figures
    import model as detector
    engine.save_checkpoint(output_dir / "model.pt", arch=arch, config=cfg,
                           model=trainer.ema.module.state_dict(), ema=None)
    figures.plot_curves(progress.history, progress.val_curve, output_dir)
    history = progress.history["loss"]
    metrics.update(train_seconds=progress.clock.train_seconds, wall_seconds=progress.clock.wall_seconds,
                   epochs=progress.epoch, weights=cfg["weights"], image_size=cfg["image_size"],
                   num_train=len(split.train), num_val=len(split.val), num_test=len(split.test),
                   loss_first_epoch=history[0], loss_last_epoch=history[-1],
                   mixed_precision="bf16" if trainer.bf16 else "none", world_size=trainer.ddp.size,
                   **outputs.run_facts(("torch", "torchvision"), device=trainer.device.type,
                                       device_name=detector.device_name(trainer.device)))
    outputs.write_metrics(output_dir, metrics)
    return metrics


def main(argv=None) -> dict:
    cfg, args = parse(argv)
    import engine  # torch: imported only after the flags are parsed
    ddp = engine.setup(cfg)  # device, threads, seeds; under torchrun this process's rank and group
    output_dir, main_rank = args.output_dir, ddp.is_main
    if main_rank:  # rank 0 alone writes; the others read what it wrote
        outputs.prepare_output_dir(output_dir, cfg, overwrite=args.overwrite, resume=cfg["resume"],
                                   smoke=args.smoke, data_dir=str(args.data_dir))
    start = build_or_resume(cfg, output_dir, ddp.device)
    with ddp.main_first():  # the smoke pictures and split.json are written before the others read
        split = split_records(*load_records(args, cfg, output_dir, main_rank), cfg, output_dir, main_rank)
    fit, val = decode(split, cfg)
    trainer, progress = make_trainer(start, fit, cfg, ddp, output_dir)
    outputs.training_started(output_dir)  # checks passed: from here a failure keeps the checkpoint
    progress = train(trainer, progress, val, cfg, start.arch, output_dir)
    if not main_rank:
        return {}  # rank 0 alone scores the model and saves the results
    metrics = evaluate(trainer, split, val, cfg, output_dir)
    return save(output_dir, trainer, start.arch, progress, split, cfg, metrics)


if __name__ == "__main__":
    run_main(main)
