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
    python 04_semantic_bg/train.py                      # from scratch (--weights none), ~35 min
    python 04_semantic_bg/train.py --weights coco --model lraspp_mobilenet_v3_large \
        --lr 0.0005 --epochs 30                         # fine-tune (needs the COCO download)
    python 04_semantic_bg/train.py --smoke              # synthetic photos, about 6 s

The 170 photos are split (seeded) 120 train / 20 val / 30 test; the epoch with the best
val IoU is kept and measured once on test. Outputs in --output-dir: model.pt (load it
with composite.py --weights PATH), metrics.json, curves.png, predictions.png.

What to expect (measured on 2 shared CPU cores, seed 0):
    python 04_semantic_bg/train.py --data-dir /tmp/dd
    -> test person IoU 0.779, pixel accuracy 0.952, boundary F1 0.740 (3 px);
       val IoU 0.804 (best epoch 180 of 200); 2.1M parameters; train_seconds 2061
       (34 min; this run shared the CPU for its first 10 min).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from matting import fit_longest_side  # the chapter's own modules sit beside this script
from tqdm import tqdm

from data.cli import ChapterParser, UserError, require, run_main, seed_everything
from data.outputs import plot_curves, plot_image_grid, prepare_output_dir, write_json
from data.pennfudan import load_pennfudan
from data.synthetic import write_pennfudan

CHAPTER = "04_semantic_bg"
CONFIG_PATH = Path(__file__).with_name("config.toml")

# --- Config -------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    require(cfg["weights"] in ("none", "coco"), f"--weights must be none or coco, got {cfg['weights']!r}")
    require(cfg["weights"] == "none" or cfg["model"] != "unet",
            "--weights coco fine-tunes a torchvision model: add --model lraspp_mobilenet_v3_large "
            "(or deeplabv3_resnet50 / deeplabv3_resnet101); the U-Net trains from scratch")
    require(cfg["crop_size"] <= cfg["image_size"], "--crop-size must not exceed --image-size")
    require(cfg["crop_size"] % 32 == 0, "--crop-size must be a multiple of 32 (the U-Net's stride)")
    require(0 < cfg["scale_min"] <= cfg["scale_max"], "need 0 < --scale-min <= --scale-max")
    require(0.0 <= cfg["copy_paste"] <= 1.0, "--copy-paste is a probability in [0, 1]")
    for key in ("epochs", "batch_size", "val_every", "num_val", "num_test", "width", "num_threads",
                "crop_size"):
        require(cfg[key] >= 1, f"--{key.replace('_', '-')} must be at least 1")
    # Even: BatchNorm needs 2+ photos, and torch 2.14.1 segfaults on odd CPU batches (see train).
    require(cfg["batch_size"] % 2 == 0, f"--batch-size must be even, got {cfg['batch_size']}")
    require(cfg["lr"] > 0, f"--lr must be positive, got {cfg['lr']}")
    require(cfg["weight_decay"] >= 0, f"--weight-decay must be at least 0, got {cfg['weight_decay']}")


# --- Data ---------------------------------------------------------------------------


@dataclass
class Photo:
    """One photo at the working resolution, plus its full-resolution mask for scoring."""

    name: str
    image: np.ndarray         # (h, w, 3) uint8, longest side = image_size
    mask: np.ndarray          # (h, w) uint8 0/1
    full_mask: np.ndarray     # (H, W) bool at the photo's own size
    people: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # cut-outs


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
                people.append((small[box].copy(), person[box].astype(np.uint8)))
        full = record.person_mask()
        photos.append(Photo(record.image_path.stem, small, shrink_mask(full, (width, height)).astype(np.uint8),
                            full, people))
    return photos


def split_photos(photos: list[Photo], num_val: int, num_test: int, seed: int):
    require(len(photos) > num_val + num_test,
            f"{len(photos)} photos cannot give {num_val} val + {num_test} test and a train split")
    order = np.random.default_rng(seed).permutation(len(photos))
    test, val, train = np.split(order, [num_test, num_test + num_val])
    return [photos[i] for i in train], [photos[i] for i in val], [photos[i] for i in test]


def paste_people(image: np.ndarray, mask: np.ndarray, donors: list, rng) -> None:
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


def random_view(photo: Photo, donors: list, cfg: dict, rng) -> tuple[np.ndarray, np.ndarray]:
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


def jitter_colors(image: np.ndarray, strength: float, rng) -> np.ndarray:
    x = image.astype(np.float32) * rng.uniform(1 - strength, 1 + strength)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # contrast
    gray = x.mean(axis=2, keepdims=True)
    x = gray + (x - gray) * rng.uniform(1 - strength, 1 + strength)  # saturation
    return np.clip(x, 0, 255).astype(np.uint8)


