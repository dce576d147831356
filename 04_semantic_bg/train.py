"""04 (train.py): train and measure a person segmenter on PennFudanPed, the model composite.py uses.

What it teaches: semantic segmentation as per-pixel classification (person vs background)
from only 120 photos, on a CPU. The levers are the ones that matter on small data: a
small residual U-Net with image-level context, a working resolution just high enough for
legs and arms, heavy augmentation (zoom, tilt, color, and copy-paste of people cut out of
other photos), CE + Dice loss, and a cosine schedule. It reports what a segmenter is
judged by: person IoU and pixel accuracy pooled over every test pixel at the photo's full
resolution, and boundary F1 (how much of the predicted outline lies within 3 px of the
true one, and vice versa).

How to run:
    python 04_semantic_bg/train.py                      # from scratch (--weights none), ~35 min on 2 CPU cores
    python 04_semantic_bg/train.py --device cuda --output-dir runs/04_semantic_bg-gpu   # on a GPU
    python 04_semantic_bg/train.py --weights coco --model lraspp_mobilenet_v3_large \
        --learning-rate 0.0005 --epochs 30 --output-dir runs/04_semantic_bg-lraspp   # fine-tune (COCO download)
    python 04_semantic_bg/train.py --no-evaluate-test --copy-paste 0 \
        --output-dir runs/04_semantic_bg-tune           # a tuning run: the test photos are never read
    python 04_semantic_bg/train.py --smoke              # synthetic photos, ~35 s on 2 cores

The 170 photos are split (seeded; --val-fraction, --test-fraction) 120 train / 20 val /
30 test, and split.json names them; the epoch with the best val IoU is kept and measured
once on test. An earlier run in --output-dir is refused unless --overwrite. Outputs in
--output-dir: model.pt (load it with composite.py --weights PATH), metrics.json (test
figures with bootstrap 95% intervals over the test photos, val figures, the machine and
library versions), config.json, split.json, curves.png, predictions.png.

This file holds the config, the data and its augmentation, and main(); the training loop
is in training.py, the scores in scoring.py, the models and inference in segmenters.py.

Where it runs: --device auto takes a CUDA GPU when torch sees one (with bf16 autocast,
--no-mixed-precision to turn it off), else the CPU, with --num-threads 0 = all cores. On
the CPU a seed gives the same figures run after run (--deterministic); a GPU run varies a
little (see segmenters.start_torch).

What to expect (measured on 2 shared CPU cores, seed 0):
    python 04_semantic_bg/train.py --data-dir /tmp/dd
    -> test person IoU 0.779, pixel accuracy 0.952, boundary F1 0.740 (3 px);
       val IoU 0.804 (best epoch 180 of 200); 2.1M parameters; train_seconds 2061
       (34 min; this run shared the CPU for its first 10 min; measured before the
       intervals were added).
    On a GPU (one NVIDIA H200, bf16 autocast, torch 2.11), same default config:
    python 04_semantic_bg/train.py --weights none --device cuda --num-threads 6 --output-dir runs/04_semantic_bg-gpu
    -> test person IoU 0.767 (95% interval 0.698-0.826, a bootstrap over the 30 test
       photos), pixel accuracy 0.948, boundary F1 0.732; val IoU 0.800 (epoch 190);
       188 s of training. The CPU run's 0.779 lies inside that interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from matting import fit_longest_side  # the chapter's own modules sit beside this script
from tqdm import tqdm

from data.cli import ChapterParser, require, run_main, seed_everything
from data.outputs import (
    plot_curves,
    plot_image_grid,
    prepare_output_dir,
    run_facts,
    write_json,
    write_split,
)
from data.pennfudan import PedRecord, load_pennfudan
from data.synthetic import write_pennfudan

CHAPTER = "04_semantic_bg"
CONFIG_PATH = Path(__file__).with_name("config.toml")

# --- Config -------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    require(cfg["weights"] in ("none", "coco"), f"--weights must be none or coco, got {cfg['weights']!r}")
    require(cfg["weights"] == "none" or cfg["model"] != "unet",
            "--weights coco fine-tunes a torchvision model: add --model lraspp_mobilenet_v3_large "
            "(or deeplabv3_resnet50 / deeplabv3_resnet101); the U-Net trains from scratch")
    require(cfg["device"] in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {cfg['device']!r}")
    require(cfg["crop_size"] <= cfg["image_size"], "--crop-size must not exceed --image-size")
    require(cfg["crop_size"] % 32 == 0, "--crop-size must be a multiple of 32 (the U-Net's stride)")
    require(0 < cfg["scale_min"] <= cfg["scale_max"], "need 0 < --scale-min <= --scale-max")
    require(0.0 <= cfg["copy_paste"] <= 1.0, "--copy-paste is a probability in [0, 1]")
    for key in ("epochs", "batch_size", "eval_every", "width", "crop_size"):
        require(cfg[key] >= 1, f"--{key.replace('_', '-')} must be at least 1")
    require(cfg["num_threads"] >= 0, f"--num-threads must be 0 (all cores) or more, got {cfg['num_threads']}")
    for key in ("val_fraction", "test_fraction"):
        require(0 < cfg[key] < 1, f"--{key.replace('_', '-')} must be between 0 and 1, got {cfg[key]}")
    require(cfg["val_fraction"] + cfg["test_fraction"] < 1, "--val-fraction + --test-fraction must leave "
            "photos to train on")
    # Even: BatchNorm needs 2+ photos, and torch 2.14.1 segfaults on odd CPU batches (see training.py).
    require(cfg["batch_size"] % 2 == 0, f"--batch-size must be even, got {cfg['batch_size']}")
    require(cfg["learning_rate"] > 0, f"--learning-rate must be positive, got {cfg['learning_rate']}")
    require(cfg["weight_decay"] >= 0, f"--weight-decay must be at least 0, got {cfg['weight_decay']}")


# --- Data ---------------------------------------------------------------------------


class Cutout(NamedTuple):
    """One person cut out of a training photo, for copy-paste augmentation."""

    patch: np.ndarray  # (h, w, 3) uint8: the person's bounding box
    mask: np.ndarray   # (h, w) uint8 0/1: which of its pixels are the person


@dataclass
class Photo:
    """One photo at the working resolution, plus its full-resolution mask for scoring."""

    name: str
    image: np.ndarray         # (h, w, 3) uint8, longest side = image_size
    mask: np.ndarray          # (h, w) uint8 0/1
    full_mask: np.ndarray     # (H, W) bool at the photo's own size
    people: list[Cutout] = field(default_factory=list)


def shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average, then threshold: the fair small version of a mask (not nearest-pixel)."""
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5


