"""Training photos for 03b, freshly augmented at every step, boxes moving with the pixels.

Torchvision's v2 transforms take the image and a `BoundingBoxes` tv_tensor together, so
a crop or flip moves the boxes with the pixels; SanitizeBoundingBoxes then drops boxes
that became slivers. Mosaic (4 photos in the quadrants of one) is written out here: first
the random choices (`MosaicPlan`), then the arithmetic that places the photos and their
boxes (`FruitBoxes.compose`), so the arithmetic can be checked by hand.

Each training item is asked for by (epoch, index) and drawn from a generator seeded by
(seed, epoch, index) alone: the same picture whichever process or loader worker makes it,
so a run under torchrun sees the pictures a single process would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from model import Photos
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from data.distributed import sample_seed

MEAN_FILL = [124, 116, 104]  # ImageNet mean colour: zoom-out padding looks "neutral"


class MosaicPlan(NamedTuple):
    """The random choices of one mosaic: the split point and, per quadrant, a photo and its crop."""
    centre: tuple[int, int]                 # (cx, cy): where the four quadrants meet
    picks: list[int]                        # photo index for quadrants TL, TR, BL, BR
    crops: list[tuple[float, float, float, float]]  # (top, left, height, width) in the photo


class FruitBoxes(torch.utils.data.Dataset):
    """Preloaded photos; in training mode each item is a new random augmentation."""

    def __init__(self, photos: Photos, cfg: dict, train: bool):
        self.images, self.boxes, self.labels = photos
        self.train, self.size, self.cfg = train, cfg["image_size"], cfg
        jitter = cfg["color_jitter"]
        self.single = v2.Compose([
            v2.RandomApply([v2.RandomZoomOut(fill=MEAN_FILL, side_range=(1.0, 2.0))],
                           p=cfg["zoom_out_prob"]),
            v2.RandomResizedCrop(self.size, scale=(cfg["crop_scale_min"], 1.0),
                                 ratio=(0.75, 1.33), antialias=True),
        ])
        self.finish = v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.02),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=4),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def _boxes(self, index: int) -> tv_tensors.BoundingBoxes:
        return tv_tensors.BoundingBoxes(self.boxes[index], format="XYXY",
                                        canvas_size=tuple(self.images.shape[-2:]))

    def plan_mosaic(self, index: int) -> MosaicPlan:
        """Random centre; per quadrant a photo (the first is `index`) and a crop of it with
        the quadrant's aspect ratio, 50-100% of the largest such crop."""
        size, side = self.size, self.images.shape[-1]
        cx, cy = (int(size * v) for v in torch.empty(2).uniform_(0.3, 0.7))
        picks = [index, *torch.randint(len(self.images), (3,)).tolist()]
        crops = []
        for x0, y0, x1, y1 in quadrants(size, cx, cy):
            w, h = x1 - x0, y1 - y0
            scale = float(torch.empty(1).uniform_(0.5, 1.0))
            crop_w, crop_h = (side * scale, side * scale * h / w) if w >= h else (side * scale * w / h, side * scale)
            left = int(torch.randint(0, max(1, int(side - crop_w) + 1), (1,)))
            top = int(torch.randint(0, max(1, int(side - crop_h) + 1), (1,)))
            crops.append((top, left, crop_h, crop_w))
        return MosaicPlan((cx, cy), picks, crops)

    def compose(self, plan: MosaicPlan):
        """Four photos, each crop resized into its quadrant: (3,S,S) uint8, boxes, labels.
        A box keeps only if at least 30% of it (in the resized photo) is in the quadrant."""
        size = self.size
        canvas = torch.zeros(3, size, size, dtype=torch.uint8)
        all_boxes, all_labels = [], []
        for pick, (top, left, crop_h, crop_w), (x0, y0, x1, y1) in zip(
                plan.picks, plan.crops, quadrants(size, *plan.centre), strict=True):
            w, h = x1 - x0, y1 - y0
            crop = (top, left, int(crop_h), int(crop_w))
            canvas[:, y0:y1, x0:x1] = F.resized_crop(self.images[pick], *crop, size=[h, w], antialias=True)
            boxes = F.resized_crop(self._boxes(pick), *crop, size=[h, w])
            source = self.boxes[pick]
            full_area = (source[:, 2:] - source[:, :2]).prod(1) * (w * h) / (crop_w * crop_h)
            clipped = F.clamp_bounding_boxes(boxes).as_subclass(torch.Tensor)
            keep = (clipped[:, 2:] - clipped[:, :2]).prod(1) >= 0.3 * full_area  # mostly visible
            all_boxes.append(clipped[keep] + torch.tensor([x0, y0, x0, y0]))
            all_labels.append(self.labels[pick][keep])
        return canvas, torch.cat(all_boxes), torch.cat(all_labels)

    def __getitem__(self, key):
        """A photo by index; in training mode a new augmentation of it, keyed by (epoch, index)."""
        if not self.train:
            return self.images[key], {"boxes": self.boxes[key], "labels": self.labels[key]}
        epoch, index = key
        # torchvision's transforms draw from torch's default generator: seed it for this
        # sample alone, and give the loop its own state back afterwards
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed(self.cfg["seed"], epoch, index))
            return self.augment(index)

    def augment(self, index: int):
        """Mosaic or one photo zoomed and cropped, then flipped and recoloured; boxes follow."""
        if float(torch.rand(1)) < self.cfg["mosaic_prob"]:
            image, boxes, labels = self.compose(self.plan_mosaic(index))
            boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(self.size, self.size))
        else:
            image, boxes, labels = self.images[index], self._boxes(index), self.labels[index]
            image, boxes = self.single(image, boxes)
        image, target = self.finish(image, {"boxes": boxes, "labels": labels})
        return image, {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]}


def quadrants(size: int, cx: int, cy: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of the top-left, top-right, bottom-left and bottom-right quadrants."""
    return [(0, 0, cx, cy), (cx, 0, size, cy), (0, cy, cx, size), (cx, cy, size, size)]


def collate(batch):
    return tuple(zip(*batch, strict=True))
