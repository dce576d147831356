"""03b: a fruit detector trained on the dataset's own Pascal VOC XML boxes (PyTorch FCOS).

What it teaches
    In the 2020 study the TensorFlow Object Detection API attempt drifted away from the
    fruit set's XML files. Here they are the whole point: every photo's VOC boxes (apple,
    banana, orange; "mixed" is only a file-name category) are read by `data.fruits`, and
    torchvision's FCOS learns to find them. The pieces a detection run needs, each small:
    a torch Dataset whose `transforms.v2` augmentation moves the boxes with the pixels
    (augment.py: mosaic, zoom-in crops, zoom-out, flips, colour jitter), a seeded
    stratified validation split carved from the 240 training photos (the 60 test photos
    are touched once, at the end), COCO-style mAP from pycocotools with a bootstrap 95%
    interval over the test photos, an EMA copy of the weights and a resumable checkpoint
    (engine.py). Model choice and shared inference: see model.py.

How to run
    python 03b_xml_detection/train.py --output-dir runs/03b-coco   # fine-tune COCO weights (needs internet)
    python 03b_xml_detection/train.py --weights none   # from scratch, offline, ~44 min on 2 CPU cores
    python 03b_xml_detection/train.py --weights none --device cuda --output-dir runs/03b-gpu
    python 03b_xml_detection/train.py --smoke          # synthetic data, into runs/03b_xml_detection-smoke
    python 03b_xml_detection/train.py --weights none --resume        # continue a stopped run (on a CPU: exactly)
    torchrun --nproc_per_node 2 03b_xml_detection/train.py --weights none   # data-parallel (DDP)
    python 03b_xml_detection/detect.py --model-path runs/03b_xml_detection/model.pt photo.jpg
    Every run writes config.json, split.json (which photos trained, validated, tested),
    metrics.json (with the device, library versions and date), model.pt and the plots;
    a folder that already holds a run is refused unless --overwrite or --resume.

What to expect (measured on 2 CPU cores, seed 0, nothing else training; results/from_scratch.json)
    python 03b_xml_detection/train.py --weights none     # 80 epochs at 320 px, ~30 s each
    -> test mAP@0.5 0.796 (95% interval 0.740-0.873), mAP@[.5:.95] 0.495 (AP@0.5 apple
       0.865, banana 0.625, orange 0.898), validation mAP@0.5 0.742; 39.6 min of
       training, 40.9 min wall in all. CPU runs of a seed are deterministic.
    On validation, the long schedule mattered most (0.42 after a 24-epoch run, 0.72 after
    80), then mosaic (0.42 vs 0.35 without, 24 epochs). 320 px was NOT shown to beat
    256 px (0.42 vs 0.46 in 24 epochs, and 256 px took 27% less time). EMA weights did
    not beat the raw ones at the end, but kept the curve steady. Tuning runs use
    --no-evaluate-test and their own --output-dir, so the test photos are never read:
    python 03b_xml_detection/train.py --weights none --epochs 24 --no-evaluate-test --output-dir runs/03b-24ep
    What limits it (python 03b_xml_detection/analyse.py --model-path <the model.pt>, on the
    validation photos; --split test once, for the final look): scored as one "fruit"
    class, test mAP@0.5 was 0.795, barely above 0.781 (a run before the keyed sampling),
    so the classes are rarely confused.
    The loss is in the scores: many extra boxes on parts of fruit and on banana bunches,
    which the XML boxes sometimes whole and sometimes banana by banana.
    python 03b_xml_detection/train.py --smoke            # ~50 s on one core: 20 epochs on 24
                                                         # synthetic pictures, test mAP@0.5 0.595
    Repeatable: on the CPU, the same seed and thread count give the same metrics bit for
    bit (torch.use_deterministic_algorithms). A GPU run is seeded, not bit-for-bit.
On a GPU (one NVIDIA H200, bf16 autocast, torch 2.11), same default config:
    python 03b_xml_detection/train.py --weights none --device cuda --num-workers 10 \
        --num-threads 6 --time-limit-minutes 5 --output-dir runs/03b_xml_detection-gpu
    -> all 80 epochs in 171 s of training; test mAP@0.5 0.834 (95% interval 0.778-0.899,
       a bootstrap over the 60 test photos), mAP@[.5:.95] 0.508 (0.464-0.580); the CPU
       run's 0.796 (0.740-0.873) overlaps it widely.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data import cli, distributed, fruits, outputs
from data.cli import ChapterParser, require, run_main, seed_everything
from data.detection_eval import coco_map, coco_map_ci95
from data.splits import stratified_split

CHAPTER = "03b_xml_detection"
CONFIG_PATH = Path(__file__).with_name("config.toml")

# --- Config ------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    cli.require_at_least(cfg, "image_size", 64)
    cli.require_at_least(cfg, "epochs", 1)
    cli.require_at_least(cfg, "batch_size", 2, "BatchNorm")
    distributed.per_process_batch(cfg["batch_size"], distributed.world_from_env().size)
    cli.require_positive(cfg, "learning_rate")
    require(0 < cfg["val_fraction"] < 1, f"--val-fraction must be between 0 and 1, got {cfg['val_fraction']}")
    require(0 <= cfg["ema_decay"] < 1, f"--ema-decay must be in [0, 1), got {cfg['ema_decay']}")
    cli.require_at_least(cfg, "preload_scale", 1)
    require(0 < cfg["crop_scale_min"] <= 1, f"--crop-scale-min must be in (0, 1], got {cfg['crop_scale_min']}")
    # The head's GroupNorm has 32 groups; 2+ channels per group keeps a 1x1 map normalizable.
    require(cfg["fpn_channels"] >= 64 and cfg["fpn_channels"] % 32 == 0,
            f"--fpn-channels must be a multiple of 32, at least 64, got {cfg['fpn_channels']}")
    for key in ("eval_every", "grid_images"):
        cli.require_at_least(cfg, key, 1)
    for key in ("warmup_epochs", "weight_decay", "color_jitter", "num_threads", "num_workers"):
        cli.require_at_least(cfg, key, 0)
    cli.require_positive(cfg, "grad_clip")
    cli.require_positive(cfg, "time_limit_minutes")
    for key in ("mosaic_prob", "zoom_out_prob", "score_threshold"):
        require(0 <= cfg[key] <= 1, f"--{key.replace('_', '-')} must be in [0, 1], got {cfg[key]}")
    require(cfg["device"] in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {cfg['device']!r}")


def parse(argv) -> tuple[dict, object]:
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    check_config(cfg)
    return cfg, args


# --- Data --------------------------------------------------------------------------


class Split(NamedTuple):
    """FruitRecords: the photos the model learns from, the validation and the test photos."""
    train: list
    val: list
    test: list


def load_records(args, cfg: dict, output_dir: Path, write: bool) -> tuple[list, list]:
    """(train, test) records: the real set, or with --smoke a tiny synthetic one in the
    same layout (written by rank 0 alone). A --no-evaluate-test run never opens the test
    folder (not even its XML)."""
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
    import model as detector  # torch: imported only after the flags are parsed

    state = None
    if cfg["resume"]:  # the checkpoint's own architecture and weights; --weights is ignored
        path = output_dir / "checkpoint.pt"
        state = detector.read_checkpoint(path)
        missing = {"optimizer", "scheduler", "ema_full", "epoch"} - set(state)
        require(not missing, f"{path} holds final weights only (no {', '.join(sorted(missing))}); "
                "--resume needs the checkpoint.pt of an interrupted run, or use --weights PATH")
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
    epoch: int = 0
    train_seconds: float = 0.0  # the optimisation steps alone
    wall_seconds: float = 0.0   # plus decoding and validation: what --time-limit-minutes watches
    history: dict = field(default_factory=dict)
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
    if start.resume_state is None:
        return trainer, Progress()
    return trainer, restore(trainer, start.resume_state, output_dir)


def restore(trainer, state: dict, output_dir: Path) -> Progress:
    """Put an interrupted run's optimizer, schedule, EMA and random states back; its progress."""
    import engine  # torch: imported only after the flags are parsed

    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.ema.load_state_dict(state["ema_full"])
    engine.restore_rng(state["rng"])
    print(f"resumed from {output_dir / 'checkpoint.pt'} after epoch {state['epoch']}")
    return Progress(state["epoch"], state["train_seconds"], state["wall_seconds"],
                    state["history"], state["val_curve"])


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
    """Epochs until --epochs or --time-limit-minutes; a checkpoint after each. Under
    torchrun rank 0 validates and writes, and all processes decide the stop together."""
    import engine  # torch: imported only after the flags are parsed

    budget = 60 * cfg["time_limit_minutes"]
    for epoch in range(progress.epoch + 1, cfg["epochs"] + 1):
        epoch_start = time.monotonic()
        losses = engine.train_one_epoch(trainer, epoch)
        progress.epoch, progress.train_seconds = epoch, progress.train_seconds + time.monotonic() - epoch_start
        for key, value in losses.items():
            progress.history.setdefault(key, []).append(value)
        line = f"epoch {epoch:3d}  loss {losses['loss']:.3f}  {progress.train_seconds / 60:.1f} min"
        last = epoch == cfg["epochs"] or progress.wall_seconds + time.monotonic() - epoch_start > budget
        if trainer.ddp.is_main and (epoch % cfg["eval_every"] == 0 or last):
            line += validate(trainer, val, progress)
        progress.wall_seconds += time.monotonic() - epoch_start
        if trainer.ddp.is_main:
            write_checkpoint(output_dir / "checkpoint.pt", trainer, progress, cfg, arch)
        print(line, flush=True)  # after the save: a run stopped now resumes from this epoch
        if trainer.ddp.any(progress.wall_seconds > budget) and epoch < cfg["epochs"]:  # a shared or slower machine:
            print(f"stopping after epoch {epoch}: over --time-limit-minutes {cfg['time_limit_minutes']}")
            break  # stop cleanly and say so (the cosine is cut short)
    return progress


