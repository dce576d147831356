"""Chapter 04: compositing math with known answers, smoke runs, the --weights PATH round
trip, error paths, and a short real-data training run.

The compositing math (04_semantic_bg/matting.py) is numpy/OpenCV only and is imported by
path; torch is only ever used inside the chapter's own subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from data.images import read_rgb
from tests.helpers import REPO, run_chapter, run_script, script_env

CHAPTER = REPO / "04_semantic_bg"
TRAIN, COMPOSITE = "04_semantic_bg/train.py", "04_semantic_bg/composite.py"


def _load_matting():
    spec = importlib.util.spec_from_file_location("ch04_matting", CHAPTER / "matting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


matting = _load_matting()

RED, BLUE, GREEN = (200, 0, 0), (0, 0, 255), (0, 180, 0)


def square_scene(size: int = 200, inside: tuple = RED, outside: tuple = GREEN, edge: int = 40):
    """A photo with a square 'person' of color `inside`, and its hard 0/1 probability."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = outside
    image[edge:size - edge, edge:size - edge] = inside
    probability = np.zeros((size, size), np.float32)
    probability[edge:size - edge, edge:size - edge] = 1.0
    return image, probability


# --- cover_resize -----------------------------------------------------------------------


def test_cover_resize_center_crops_a_wide_background_without_stretching():
    x = np.arange(400, dtype=np.float64)
    wide = np.repeat(np.repeat((x * 255 / 399)[None, :, None], 100, axis=0), 3, axis=2).astype(np.uint8)
    out = matting.cover_resize(wide, 100, 100)  # 400x100 -> scale 1, keep the middle 100 columns
    assert out.shape == (100, 100, 3)
    np.testing.assert_array_equal(out, wide[:, 150:250])


def test_cover_resize_scales_a_tall_background_up_by_the_larger_factor():
    y = np.arange(200, dtype=np.float64)
    tall = np.repeat(np.repeat(y[:, None, None], 50, axis=1), 3, axis=2).astype(np.uint8)
    out = matting.cover_resize(tall, 100, 100)  # 50x200 -> x2 = 100x400 -> rows 150..250
    assert out.shape == (100, 100, 3)
    expected_rows = (np.arange(100) + 150) / 2  # source row at the center of each output row
    np.testing.assert_allclose(out[:, 50, 0], expected_rows, atol=1.0)
    # no stretch: every column of a row is the same (the source is constant along x)
    assert np.ptp(out[:, :, 0], axis=1).max() == 0


def test_cover_resize_shrinks_a_large_photo_to_exactly_the_frame():
    big = np.zeros((1080, 1920, 3), np.uint8)
    assert matting.cover_resize(big, 320, 240).shape == (240, 320, 3)  # 4:3 frame from 16:9


# --- the soft matte ---------------------------------------------------------------------


def test_matte_is_one_deep_inside_zero_far_outside_and_soft_at_the_edge():
    image, probability = square_scene()
    for refine in ("guided", "blur"):
        alpha = matting.soft_matte(probability, image, refine=refine, feather=2.0)
        assert alpha.dtype == np.float32 and alpha.shape == probability.shape
        assert alpha[60:140, 60:140].min() > 0.999, refine
        assert alpha[:20].max() < 1e-3 and alpha[:, 180:].max() < 1e-3, refine
        row = alpha[100, 20:70]
        assert np.all(np.diff(row) >= -1e-6), f"{refine}: the edge is not a monotonic ramp"
        assert ((row > 0.05) & (row < 0.95)).sum() >= 3, f"{refine}: a hard cut, not a feathered edge"


def test_matte_without_refinement_is_the_hard_cut():
    image, probability = square_scene()
    alpha = matting.soft_matte(probability, image, refine="none")
    assert set(np.unique(alpha)) == {0.0, 1.0}


def test_matte_keeps_the_class_probability_between_low_and_high():
    probability = np.linspace(0, 1, 101, dtype=np.float32)[None].repeat(4, axis=0)
    alpha = matting.soft_matte(probability, refine="none", low=0.3, high=0.7)
    np.testing.assert_allclose(alpha[0, [0, 30, 50, 70, 100]], [0, 0, 0.5, 1, 1], atol=1e-5)


