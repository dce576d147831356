"""data/classify.py: per-class accuracy with Wilson intervals, prediction rows, top-2 lines,
a photo read as a classifier's input, and the chapter check of a saved Keras model."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from data.classify import (
    accuracy_metrics,
    check_keras_model_chapter,
    check_photos,
    prediction_rows,
    read_classifier_input,
    top2_line,
)
from data.cli import UserError

CLASSES = ("apple", "banana", "orange", "mixed")


def test_accuracy_metrics_known_answers():
    # 55 of 60 right, as 02b's first run: Wilson [0.819, 0.964]; per class by hand.
    labels = np.array([0] * 19 + [1] * 18 + [2] * 18 + [3] * 5)
    predicted = labels.copy()
    predicted[[0, 19, 37, 55, 56]] = [1, 3, 1, 0, 1]  # one apple, banana, orange, two mixed
    m = accuracy_metrics("test", labels, predicted, CLASSES)
    assert m["test_accuracy"] == pytest.approx(55 / 60) and m["test_correct"] == 55
    assert m["test_accuracy_ci95"] == pytest.approx([0.8192, 0.9643], abs=5e-4)
    assert m["test_accuracy_apple"] == pytest.approx(18 / 19) and m["test_num_apple"] == 19
    assert m["test_accuracy_mixed"] == pytest.approx(3 / 5) and m["test_num_mixed"] == 5
    assert m["test_accuracy_mixed_ci95"] == pytest.approx([0.2307, 0.8824], abs=5e-4)
    json.dumps(m)  # plain types only: it goes into metrics.json


def test_accuracy_metrics_class_without_photos_is_none_not_zero():
    m = accuracy_metrics("val", [0, 0, 1], [0, 1, 1], CLASSES)
    assert m["val_accuracy_orange"] is None and m["val_accuracy_orange_ci95"] is None
    assert m["val_num_orange"] == 0 and m["val_accuracy_apple"] == 0.5
    lo, hi = m["val_accuracy_banana_ci95"]  # 1 of 1: the interval still reaches well below 1
    assert hi == 1.0 and lo < 0.3
    with pytest.raises(ValueError):
        accuracy_metrics("val", [0, 1], [0], CLASSES)


def test_prediction_rows_and_top2_line():
    probs = np.array([[0.1, 0.7, 0.15, 0.05], [0.2, 0.2, 0.5, 0.1]])
    rows = prediction_rows(["banana_1.jpg", "apple_3.jpg"], [1, 0], probs, CLASSES)
    assert rows == [{"name": "banana_1.jpg", "true": "banana", "predicted": "banana", "probability": 0.7},
                    {"name": "apple_3.jpg", "true": "apple", "predicted": "orange", "probability": 0.5}]
    assert top2_line("a.jpg", probs[0], CLASSES) == "a.jpg: banana 70.0% (runner-up: orange 15.0%)"
    # A tie for second place goes to the class listed first.
    assert top2_line("b.jpg", probs[1], CLASSES) == "b.jpg: orange 50.0% (runner-up: apple 20.0%)"
    with pytest.raises(ValueError):
        top2_line("c.jpg", [0.5, 0.5], CLASSES)


def test_read_classifier_input_squashes_odd_photos_to_upright_rgb(tmp_path):
    # A 60x40 photo, left half red, right half blue, stored sideways with an EXIF rotation.
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:, :30] = (255, 0, 0)
    upright[:, 30:] = (0, 0, 255)
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 40 wide, 60 high
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    sideways.save(tmp_path / "phone.jpg", format="PNG", exif=exif)  # PNG bytes behind .jpg
    image = read_classifier_input(tmp_path / "phone.jpg", 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert image[8, 2, 0] > 200 and image[8, 2, 2] < 50   # red on the left, as the viewer sees it
    assert image[8, 13, 2] > 200 and image[8, 13, 0] < 50
    Image.fromarray(upright).convert("CMYK").save(tmp_path / "print.jpg", format="JPEG")
    assert read_classifier_input(tmp_path / "print.jpg", 16).shape == (16, 16, 3)


def _fake_keras_file(path, name):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional", "config": {"name": name}}))
    return path


def test_check_keras_model_chapter_refuses_other_files(tmp_path):
    ours = _fake_keras_file(tmp_path / "ours.keras", "02b_fruit_cnn_aug")
    assert check_keras_model_chapter(ours, "02b_fruit_cnn_aug") == ours
    theirs = _fake_keras_file(tmp_path / "theirs.keras", "02_fruit_cnn")
    with pytest.raises(UserError, match="'02_fruit_cnn', not of 02b_fruit_cnn_aug"):
        check_keras_model_chapter(theirs, "02b_fruit_cnn_aug")
    (tmp_path / "model.pt").write_bytes(b"\x80\x02torch pickle")
    with pytest.raises(UserError, match=r"not a Keras \.keras model"):
        check_keras_model_chapter(tmp_path / "model.pt", "02b_fruit_cnn_aug")
    with pytest.raises(UserError, match="no such file"):
        check_keras_model_chapter(tmp_path / "missing.keras", "02b_fruit_cnn_aug")
    with pytest.raises(UserError, match=r"no such photo: .*nope\.jpg"):
        check_photos([ours, tmp_path / "nope.jpg"])


def test_wilson_ends_are_exact():
    from data.classify import wilson

    assert wilson(0, 3)[0] == 0.0 and wilson(3, 3)[1] == 1.0
    assert wilson(0, 5) == pytest.approx([0.0, 0.4345], abs=5e-4)
