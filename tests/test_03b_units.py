"""03b_xml_detection: known answers for the arithmetic a learner might copy: the mosaic's
box placement, preload's per-axis box scaling, the warm-up + cosine schedule and the EMA
decay ramp.

One script computes them all in a fresh process (torch stays out of the test process:
torchvision imported after TensorFlow segfaults); the tests check its answers by hand.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import run_python

KNOWN_ANSWERS = r'''
import json, sys, tempfile
from pathlib import Path
import numpy as np, torch
from PIL import Image
sys.path[:0] = [".", "03b_xml_detection"]  # run from the repo root
import engine, model
from augment import FruitBoxes, MosaicPlan
from data.fruits import FruitRecord

out = {}
# Mosaic: four solid-colour 100 px photos, one box each, split at (40, 60).
colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
images = torch.stack([torch.tensor(c, dtype=torch.uint8)[:, None, None].expand(3, 100, 100) for c in colours])
boxes = [torch.tensor([b], dtype=torch.float32) for b in
         ([5, 10, 25, 40], [30, 30, 50, 60], [20, 20, 60, 60], [50, 50, 100, 100])]
labels = [torch.tensor([k]) for k in (0, 1, 2, 0)]
cfg = {"image_size": 100, "color_jitter": 0.0, "zoom_out_prob": 0.0, "crop_scale_min": 1.0}
data = FruitBoxes(model.Photos(images, boxes, labels), cfg, train=True)
plan = MosaicPlan((40, 60), [0, 1, 2, 3],
                  [(0, 0, 60, 40), (20, 20, 60, 60), (0, 0, 80, 80), (0, 0, 100, 100)])
canvas, mosaic_boxes, mosaic_labels = data.compose(plan)
out["mosaic_boxes"] = mosaic_boxes.tolist()
out["mosaic_labels"] = mosaic_labels.tolist()
out["mosaic_pixels"] = [canvas[:, y, x].tolist() for x, y in ((20, 30), (70, 30), (20, 80), (70, 80))]

# preload: a 200 x 100 photo (red left half, blue right half) squashed to 50 x 50.
folder = Path(tempfile.mkdtemp())
pixels = np.zeros((100, 200, 3), np.uint8)
pixels[:, :100, 0] = 255
pixels[:, 100:, 2] = 255
Image.fromarray(pixels).save(folder / "apple_1.jpg", format="PNG")
record = FruitRecord(folder / "apple_1.jpg", folder / "apple_1.xml", "apple", 200, 100,
                     np.array([[20, 10, 120, 60]], np.float32), ["banana"])
photos = model.preload([record], 50, "test")
out["preload_shape"] = list(photos.images.shape)
out["preload_boxes"] = photos.boxes[0].tolist()
out["preload_labels"] = photos.labels[0].tolist()
out["preload_pixels"] = [photos.images[0, :, 25, 10].tolist(), photos.images[0, :, 25, 40].tolist()]

# The schedule as the optimizer sees it: 10 epochs of 10 steps, 1 warm-up epoch.
net = torch.nn.Linear(2, 2)
opt_cfg = {"weight_decay": 0.05, "learning_rate": 0.002, "epochs": 10, "warmup_epochs": 1}
optimizer, scheduler = engine.make_optimizer(net, opt_cfg, steps_per_epoch=10)
lrs = {}
for step in range(101):
    lrs[step] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
out["lr"] = {str(step): lrs[step] for step in (0, 9, 10, 55, 100)}
out["ema"] = [engine.ema_decay_at(0, 0.996), engine.ema_decay_at(200, 0.996),
              engine.ema_decay_at(10**6, 0.996), engine.ema_decay_at(500, 0.0)]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def known_answers():
    return json.loads(run_python(KNOWN_ANSWERS, "03b_xml_detection").stdout.strip().splitlines()[-1])


def test_mosaic_puts_each_photo_and_its_box_in_its_quadrant(known_answers):
    # Split at (40, 60): TL 40x60, TR 60x60, BL 40x40, BR 60x40. Crops: TL 40x60 at (0,0),
    # unscaled; TR 60x60 at (20,20), unscaled, shifted by -20; BL 80x80 halved; BR 100x100
    # scaled by 0.6 across and 0.4 down. Then each moves by its quadrant's corner.
    expected = [[5, 10, 25, 40],                      # TL: as it was
                [40 + 10, 0 + 10, 40 + 30, 0 + 40],   # TR: (30,30,50,60) - 20, then + (40, 0)
                [0 + 10, 60 + 10, 0 + 30, 60 + 30],   # BL: (20,20,60,60) / 2, then + (0, 60)
                [40 + 30, 60 + 20, 40 + 60, 60 + 40]]  # BR: (50*.6, 50*.4, 100*.6, 100*.4) + (40, 60)
    assert len(known_answers["mosaic_boxes"]) == 4
    for got, want in zip(known_answers["mosaic_boxes"], expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    assert known_answers["mosaic_labels"] == [0, 1, 2, 0]
    assert known_answers["mosaic_pixels"] == [[200, 0, 0], [0, 200, 0], [0, 0, 200], [200, 200, 0]]


def test_preload_scales_boxes_of_a_non_square_photo_per_axis(known_answers):
    # 200 x 100 -> 50 x 50: x scaled by 1/4, y by 1/2.
    assert known_answers["preload_shape"] == [1, 3, 50, 50]
    assert known_answers["preload_boxes"] == [pytest.approx([5, 5, 30, 30])]
    assert known_answers["preload_labels"] == [1]  # banana
    assert known_answers["preload_pixels"] == [[255, 0, 0], [0, 0, 255]]  # left half red, right blue


def test_warmup_then_cosine_schedule(known_answers):
    # 100 steps, 10 of warm-up, peak 0.002: 1/10 of the peak at step 0, the peak at the end
    # of the warm-up, half-way down the cosine at step 55 (0.01 + 0.99 / 2), 1% at the end.
    lr = known_answers["lr"]
    assert lr["0"] == pytest.approx(0.0002)
    assert lr["9"] == pytest.approx(0.002) and lr["10"] == pytest.approx(0.002)
    assert lr["55"] == pytest.approx(0.002 * 0.505)
    assert lr["100"] == pytest.approx(0.002 * 0.01)


def test_ema_decay_ramps_up_to_its_target(known_answers):
    at_0, at_200, at_end, no_decay = known_answers["ema"]
    assert at_0 == 0.0  # the first updates copy the weights
    assert at_200 == pytest.approx(0.996 * (1 - math.exp(-1)))
    assert at_end == pytest.approx(0.996)
    assert no_decay == 0.0