def test_guided_refinement_moves_the_matte_edge_onto_the_photo_edge():
    _, probability = square_scene(edge=40)  # the model's edge at x = 40
    photo, _ = square_scene(edge=43, inside=(30, 30, 30), outside=(128, 128, 128))  # the real one at 43
    flat = np.full_like(photo, 128)
    snapped = matting.soft_matte(probability, photo, refine="guided", feather=0.0, radius=4)
    unsnapped = matting.soft_matte(probability, flat, refine="guided", feather=0.0, radius=4)
    assert snapped[100, 43] - snapped[100, 42] > 0.25  # a clean step at the photo's edge
    assert np.diff(unsnapped[100, 30:60]).max() < 0.15  # a flat photo only smooths


# --- the three modes ----------------------------------------------------------------------


def test_replace_takes_person_inside_background_outside_and_blends_the_edge():
    image, probability = square_scene(inside=RED)
    background = np.empty((120, 300, 3), np.uint8)  # non-square: cover-resized, not stretched
    background[:] = BLUE
    alpha = matting.soft_matte(probability, image)
    out = matting.composite(image, alpha, "replace", background)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[100, 100], RED)
    np.testing.assert_array_equal(out[5, 5], BLUE)
    edge = out[100, 40]
    assert 0 < edge[0] < 200 and 0 < edge[2] < 255, f"edge pixel {edge} is not a blend"


def test_gray_keeps_the_person_in_color_and_the_rest_in_gray():
    image, probability = square_scene(inside=RED, outside=BLUE)
    out = matting.composite(image, matting.soft_matte(probability, image), "gray")
    np.testing.assert_array_equal(out[100, 100], RED)
    np.testing.assert_array_equal(out[5, 5], [29, 29, 29])  # luma of pure blue: 0.114 * 255


def test_blur_fills_the_background_without_the_person_glow():
    image, probability = square_scene(inside=RED, outside=GREEN)
    background = matting.blurred_background(image, probability, sigma=10.0)
    # just outside the person a plain blur would be half red; the normalized fill is green
    assert background[100, 36, 0] < 5 and abs(background[100, 36, 1] - 180) < 5
    plain = matting.blurred_background(image, np.zeros_like(probability), sigma=10.0)
    assert plain[100, 36, 0] > 40  # (what a plain blur does)
    out = matting.composite(image, matting.soft_matte(probability, image), "blur", blur_sigma=10.0)
    np.testing.assert_array_equal(out[100, 100], RED)
    np.testing.assert_allclose(out[5, 5], GREEN, atol=1)


def test_blur_really_blurs_a_textured_background():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    alpha = np.zeros((120, 160), np.float32)
    out = matting.composite(image, alpha, "blur", blur_sigma=6.0)
    assert out.astype(float).std() < 0.25 * image.astype(float).std()


def test_bad_mode_and_missing_background_are_errors():
    image, probability = square_scene()
    with pytest.raises(ValueError, match="mode"):
        matting.composite(image, probability, "sepia")
    with pytest.raises(ValueError, match="background"):
        matting.composite(image, probability, "replace")


def test_an_rgba_foreground_reads_as_rgb_on_white_and_composites(tmp_path):
    rgba = np.zeros((80, 60, 4), np.uint8)
    rgba[20:60, 15:45] = (*RED, 255)  # an opaque person; the rest fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "person.png")
    image = read_rgb(tmp_path / "person.png")
    assert image.shape == (80, 60, 3)
    np.testing.assert_array_equal(image[0, 0], [255, 255, 255])
    probability = (rgba[:, :, 3] > 0).astype(np.float32)
    background = np.zeros((50, 200, 3), np.uint8)
    background[:] = BLUE
    out = matting.composite(image, matting.soft_matte(probability, image), "replace", background)
    np.testing.assert_array_equal(out[40, 30], RED)
    np.testing.assert_array_equal(out[2, 2], BLUE)


# --- the scripts -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """train.py --smoke once: its checkpoint feeds the composite tests."""
    output_dir = tmp_path_factory.mktemp("train_smoke")
    metrics = run_chapter(TRAIN, output_dir, "--smoke", timeout=180)
    return output_dir, metrics


