"""04b_instance_seg, the COCO model's parts against torchvision's own functions.

A torch process computes torchvision's answers (RoIAlign near and past the map's edges, the
multi-scale level mapping, mask paste-back, anchors) on cases drawn here; a TensorFlow
process computes tv_roi_align.py's and coco_model.py's on the same inputs. The whole model
is compared in test_04b_coco.py; these cases reach the edge rules a photo seldom does.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from tests.helpers import REPO, run_python

CHAPTER = "04b_instance_seg"

TORCH_ANSWERS = """
    import sys
    import numpy as np
    import torch
    from collections import OrderedDict
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    cases = dict(np.load(sys.argv[1]))
    t = torch.from_numpy
    out = {}
    out["roi"] = roi_align(t(cases["feature"]), [t(cases["boxes"])], 7, spatial_scale=0.25,
                           sampling_ratio=2, aligned=False).permute(0, 2, 3, 1).numpy()
    pyramid = OrderedDict((str(k), t(cases[f"P{k + 2}"])) for k in range(4))
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
    out["multiscale"] = pooler(pyramid, [t(cases["level_boxes"])], [(256, 320)]).permute(0, 2, 3, 1).numpy()
    out["pasted"] = paste_masks_in_image(t(cases["masks"])[:, None], t(cases["mask_boxes"]), (50, 60))[:, 0].numpy()
    generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    maps = [torch.zeros(1, 1, (800 + s - 1) // s, (1088 + s - 1) // s) for s in (4, 8, 16, 32, 64)]
    anchors = generator(ImageList(torch.zeros(1, 3, 800, 1088), [(790, 1066)]), maps)[0]
    out["anchors"] = anchors.numpy()
    np.savez(sys.argv[2], **out)
"""

KERAS_ANSWERS = """
    import sys
    import numpy as np
    import tensorflow as tf
    import coco_model
    import tv_roi_align

    cases = dict(np.load(sys.argv[1]))
    nhwc = lambda a: tf.constant(a.transpose(0, 2, 3, 1))
    out = {}
    out["roi"] = tv_roi_align.roi_align(nhwc(cases["feature"]), cases["boxes"], 7, 0.25).numpy()
    pyramid = [nhwc(cases[f"P{k + 2}"]) for k in range(4)]
    out["multiscale"] = tv_roi_align.multiscale_roi_align(pyramid, tf.constant(cases["level_boxes"]), 14).numpy()
    out["pasted"] = np.stack([coco_model.paste_mask(m, b, 50, 60)
                              for m, b in zip(cases["masks"], cases["mask_boxes"])])
    padded = tf.constant([800, 1088])
    out["anchors"] = np.concatenate([
        coco_model.grid_anchors(tf.zeros([1, (800 + s - 1) // s, (1088 + s - 1) // s, 1]), padded, size).numpy()
        for s, size in zip((4, 8, 16, 32, 64), coco_model.ANCHOR_SIZES)])
    np.savez(sys.argv[2], **out)
"""


def draw_cases() -> dict:
    rng = np.random.default_rng(28)
    cases = {"feature": rng.normal(size=(1, 5, 13, 17)).astype(np.float32)}
    # Boxes in input pixels for a stride-4 map of 13 x 17 (52 x 68 pixels): inside, across
    # each edge, in the one-pixel band past the edge that is clamped, beyond it (zeros),
    # smaller than a map pixel (stretched to 1 x 1), and random ones.
    crafted = [[4, 4, 40, 30], [-10, -6, 20, 16], [50, 40, 75, 60], [-8, -8, -1, -2], [66, 50, 71, 56],
               [70, 54, 90, 70], [10, 10, 11, 10.5], [0, 0, 68, 52], [-30, 20, 100, 30], [33.3, 7.7, 34.1, 49.9]]
    corners = rng.uniform(-12, 75, size=(30, 2, 2))
    random = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    cases["boxes"] = np.concatenate([crafted, random]).astype(np.float32)
    for k, stride in enumerate((4, 8, 16, 32)):  # a 256 x 320 image's pyramid
        cases[f"P{k + 2}"] = rng.normal(size=(1, 3, 256 // stride, 320 // stride)).astype(np.float32)
    sides = np.exp(rng.uniform(np.log(4), np.log(400), size=(40, 2)))  # every level is used
    origins = rng.uniform(-20, 300, size=(40, 2))
    cases["level_boxes"] = np.concatenate([origins, origins + sides], axis=1).astype(np.float32)
    cases["masks"] = rng.uniform(size=(12, 28, 28)).astype(np.float32)
    # Boxes of a 50 x 60 photo, some running off its edges (torchvision's paste fails on a box
    # that starts past the bottom or right edge, which a detection clipped to the photo never does).
    starts = rng.uniform(-15, [59, 49], size=(12, 2))
    ends = starts + rng.uniform(0.5, 40, size=(12, 2))
    cases["mask_boxes"] = np.concatenate([starts, ends], axis=1).astype(np.float32)
    cases["mask_boxes"][0] = [3.0, 4.0, 3.5, 4.2]  # under a pixel: pasted as 1 x 1
    return cases


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco_units")
    np.savez(folder / "cases.npz", **draw_cases())
    torch_code = f"import sys; sys.path.insert(0, {str(REPO / CHAPTER)!r})\n" + textwrap.dedent(TORCH_ANSWERS)
    run_python(torch_code, None, args=(folder / "cases.npz", folder / "torch.npz"))
    run_python(KERAS_ANSWERS, CHAPTER, args=(folder / "cases.npz", folder / "keras.npz"))
    with np.load(folder / "torch.npz") as theirs, np.load(folder / "keras.npz") as ours:
        return {key: (ours[key], theirs[key]) for key in theirs.files}


def largest_difference(pair) -> float:
    ours, theirs = pair
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max())


def test_roi_align_matches_torchvision_at_and_past_the_edges(answers):
    # Measured: 3.2e-06 (float32 rounding of the sample positions; the maps have unit variance).
    assert largest_difference(answers["roi"]) < 1e-4


def test_multiscale_roi_align_picks_torchvision_levels(answers):
    # Measured: 2.2e-05 (boxes up to 400 px, so larger rounding of positions than above).
    assert largest_difference(answers["multiscale"]) < 1e-4


def test_mask_paste_back_matches_torchvision(answers):
    # Measured: 6.0e-07 (masks in 0..1).
    assert largest_difference(answers["pasted"]) < 1e-5


def test_anchors_match_torchvision_including_the_pool_levels_stride(answers):
    # P6 is 13 x 17 on an 800 x 1088 input: torchvision's stride there is 800 // 13 = 61, not 64.
    ours, theirs = answers["anchors"]
    assert ours.shape == theirs.shape == (3 * sum(-(-800 // s) * -(-1088 // s) for s in (4, 8, 16, 32, 64)), 4)
    assert np.array_equal(ours, theirs)
