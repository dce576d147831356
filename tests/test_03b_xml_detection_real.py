"""03b_xml_detection on the real fruit photos and XML files from the mirror: a short
from-scratch run learns. Its own file, so the parallel suite can run it beside the
chapter's smoke tests."""

from __future__ import annotations

import pytest

from tests.helpers import run_chapter, script_env

TRAIN = "03b_xml_detection/train.py"


@pytest.mark.real_data
@pytest.mark.slow
def test_real_data_training_learns(shared_datasets, tmp_path):
    # A short from-scratch run on the real photos: small images, a small model, a few
    # epochs. It only shows that the pipeline learns; the chapter's figure needs ~45 min.
    # Measured with one core: val mAP@0.5 0.19, test 0.23 after these 5 epochs at 160 px
    # (91 s; 6 epochs: 0.24 / 0.27; 4: 0.17 / 0.21), against a bar of 0.15.
    env = script_env(DLSTUDY_MIRROR=str(shared_datasets))
    metrics = run_chapter(
        TRAIN, tmp_path / "run", "--data-dir", str(tmp_path / "data"), "--weights", "none",
        "--image-size", "160", "--fpn-channels", "64", "--head-convs", "2", "--epochs", "5",
        "--warmup-epochs", "1", "--eval-every", "5", "--learning-rate", "0.003",
        env=env, timeout=400)
    print({k: metrics[k] for k in ("map50", "map", "val_map50", "train_seconds")})
    assert metrics["num_train"] + metrics["num_val"] == 240 and metrics["num_test"] == 60
    assert max(metrics["val_map50"], metrics["map50"]) > 0.15
