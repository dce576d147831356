"""04b_instance_seg: `train.py --dataset pennfudan --weights coco`, offline.

The torchvision tutorial's fine-tune (new box and mask predictors for the run's classes, the
rest from COCO) from the stand-in COCO file of test_04b_coco.py, on the smoke data at 64 px.
A file of its own, so that `make test` can run it beside the parity test.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.helpers import run_python, run_script
from tests.test_04b_coco import CONVERTED, PREDICT, make_stand_in, synthetic_photo

# A pretrained path through a stand-in weights file: `make test` runs these, `make smoke` skips them.
pytestmark = pytest.mark.pretrained


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return make_stand_in(tmp_path_factory)


# What the fine-tune started from and what it trained: in a TensorFlow process.
CHECK_FINE_TUNE = """
    import json, sys
    import numpy as np
    import coco_finetune

    model = coco_finetune.load_model(sys.argv[1])
    coco = np.load(sys.argv[2])
    layers = {layer.name: layer for net in (model.features, model.box_head, model.mask_head)
              for layer in net.layers}
    def same(name):
        return bool(np.array_equal(layers[name].get_weights()[0], coco[name + "/0"]))
    print("JSON" + json.dumps({
        "frozen_stem_kept": same("backbone.body.conv1") and same("backbone.body.layer1.0.conv1"),
        "layer4_trained": not same("backbone.body.layer4.2.conv3"),
        "fpn_trained": not same("backbone.fpn.layer_blocks.0.0"),
        "cls_score": list(layers["roi_heads.box_predictor.cls_score"].get_weights()[0].shape),
        "mask_logits": list(layers["roi_heads.mask_predictor.mask_fcn_logits"].get_weights()[0].shape)}))
    """


def test_train_fine_tunes_the_coco_model_on_pennfudan(stand_in, tmp_path):
    torch_home, env = stand_in
    run = tmp_path / "run"
    result = run_script("04b_instance_seg/train.py", "--smoke", "--dataset", "pennfudan", "--weights", "coco",
                        "--learning-rate", "0.0001", "--output-dir", run, env=env, timeout=600)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["weights"] == "coco" and metrics["dataset"] == "pennfudan" and 0 <= metrics["mask_map50"] <= 1
    losses = [float(line.split()[3]) for line in result.stdout.splitlines() if line.startswith("epoch")]
    # Measured (64 px smoke photos, stand-in weights): mean loss 8.62 in epoch 1, 5.49 in epoch 2
    # (each of the 6 steps sees 4 photos; mAP stays 0 in 2 epochs, 0.32 after 5 with --epochs 5).
    assert len(losses) == 2 and losses[1] < losses[0], result.stdout
    arch = json.loads((run / "model.json").read_text())
    assert arch["kind"] == "torchvision maskrcnn_resnet50_fpn fine-tuned" and arch["class_names"] == ["person"]
    checked = run_python(CHECK_FINE_TUNE, "04b_instance_seg", args=(run / "model.weights.h5", torch_home / CONVERTED))
    facts = json.loads(next(line[4:] for line in checked.stdout.splitlines() if line.startswith("JSON")))
    # The tutorial's recipe: COCO weights everywhere but the new 2-class predictors; the stem
    # and layer1 frozen (torchvision's trainable_backbone_layers=3), the rest trained.
    assert facts == {"frozen_stem_kept": True, "layer4_trained": True, "fpn_trained": True,
                     "cls_score": [1024, 2], "mask_logits": [1, 1, 256, 2]}, facts
    # predict.py reads the fine-tune that train.py saved, as it reads the compact model.
    photo = tmp_path / "photo.png"
    synthetic_photo().save(photo)
    predicted = run_script(PREDICT, "--model-path", run / "model.weights.h5", "--score-threshold", "0",
                           "--output-dir", tmp_path / "out", photo, env=env)
    assert Image.open(tmp_path / "out" / "photo_instances.png").size == (320, 240), predicted.stderr
