"""Loaders on the synthetic fixtures (real on-disk formats), and their error paths."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from data import fruits, mnist, pennfudan, synthetic
from data.cli import UserError
from data.splits import stratified_split


def test_mnist_roundtrip(tmp_path):
    synthetic.write_mnist(tmp_path, num_train=50, num_test=20, seed=3)
    data = mnist.load_mnist(tmp_path, fetch=False)
    assert data.x_train.shape == (50, 28, 28) and data.x_test.shape == (20, 28, 28)
    assert data.x_train.dtype == np.uint8 and set(data.y_train.tolist()) == set(range(10))
    again = mnist.load_mnist(tmp_path, fetch=True)  # present: no download attempted
    np.testing.assert_array_equal(again.x_test, data.x_test)


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic.draw_digits(30, seed=1)[0]
    b = synthetic.draw_digits(30, seed=1)[0]
    c = synthetic.draw_digits(30, seed=2)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("damage,expected", [
    (lambda raw: b"\x00\x00\x09\x99" + raw[4:], "magic number"),
    (lambda raw: raw[:-100], "header promises"),
    (lambda raw: raw[:5], "too short"),
])
def test_mnist_corrupt_idx_is_named(tmp_path, damage, expected):
    folder = synthetic.write_mnist(tmp_path, num_train=20, num_test=10)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(damage(gzip.decompress(path.read_bytes()))))
    with pytest.raises(mnist.IdxError, match=expected) as info:
        mnist.load_mnist(tmp_path, fetch=False)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_mnist_bad_gzip_and_missing(tmp_path):
    folder = synthetic.write_mnist(tmp_path, num_train=20, num_test=10)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(mnist.IdxError, match="corrupt"):
        mnist.load_mnist(tmp_path, fetch=False)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(mnist.IdxError, match="not found"):
        mnist.load_mnist(tmp_path, fetch=False)


def test_fruits_roundtrip_with_quirks(tmp_path):
    synthetic.write_fruits(tmp_path, train_per_class=3, test_per_class=2, seed=0, image_size=(96, 80))
    train, test = fruits.load_fruits(tmp_path, fetch=False)
    assert len(train) == 12 and len(test) == 8
    assert [r.label for r in train].count("mixed") == 3
    zero_size = next(r for r in train if r.xml_path.name == "apple_3.xml")
    assert "<width>0</width>" in zero_size.xml_path.read_text()
    assert (zero_size.width, zero_size.height) == (96, 80)  # taken from the image
    assert train[0].image_path.read_bytes()[:4] == b"\x89PNG"  # PNG behind .jpg
    for record in train + test:
        assert record.boxes.shape == (len(record.box_labels), 4)
        assert set(record.box_labels) <= set(fruits.BOX_CLASSES)
        assert (record.boxes[:, 2] <= record.width).all() and (record.boxes[:, 3] <= record.height).all()
    mixed = [r for r in train if r.label == "mixed"]
    assert all(len(set(r.box_labels)) >= 2 for r in mixed)


def test_fruits_errors_name_the_file(tmp_path):
    root = synthetic.write_fruits(tmp_path, train_per_class=1, test_per_class=1)
    (root / "train_zip/train/banana_2.xml").write_text("<annotation><object>")
    with pytest.raises(UserError, match=r"banana_2.xml"):
        fruits.load_split(root, "train")
    (root / "train_zip/train/banana_2.xml").unlink()
    with pytest.raises(UserError, match=r"banana_2.jpg"):
        fruits.load_split(root, "train")
    with pytest.raises(UserError, match=r"download\.py fruits"):
        fruits.load_split(tmp_path / "nowhere", "test")


def test_pennfudan_roundtrip(tmp_path):
    synthetic.write_pennfudan(tmp_path, count=5, seed=1)
    records = pennfudan.load_pennfudan(tmp_path, fetch=False)
    assert len(records) == 5
    for record in records:
        image, masks, boxes = record.image(), record.instance_masks(), record.boxes()
        assert image.shape == (120, 160, 3)
        assert masks.ndim == 3 and masks.shape[1:] == (120, 160) and len(masks) >= 1
        assert boxes.shape == (len(masks), 4)
        assert (record.person_mask() == masks.any(0)).all()
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int), strict=True):
            assert mask[y0:y1, x0:x1].sum() == mask.sum()  # the box holds the whole mask


def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = ["a"] * 75 + ["b"] * 73 + ["c"] * 72 + ["m"] * 20  # the fruit set's 240 photos
    train, val = stratified_split(labels, 0.2, seed=0)
    _again_train, again_val = stratified_split(labels, 0.2, seed=0)
    _other_train, other_val = stratified_split(labels, 0.2, seed=1)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(val, other_val)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
    counts = {k: sum(labels[i] == k for i in val) for k in "abcm"}
    assert counts == {"a": 15, "b": 15, "c": 14, "m": 4}  # the small "mixed" class keeps its share
    with pytest.raises(ValueError):
        stratified_split(labels, 1.5, seed=0)


def test_plot_misclassified_shows_only_the_wrong_photos(tmp_path, monkeypatch):
    from pathlib import Path

    from data import outputs

    records = [fruits.FruitRecord(Path(f"{name}.jpg"), Path(f"{name}.xml"), name.split("_")[0], 8, 8,
                                  np.zeros((0, 4), np.float32), [])
               for name in ("apple_1", "banana_2", "orange_3")]
    shown, real_grid = {}, outputs.plot_image_grid

    def capture(images, titles, path, **kwargs):
        shown.update(titles=titles, count=len(images), colors=kwargs.get("colors"))
        return real_grid(images, titles, path, **kwargs)

    monkeypatch.setattr(outputs, "plot_image_grid", capture)
    images = np.zeros((3, 8, 8, 3), np.uint8)
    path = fruits.plot_misclassified(images, records, np.array([0, 2, 2]), np.array([0, 1, 2]),
                                     tmp_path / "wrong.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert shown == {"titles": ["banana_2\n-> orange"], "count": 1, "colors": ["crimson"]}
