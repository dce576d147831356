"""04b_instance_seg: torchvision's COCO Mask R-CNN in Keras (coco_model.py), offline.

A stand-in COCO file (convert_coco.py --stand-in: seeded random weights, BatchNorm statistics
drawn at random, the "person" score raised so that it detects) is written where torchvision's
download lands in a temporary TORCH_HOME. torchvision then builds its reference exactly as a
learner does, `maskrcnn_resnet50_fpn(weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1)`, and
parity.py compares it with the converted Keras model stage by stage, each framework in its
own process. predict.py --weights coco runs on odd photos from the same converted file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.helpers import OFFLINE, assert_one_line_error, run_script, script_env

# A pretrained path through a stand-in weights file: `make test` runs these, `make smoke` skips them.
pytestmark = pytest.mark.pretrained

CONVERT, PARITY, PREDICT = (f"04b_instance_seg/{name}.py" for name in ("convert_coco", "parity", "predict"))
PTH = "hub/checkpoints/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"  # the name in COCO_V1's URL
CONVERTED = "hub/checkpoints/maskrcnn_resnet50_fpn_coco-bf2d0c1e.keras.npz"


def synthetic_photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """Smooth colour waves, a few filled shapes and pixel noise: something with edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    waves = np.stack([80 + 60 * np.sin(xx / 37 + c) + 40 * np.cos(yy / 23 - c) for c in range(3)], axis=-1)
    image = Image.fromarray(np.clip(waves, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0, side = rng.integers(0, width - 60), rng.integers(0, height - 60), rng.integers(25, 90)
        box = [x0, y0, x0 + side, y0 + int(side * rng.uniform(0.6, 1.6))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return make_stand_in(tmp_path_factory)


def make_stand_in(tmp_path_factory):
    """A TORCH_HOME holding the stand-in and its conversion, and the environment that uses it."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    env = script_env(TORCH_HOME=str(torch_home), **OFFLINE)
    run_script(CONVERT, "--stand-in", env=env, timeout=300)
    assert (torch_home / PTH).is_file() and (torch_home / CONVERTED).is_file()
    return torch_home, env


def test_keras_model_matches_torchvision_stage_by_stage(stand_in, tmp_path):
    _, env = stand_in
    photo = tmp_path / "photo.png"
    synthetic_photo().save(photo)  # 320 x 240: torchvision resizes it to 1066 x 800, pads to 1088 x 800
    run_script(PARITY, photo, "--output-dir", tmp_path / "parity", env=env, timeout=600)
    report = json.loads((tmp_path / "parity" / "parity.json").read_text())["report"][0]
    # Measured on this photo: every map (input, C2..C5, P2..P6, RPN logits and deltas) within
    # 8.8e-06 of torchvision's, relative to the map's largest value (the largest: the input,
    # its bilinear resize). Keras' one-sided "same" padding on the strided convs moves C2 by 0.23.
    for name, row in report["maps"].items():
        assert row["same_shape"] and row["relative_diff"] < 1e-4, (name, row)
    # Measured: 1000 proposals each, the same boxes within 3.1e-04 px (10 pairs ranked the other
    # way round: their scores tie to float32 precision).
    proposals = report["proposals"]
    assert proposals["count_keras"] == proposals["count_torch"] == 1000 and proposals["one_to_one"]
    assert proposals["max_box_diff"] < 0.01, proposals
    # The box head on those proposals. Measured: within 8.4e-06 (relative). One global top-k
    # instead of torchvision's per-level top-k gives other proposals, and logits off by 0.68.
    assert report["class_logits"]["relative_diff"] < 1e-4, report["class_logits"]
    # parity.py's bars (BOX_TOLERANCE, SCORE_TOLERANCE, MASK_IOU_MIN). Measured: 100 detections
    # each (all "person", scores 0.29-0.52), boxes within 1.1e-04 px, scores within 3.3e-06,
    # every mask IoU 1.0.
    found = report["detections"]
    assert found["count_keras"] == found["count_torch"] == found["paired"] == 100, found
    assert found["max_box_diff"] <= 0.5 and found["max_score_diff"] <= 1e-3, found
    assert found["min_mask_iou"] >= 0.98 and found["passed"], found


def odd_photos(folder):
    """PNG bytes behind a .jpg name, and a CMYK JPEG whose EXIF says "rotate 90 degrees"."""
    png_as_jpg = folder / "png_inside.jpg"
    synthetic_photo(seed=1).save(png_as_jpg, format="PNG")
    rotated = folder / "rotated_cmyk.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, the upright photo is 240 wide, 320 high
    synthetic_photo(seed=2).convert("CMYK").save(rotated, format="JPEG", quality=95, exif=exif)
    return {png_as_jpg: (320, 240), rotated: (240, 320)}


def test_predict_coco_converts_once_and_writes_predictions(stand_in, tmp_path):
    torch_home, env = stand_in
    (torch_home / CONVERTED).unlink()  # predict.py must run the converter, and say so
    photos = odd_photos(tmp_path)
    out = tmp_path / "out"
    result = run_script(PREDICT, "--weights", "coco", "--score-threshold", "0.3", "--output-dir", out,
                        *photos, env=env, timeout=600)
    assert "converting torchvision's COCO weights (once" in result.stdout
    assert (torch_home / CONVERTED).is_file()
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["weights"] == "coco" and set(predictions["photos"]) == {str(p) for p in photos}
    for path, (width, height) in photos.items():
        found = predictions["photos"][str(path)]
        # Measured: 12 instances scored >= 0.3 (9 "person", the stand-in's raised class, 3 "skis")
        # on the first photo, 87 (all "person") on the second.
        people = [instance for instance in found if instance["label"] == "person"]
        assert len(people) >= 5 and len(people) >= len(found) / 2, found
        nonempty = 0
        for instance in found:
            x1, y1, x2, y2 = instance["box"]
            assert 1 <= instance["label_id"] <= 90 and instance["label"] not in ("N/A", "__background__")
            assert instance["score"] >= 0.3
            # (x2 or y2 may pass the edge by float32 rounding, as torchvision's do: 800 * 0.3 = 240.00001)
            assert 0 <= x1 < x2 <= width + 1e-3 and 0 <= y1 < y2 <= height + 1e-3, instance
            mask = np.asarray(Image.open(out / instance["mask"]))
            assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
            # Pasted where its box is: the paste grows the box by 30/28 and rounds, so allow that.
            grow_x, grow_y = 2 + (x2 - x1) / 28, 2 + (y2 - y1) / 28
            inside = mask[max(int(y1 - grow_y), 0):int(y2 + grow_y) + 1, max(int(x1 - grow_x), 0):int(x2 + grow_x) + 1]
            assert (inside > 0).sum() == (mask > 0).sum(), instance
            nonempty += bool(mask.any())
        assert nonempty >= len(found) / 2  # (a mask may be empty: no pixel of it reached 0.5)
        assert Image.open(out / f"{path.stem}_instances.png").size == (width, height)
    printed = [line for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(printed) == sum(len(found) for found in predictions["photos"].values())


def test_bad_weight_files_are_one_line_errors(stand_in, tmp_path):
    _, env = stand_in
    photo = tmp_path / "photo.png"
    synthetic_photo().save(photo)

    def predict(torch_home):
        run_env = {**env, "TORCH_HOME": str(torch_home)}
        return run_script(PREDICT, "--weights", "coco", "--output-dir", tmp_path / "out", photo,
                          env=run_env, check=False, timeout=300)

    offline = tmp_path / "offline"  # nothing there, and the download cannot connect
    assert_one_line_error(predict(offline), "could not download", str(offline / PTH), "connect")
    assert not (offline / CONVERTED).exists()

    corrupt = tmp_path / "corrupt"
    (corrupt / PTH).parent.mkdir(parents=True)
    (corrupt / PTH).write_bytes(b"PK\x03\x04 a download cut short")
    assert_one_line_error(predict(corrupt), str(corrupt / PTH), "delete it")
    assert not (corrupt / CONVERTED).exists()

    other = tmp_path / "other"  # a converted file, but of a 3-class model with another backbone
    (other / CONVERTED).parent.mkdir(parents=True)
    np.savez(other / CONVERTED, format=np.array("torchvision maskrcnn_resnet50_fpn v1 as Keras NHWC arrays, "
                                                "version 1"), **{"roi_heads.box_predictor.cls_score/1": np.zeros(3)})
    assert_one_line_error(predict(other), str(other / CONVERTED), "another architecture", "delete it")
