"""04b: the Keras COCO Mask R-CNN beside torchvision's own, stage by stage, on your photos.

What it teaches
    The same network in two frameworks gives the same answer only if every convention
    matches. This script runs torchvision's `maskrcnn_resnet50_fpn(weights=COCO_V1)` and
    coco_model.py's Keras copy on the same photos, and compares what each stage made:

        images         the resized, normalised, padded input (PyTorch NCHW, Keras NHWC)
        C2..C5         ResNet-50 stages (FrozenBatchNorm, PyTorch's symmetric padding)
        P2..P6         FPN levels (P6: the max-pool level)
        objectness*    RPN logits per level, rpn_deltas* its box deltas
        proposals      the RPN's 1000 boxes after per-level top-k and NMS
        class_logits   the box head on those proposals
        detections     boxes, scores, labels and masks, back on the photo

    Each map is reported by its largest difference relative to its largest value; the
    detections by count, box and score differences, and each matched pair's mask IoU
    (masks thresholded at 0.5). Try breaking a convention in coco_model.py (Keras' "same"
    padding on the strided convs, say) and see which stage drifts first.

How to run
    python 04b_instance_seg/parity.py photo.jpg [more.jpg ...] [--output-dir DIR]
    It runs itself twice more as `--side torch` and `--side keras`, one framework per process
    (importing torchvision after TensorFlow segfaults), each writing DIR/<side>.npz; then
    compares them, prints a table and writes DIR/parity.json. The converted weights are made
    first if missing (convert_coco.py). Offline, with seeded stand-in weights instead:
    TORCH_HOME=/tmp/empty python 04b_instance_seg/convert_coco.py --stand-in, then this script
    with the same TORCH_HOME.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import convert_coco
import numpy as np

from data.cli import REPO_ROOT, UserError, run_main
from data.images import read_rgb
from data.outputs import atomic_path, write_json

# Parity bars for the final detections: what "the same model" means here.
BOX_TOLERANCE, SCORE_TOLERANCE, MASK_IOU_MIN = 0.5, 1e-3, 0.98
MAP_STAGES = ("images", "C2", "C3", "C4", "C5", "P2", "P3", "P4", "P5", "P6",
              *(f"objectness{k}" for k in range(2, 7)), *(f"rpn_deltas{k}" for k in range(2, 7)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="photos to compare on")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "04b_instance_seg-parity",
                        help="where torch.npz, keras.npz and parity.json go")
    parser.add_argument("--side", choices=("torch", "keras"), default=None,
                        help="internal: run one framework's side only")
    parser.add_argument("--num-threads", type=int, default=2, help="each framework's intra-op threads")
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")
    return parser.parse_args(argv)


# --- Each side: one framework, every stage, every photo ----------------------------------------


def torch_side(photos: list[np.ndarray], num_threads: int) -> dict:
    """torchvision's model, its stages caught with forward hooks (they change nothing)."""
    import torch

    torch.set_num_threads(num_threads)
    model = convert_coco.reference_model()
    caught = {}
    model.transform.register_forward_hook(lambda m, i, out: caught.update(images=out[0].tensors))
    model.backbone.body.register_forward_hook(lambda m, i, out: caught.update(body=list(out.values())))
    model.backbone.register_forward_hook(lambda m, i, out: caught.update(pyramid=list(out.values())))
    model.rpn.head.register_forward_hook(lambda m, i, out: caught.update(head=out))
    model.roi_heads.box_predictor.register_forward_hook(lambda m, i, out: caught.update(box_head=out))
    filter_proposals = model.rpn.filter_proposals

    def keep_proposals(*args, **kwargs):  # RegionProposalNetwork.forward drops the scores
        boxes, scores = filter_proposals(*args, **kwargs)
        caught.update(proposals=boxes[0], proposal_scores=scores[0])
        return boxes, scores

    model.rpn.filter_proposals = keep_proposals
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    stages = {}
    for index, photo in enumerate(photos):
        out = model([torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255])[0]
        found = {"images": nhwc(caught["images"]), "proposals": caught["proposals"].numpy(),
                 "proposal_scores": caught["proposal_scores"].numpy(),
                 "class_logits": caught["box_head"][0].numpy(), "boxes": out["boxes"].numpy(),
                 "scores": out["scores"].numpy(), "labels": out["labels"].numpy(),
                 "masks": out["masks"][:, 0].numpy() >= 0.5}
        found.update({f"C{k + 2}": nhwc(c) for k, c in enumerate(caught["body"])})
        found.update({f"P{k + 2}": nhwc(p) for k, p in enumerate(caught["pyramid"])})
        found.update({f"objectness{k + 2}": nhwc(o) for k, o in enumerate(caught["head"][0])})
        found.update({f"rpn_deltas{k + 2}": nhwc(d) for k, d in enumerate(caught["head"][1])})
        stages.update({f"{index}/{key}": value for key, value in found.items()})
    return stages


