"""04b: torchvision's COCO Mask R-CNN weights, converted for the Keras model of coco_model.py.

What it does
    Builds the model exactly as a torchvision user does,
    `maskrcnn_resnet50_fpn(weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1)`: the first time,
    torchvision downloads the file into the torch.hub cache and checks its SHA-256. Then it
    writes every weight, in the layout Keras wants, to one .npz beside that file:

        Conv2d           (out, in, kh, kw)  ->  kernel (kh, kw, in, out), bias
        ConvTranspose2d  (in, out, kh, kw)  ->  kernel (kh, kw, out, in), bias
        Linear           (out, in)          ->  kernel (in, out), bias; fc6 also reorders its
                                                inputs from PyTorch's (channel, y, x) flattening
                                                of a 7x7 crop to Keras' (y, x, channel)
        FrozenBatchNorm2d                    ->  weight, bias, running_mean, running_var

    Each array is stored as "<torchvision module name>/<index>"; the Keras layer of that
    name takes them in that order. The .npz appears only once it is complete.

    This process imports torch and torchvision only: importing torchvision after TensorFlow
    in one process segfaults, so predict.py and train.py run this script as a subprocess.

How to run
    python 04b_instance_seg/convert_coco.py              # predict.py --weights coco runs it once
    python 04b_instance_seg/convert_coco.py --stand-in   # offline: seeded random weights (tests)

`--stand-in` writes what the offline tests use in place of the real file: seeded random
weights, BatchNorm statistics drawn at random, and the "person" score raised so that the
model detects something. It never replaces an existing file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import coco_names

from data.cli import UserError, run_main
from data.outputs import atomic_path

# torchvision's MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url; `reference_model` checks that it is.
COCO_V1_URL = "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
FORMAT = "torchvision maskrcnn_resnet50_fpn v1 as Keras NHWC arrays, version 1"
STAND_IN_CLASS = 1  # "person": the class whose score the stand-in raises
NUM_CLASSES = 91  # COCO_V1: background + 90 category ids (some unused)


# --- Where the files are (no torch import: predict.py calls these) -------------------------


def torchvision_file() -> Path:
    """Where torch.hub keeps the download: $TORCH_HOME/hub/checkpoints/<file name of the URL>
    (TORCH_HOME defaults to $XDG_CACHE_HOME/torch, that to ~/.cache/torch), as torch.hub.get_dir."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(torch_home) / "hub" / "checkpoints" / COCO_V1_URL.rsplit("/", 1)[1]


def converted_file() -> Path:
    """The Keras arrays, beside the torchvision file they came from."""
    source = torchvision_file()
    return source.with_name(f"{source.stem}.keras.npz")


def source_stamp(path: Path) -> list[int]:
    """(size, mtime in ns) of the torchvision file: the converted file records it, and a
    different stamp (say, the real file replacing a stand-in) means "convert again"."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def ensure_converted() -> Path:
    """The converted file; made first, by this script in a torch-only subprocess, when it is
    missing or was converted from another torchvision file (says so on stdout)."""
    import numpy as np

    target, source = converted_file(), torchvision_file()
    if target.is_file():
        try:
            with np.load(target) as arrays:
                stamp = arrays["source_stamp"].tolist()
        except Exception:  # unreadable: coco_model.load_converted names the file and the fix
            return target
        if not source.is_file() or stamp == source_stamp(source):
            return target
        print(f"{source} changed since it was converted: converting it again")
    print(f"converting torchvision's COCO weights (once; downloading {source.name}, 170 MB, "
          f"first if needed) to {target}", flush=True)  # stdout: stderr is for one-line errors
    result = subprocess.run([sys.executable, str(Path(__file__).resolve())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"{Path(__file__).name} failed"]
        if not lines[-1].startswith("error: "):
            sys.stderr.write(result.stderr)
        raise UserError(lines[-1].removeprefix("error: "))
    return target


# --- The reference model -------------------------------------------------------------------


def reference_model():
    """torchvision's COCO Mask R-CNN, built as its documentation says, in eval mode."""
    import torch
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn

    weights = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    if weights.url != COCO_V1_URL or tuple(weights.meta["categories"]) != coco_names.CATEGORIES:
        raise UserError(f"this torchvision's COCO_V1 ({weights.url}) is not the one convert_coco.py "
                        "and coco_names.py describe: update COCO_V1_URL and CATEGORIES")
    path, existed = torchvision_file(), torchvision_file().is_file()
    try:
        model = maskrcnn_resnet50_fpn(weights=weights, progress=False)
    except Exception as exc:  # a download (URLError, hash mismatch) or a load (pickle, zip, keys)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if existed:
            raise UserError(f"{path} is not torchvision's maskrcnn_resnet50_fpn COCO_V1 file ({reason}); "
                            "delete it and rerun to download it again") from None
        raise UserError(f"could not download {COCO_V1_URL} to {path} ({reason}); connect to the "
                        "internet, or copy the file there") from None
    torch.set_grad_enabled(False)
    return model.eval()


# --- Conversion ----------------------------------------------------------------------------