def test_train_smoke_learns_and_writes_everything(smoke_run):
    output_dir, metrics = smoke_run
    for key in ("person_iou", "pixel_accuracy", "boundary_f1", "train_seconds", "val_person_iou"):
        assert key in metrics, key
    assert metrics["person_iou"] > 0.6, metrics  # the drawn people are easy to learn
    # ~15 s alone on 2 cores; the margin absorbs a CPU shared with other jobs
    assert metrics["_wall_seconds"] < 120, metrics["_wall_seconds"]
    for name in ("model.pt", "config.json", "curves.png", "predictions.png"):
        assert (output_dir / name).is_file(), name
    assert not list(output_dir.glob(".*.tmp*")), "a temporary file was left behind"


def test_short_last_batch_trains(tmp_path):
    # 17 smoke photos in batches of 6 leave a last batch of 5: it used to segfault in torch.
    metrics = run_chapter(TRAIN, tmp_path / "run", "--smoke", "--num-val", "4", timeout=120)
    assert metrics["num_train"] == 17 and metrics["person_iou"] > 0.5  # it learned something


def test_composite_smoke_writes_three_composites(tmp_path):
    metrics = run_chapter(COMPOSITE, tmp_path, "--smoke", timeout=120)
    assert metrics["_wall_seconds"] < 120  # a few seconds alone on 2 cores
    for mode in ("replace", "blur", "gray"):
        assert Image.open(tmp_path / f"composite_{mode}.jpg").size == (metrics["width"], metrics["height"])
    assert (tmp_path / "mask.png").is_file() and (tmp_path / "figure.png").is_file()


def test_composite_loads_the_checkpoint_train_wrote(smoke_run, tmp_path):
    train_dir, _ = smoke_run
    foreground = train_dir / "smoke_data" / "PennFudanPed" / "PNGImages" / "FudanPed00001.png"
    truth = np.asarray(Image.open(train_dir / "smoke_data" / "PennFudanPed" / "PedMasks"
                                  / "FudanPed00001_mask.png")) > 0
    background = tmp_path / "wide.png"
    Image.fromarray(np.full((90, 400, 3), BLUE, np.uint8)).save(background)
    metrics = run_chapter(COMPOSITE, tmp_path / "out", "--foreground", foreground, "--background",
                          background, "--mode", "all", "--weights", train_dir / "model.pt",
                          "--output-format", "png", timeout=120)
    assert metrics["person_found"] and metrics["model"].startswith("unet")
    alpha = np.asarray(Image.open(tmp_path / "out" / "mask.png")) / 255
    iou = ((alpha > 0.5) & truth).sum() / ((alpha > 0.5) | truth).sum()
    assert iou > 0.5, iou  # the trained smoke model finds the drawn people in the matte
    for mode in ("replace", "blur", "gray"):  # each at the foreground's full resolution
        assert Image.open(tmp_path / "out" / f"composite_{mode}.png").size == truth.shape[::-1]


def test_composite_applies_exif_orientation(smoke_run, tmp_path):
    train_dir, _ = smoke_run
    source = Image.open(train_dir / "smoke_data" / "PennFudanPed" / "PNGImages" / "FudanPed00002.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    source.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    metrics = run_chapter(COMPOSITE, tmp_path / "out", "--foreground", tmp_path / "phone.jpg",
                          "--mode", "gray", "--weights", train_dir / "model.pt", timeout=120)
    assert (metrics["width"], metrics["height"]) == (source.height, source.width)


def test_composite_takes_a_grayscale_foreground_and_an_rgba_background(smoke_run, tmp_path):
    train_dir, _ = smoke_run
    source = Image.open(train_dir / "smoke_data" / "PennFudanPed" / "PNGImages" / "FudanPed00003.png")
    source.convert("L").save(tmp_path / "gray.png")
    background = np.zeros((60, 300, 4), np.uint8)
    background[..., 2] = 255
    background[:, :150, 3] = 255  # left half opaque blue, right half transparent -> white
    Image.fromarray(background, "RGBA").save(tmp_path / "rgba.png")
    metrics = run_chapter(COMPOSITE, tmp_path / "out", "--foreground", tmp_path / "gray.png",
                          "--background", tmp_path / "rgba.png", "--weights", train_dir / "model.pt",
                          "--output-format", "png", timeout=120)
    out = np.asarray(Image.open(tmp_path / "out" / "composite_replace.png"))
    assert out.shape == (source.height, source.width, 3)
    assert metrics["person_found"]


def _fails_with_one_line(script: str, *args, env=None, timeout: float = 60):
    result = run_script(script, *args, check=False, env=env, timeout=timeout)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return result, lines[0]


