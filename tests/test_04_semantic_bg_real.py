"""04_semantic_bg on PennFudanPed from the mirror: a short street-view run learns. Its own
file, so the parallel suite can run it beside the chapter's smoke tests."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import run_chapter, script_env

TRAIN = "04_semantic_bg/train.py"


@pytest.mark.real_data
@pytest.mark.slow
def test_short_training_on_pennfudan_learns(shared_datasets, tmp_path):
    env = script_env(DLSTUDY_MIRROR=str(shared_datasets))
    # Street-scene views only: the close-up and empty views of the default config slow the
    # street-photo IoU down in the first epochs (the default run: val IoU 0.48 at epoch 10;
    # street views only, in float32: 0.52), and this test checks that the loop learns at all,
    # in minutes. Measured with one core: test person IoU 0.533 after these 6 epochs, one
    # validation at the end (63-66 s in `make test`; validating at epoch 3 too kept the same
    # epoch 6, in 67-71 s; 0.54 after 8 epochs, 80 s).
    metrics = run_chapter(TRAIN, tmp_path / "out", "--data-dir", tmp_path / "data", "--epochs", "6",
                          "--image-size", "256", "--crop-size", "192", "--eval-every", "6",
                          "--closeup-fraction", "0", "--negative-fraction", "0",
                          env=env, timeout=400)
    assert metrics["person_iou"] > 0.45, metrics
    assert 0.0 < metrics["close_up_iou"] <= 1.0  # measured on the test close-ups all the same
    assert 0.0 < metrics["boundary_f1"] <= 1.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["epochs"] == 6
    assert os.path.getsize(tmp_path / "out" / "model.pt") > 1_000_000