def keras_side(photos: list[np.ndarray], num_threads: int) -> dict:
    import coco_model
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(num_threads)
    model = coco_model.load_converted(convert_coco.converted_file())
    stages = {}
    for index, photo in enumerate(photos):
        found = coco_model.predict(model, photo, stages=True)
        found["masks"] = found["masks"] >= 0.5
        stages.update({f"{index}/{key}": value for key, value in found.items()
                       if key not in ("box_deltas", "resized_size")})
    return stages


# --- Comparison ----------------------------------------------------------------------------------


def compare_maps(ours: np.ndarray, theirs: np.ndarray) -> dict:
    if ours.shape != theirs.shape:
        return {"shape_keras": list(ours.shape), "shape_torch": list(theirs.shape), "same_shape": False}
    difference = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    scale = float(np.abs(theirs).max()) if theirs.size else 0.0
    return {"same_shape": True, "shape": list(ours.shape), "max_abs_diff": difference,
            "relative_diff": difference / max(scale, 1e-12)}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def compare_detections(ours: dict, theirs: dict) -> dict:
    """Pairs each torchvision detection with the unpaired Keras one of the same label nearest
    to it (a near-tie in score may swap two in the ranking), then applies the parity bars."""
    free, pairs = set(range(len(ours["scores"]))), []
    for index in range(len(theirs["scores"])):
        candidates = [k for k in free if ours["labels"][k] == theirs["labels"][index]]
        if not candidates:
            continue
        nearest = min(candidates, key=lambda k: np.abs(ours["boxes"][k] - theirs["boxes"][index]).max())
        free.discard(nearest)
        pairs.append((nearest, index))
    box_diff = max((float(np.abs(ours["boxes"][k] - theirs["boxes"][i]).max()) for k, i in pairs), default=0.0)
    score_diff = max((abs(float(ours["scores"][k] - theirs["scores"][i])) for k, i in pairs), default=0.0)
    ious = [mask_iou(ours["masks"][k], theirs["masks"][i]) for k, i in pairs]
    result = {"count_keras": len(ours["scores"]), "count_torch": len(theirs["scores"]),
              "paired": len(pairs), "max_box_diff": box_diff, "max_score_diff": score_diff,
              "min_mask_iou": min(ious, default=1.0)}
    result["passed"] = (result["count_keras"] == result["count_torch"] == len(pairs)
                        and box_diff <= BOX_TOLERANCE and score_diff <= SCORE_TOLERANCE
                        and result["min_mask_iou"] >= MASK_IOU_MIN)
    return result


