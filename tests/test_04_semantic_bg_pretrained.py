"""Chapter 04's pretrained paths, run offline through torch.hub's own cache.

A learner with internet gets torchvision's COCO weights (VOC labels) by default in
composite.py, and with train.py --weights coco. torchvision builds the model and calls
torch.hub.load_state_dict_from_url, which downloads the file once into
$TORCH_HOME/hub/checkpoints/<the file name of the Weights enum's URL> and from then on
reads it from there. It checks the file's hash only while downloading it (check_hash is
applied inside `if not os.path.exists(cached_file)` in torch/hub.py, torch 2.14), so a
stand-in file put in the cache is loaded as the downloaded one would be. With a weights
enum, the segmentation builders set weights_backbone=None: no ImageNet backbone file is
fetched, and only the one file per model needs a stand-in.

The stand-ins are models of the same architecture with random weights (seeded), saved as
torchvision publishes them (a state_dict, with DeepLabV3's auxiliary head). The scripts run
under a proxy that refuses every connection, so nothing can be downloaded, and a spy
(SPY_ON_WEIGHTS) records the model's tensors when the script hands it to
segmenters.prepare_model, before any training step: they must be the file's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.synthetic import write_pennfudan
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

TRAIN, COMPOSITE = "04_semantic_bg/train.py", "04_semantic_bg/composite.py"
VOC_PERSON = 15  # "person" among the 21 VOC labels of the COCO_WITH_VOC_LABELS_V1 weights


def offline(torch_home: Path) -> dict[str, str]:
    return script_env(TORCH_HOME=str(torch_home), **OFFLINE)


TQDM_BAR = re.compile(r"^\s*$|^[\w -]+:\s+\d+%\|")  # a progress bar's frame, or its wiped line


def assert_one_shown_error(result, *words: str) -> None:
    """assert_one_line_error, with the photo-loading progress bars left out: tqdm draws them
    on stderr (and wipes them when done, on a terminal), before the weights load fails."""
    shown = "\n".join(line for line in result.stderr.splitlines() if not TQDM_BAR.match(line))
    assert_one_line_error(subprocess.CompletedProcess(result.args, result.returncode, result.stdout, shown),
                          *words)


# Writes the stand-ins where torch.hub caches what it downloads: a random model of each
# architecture (seeded), its state_dict saved under the file name of the Weights enum's URL.
# DeepLabV3-ResNet101's last 1x1 conv (classifier.4) is set to a constant answer, person
# (VOC 15) everywhere: a random model's output is noise with no person in it, and
# composite.py then stops at "no person found" before writing its composites.
STAND_INS = """
import json, os, sys
from urllib.parse import urlparse
import torch
from torchvision.models import segmentation
folder = os.path.join(sys.argv[1], "hub", "checkpoints")
os.makedirs(folder, exist_ok=True)
torch.manual_seed(0)
files = {}
for arch, enum_name, extra in (("lraspp_mobilenet_v3_large", "LRASPP_MobileNet_V3_Large_Weights", {}),
                               ("deeplabv3_resnet101", "DeepLabV3_ResNet101_Weights", {"aux_loss": True})):
    weights = getattr(segmentation, enum_name).COCO_WITH_VOC_LABELS_V1
    model = getattr(segmentation, arch)(weights=None, weights_backbone=None,
                                        num_classes=len(weights.meta["categories"]), **extra)
    state = model.state_dict()
    if arch == "lraspp_mobilenet_v3_large":  # a 2-class LR-ASPP: another model's weights, for the bad-file test
        two_class = getattr(segmentation, arch)(weights=None, weights_backbone=None, num_classes=2)
        files["lraspp_two_classes"] = os.path.join(sys.argv[1], "lraspp_two_classes.pth")
        torch.save(two_class.state_dict(), files["lraspp_two_classes"])
    if arch == "deeplabv3_resnet101":
        state["classifier.4.weight"].zero_()
        state["classifier.4.bias"].fill_(-4.0)[15] = 4.0
    path = os.path.join(folder, os.path.basename(urlparse(weights.url).path))
    torch.save(state, path)
    files[arch] = path
