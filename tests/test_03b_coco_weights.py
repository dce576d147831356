"""03b's default for a learner with internet, `--weights coco`, run offline through torch.hub's cache.

train.py asks torchvision for `FCOS_ResNet50_FPN_Weights.COCO_V1`; torch.hub downloads the
file once into $TORCH_HOME/hub/checkpoints/<the file name in the enum's URL> and from then on
reads it from there. It checks the file's hash only while downloading it (in
`torch.hub.load_state_dict_from_url`, torch 2.14, the hash check sits inside
`if not os.path.exists(cached_file)`), so a stand-in put in the cache is loaded as the
downloaded file would be.

The stand-in: torchvision's FCOS ResNet-50 FPN with COCO's 91 outputs and random weights
(seeded), its state_dict saved as the published file holds it, without BatchNorm's
`num_batches_tracked` (the published model was trained with frozen BatchNorm, which has
none) and with random BatchNorm statistics, so that the test can tell them from a fresh
model's. Every run is offline: a proxy that refuses every connection.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import (
    OFFLINE,
    assert_failed_start_left_nothing,
    assert_one_line_error,
    run_python,
    run_script,
    script_env,
)

# A pretrained path through a stand-in weights file: `make test` runs these, `make smoke` skips them.
pytestmark = pytest.mark.pretrained

TRAIN, DETECT = "03b_xml_detection/train.py", "03b_xml_detection/detect.py"
FILE = "fcos_resnet50_fpn_coco-99b0c9b7.pth"  # the name in COCO_V1's URL
# The shortest run that still goes through the whole path: 2 steps of 12 of the 24 smoke
# pictures at 64 px, at the learning rate config.toml suggests for fine-tuning.
FLAGS = ("--smoke", "--weights", "coco", "--image-size", "64", "--batch-size", "12", "--epochs", "1",
         "--learning-rate", "1e-4", "--device", "cpu")

STAND_IN = """
import sys
from pathlib import Path
from urllib.parse import urlparse
import torch
from torchvision.models.detection import FCOS_ResNet50_FPN_Weights, fcos_resnet50_fpn

url = FCOS_ResNet50_FPN_Weights.COCO_V1.url
folder = Path(sys.argv[1]) / "hub" / "checkpoints"
folder.mkdir(parents=True)
torch.manual_seed(0)
state = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
for key in [key for key in state if key.endswith("num_batches_tracked")]:
    del state[key]
for key, value in state.items():
    if key.endswith("running_var"):
        value.uniform_(0.5, 2.0)
    elif key.endswith("running_mean"):
        value.normal_(0.0, 0.1)
torch.save(state, folder / Path(urlparse(url).path).name)
print(Path(urlparse(url).path).name)
"""

# The run's saved model (model.pt, the EMA weights) against the stand-in file.
COMPARE = """
import json, math, sys
import torch

file = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
saved = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
model, arch = saved["model"], saved["arch"]
frozen = [k for k in file if k.startswith(("backbone.body.conv1.", "backbone.body.layer1."))
          or k.endswith(("running_mean", "running_var"))]
shared = [k for k in file if "cls_logits" not in k and k not in frozen]
logits_w, logits_b = model["head.classification_head.cls_logits.weight"], model["head.classification_head.cls_logits.bias"]
print("JSON" + json.dumps({
    "kind": arch["kind"],
    "keys_missing": sorted(set(file) - set(model)),
    "frozen_changed": max((model[k] - file[k]).abs().max().item() for k in frozen),
    "num_frozen": len(frozen),
    "trained_changed": max((model[k] - file[k]).abs().max().item() for k in shared),
    "tower_changed": max((model[k] - file[k]).abs().max().item() for k in shared
                         if k.startswith("head.classification_head.conv")),
    "logits_shape": list(logits_w.shape),
    "logits_std": logits_w.std().item(), "logits_mean": logits_w.mean().item(),
    "bias": logits_b.tolist(),
}))
"""


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose torch.hub cache holds the stand-in, under COCO_V1's file name."""
    home = tmp_path_factory.mktemp("torch_home")
    result = run_python(STAND_IN, "03b_xml_detection", args=(home,), timeout=300)
    assert result.stdout.split()[-1] == FILE
    return home


