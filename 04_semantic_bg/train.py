"""04 (train.py): train and measure a person segmenter on PennFudanPed, the model composite.py uses.

What it teaches: semantic segmentation as per-pixel classification (person vs background)
from only 120 photos, on a CPU. The levers are the ones that matter on small data: a
small residual U-Net with image-level context, a working resolution just high enough for
legs and arms, heavy augmentation (zoom, tilt, color, and copy-paste of people cut out of
other photos), CE + Dice loss, and a cosine schedule. It reports what a segmenter is
judged by: person IoU and pixel accuracy pooled over every test pixel at the photo's full
resolution, and boundary F1 (how much of the predicted outline lies within 3 px of the
true one, and vice versa).

PennFudanPed holds small, full-body pedestrians; the photos people composite are portraits.
So the model is also measured, and trained, on close-ups cut from the same photos
(closeups.py): the close-up measure frames each test person head to waist and head to
knees, as a phone portrait (close_up_iou); training mixes in zooms on one person, the head
always in the frame, where person pixels fill a share of it drawn from 30-90% or the nearest
a window can hold with the head in it (--closeup-fraction;
--closeup-top-drop allows headless zooms on the upper body, which cost both figures on
validation), and views with no person at all (--negative-fraction), so that "no person" is
learned too. The epoch kept is the one with
the best mean of the val person IoU and the val close-up IoU.

How to run:
    python 04_semantic_bg/train.py                      # from scratch (--weights none); on 2 CPU
                                                        # cores at most --time-limit-minutes 44
    python 04_semantic_bg/train.py --device cuda --output-dir runs/04_semantic_bg-gpu   # on a GPU
    python 04_semantic_bg/train.py --weights coco --model lraspp_mobilenet_v3_large \
        --learning-rate 0.0005 --epochs 30 --output-dir runs/04_semantic_bg-lraspp   # fine-tune (COCO download)
    python 04_semantic_bg/train.py --no-evaluate-test --closeup-fraction 0 \
        --output-dir runs/04_semantic_bg-tune           # a tuning run: the test photos are never read
    python 04_semantic_bg/evaluate.py --run-dir runs/04_semantic_bg-tune --split test \
        --output-dir runs/04_semantic_bg-tune-test      # ...its test photos scored once, afterwards
    python 04_semantic_bg/train.py --smoke              # synthetic photos, about 11 s on 2 quiet cores
    torchrun --nproc_per_node 2 04_semantic_bg/train.py # data-parallel (DDP): the global batch, split in 2

The 170 photos are split (seeded; --val-fraction, --test-fraction) 120 train / 20 val /
30 test, and split.json names them; the best epoch is measured once on test. Training
stops early when --time-limit-minutes runs out (metrics.json: epochs_run). An earlier run
in --output-dir is refused unless --overwrite; a run that fails before training starts (no
data, no GPU, no weights) leaves nothing there. Outputs in --output-dir: model.pt (load it
with composite.py --weights PATH), metrics.json (test figures with bootstrap 95% intervals
over the test photos, val figures, the machine and library versions), config.json,
split.json, curves.png, predictions.png, worst.png (the test photos with the lowest IoU),
close_ups.png (test close-ups), per_photo.json (IoU and uncertain share of each test
photo and close-up: what composite.py's --max-uncertain is checked against).

This file holds the config, the split and the augmentation, and main(); the photos as they
are loaded, scored and drawn are in photos.py (shared with evaluate.py, which scores a saved
model.pt on its run's val or test photos afterwards: a --no-evaluate-test run's test set, say),
the close-up crops in closeups.py, the training loop in training.py, the scores in
scoring.py, the models and inference in segmenters.py.

Where it runs: --device auto takes a CUDA GPU when torch sees one, else the CPU, with
--num-threads 0 = all cores. Training runs under bf16 autocast on a GPU that supports it
and on a CPU with bf16 units (AMX or AVX512-BF16, as on recent Xeons), where an epoch took
6.4 s against 7.5-9.7 s in float32, validation included (--no-mixed-precision turns it
off; inference is float32 everywhere). On the CPU a seed gives the same figures run after
run (--deterministic) on one kind of CPU; a GPU run varies a little (see
segmenters.start_torch).

What to expect (measured on 2 shared CPU cores, seed 0), before the close-up measure and
the close-up and no-person training views were added:
    python 04_semantic_bg/train.py --data-dir /tmp/dd
    -> test person IoU 0.779, pixel accuracy 0.952, boundary F1 0.740 (3 px);
       val IoU 0.804 (best epoch 180 of 200); 2.1M parameters; train_seconds 2061
       (34 min; this run shared the CPU for its first 10 min; measured before the
       intervals were added).
    On a GPU (one NVIDIA H200, bf16 autocast, torch 2.11), same config as then:
    python 04_semantic_bg/train.py --weights none --device cuda --num-threads 6 --output-dir runs/04_semantic_bg-gpu
    -> test person IoU 0.767 (95% interval 0.698-0.826, a bootstrap over the 30 test
       photos), pixel accuracy 0.948, boundary F1 0.732; val IoU 0.800 (epoch 190);
       188 s of training. The CPU run's 0.779 lies inside that interval.
    With the close-up and no-person views (the default config now: bf16 training on a CPU
    with bf16 units, 400 epochs), 2 quiet CPU cores:
    python 04_semantic_bg/train.py --data-dir /tmp/dd --no-evaluate-test --output-dir runs/04_semantic_bg-bf16-e400
    python 04_semantic_bg/evaluate.py --run-dir runs/04_semantic_bg-bf16-e400 --split test \
        --data-dir /tmp/dd --output-dir runs/04_semantic_bg-bf16-e400-test
    -> val person IoU 0.800, val close-up IoU 0.804 (best epoch 350 of 400), train_seconds
       2546 (42 min); test close_up_iou 0.788 (95% interval 0.757-0.820, 142 close-ups of the
       30 test photos), test person_iou 0.732 (0.637-0.814). The same views in float32 for
       280 epochs (--no-mixed-precision --epochs 280 --eval-every 5; the time limit stopped
       it at 273): val 0.776 / 0.796, test 0.725 / 0.782. Close-ups are learned at some cost
       to the street photos' figure; worst.png shows that part of it is people the dataset
       left unlabelled, whom this model paints as people. The earlier close-up views, most
       of them zooms that cut off the head (--closeup-top-drop 0.3 --closeup-fraction 0.3
       --epochs 200): val 0.675 / 0.738, test 0.645 / 0.727. Street views only
       (--closeup-fraction 0 --negative-fraction 0), stopped at epoch 125: val person IoU
       0.789, val close-up IoU 0.517.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import closeups  # the chapter's own modules sit beside this script
import cv2
import numpy as np
from photos import Cutout, Photo, load_close_ups, load_photos, photo_rows, save_grids, set_figures

from data import distributed, outputs
from data.cli import ChapterParser, require, run_main, seed_everything
from data.outputs import plot_curves, prepare_output_dir, run_facts, write_json, write_split
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
    # The global batch; even per process: BatchNorm needs 2+ photos, and odd CPU batches segfault (training.py)
    distributed.per_process_batch(cfg["batch_size"], distributed.world_from_env().size, multiple_of=2,
                                  why="BatchNorm needs pairs, and odd CPU batches crash channels-last backward")
    require(cfg["learning_rate"] > 0, f"--learning-rate must be positive, got {cfg['learning_rate']}")
    require(cfg["weight_decay"] >= 0, f"--weight-decay must be at least 0, got {cfg['weight_decay']}")
    require(0 <= cfg["ema_decay"] < 1, f"--ema-decay must be in [0, 1) (0 = off), got {cfg['ema_decay']}")
    for key in ("closeup_fraction", "negative_fraction"):
        require(0.0 <= cfg[key] <= 1.0, f"--{key.replace('_', '-')} is a share of the views in [0, 1]")
    require(cfg["closeup_fraction"] + cfg["negative_fraction"] <= 1.0,
            "--closeup-fraction + --negative-fraction must be at most 1 (the rest are whole-scene views)")
    require(0 < cfg["closeup_share_min"] <= cfg["closeup_share_max"] < 1,
            "need 0 < --closeup-share-min <= --closeup-share-max < 1")
    require(0 <= cfg["closeup_top_drop"] <= 0.5, f"--closeup-top-drop is a share of the person's height "
            f"in [0, 0.5], got {cfg['closeup_top_drop']}")
    require(cfg["closeup_min_height"] >= 16, f"--closeup-min-height must be at least 16 px, got "
            f"{cfg['closeup_min_height']}")
    require(cfg["time_limit_minutes"] >= 0, "--time-limit-minutes must be 0 (no limit) or more")


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


def warp_view(image: np.ndarray, mask: np.ndarray, center: tuple[float, float], scale: float, cfg: dict,
              rng) -> tuple[np.ndarray, np.ndarray]:
    """The crop_size^2 view of `image` around `center` (x, y) at `scale`: tilted, maybe
    mirrored, recolored; the mask follows every step but the colors."""
    crop = cfg["crop_size"]
    matrix = cv2.getRotationMatrix2D(center, rng.uniform(-cfg["rotate_degrees"], cfg["rotate_degrees"]), scale)
    matrix[:, 2] += (crop / 2 - center[0], crop / 2 - center[1])
    # reflecting the border, to the image and the mask alike, keeps the labels true
    image = cv2.warpAffine(image, matrix, (crop, crop), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    mask = cv2.warpAffine(mask, matrix, (crop, crop), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return jitter_colors(image, cfg["color_jitter"], rng), np.ascontiguousarray(mask)


def scene_view(photo: Photo, donors: list[Cutout], cfg: dict, rng) -> tuple[np.ndarray, np.ndarray]:
    """A view of the street scene: paste people, then zoom (scale_min..scale_max) and shift."""
    image, mask = photo.image.copy(), photo.mask.copy()
    if donors and rng.random() < cfg["copy_paste"]:
        paste_people(image, mask, donors, rng)
    height, width = mask.shape
    scale = rng.uniform(cfg["scale_min"], cfg["scale_max"])
    half = cfg["crop_size"] / 2 / scale  # half the crop's side, in source pixels
    center_x = rng.uniform(min(half, width / 2), max(width - half, width / 2))
    center_y = rng.uniform(min(half, height / 2), max(height - half, height / 2))
    return warp_view(image, mask, (center_x, center_y), scale, cfg, rng)


def close_up_view(photo: Photo, cfg: dict, rng) -> tuple[np.ndarray, np.ndarray]:
    """A zoom on one person, cut from the full-size photo: person pixels fill a share of the
    frame drawn from closeup_share_min..closeup_share_max (closeups.closeup_window)."""
    box = photo.boxes[int(rng.integers(len(photo.boxes)))]
    share = rng.uniform(cfg["closeup_share_min"], cfg["closeup_share_max"])
    top, left, side = closeups.closeup_window(photo.full_mask, box, share, rng, cfg["closeup_top_drop"])
    return warp_view(photo.full_image, photo.full_mask.astype(np.uint8), (left + side / 2, top + side / 2),
                     cfg["crop_size"] / side, cfg, rng)


def empty_view(photo: Photo, cfg: dict, rng) -> tuple[np.ndarray, np.ndarray] | None:
    """A view with no person pixel, cut from the full-size photo; None if none was found.
    The view keeps to the middle of an empty window, so that even tilted by rotate_degrees
    it never reaches past it: a square tilted by t spans cos(t) + sin(t) times its side."""
    shortest = min(photo.full_mask.shape)
    window = closeups.empty_window(photo.full_mask, (0.2 * shortest, 0.7 * shortest), rng)
    if window is None:
        return None
    top, left, side = window
    tilt = math.radians(min(abs(cfg["rotate_degrees"]), 45))
    reach = math.cos(tilt) + math.sin(tilt)
    return warp_view(photo.full_image, photo.full_mask.astype(np.uint8), (left + side / 2, top + side / 2),
                     reach * cfg["crop_size"] / side, cfg, rng)


def random_view(photo: Photo, donors: list[Cutout], cfg: dict, rng) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training view (crop_size^2): with chance negative_fraction one with no
    person, with chance closeup_fraction a close-up, else the street scene. A photo with no
    empty window, or no person tall enough for a close-up, gives a scene view instead."""
    draw = rng.random()
    view = None
    if draw < cfg["negative_fraction"]:
        view = empty_view(photo, cfg, rng)
    elif draw < cfg["negative_fraction"] + cfg["closeup_fraction"] and photo.boxes:
        view = close_up_view(photo, cfg, rng)
    return view if view is not None else scene_view(photo, donors, cfg, rng)