def load_photos(records, image_size: int) -> list[Photo]:
    """Read and resize every photo once: epochs then cost no disk or decode time."""
    photos = []
    for record in tqdm(records, desc="loading", leave=False):
        image, instances = record.image(), record.instance_masks()
        height, width = fit_longest_side(*image.shape[:2], image_size)
        small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        people = []
        for instance in instances:
            person = shrink_mask(instance, (width, height))
            ys, xs = np.nonzero(person)
            if len(ys) >= 64:  # skip slivers: tiny, cut-off people paste as noise
                box = np.s_[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
                people.append(Cutout(small[box].copy(), person[box].astype(np.uint8)))
        full = record.person_mask()
        photos.append(Photo(record.image_path.stem, small, shrink_mask(full, (width, height)).astype(np.uint8),
                            full, people))
    return photos


@dataclass
class Split:
    """Which photos train, pick the best epoch (val), and give the final figures (test)."""

    train: list[PedRecord]
    val: list[PedRecord]
    test: list[PedRecord]

    def names(self) -> dict[str, list[str]]:
        return {part: [record.image_path.name for record in getattr(self, part)]
                for part in ("train", "val", "test")}


def read_records(data_dir: Path, smoke: bool, output_dir: Path, cfg: dict) -> list[PedRecord]:
    if smoke:  # same loader, same code path, on photos drawn for the purpose
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


def paste_people(image: np.ndarray, mask: np.ndarray, donors: list[Cutout], rng) -> None:
    """Copy-paste augmentation (Ghiasi et al. 2021), in place: 1-2 people from other photos."""
    height, width = mask.shape
    for _ in range(int(rng.integers(1, 3))):
        patch, patch_mask = donors[int(rng.integers(len(donors)))]
        scale = rng.uniform(0.6, 1.2)
        scale = min(scale, 0.95 * height / patch.shape[0], 0.95 * width / patch.shape[1])
        size = (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale)))
        patch = cv2.resize(patch, size, interpolation=cv2.INTER_LINEAR)
        patch_mask = cv2.resize(patch_mask, size, interpolation=cv2.INTER_NEAREST)
        if rng.random() < 0.5:
            patch, patch_mask = patch[:, ::-1], patch_mask[:, ::-1]
        top = int(rng.integers(0, height - size[1] + 1))
        left = int(rng.integers(0, width - size[0] + 1))
        # a slightly soft paste edge, so "sharp seam = person" is not a shortcut to learn
        soft = cv2.GaussianBlur(patch_mask.astype(np.float32), (0, 0), 0.8)[:, :, None]
        region = np.s_[top:top + size[1], left:left + size[0]]
        image[region] = np.round(soft * patch + (1 - soft) * image[region]).astype(np.uint8)
        mask[region] |= patch_mask