def pair_boxes(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """For each of torchvision's boxes, the index of the nearest of ours (largest coordinate
    difference): the rankings may differ where two scores tie to float32 precision."""
    if not len(ours) or not len(theirs):
        return np.zeros(0, np.int64)
    distance = np.abs(theirs[:, None, :] - ours[None, :, :]).max(axis=2)
    return distance.argmin(axis=1)


def compare_proposals(ours: dict, theirs: dict) -> dict:
    pairs = pair_boxes(ours["proposals"], theirs["proposals"])
    paired = ours["proposals"][pairs]
    result = {"count_keras": len(ours["proposals"]), "count_torch": len(theirs["proposals"]),
              "one_to_one": len(set(pairs.tolist())) == len(pairs),
              "reordered": int((pairs != np.arange(len(pairs))).sum()),
              "max_box_diff": float(np.abs(paired - theirs["proposals"]).max()) if len(pairs) else 0.0}
    logits = compare_maps(ours["class_logits"][pairs], theirs["class_logits"])  # on the same boxes
    return result, logits


def compare(ours: dict, theirs: dict, count: int) -> list[dict]:
    report = []
    for index in range(count):
        def get(stages, keys, index=index):
            return {key: stages[f"{index}/{key}"] for key in keys}

        maps = {key: compare_maps(ours[f"{index}/{key}"], theirs[f"{index}/{key}"]) for key in MAP_STAGES}
        keys = ("proposals", "class_logits")
        proposals, logits = compare_proposals(get(ours, keys), get(theirs, keys))
        keys = ("boxes", "scores", "labels", "masks")
        found = compare_detections(get(ours, keys), get(theirs, keys))
        report.append({"maps": maps, "proposals": proposals, "class_logits": logits, "detections": found})
    return report


def print_report(paths: list[Path], report: list[dict]) -> None:
    for path, photo in zip(paths, report, strict=True):
        print(f"{path}\n  {'stage':<14}{'shape (NHWC)':<24}{'max |diff|':>12}{'relative':>12}")
        for name, row in [*photo["maps"].items(), ("class_logits", photo["class_logits"])]:
            if not row["same_shape"]:
                print(f"  {name:<14}keras {row['shape_keras']} vs torch {row['shape_torch']}")
                continue
            shape = "x".join(map(str, row["shape"]))
            print(f"  {name:<14}{shape:<24}{row['max_abs_diff']:>12.2e}{row['relative_diff']:>12.2e}")
        p = photo["proposals"]
        print(f"  proposals: keras {p['count_keras']}, torch {p['count_torch']}, one to one "
              f"{p['one_to_one']}, {p['reordered']} in another rank (tied scores); box diff "
              f"{p['max_box_diff']:.2e} px")
        d = photo["detections"]
        print(f"  detections: keras {d['count_keras']}, torch {d['count_torch']}, paired {d['paired']}; "
              f"box diff {d['max_box_diff']:.2e} px (bar {BOX_TOLERANCE}), score diff "
              f"{d['max_score_diff']:.2e} (bar {SCORE_TOLERANCE}), min mask IoU {d['min_mask_iou']:.4f} "
              f"(bar {MASK_IOU_MIN}): {'PASS' if d['passed'] else 'FAIL'}")


# --- Main ------------------------------------------------------------------------------------------


def run_side(side: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *map(str, args.images), "--side", side,
               "--output-dir", str(args.output_dir), "--num-threads", str(args.num_threads)]
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        if lines and lines[-1].startswith("error: "):
            raise UserError(lines[-1][len("error: "):])
        sys.stderr.write(result.stderr)
        raise UserError(f"the {side} side failed (exit {result.returncode}); its output is above")
    with np.load(args.output_dir / f"{side}.npz") as stages:
        return dict(stages)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    photos = [read_rgb(path) for path in args.images]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.side:
        stages = torch_side(photos, args.num_threads) if args.side == "torch" else keras_side(
            photos, args.num_threads)
        with atomic_path(args.output_dir / f"{args.side}.npz") as tmp, open(tmp, "wb") as file:
            np.savez_compressed(file, **stages)
        return []
    convert_coco.ensure_converted()
    theirs, ours = run_side("torch", args), run_side("keras", args)
    report = compare(ours, theirs, len(photos))
    print_report(args.images, report)
    write_json(args.output_dir / "parity.json", {"photos": [str(p) for p in args.images], "report": report})
    return report


if __name__ == "__main__":
    run_main(main)