def view_maker(train_set: list[Photo], cfg: dict) -> Callable[[np.ndarray], tuple]:
    """The training loop's source of batches: (epoch, photo index) keys in, augmented (images,
    masks) out. Each view draws from a generator of its own, seeded by (seed, epoch, index):
    the same view whichever process makes it, so N processes see what one would."""
    donors = [person for photo in train_set for person in photo.people]

    def make_views(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        views = [random_view(train_set[i], donors, cfg, distributed.sample_rng(cfg["seed"], epoch, i))
                 for epoch, i in keys.tolist()]
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


def chapter_metrics(scores: dict, sets: Sets, best, epochs_run: int, train_seconds: float) -> dict:
    """The figures of the run: test (with 95% intervals) unless --no-evaluate-test, then val."""
    metrics = {}
    if "test" in scores:
        metrics = set_figures(scores["test"], scores["test_close_ups"], sets.test_close_ups)
    val = scores["val"]
    return {**metrics, "val_person_iou": val.iou, "val_close_up_iou": scores["val_close_ups"].iou,
            "val_pixel_accuracy": val.pixel_accuracy, "val_boundary_f1": val.boundary_f1,
            "best_epoch": best.epoch, "epochs_run": epochs_run, "train_seconds": train_seconds,
            "num_train": len(sets.train), "num_val": len(sets.val), "num_test": len(sets.test or []),
            "num_val_close_ups": len(sets.val_close_ups), "num_test_close_ups": len(sets.test_close_ups or [])}


def per_photo(scores: dict, sets: Sets) -> dict[str, list[dict]]:
    """IoU and uncertain share of every photo and close-up scored after training."""
    return {part: photo_rows(photos, scores[part]) for part, photos in sets.measured().items()}


def save_plots(history, scores: dict, sets: Sets, output_dir: Path, cfg: dict) -> None:
    """curves.png, and predictions.png, worst.png and close_ups.png of the test photos (val
    with --no-evaluate-test); the close-ups shown are spread over the whole set."""
    plot_curves(asdict(history), output_dir / "curves.png",
                xlabel=f"validation pass (every {cfg['eval_every']} epochs)")
    part = "test" if sets.test is not None else "val"
    save_grids(getattr(sets, part), scores[part], getattr(sets, f"{part}_close_ups"), scores[f"{part}_close_ups"],
               output_dir, part, cfg["grid_images"])


def print_summary(scores: dict, sets: Sets, best, epochs_run: int, train_seconds: float, output_dir: Path) -> None:
    part = "test" if sets.test is not None else "val"
    print(f"{part} person IoU {scores[part].iou:.4f}  close-up IoU {scores[f'{part}_close_ups'].iou:.4f}  "
          f"pixel accuracy {scores[part].pixel_accuracy:.4f}  boundary F1 {scores[part].boundary_f1:.4f}  "
          f"(best epoch {best.epoch} of {epochs_run}, {train_seconds:.0f} s) -> {output_dir}")


def main(argv=None) -> dict:
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    check_config(cfg)
    import segmenters  # torch loads only now: --help and flag errors stay instant
    import training

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
    model, model_kwargs = training.make_model(cfg, device)
    fit = training.make_fit(model, cfg, len(sets.train), device, ddp)
    print(f"{cfg['model']} ({cfg['weights']}) on {device.type}{' (bf16 autocast)' if fit.mixed_precision else ''}: "
          f"{segmenters.count_parameters(model) / 1e6:.2f}M parameters; {len(split.train)} train / "
          f"{len(split.val)} val / {len(split.test)} test photos; {len(sets.val_close_ups)} val close-ups",
          flush=True)
    outputs.training_started(output_dir)  # data, device and weights in hand: a failure now keeps the run
    start = time.monotonic()
    rng = np.random.default_rng(cfg["seed"])
    history, best, epochs_run = training.train(fit, len(sets.train), view_maker(sets.train, cfg),
                                               (sets.val, sets.val_close_ups), cfg, rng)
    train_seconds = time.monotonic() - start
    if not ddp.is_main:
        return {}  # rank 0 alone measures the model and saves the results
    scores = {part: training.evaluate(model, photos, cfg, device, keep_masks=True)
              for part, photos in sets.measured().items()}

    segmenters.save_checkpoint(output_dir / "model.pt", model, cfg["model"], num_classes=2, person_class=1,
                               image_size=cfg["image_size"], model_kwargs=model_kwargs, config=cfg,
                               best_epoch=best.epoch)
    metrics = {**chapter_metrics(scores, sets, best, epochs_run, train_seconds),
               "parameters": segmenters.count_parameters(model), "mixed_precision": fit.mixed_precision,
               "world_size": ddp.size,
               **run_facts(("torch", "torchvision"), device=device.type,
                           device_name=segmenters.device_name(device))}
    write_json(output_dir / "metrics.json", metrics)
    write_json(output_dir / "per_photo.json", per_photo(scores, sets))
    save_plots(history, scores, sets, output_dir, cfg)
    print_summary(scores, sets, best, epochs_run, train_seconds, output_dir)
    return metrics


if __name__ == "__main__":
    run_main(main)