# --- Model --------------------------------------------------------------------------


def make_model(cfg: dict):
    from segmenters import build_model

    model_kwargs = {"width": cfg["width"]} if cfg["model"] == "unet" else {}
    model = build_model(cfg["model"], num_classes=2, pretrained=cfg["weights"] == "coco",
                        **model_kwargs)
    return model, model_kwargs


# --- Train --------------------------------------------------------------------------


def segmentation_loss(logits, target, dice_weight: float):
    import torch.nn.functional as F

    loss = F.cross_entropy(logits, target)
    if dice_weight:
        person = logits.softmax(1)[:, 1]
        truth = target.float()
        dice = 1 - (2 * (person * truth).sum() + 1) / (person.sum() + truth.sum() + 1)
        loss = loss + dice_weight * dice
    return loss


def train(model, train_set: list[Photo], val_set: list[Photo], cfg: dict, rng):
    """Cosine-scheduled AdamW; validates every `val_every` epochs, keeps the best state."""
    import torch
    from segmenters import to_tensor

    steps_per_epoch = math.ceil(len(train_set) / cfg["batch_size"])
    total, warmup = cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / max(warmup, 1), 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))))
    donors = [person for photo in train_set for person in photo.people]
    history = {"loss": [], "iou": [], "val_iou": [], "val_boundary_f1": []}
    best = {"val_iou": -1.0, "epoch": 0, "state": None}
    running = {"loss": 0.0, "batches": 0, "intersection": 0, "union": 0}
    progress = tqdm(range(1, cfg["epochs"] + 1), desc="train", leave=False)
    for epoch in progress:
        model.train()
        order = rng.permutation(len(train_set))
        for start in range(0, len(order), cfg["batch_size"]):
            batch = order[start:start + cfg["batch_size"]]
            # torch 2.14.1's channels-last conv backward on CPU segfaults on odd batch sizes
            # (measured): drop the odd photo of a short last batch (it is seen next epoch).
            batch = batch[:len(batch) // 2 * 2]
            if not len(batch):
                continue
            views = [random_view(train_set[i], donors, cfg, rng) for i in batch]
            images = to_tensor(np.stack([v[0] for v in views]))
            target = torch.from_numpy(np.stack([v[1] for v in views])).long()
            logits = model(images)
            loss = segmentation_loss(logits, target, cfg["dice_weight"])
            if not torch.isfinite(loss):
                raise UserError(f"the loss became {loss.item()} at epoch {epoch}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            predicted = logits.argmax(1).bool()
            running["loss"] += loss.item()
            running["batches"] += 1
            running["intersection"] += (predicted & target.bool()).sum().item()
            running["union"] += (predicted | target.bool()).sum().item()
        if epoch % cfg["val_every"] == 0 or epoch == cfg["epochs"]:
            scores = evaluate(model, val_set, cfg)
            history["loss"].append(running["loss"] / running["batches"])
            history["iou"].append(running["intersection"] / max(running["union"], 1))
            history["val_iou"].append(scores["iou"])
            history["val_boundary_f1"].append(scores["boundary_f1"])
            running = dict.fromkeys(running, 0)
            if scores["iou"] > best["val_iou"]:
                best = {"val_iou": scores["iou"], "epoch": epoch,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            progress.set_postfix(loss=f"{history['loss'][-1]:.3f}", val_iou=f"{scores['iou']:.3f}")
            print(f"epoch {epoch:4d}  loss {history['loss'][-1]:.4f}  train IoU {history['iou'][-1]:.3f}"
                  f"  val IoU {scores['iou']:.3f}  val BF1 {scores['boundary_f1']:.3f}", flush=True)
    model.load_state_dict(best["state"])
    return history, best


# --- Evaluate -----------------------------------------------------------------------


def predict_probability(model, image: np.ndarray, full_size: tuple[int, int], flip_tta: bool) -> np.ndarray:
    """Person probability at full resolution (H, W) for one working-size photo."""
    from segmenters import person_probability

    probability = person_probability(model, image, person_class=1, flip=flip_tta)
    return cv2.resize(probability, (full_size[1], full_size[0]), interpolation=cv2.INTER_LINEAR)


def boundary_f1(predicted: np.ndarray, truth: np.ndarray, tolerance: float) -> float:
    """F1 of outline pixels matched within `tolerance` px (Csurka et al. 2013's BF score)."""
    def outline(mask):
        mask = mask.astype(np.uint8)
        return (mask - cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)) > 0
    edge_predicted, edge_truth = outline(predicted), outline(truth)
    if not edge_predicted.any() and not edge_truth.any():
        return 1.0
    if not edge_predicted.any() or not edge_truth.any():
        return 0.0
    def distance_to(edge):  # distance of every pixel to the nearest pixel of `edge`
        return cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3)
    precision = (distance_to(edge_truth)[edge_predicted] <= tolerance).mean()
    recall = (distance_to(edge_predicted)[edge_truth] <= tolerance).mean()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def evaluate(model, photos: list[Photo], cfg: dict, keep_masks: bool = False) -> dict:
    """IoU and pixel accuracy pooled over all pixels; boundary F1 averaged over photos."""
    model.eval()
    intersection = union = correct = total = 0
    f1_scores, masks = [], []
    for photo in photos:
        predicted = predict_probability(model, photo.image, photo.full_mask.shape, cfg["flip_tta"]) > 0.5
        truth = photo.full_mask
        intersection += int((predicted & truth).sum())
        union += int((predicted | truth).sum())
        correct += int((predicted == truth).sum())
        total += truth.size
        f1_scores.append(boundary_f1(predicted, truth, cfg["boundary_tolerance"]))
        if keep_masks:
            masks.append(predicted)
    return {"iou": intersection / max(union, 1), "pixel_accuracy": correct / max(total, 1),
            "boundary_f1": float(np.mean(f1_scores)), "masks": masks}


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


def save_predictions(photos: list[Photo], masks: list[np.ndarray], path: Path) -> None:
    images, titles = [], []
    for photo, predicted in zip(photos, masks, strict=True):
        union = (predicted | photo.full_mask).sum()
        iou = (predicted & photo.full_mask).sum() / union if union else 1.0
        images.append(overlay(photo, predicted))
        titles.append(f"{photo.name} IoU {iou:.2f}")
    plot_image_grid(images, titles, path, columns=4, cell=2.6,
                    title="test predictions: green hit, red false person, blue missed")


def main(argv=None) -> dict:
    parser = ChapterParser(__doc__, CONFIG_PATH, CHAPTER)
    cfg, args = parser.parse_config(argv)
    check_config(cfg)
    import torch  # after parsing: --help and flag errors stay instant
    from segmenters import count_parameters, save_checkpoint

    seed_everything(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["num_threads"])
    output_dir = prepare_output_dir(args.output_dir, cfg, smoke=args.smoke)
    if args.smoke:  # same loader, same code path, on photos drawn for the purpose
        data_dir = output_dir / "smoke_data"
        write_pennfudan(data_dir, count=cfg["smoke_images"], seed=cfg["seed"])
        records = load_pennfudan(data_dir, fetch=False)
    else:
        records = load_pennfudan(args.data_dir)
    photos = load_photos(records, cfg["image_size"])
    train_set, val_set, test_set = split_photos(photos, cfg["num_val"], cfg["num_test"], cfg["seed"])
    model, model_kwargs = make_model(cfg)
    model = model.to(memory_format=torch.channels_last)  # ~1.7x faster convolutions on CPU
    print(f"{cfg['model']} ({cfg['weights']}): {count_parameters(model) / 1e6:.2f}M parameters; "
          f"{len(train_set)} train / {len(val_set)} val / {len(test_set)} test photos", flush=True)

    start = time.monotonic()
    history, best = train(model, train_set, val_set, cfg, np.random.default_rng(cfg["seed"]))
    train_seconds = time.monotonic() - start
    test = evaluate(model, test_set, cfg, keep_masks=True)
    val = evaluate(model, val_set, cfg)

    save_checkpoint(output_dir / "model.pt", model, cfg["model"], num_classes=2, person_class=1,
                    image_size=cfg["image_size"], model_kwargs=model_kwargs, config=cfg,
                    best_epoch=best["epoch"])
    metrics = {"person_iou": test["iou"], "pixel_accuracy": test["pixel_accuracy"],
               "boundary_f1": test["boundary_f1"], "val_person_iou": val["iou"],
               "val_pixel_accuracy": val["pixel_accuracy"], "val_boundary_f1": val["boundary_f1"],
               "best_epoch": best["epoch"], "train_seconds": train_seconds,
               "parameters": count_parameters(model), "num_train": len(train_set),
               "num_val": len(val_set), "num_test": len(test_set)}
    write_json(output_dir / "metrics.json", metrics)
    plot_curves(history, output_dir / "curves.png",
                xlabel=f"validation pass (every {cfg['val_every']} epochs)")
    count = min(cfg["grid_images"], len(test_set))
    save_predictions(test_set[:count], test["masks"][:count], output_dir / "predictions.png")
    print(f"test person IoU {test['iou']:.4f}  pixel accuracy {test['pixel_accuracy']:.4f}  "
          f"boundary F1 {test['boundary_f1']:.4f}  (val IoU {val['iou']:.4f}, best epoch "
          f"{best['epoch']}, {train_seconds:.0f} s) -> {output_dir}")
    return metrics


if __name__ == "__main__":
    run_main(main)
