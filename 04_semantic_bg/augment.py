"""The training views of chapter 04: every augmented crop the segmenter learns from.

`view_maker` turns (epoch, photo) keys into a batch of crop_size^2 views. Each view is, by
chance: a street scene (copy-paste of people cut from other photos, a random zoom and shift),
a close-up of one person with the head in the frame (closeups.py), or a view with no person
at all; then tilted, maybe mirrored and recolored (`warp_view`). Every view draws from a
generator seeded by (seed, epoch, photo) alone (data/distributed.py), so any process under
torchrun makes the same view. numpy/OpenCV only: no torch here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import closeups  # the chapter's own modules sit beside this one
import cv2
import numpy as np
from photos import Cutout, Photo

from data import distributed
from data.cli import require, require_at_least

# (N, 2) keys (epoch, index of a training photo) -> (images (N, h, w, 3) uint8, masks (N, h, w) uint8):
# augmented views, each drawn from its key alone (so any process draws the same view)
MakeViews = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def check_views(cfg: dict) -> None:
    """The flags of the views; a wrong one raises a UserError that names it."""
    require_at_least(cfg, "crop_size", 1)
    require(cfg["crop_size"] <= cfg["image_size"], "--crop-size must not exceed --image-size")
    require(cfg["crop_size"] % 32 == 0, "--crop-size must be a multiple of 32 (the U-Net's stride)")
    require(0 < cfg["scale_min"] <= cfg["scale_max"], "need 0 < --scale-min <= --scale-max")
    require(0.0 <= cfg["copy_paste"] <= 1.0, "--copy-paste is a probability in [0, 1]")
    for key in ("closeup_fraction", "negative_fraction"):
        require(0.0 <= cfg[key] <= 1.0, f"--{key.replace('_', '-')} is a share of the views in [0, 1]")
    require(cfg["closeup_fraction"] + cfg["negative_fraction"] <= 1.0,
            "--closeup-fraction + --negative-fraction must be at most 1 (the rest are whole-scene views)")
    require(0 < cfg["closeup_share_min"] <= cfg["closeup_share_max"] < 1,
            "need 0 < --closeup-share-min <= --closeup-share-max < 1")
    require(0 <= cfg["closeup_top_drop"] <= 0.5, f"--closeup-top-drop is a share of the person's height "
            f"in [0, 0.5], got {cfg['closeup_top_drop']}")
    require_at_least(cfg, "closeup_min_height", 16, "px at the photo's own size")


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


def view_maker(train_set: list[Photo], cfg: dict) -> MakeViews:
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