print(json.dumps(files))
"""

# Runs `python SCRIPT ARGS...` as a user would, and records the model's tensors when the
# script passes it to segmenters.prepare_model (right after building or loading it, before
# any training step). At exit it compares them with the cached weights file and writes
# REPORT: which tensors equal the file's, which equal rows 0 and 15 of the file's (the
# background and person rows of the VOC head), which differ, and which keys are in only one.
SPY_ON_WEIGHTS = """
import json, runpy, sys
sys.path[:0] = ["04_semantic_bg", "."]
import torch
import segmenters
report, weights_file, script = sys.argv[1:4]
seen = {}
prepare = segmenters.prepare_model
def spy(model, device):
    seen.update({key.removeprefix("model."): value.detach().clone() for key, value in model.state_dict().items()})
    return prepare(model, device)
segmenters.prepare_model = spy
sys.argv = sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    if seen:
        saved = torch.load(weights_file, map_location="cpu")
        rows = torch.tensor([0, 15])
        found = {"equal": [], "voc_rows_0_15": [], "differ": [], "not_in_file": [], "file_only": []}
        for key, value in seen.items():
            if key not in saved:
                found["not_in_file"].append(key)
            elif saved[key].shape == value.shape and torch.equal(saved[key], value):
                found["equal"].append(key)
            elif saved[key].dim() and saved[key][rows].shape == value.shape and torch.equal(saved[key][rows], value):
                found["voc_rows_0_15"].append(key)
            else:
                found["differ"].append(key)
        found["file_only"] = sorted(set(saved) - set(seen))
        with open(report, "w") as out:
            json.dump(found, out)