def test_coco_weights_load_from_the_cache_and_the_new_head_starts_at_the_prior(torch_home, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(TRAIN, *FLAGS, "--output-dir", run_dir, timeout=600,
                        env=script_env(TORCH_HOME=str(torch_home), **OFFLINE))
    print(f"--weights coco, 2 steps at 64 px: {result.seconds:.0f} s")
    metrics = json.loads((run_dir / "metrics.json").read_text())  # (c) it finishes
    assert metrics["weights"] == "coco" and metrics["epochs"] == 1 and "map50" in metrics
    compared = run_python(COMPARE, "03b_xml_detection", args=(torch_home / "hub" / "checkpoints" / FILE,
                                                             run_dir / "model.pt"), timeout=300)
    found = json.loads(next(line[4:] for line in compared.stdout.splitlines() if line.startswith("JSON")))
    print({key: value for key, value in found.items() if key != "bias"})
    assert found["kind"] == "fcos_resnet50_coco" and found["keys_missing"] == []
    # (a) The file's tensors: the frozen stem and first stage, and every BatchNorm statistic
    # (frozen BatchNorm, as torchvision fine-tunes), are the file's to the bit after training;
    # the rest moved by at most 2 AdamW steps of 1e-4. A model that skipped the file differs
    # by 1.13 in the frozen tensors; one with a fresh classification tower by 0.07 there.
    assert found["num_frozen"] > 100 and found["frozen_changed"] == 0.0
    assert found["trained_changed"] < 1e-3 and found["tower_changed"] < 1e-3
    # (b) The new last classification layer, as model.py says: 3 classes, weights N(0, 0.01^2),
    # bias -log((1 - 0.01) / 0.01) = -4.595 (every point starts at a 1% score).
    assert found["logits_shape"] == [3, 256, 3, 3]
    assert 0.0095 < found["logits_std"] < 0.0105 and abs(found["logits_mean"]) < 1e-3
    assert found["bias"] == pytest.approx([-math.log(99)] * 3, abs=1e-3)
    # The saved model rebuilds without the download, as detect.py does on any machine.
    picture = next((run_dir / "smoke-data" / "fruits" / "test_zip" / "test").glob("*.jpg"))
    run_script(DETECT, "--model-path", run_dir / "model.pt", "--output-dir", tmp_path / "detect",
               "--score-threshold", "0.0", "--device", "cpu", picture)


@pytest.mark.parametrize("damage", ["corrupt", "wrong architecture"])
def test_a_bad_cached_file_is_named_with_the_fix(torch_home, tmp_path, damage):
    # A truncated download, or another model's file under COCO_V1's name (an 80-class head):
    # one line naming the file and the fix, and nothing left in the output folder.
    home = tmp_path / "torch_home"
    cached = home / "hub" / "checkpoints" / FILE
    cached.parent.mkdir(parents=True)
    good = (torch_home / "hub" / "checkpoints" / FILE).read_bytes()
    if damage == "corrupt":
        cached.write_bytes(good[: len(good) // 2])
    else:
        run_python("""
import sys, torch
state = torch.load(sys.argv[1], weights_only=True)
for key in ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"):
    state[key] = state[key][:80]
torch.save(state, sys.argv[2])
""", "03b_xml_detection", args=(torch_home / "hub" / "checkpoints" / FILE, cached))
    result = run_script(TRAIN, *FLAGS, "--output-dir", tmp_path / "run", check=False, timeout=300,
                        env=script_env(TORCH_HOME=str(home), **OFFLINE))
    assert_one_line_error(result, str(cached), "delete it to download it again")
    assert_failed_start_left_nothing(tmp_path / "run")
