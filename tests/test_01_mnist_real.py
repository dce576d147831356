"""01_mnist on the real MNIST files from the mirror: a 2-epoch run and predict.py on
photographed test digits. Its own file, so that the parallel suite (make test) can run it
beside the chapter's smoke tests."""

from __future__ import annotations

import json

import pytest

from data import mnist
from tests.helpers import SHARED_DATASETS, mnist_photo, run_chapter, run_script, script_env

SCRIPT = "01_mnist/train.py"
PREDICT = "01_mnist/predict.py"


@pytest.fixture(scope="module")
def short_real_run(tmp_path_factory):
    """The default MLP recipe for 2 epochs on real MNIST (seconds of training)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real-data test: no dataset mirror at {SHARED_DATASETS}")
    tmp = tmp_path_factory.mktemp("mnist_real")
    env = script_env(DLSTUDY_MIRROR=str(SHARED_DATASETS))
    metrics = run_chapter(SCRIPT, tmp / "out", "--data-dir", str(tmp / "data"), "--epochs", "2",
                          timeout=600, env=env)
    return tmp, metrics


@pytest.mark.real_data
def test_short_real_run_reaches_97_percent(short_real_run):
    _, metrics = short_real_run
    assert metrics["num_test"] == 10_000 and metrics["num_val"] == 5001
    assert metrics["test_accuracy"] >= 0.97, metrics
    low, high = metrics["test_accuracy_ci95"]
    assert low < metrics["test_accuracy"] < high and high - low < 0.01


@pytest.mark.real_data
def test_predict_reads_9_of_10_mnist_digits_photographed(short_real_run):
    tmp, _ = short_real_run
    images, labels = mnist.read_split(tmp / "data" / "mnist", "test")
    photos = []
    for index in range(10):  # the first ten test digits, dark ink on white, 3x larger, off-centre
        photos.append(tmp / f"test{index}_is_{labels[index]}.png")
        mnist_photo(images[index], size=84, canvas=(240, 160), at=(10 + 13 * index, 60 - 5 * index)).save(photos[-1])
    run_script(PREDICT, "--model-path", str(tmp / "out" / "model.keras"), "--output-dir",
               str(tmp / "predicted"), *map(str, photos), timeout=120)
    found = json.loads((tmp / "predicted" / "predictions.json").read_text())
    right = sum(a["digit"] == labels[i] for i, a in enumerate(found))
    assert right >= 9, found