def keras_arrays(model) -> dict:
    """{"<module name>/<index>": array} for every weighted layer, in Keras layout."""
    import numpy as np
    import torch
    from torchvision.ops import FrozenBatchNorm2d

    arrays = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ConvTranspose2d):
            kernel = module.weight.numpy().transpose(2, 3, 1, 0)
            found = [kernel, module.bias.numpy()]
        elif isinstance(module, torch.nn.Conv2d):
            kernel = module.weight.numpy().transpose(2, 3, 1, 0)
            found = [kernel] + ([module.bias.numpy()] if module.bias is not None else [])
        elif isinstance(module, torch.nn.Linear):
            kernel = module.weight.numpy()
            if name == "roi_heads.box_head.fc6":  # its input: a 256x7x7 crop, flattened
                outputs, channels = kernel.shape[0], kernel.shape[1] // 49
                kernel = kernel.reshape(outputs, channels, 7, 7).transpose(0, 2, 3, 1).reshape(outputs, -1)
            found = [kernel.T, module.bias.numpy()]
        elif isinstance(module, FrozenBatchNorm2d):
            if module.eps != 0.0:
                raise UserError(f"{name}: FrozenBatchNorm2d eps is {module.eps}; the Keras model "
                                "follows COCO_V1, whose eps torchvision sets to 0")
            found = [module.weight, module.bias, module.running_mean, module.running_var]
            found = [tensor.numpy() for tensor in found]
        elif isinstance(module, torch.nn.BatchNorm2d):
            raise UserError(f"{name}: a trainable BatchNorm2d; expected COCO_V1's FrozenBatchNorm2d")
        else:
            continue
        for index, array in enumerate(found):
            arrays[f"{name}/{index}"] = np.ascontiguousarray(array, dtype=np.float32)
    return arrays


def write_npz(arrays: dict, path: Path) -> None:
    """np.savez to a temporary file in the same folder, then an atomic rename."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as file:  # (a file object: no ".npz" added)
        np.savez(file, **arrays)


def convert() -> Path:
    source, target = torchvision_file(), converted_file()
    arrays = keras_arrays(reference_model())
    arrays["format"] = FORMAT
    arrays["source_stamp"] = source_stamp(source)
    write_npz(arrays, target)
    return target


# --- The offline stand-in ------------------------------------------------------------------


def write_stand_in(path: Path, seed: int) -> None:
    """Seeded random weights in torchvision's COCO_V1 layout, saved where its download lands.

    Drawn so that signals keep a sensible scale (a purely random ResNet-50 grows its
    activations a thousandfold, and then every RPN score saturates at 1.0, a tie):
    - BatchNorm statistics: each layer's own statistics on a random image, then shifted and
      scaled at random; the last BatchNorm of each block gets a small weight, as trained
      ResNets have, so the residual sums do not grow block after block;
    - every other layer: He-normal weights, the FPN's 1x1 convs divided by the scale of
      their input, box deltas shrunk so that boxes stay on the photo, and score layers
      shrunk so that no score saturates at 1.0 (where float32 makes ties);
    - the "person" logit raised by 6, so that most detections are people, scored above
      torchvision's 0.05 threshold.
    """
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    with torch.no_grad():
        scales = _calibrate_backbone(model.backbone.body, generator)
        for name, module in model.named_modules():
            if name.startswith("backbone.body") or not isinstance(
                    module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                continue
            weight = module.weight
            fan_in = weight.shape[0] * 4 if isinstance(module, torch.nn.ConvTranspose2d) else weight[0].numel()
            weight.copy_(torch.randn(weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            if name.startswith("backbone.fpn.inner_blocks."):
                weight /= scales[int(name.split(".")[3])]
            if name.endswith(("bbox_pred", "cls_logits", "cls_score")):
                weight *= 0.1 if name.endswith("bbox_pred") else 0.2  # unsaturated scores
        model.roi_heads.box_predictor.cls_score.bias[STAND_IN_CLASS] += 6.0
    state = {key: value for key, value in model.state_dict().items() if "num_batches_tracked" not in key}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _calibrate_backbone(body, generator) -> list[float]:
    """Random BatchNorm statistics near the real ones; returns the rms of C2..C5."""
    import torch

    norms = {name: m for name, m in body.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for norm in norms.values():
        norm.reset_running_stats()
        norm.momentum = None  # a plain average: after one batch, that batch's statistics
    images = torch.randn(2, 3, 224, 224, generator=generator)
    body.train()
    body(images)
    body.eval()
    for name, norm in norms.items():
        count = norm.num_features
        norm.running_mean += 0.2 * norm.running_var.sqrt() * torch.randn(count, generator=generator)
        norm.running_var *= torch.empty(count).uniform_(0.7, 1.4, generator=generator)
        low, high = (0.1, 0.3) if name.endswith("bn3") else (0.7, 1.3)
        norm.weight.copy_(torch.empty(count).uniform_(low, high, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(count, generator=generator))
    return [float(c.pow(2).mean().sqrt()) for c in body(images).values()]


# --- Main ----------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stand-in", action="store_true",
                        help="first write seeded random weights where torchvision's download lands "
                             "(offline tests; refused if a file is there)")
    parser.add_argument("--seed", type=int, default=0, help="the stand-in's seed")
    parser.add_argument("--num-threads", type=int, default=2, help="torch's intra-op threads")
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.num_threads)
    if args.stand_in:
        if torchvision_file().exists():
            raise UserError(f"--stand-in: {torchvision_file()} exists; point TORCH_HOME at an empty "
                            "folder to test with a stand-in")
        write_stand_in(torchvision_file(), args.seed)
        print(f"wrote a stand-in (random weights, seed {args.seed}) to {torchvision_file()}")
    target = convert()
    print(f"converted {torchvision_file()} -> {target}")
    return target


if __name__ == "__main__":
    run_main(main)