"""


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """(TORCH_HOME holding the stand-ins, {arch: file}, the spy script): written once."""
    home = tmp_path_factory.mktemp("torch_home")
    result = run_python(STAND_INS, "04_semantic_bg", timeout=240, args=(home,))
    files = {arch: Path(path) for arch, path in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    spy = home.parent / "spy_on_weights.py"
    spy.write_text(SPY_ON_WEIGHTS)
    return home, files, spy


def run_spied(spy: Path, report: Path, weights_file: Path, script: str, *args, env, timeout=300):
    """The chapter's command under SPY_ON_WEIGHTS; returns (the run, the spy's report)."""
    result = run_script(str(spy), report, weights_file, script, *map(str, args), env=env, timeout=timeout,
                        chapter="04_semantic_bg", check=False)
    assert result.returncode == 0, f"{script} exited {result.returncode}\n{result.stderr[-4000:]}"
    return result, json.loads(report.read_text())


def test_train_weights_coco_offline_leaves_nothing_then_fine_tunes_the_cached_file(stand_ins, tmp_path):
    """train.py --weights coco --model lraspp_mobilenet_v3_large: with an empty cache and no
    network, one line and nothing left behind; with the file in torch.hub's cache, the same
    command into the same folder (no --overwrite) fine-tunes the file's weights, its head cut
    to the VOC background and person rows, and finishes with its metrics."""
    home, files, spy = stand_ins
    output_dir = tmp_path / "lraspp"
    # shortened: 8 photos (6 to train on, one batch), one epoch, no flip TTA; a step of this
    # model costs ~3 s of CPU at 96 px on this machine
    command = ("--smoke", "--weights", "coco", "--model", "lraspp_mobilenet_v3_large", "--device", "cpu",
               "--smoke-images", "8", "--epochs", "1", "--no-flip-tta", "--output-dir", output_dir)
    failed = run_script(TRAIN, *command, env=offline(tmp_path / "empty_torch_home"), check=False, timeout=120)
    assert_one_shown_error(failed, "could not download the COCO weights", "lraspp_mobilenet_v3_large-",
                          "--weights none")
    assert_failed_start_left_nothing(output_dir)

    result, found = run_spied(spy, tmp_path / "report.json", files["lraspp_mobilenet_v3_large"], TRAIN,
                              *command, env=offline(home))
    # (a) every tensor of the model is the file's; (b) the two heads' convs are the file's
    # VOC rows 0 (background) and 15 (person), as segmenters._person_head_from_voc says
    heads = [f"classifier.{head}.{part}" for head in ("low_classifier", "high_classifier")
             for part in ("weight", "bias")]
    assert sorted(found["voc_rows_0_15"]) == sorted(heads), found
    assert found["differ"] == found["not_in_file"] == found["file_only"] == [], found
    assert len(found["equal"]) > 100  # the whole backbone and the rest of the head
    assert "Downloading" not in result.stdout + result.stderr
    # (c) it trains and finishes with its metrics and model
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and 0 <= metrics["person_iou"] <= 1
    config = json.loads((output_dir / "config.json").read_text())
    assert (config["weights"], config["model"]) == ("coco", "lraspp_mobilenet_v3_large")
    assert (output_dir / "model.pt").is_file()
    assert "lraspp_mobilenet_v3_large (coco)" in result.stdout


def test_composite_default_weights_come_from_the_torch_hub_cache(stand_ins, tmp_path):
    """composite.py with its defaults (DeepLabV3-ResNet101, COCO with VOC labels): the
    model's tensors are the cached file's, the 21-class head kept (person = channel 15),
    the auxiliary head dropped; it writes its composite and metrics."""
    home, files, spy = stand_ins
    root = write_pennfudan(tmp_path / "photos", count=1, seed=3, image_size=(240, 180))
    foreground = root / "PNGImages" / "FudanPed00001.png"
    background = tmp_path / "sea.png"
    Image.fromarray(np.full((90, 200, 3), (30, 90, 200), np.uint8)).save(background)
    output_dir = tmp_path / "out"
    result, found = run_spied(spy, tmp_path / "report.json", files["deeplabv3_resnet101"], COMPOSITE,
                              "--foreground", foreground, "--background", background, "--device", "cpu",
                              "--working-size", "160", "--output-dir", output_dir, env=offline(home))
    assert found["differ"] == found["voc_rows_0_15"] == found["not_in_file"] == [], found
    assert len(found["equal"]) > 300 and "classifier.4.weight" in found["equal"]
    assert found["file_only"] and all(key.startswith("aux_classifier.") for key in found["file_only"])
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["model"] == "deeplabv3_resnet101 (COCO)"
    # the stand-in's head answers person everywhere (see STAND_INS), so its person channel
    # (15) is the one read: probability e^4 / (e^4 + 20 e^-4) = 0.993 at every pixel
    assert metrics["max_person_probability"] == pytest.approx(np.exp(4) / (np.exp(4) + 20 * np.exp(-4)), abs=1e-4)
    assert metrics["person_found"] and metrics["person_fraction"] == 1.0
    assert metrics["out_of_range"] and "leaving no background" in result.stderr
    assert Image.open(output_dir / "composite_replace.jpg").size == (240, 180)


def test_an_unusable_cached_file_is_one_line_naming_it(stand_ins, tmp_path):
    """A corrupt cached file, or one holding another model's weights: one line that names
    the file and says to delete it, exit 2, nothing left in the output folder."""
    _, files, _ = stand_ins
    home = tmp_path / "torch_home"
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    corrupt = cache / files["lraspp_mobilenet_v3_large"].name
    corrupt.write_bytes(files["lraspp_mobilenet_v3_large"].read_bytes()[:50_000])  # a cut-off copy
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.png")
    result = run_script(COMPOSITE, "--foreground", tmp_path / "p.png", "--mode", "gray", "--model",
                        "lraspp_mobilenet_v3_large", "--device", "cpu", "--output-dir", tmp_path / "out",
                        env=offline(home), check=False, timeout=120)
    assert_one_line_error(result, str(corrupt), "not a readable weights file", "delete it")
    assert_failed_start_left_nothing(tmp_path / "out")

    # a 2-class LR-ASPP (someone's fine-tuned copy, say) under the COCO file's name: the wrong model
    wrong = corrupt  # the same name, now holding another model's weights
    shutil.copy(files["lraspp_two_classes"], wrong)
    result = run_script(TRAIN, "--smoke", "--smoke-images", "8", "--weights", "coco", "--model",
                        "lraspp_mobilenet_v3_large", "--device", "cpu", "--output-dir", tmp_path / "train",
                        env=offline(home), check=False, timeout=120)
    assert_one_shown_error(result, str(wrong), "do not fit", "delete it")
    assert_failed_start_left_nothing(tmp_path / "train")
    assert wrong.read_bytes() == files["lraspp_two_classes"].read_bytes()  # named, never deleted by the run