def write_checkpoint(path: Path, trainer, progress: Progress, cfg: dict, arch: dict) -> None:
    """Everything --resume needs to go on as if never stopped: the weights (raw and EMA), the
    optimizer, the schedule, the progress and torch's random state."""
    import engine  # torch: imported only after the flags are parsed

    engine.save_checkpoint(
        path, arch=arch, config=cfg, epoch=progress.epoch,
        model=trainer.model.state_dict(), ema=trainer.ema.module.state_dict(),
        ema_full=trainer.ema.state_dict(), optimizer=trainer.optimizer.state_dict(),
        scheduler=trainer.scheduler.state_dict(), history=progress.history,
        val_curve=progress.val_curve, train_seconds=progress.train_seconds,
        wall_seconds=progress.wall_seconds, rng=engine.rng_state())


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


class Evaluation(NamedTuple):
    """The run's final figures; with the test pass, also the decoded test photos and their
    predictions, for the prediction grid (None after a --no-evaluate-test run)."""
    metrics: dict
    test: object = None         # model.Photos
    predictions: list | None = None


def evaluate(trainer, split: Split, val, cfg: dict) -> Evaluation:
    """Final validation figures; then, unless --no-evaluate-test, the test photos, once,
    with the EMA weights (what detect.py uses)."""
    import model as detector  # torch: imported only after the flags are parsed

    ema_model, device = trainer.ema.module, trainer.device
    final_val = score(detector.predict(ema_model, val.images, device), val)
    metrics = {"val_map50": final_val["map50"], "val_map": final_val["map"]}
    if not cfg["evaluate_test"]:
        return Evaluation(metrics)
    start = time.monotonic()
    test = detector.preload(split.test, cfg["image_size"], "decode test")
    predictions = detector.predict(ema_model, test.images, device)
    metrics = {**test_metrics(predictions, test, cfg["seed"]), **metrics}
    print(f"test mAP@0.5 {metrics['map50']:.3f} {metrics['map50_ci95']}, mAP {metrics['map']:.3f} "
          f"{metrics['map_ci95']} ({time.monotonic() - start:.0f}s with the intervals)")
    return Evaluation(metrics, test, predictions)


