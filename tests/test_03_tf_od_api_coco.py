"""03_tf_od_api --weights coco, offline: KerasHub's COCO RetinaNet through kagglehub's own cache.

KerasHub fetches `retinanet_resnet50_fpn_coco` with kagglehub, file by file, into
$KAGGLEHUB_CACHE/models/keras/retinanet/keras/retinanet_resnet50_fpn_coco/<version>/, each
file with a completion marker; a file found there with its marker is never fetched again.
These tests put a stand-in there and run the chapter's command with a closed proxy. The
stand-in has random weights and the published preset's architecture, built as KerasHub's
conversion script (tools/checkpoint_conversion/convert_retinanet_checkpoints.py) builds it:
the `resnet_50_imagenet` ResNet-50, an FPN on P3-P7 without P5, 91 COCO classes, and an
800 px converter with torchvision's ImageNet mean and std. It has 34,121,239 parameters,
the count the preset publishes. Written with `save_to_preset`, it holds the files the
preset holds.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest

from tests.helpers import (
    OFFLINE,
    assert_one_line_error,
    run_chapter,
    run_python,
    run_script,
    script_env,
)

# A pretrained path through a stand-in weights file: `make test` runs these, `make smoke` skips them.
pytestmark = pytest.mark.pretrained

CHAPTER = "03_tf_od_api"
TRAIN = "03_tf_od_api/train.py"

# Builds a RetinaNet preset and files it in kagglehub's cache with kagglehub's own layout
# (Cache.get_path / mark_as_complete for the handle KerasHub downloads). ARGS: cache folder,
# then "coco" (the stand-in) or "small" (another architecture: ResNet-18 blocks, P3-P5).
_STAND_IN = """
import os, shutil, sys, tempfile
os.environ["KAGGLEHUB_CACHE"] = sys.argv[1]
import keras_hub
from kagglehub.cache import Cache
from kagglehub.handle import parse_model_handle

coco = sys.argv[2] == "coco"
encoder = keras_hub.models.ResNetBackbone(
    input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
    stackwise_num_blocks=[3, 4, 6, 3] if coco else [1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2],
    block_type="bottleneck_block" if coco else "basic_block", use_pre_activation=False)
backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=7 if coco else 5,
                                              use_p5=False)
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
converter = keras_hub.layers.RetinaNetImageConverter(
    image_size=(800, 800), pad_to_aspect_ratio=True, crop_to_aspect_ratio=False,
    scale=[1 / 255 / s for s in std], offset=[-m / s for m, s in zip(mean, std)])
detector = keras_hub.models.RetinaNetObjectDetector(
    backbone=backbone, num_classes=91,
    preprocessor=keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter))