def random_view(photo: Photo, donors: list[Cutout], cfg: dict, rng) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training crop (crop_size^2): paste, zoom, tilt, shift, flip, colors."""
    image, mask = photo.image.copy(), photo.mask.copy()
    if donors and rng.random() < cfg["copy_paste"]:
        paste_people(image, mask, donors, rng)
    height, width = mask.shape
    crop, scale = cfg["crop_size"], rng.uniform(cfg["scale_min"], cfg["scale_max"])
    half = crop / 2 / scale  # half the crop's side, in source pixels
    center_x = rng.uniform(min(half, width / 2), max(width - half, width / 2))
    center_y = rng.uniform(min(half, height / 2), max(height - half, height / 2))
    matrix = cv2.getRotationMatrix2D((center_x, center_y),
                                     rng.uniform(-cfg["rotate_degrees"], cfg["rotate_degrees"]), scale)
    matrix[:, 2] += (crop / 2 - center_x, crop / 2 - center_y)
    # reflecting the border, to the image and the mask alike, keeps the labels true
    image = cv2.warpAffine(image, matrix, (crop, crop), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    mask = cv2.warpAffine(mask, matrix, (crop, crop), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return jitter_colors(image, cfg["color_jitter"], rng), np.ascontiguousarray(mask)


def view_maker(train_set: list[Photo], cfg: dict, rng) -> Callable[[np.ndarray], tuple]:
    """The training loop's source of batches: indices in, augmented (images, masks) out."""
    donors = [person for photo in train_set for person in photo.people]

    def make_views(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        views = [random_view(train_set[i], donors, cfg, rng) for i in batch]
        return np.stack([image for image, _ in views]), np.stack([mask for _, mask in views])

    return make_views


def jitter_colors(image: np.ndarray, strength: float, rng) -> np.ndarray:
    x = image.astype(np.float32) * rng.uniform(1 - strength, 1 + strength)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # contrast
    gray = x.mean(axis=2, keepdims=True)
    x = gray + (x - gray) * rng.uniform(1 - strength, 1 + strength)  # saturation
    return np.clip(x, 0, 255).astype(np.uint8)


# --- Save ---------------------------------------------------------------------------


def overlay(photo: Photo, predicted: np.ndarray) -> np.ndarray:
    """Green: person found; red: background called person; blue: person missed."""
    height, width = photo.mask.shape
    predicted = cv2.resize(predicted.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    truth = photo.mask > 0
    out = photo.image.astype(np.float32)
    for where, color in ((predicted & truth, (0, 200, 0)), (predicted & ~truth, (230, 0, 0)),
                         (~predicted & truth, (0, 90, 255))):
        out[where] = 0.5 * out[where] + 0.5 * np.array(color, np.float32)
    return out.astype(np.uint8)


def save_predictions(photos: list[Photo], masks: list[np.ndarray], path: Path, part: str = "test") -> None:
    images, titles = [], []
    for photo, predicted in zip(photos, masks, strict=True):
        union = (predicted | photo.full_mask).sum()
        iou = (predicted & photo.full_mask).sum() / union if union else 1.0
        images.append(overlay(photo, predicted))
        titles.append(f"{photo.name} IoU {iou:.2f}")
    plot_image_grid(images, titles, path, columns=4, cell=2.6,
                    title=f"{part} predictions: green hit, red false person, blue missed")


def chapter_metrics(test, val, best, train_seconds: float, split: Split) -> dict:
    """The figures of the run: test (with 95% intervals) unless --no-evaluate-test, then val."""
    metrics = {}
    if test is not None:
        metrics = {"person_iou": test.iou, "pixel_accuracy": test.pixel_accuracy,
                   "boundary_f1": test.boundary_f1, **test.intervals()}
    return {**metrics, "val_person_iou": val.iou, "val_pixel_accuracy": val.pixel_accuracy,
            "val_boundary_f1": val.boundary_f1, "best_epoch": best.epoch, "train_seconds": train_seconds,
            "num_train": len(split.train), "num_val": len(split.val),
            "num_test": len(split.test) if test is not None else 0}


def save_plots(history, shown: list[Photo], masks: list[np.ndarray], part: str, output_dir: Path,
               cfg: dict) -> None:
    plot_curves(asdict(history), output_dir / "curves.png",
                xlabel=f"validation pass (every {cfg['eval_every']} epochs)")
    count = min(cfg["grid_images"], len(shown))
    save_predictions(shown[:count], masks[:count], output_dir / "predictions.png", part)


def main(argv=None) -> dict:
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    check_config(cfg)
    import segmenters  # torch loads only now: --help and flag errors stay instant
    import training

    device = segmenters.start_torch(cfg["device"], cfg["num_threads"], cfg["seed"], cfg["deterministic"])
    seed_everything(cfg["seed"])
    output_dir = prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite, smoke=args.smoke)
    records = read_records(args.data_dir, args.smoke, output_dir, cfg)
    split = split_records(records, cfg["val_fraction"], cfg["test_fraction"], cfg["seed"])
    write_split(output_dir, split.names())
    train_set, val_set = load_photos(split.train, cfg["image_size"]), load_photos(split.val, cfg["image_size"])
    # --no-evaluate-test: the test photos are never read, so no choice can lean on them
    test_set = load_photos(split.test, cfg["image_size"]) if cfg["evaluate_test"] else None
    model, model_kwargs = training.make_model(cfg, device)
    fit = training.make_fit(model, cfg, len(train_set), device)
    print(f"{cfg['model']} ({cfg['weights']}) on {device.type}{' (bf16 autocast)' if fit.mixed_precision else ''}: "
          f"{segmenters.count_parameters(model) / 1e6:.2f}M parameters; {len(split.train)} train / "
          f"{len(split.val)} val / {len(split.test)} test photos", flush=True)

    start = time.monotonic()
    rng = np.random.default_rng(cfg["seed"])
    history, best = training.train(fit, len(train_set), view_maker(train_set, cfg, rng), val_set, cfg, rng)
    train_seconds = time.monotonic() - start
    val = training.evaluate(model, val_set, cfg, device, keep_masks=test_set is None)
    test = training.evaluate(model, test_set, cfg, device, keep_masks=True) if test_set is not None else None

    segmenters.save_checkpoint(output_dir / "model.pt", model, cfg["model"], num_classes=2, person_class=1,
                               image_size=cfg["image_size"], model_kwargs=model_kwargs, config=cfg,
                               best_epoch=best.epoch)
    metrics = {**chapter_metrics(test, val, best, train_seconds, split),
               "parameters": segmenters.count_parameters(model), "mixed_precision": fit.mixed_precision,
               **run_facts(("torch", "torchvision"), device=device.type,
                           device_name=segmenters.device_name(device))}
    write_json(output_dir / "metrics.json", metrics)
    shown, scores, part = (test_set, test, "test") if test is not None else (val_set, val, "val")
    save_plots(history, shown, scores.masks, part, output_dir, cfg)
    print(f"{part} person IoU {scores.iou:.4f}  pixel accuracy {scores.pixel_accuracy:.4f}  "
          f"boundary F1 {scores.boundary_f1:.4f}  (val IoU {val.iou:.4f}, best epoch "
          f"{best.epoch}, {train_seconds:.0f} s) -> {output_dir}")
    return metrics


if __name__ == "__main__":
    run_main(main)