# --- Save --------------------------------------------------------------------------


def plot_val_curve(val_curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in (("map50", "mAP@0.5 (EMA)"), ("map", "mAP@[.5:.95] (EMA)"),
                       ("map50_raw", "mAP@0.5 (raw weights)")):
        ax.plot(val_curve["epoch"], val_curve[key], marker="o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="validation mAP", ylim=(0, 1), title="validation mAP")
    ax.grid(alpha=0.3)
    ax.legend()
    outputs.save_figure(fig, path)


def plot_test_grid(test, records: list, predictions: list[dict], cfg: dict, path: Path) -> None:
    """Ground truth | prediction pairs, spread over the (name-sorted) test set."""
    from model import draw_boxes  # torch: imported only after the flags are parsed

    picks = np.linspace(0, len(test.images) - 1, min(cfg["grid_images"], len(test.images))).astype(int)
    cells, titles = [], []
    for i in picks:
        image = test.images[i].permute(1, 2, 0).numpy()
        pred = predictions[i]
        shown = pred["scores"] >= cfg["score_threshold"]
        cells += [draw_boxes(image, test.boxes[i].numpy(), test.labels[i].numpy()),
                  draw_boxes(image, pred["boxes"][shown], pred["labels"][shown], pred["scores"][shown])]
        titles += [f"{records[i].image_path.stem}: truth", f"predicted (>= {cfg['score_threshold']})"]
    outputs.plot_image_grid(cells, titles, path, columns=8, cell=2.4,
                            title="test photos: ground truth (left) and predictions (right)")


def save(output_dir: Path, trainer, arch: dict, progress: Progress, split: Split, cfg: dict,
         evaluation: Evaluation) -> dict:
    """model.pt (the EMA weights), the plots, and metrics.json with the run's facts."""
    import engine  # torch: imported only after the flags are parsed
    import model as detector

    engine.save_checkpoint(output_dir / "model.pt", arch=arch, config=cfg,
                           model=trainer.ema.module.state_dict(), ema=None)
    outputs.plot_curves(progress.history, output_dir / "loss_curves.png", title="training losses")
    plot_val_curve(progress.val_curve, output_dir / "val_map.png")
    if evaluation.test is not None:
        plot_test_grid(evaluation.test, split.test, evaluation.predictions, cfg,
                       output_dir / "test_predictions.png")
    else:  # no stale test grid from an earlier run next to this model
        (output_dir / "test_predictions.png").unlink(missing_ok=True)
    history = progress.history["loss"]
    metrics = dict(evaluation.metrics)
    metrics.update(train_seconds=progress.train_seconds, wall_seconds=progress.wall_seconds,
                   epochs=progress.epoch, weights=cfg["weights"], image_size=cfg["image_size"],
                   num_train=len(split.train), num_val=len(split.val), num_test=len(split.test),
                   loss_first_epoch=history[0], loss_last_epoch=history[-1],
                   mixed_precision="bf16" if trainer.bf16 else "none", world_size=trainer.ddp.size,
                   **outputs.run_facts(("torch", "torchvision"), device=trainer.device.type,
                                       device_name=detector.device_name(trainer.device)))
    outputs.write_metrics(output_dir, metrics)
    return metrics


def setup(cfg: dict):
    """The device (one line if --device cuda finds no GPU), torchrun's process group if
    there is one (parallel.torch_ddp: rank 0 alone prints and writes), threads and seeds."""
    import engine  # torch: imported only after the flags are parsed
    import model as detector

    from parallel import torch_ddp

    ddp = torch_ddp.setup(detector.pick_device(cfg["device"]))
    device = ddp.device
    threads = detector.set_threads(cfg["num_threads"])
    seed_everything(cfg["seed"])
    engine.make_repeatable(cfg["seed"], device)
    name = detector.device_name(device)
    print(f"device: {device.type}{f' ({name})' if name else ''}, {threads} CPU threads"
          + (f", {ddp.size} processes" if ddp.size > 1 else ""))
    return ddp


def main(argv=None) -> dict:
    cfg, args = parse(argv)
    ddp = setup(cfg)  # under torchrun: this process's rank and device, and the process group
    output_dir, main_rank = args.output_dir, ddp.is_main
    if main_rank:  # rank 0 alone writes; the others read what it wrote
        outputs.prepare_output_dir(output_dir, cfg, overwrite=args.overwrite, resume=cfg["resume"],
                                   smoke=args.smoke, data_dir=str(args.data_dir))
    start = build_or_resume(cfg, output_dir, ddp.device)
    with ddp.main_first():  # the smoke pictures and split.json are written before the others read
        split = split_records(*load_records(args, cfg, output_dir, main_rank), cfg, output_dir, main_rank)
    decode_start = time.monotonic()
    fit, val = decode(split, cfg)
    trainer, progress = make_trainer(start, fit, cfg, ddp, output_dir)
    progress.wall_seconds += time.monotonic() - decode_start  # decoding counts towards the time limit
    outputs.training_started(output_dir)  # checks passed: from here a failure keeps the checkpoint
    progress = train(trainer, progress, val, cfg, start.arch, output_dir)
    if not main_rank:
        return {}  # rank 0 alone scores the model and saves the results
    evaluation = evaluate(trainer, split, val, cfg)
    return save(output_dir, trainer, start.arch, progress, split, cfg, evaluation)


if __name__ == "__main__":
    run_main(main)