print("PARAMETERS", detector.count_params())
handle = keras_hub.models.RetinaNetObjectDetector.presets["retinanet_resnet50_fpn_coco"]["kaggle_handle"]
handle = parse_model_handle(handle.removeprefix("kaggle://"))
with tempfile.TemporaryDirectory() as tmp:
    detector.save_to_preset(tmp)
    cache = Cache()
    for name in sorted(os.listdir(tmp)):
        target = cache.get_path(handle, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(os.path.join(tmp, name), target)
        cache.mark_as_complete(handle, name)
print("FOLDER", os.path.dirname(cache.get_path(handle, "config.json")))
"""


def write_stand_in(cache, kind: str = "coco"):
    """(the preset's folder in the kagglehub cache at `cache`, the stand-in's parameter count)."""
    from pathlib import Path

    result = run_python(_STAND_IN, CHAPTER, args=(cache, kind), timeout=300)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("FOLDER", "PARAM")))
    return Path(lines["FOLDER"]), int(lines["PARAMETERS"])


def offline(cache) -> dict[str, str]:
    return script_env(KAGGLEHUB_CACHE=str(cache), **OFFLINE)  # nothing can be downloaded


def _arrays(path) -> dict[str, np.ndarray]:
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kagglehub")
    folder, parameters = write_stand_in(cache)
    return cache, folder, parameters


@pytest.fixture(scope="module")
def coco_run(stand_in, tmp_path_factory):
    """The chapter's command with the COCO weights on the smoke data, offline: one epoch of
    two steps (20 photos, batches of 10) at 128 px, the least the P7 level allows; a
    non-default --prior-probability, to see it used. Under tf.distribute's MirroredStrategy
    on 2 logical CPU devices (--strategy mirrored): KerasHub's RetinaNet, tf.data and the
    SavedModel export, each replica taking half of each batch."""
    cache, _, _ = stand_in
    output_dir = tmp_path_factory.mktemp("03coco") / "run"
    metrics = run_chapter(TRAIN, output_dir, "--smoke", "--weights", "coco", "--prior-probability", "0.02",
                          "--epochs", "1", "--batch-size", "10", "--strategy", "mirrored", "--no-evaluate-test", timeout=600,
                          env=offline(cache))
    print(f"03 --weights coco wall time {metrics['_wall_seconds']:.1f}s")
    return output_dir, metrics


def test_stand_in_has_the_published_parameter_count(stand_in):
    assert stand_in[2] == 34_121_239  # retinanet_presets.py: "params": 34121239


def test_coco_run_finishes_with_metrics(coco_run):
    output_dir, metrics = coco_run
    assert metrics["weights"] == "coco" and metrics["epochs"] == 1 and metrics["image_size"] == 128
    assert math.isfinite(metrics["val_map50"]) and metrics["export_mismatched_photos"] == 0
    assert (metrics["num_replicas"], metrics["world_size"]) == (2, 1)  # the export agrees with the mirrored model
    assert (output_dir / "saved_model" / "saved_model.pb").is_file()


def test_coco_run_starts_from_the_cached_backbone_with_batchnorm_frozen(stand_in, coco_run):
    """(a) Every backbone and FPN tensor of the trained model (best.weights.h5, its one epoch)
    is the stand-in's: the BatchNorm scales, offsets and statistics exactly (frozen), the
    convolutions within what two AdamW steps at <= 5e-4 can move (a fresh random init differs
    by ~0.05)."""
    _, folder, _ = stand_in
    output_dir, _ = coco_run
    cached, trained = _arrays(folder / "model.weights.h5"), _arrays(output_dir / "best.weights.h5")
    assert len(cached) == 281
    for key, value in cached.items():
        got = trained["layers/retina_net_backbone/" + key]  # the backbone inside the detector
        if "batch_normalization" in key:
            np.testing.assert_array_equal(got, value, err_msg=key)
        else:
            np.testing.assert_allclose(got, value, atol=2e-3, err_msg=key)


def test_coco_run_replaces_both_heads_as_the_from_scratch_model_starts(coco_run):
    """(b) Both heads are new (3 classes x 9 anchors; 4 x 9 box deltas) and start as
    model.init_heads starts the from-scratch model: He-normal head convs (KerasHub's own
    would be N(0, 0.05)), logits N(0, 0.01), the class bias at --prior-probability 0.02
    (-log(0.98 / 0.02) = -3.89; KerasHub would put its prior on the box head instead), the
    box bias 0. Two steps move a bias by at most ~1e-3."""
    output_dir, _ = coco_run
    trained = _arrays(output_dir / "best.weights.h5")
    heads = {}
    for key, value in trained.items():
        if key.startswith("layers/prediction_head") and key.endswith("prediction_layer/vars/1"):
            heads[value.shape[0]] = key.split("/prediction_layer")[0]
    assert sorted(heads) == [27, 36]
    for outputs, bias in ((27, -math.log(0.98 / 0.02)), (36, 0.0)):
        head = heads[outputs]
        np.testing.assert_allclose(trained[f"{head}/prediction_layer/vars/1"], bias, atol=1e-2)
        assert np.std(trained[f"{head}/prediction_layer/vars/0"]) == pytest.approx(0.01, rel=0.1)
        convs = sorted(k for k in trained if k.startswith(f"{head}/conv_layers/") and k.endswith("vars/0"))
        assert len(convs) == 4  # the preset's pre_logits_num_conv_layers
        for key in convs:
            assert np.std(trained[key]) == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.1), key


def test_a_corrupt_cached_file_is_one_line_naming_it(stand_in, tmp_path):
    """A truncated download of the weights: the file named, and the fix."""
    cache, folder, _ = stand_in
    copy = tmp_path / "kagglehub"
    shutil.copytree(cache, copy, copy_function=os.link)  # hard links: no 140 MB copy
    broken = copy / folder.relative_to(cache) / "model.weights.h5"
    data = broken.read_bytes()[: 1 << 20]
    broken.unlink()  # the link, not the stand-in
    broken.write_bytes(data)
    result = run_script(TRAIN, "--smoke", "--weights", "coco", "--output-dir", tmp_path / "run",
                        check=False, timeout=180, env=offline(copy))
    assert_one_line_error(result, str(broken), "delete", "to download it again")
    assert not (tmp_path / "run").exists()


def test_a_cached_preset_of_another_architecture_is_one_line_naming_it(tmp_path):
    folder, _ = write_stand_in(tmp_path / "kagglehub", "small")
    result = run_script(TRAIN, "--smoke", "--weights", "coco", "--output-dir", tmp_path / "run",
                        check=False, timeout=180, env=offline(tmp_path / "kagglehub"))
    assert_one_line_error(result, str(folder / "config.json"), "ResNet-50", "delete", "to download it again")
    assert not (tmp_path / "run").exists()