def test_composite_missing_file_is_one_line(tmp_path):
    result, line = _fails_with_one_line(COMPOSITE, "--foreground", tmp_path / "nope.jpg", "--mode",
                                        "gray", "--output-dir", tmp_path)
    assert result.returncode == 2 and "not found" in line


def test_composite_unreadable_image_is_one_line(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    result, line = _fails_with_one_line(COMPOSITE, "--foreground", tmp_path / "broken.jpg",
                                        "--mode", "blur", "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "broken.jpg" in line


def test_bad_flags_are_one_line(tmp_path):
    for script, args in ((COMPOSITE, ("--mode", "sepia")), (COMPOSITE, ("--matte-low", "0.9")), (TRAIN, ("--epochs", "many")),
                         (TRAIN, ("--weights", "imagenet")), (COMPOSITE, ("--no-such-flag",)),
                         (TRAIN, ("--batch-size", "3")), (TRAIN, ("--lr", "-1")),
                         (COMPOSITE, ("--num-threads", "0")), (COMPOSITE, ("--jpeg-quality", "500"))):
        result, _ = _fails_with_one_line(script, *args, "--output-dir", tmp_path / "out")
        assert result.returncode == 2, (script, args)


def test_replace_without_background_names_the_flag(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.png")
    _, line = _fails_with_one_line(COMPOSITE, "--foreground", tmp_path / "p.png", "--output-dir",
                                   tmp_path / "out")
    assert "--background" in line


def test_a_weights_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    for weights, words in ((tmp_path / "model.pt", "not a readable checkpoint"),
                           (tmp_path / "missing.pt", "not found")):
        result, line = _fails_with_one_line(COMPOSITE, "--foreground", tmp_path / "p.png", "--mode",
                                            "gray", "--weights", weights, "--output-dir", tmp_path / "out")
        assert result.returncode == 2 and words in line


def test_no_person_found_reports_and_still_writes_the_mask(smoke_run, tmp_path):
    train_dir, _ = smoke_run
    Image.fromarray(np.full((120, 160, 3), 235, np.uint8)).save(tmp_path / "empty_wall.png")
    result, line = _fails_with_one_line(COMPOSITE, "--foreground", tmp_path / "empty_wall.png",
                                        "--mode", "blur", "--weights", train_dir / "model.pt",
                                        "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "no person found" in line
    assert (tmp_path / "out" / "mask.png").is_file()


def test_coco_weights_offline_fail_fast_naming_weights_path(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.png")
    # an empty hub cache and a proxy that refuses at once: "offline" even on a networked machine
    env = script_env(TORCH_HOME=str(tmp_path / "torch_home"), HTTPS_PROXY="http://127.0.0.1:9",
                     HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                     http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    result, line = _fails_with_one_line(COMPOSITE, "--foreground", tmp_path / "p.png", "--mode", "gray",
                                        "--weights", "coco", "--model", "lraspp_mobilenet_v3_large",
                                        "--output-dir", tmp_path / "out", env=env, timeout=90)
    assert "--weights PATH" in line and result.seconds < 60


# --- real data ---------------------------------------------------------------------------


@pytest.mark.real_data
@pytest.mark.slow
def test_short_training_on_pennfudan_learns(shared_datasets, tmp_path):
    env = script_env(DLSTUDY_MIRROR=str(shared_datasets))
    metrics = run_chapter(TRAIN, tmp_path / "out", "--data-dir", tmp_path / "data", "--epochs", "12",
                          "--image-size", "256", "--crop-size", "192", "--val-every", "4",
                          env=env, timeout=400)
    assert metrics["person_iou"] > 0.45, metrics
    assert 0.0 < metrics["boundary_f1"] <= 1.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["epochs"] == 12
    assert os.path.getsize(tmp_path / "out" / "model.pt") > 1_000_000


def test_chapter_modules_exist():
    for name in ("train.py", "composite.py", "matting.py", "segmenters.py", "config.toml",
                 "composite.toml"):
        assert (CHAPTER / name).is_file(), name
    # matting.py is numpy/OpenCV only: no `import torch` or `from torch ...` anywhere in it
    assert not re.search(r"^\s*(import|from)\s+torch", (CHAPTER / "matting.py").read_text(), re.M)
