"""04b: instance segmentation with a Mask R-CNN written for Keras 3, trained from scratch.

What it teaches
    The 2020 study ended on instance segmentation, with the classic Mask R-CNN walkthrough
    on the matterport implementation. That code targets TensorFlow 1 / Keras 2 and does not
    run on TensorFlow 2.21 with Keras 3; KerasHub has no Mask R-CNN, and keras-cv's port
    went only into a nightly of a retired package. So this chapter builds a compact one
    (model.py, targets.py, roi_align.py, instances.py), and trains and measures it here:
    - `--dataset shapes`: squares, circles and triangles drawn on the fly (shapes.py), the
      classic teaching set, with seeded validation and test sets of 200 and 300 pictures;
    - `--dataset pennfudan`: 170 street photos with a mask per pedestrian (data.pennfudan),
      split by seed into train / validation / test (saved as split.json); its settings
      are in pennfudan.toml.
    Each run keeps the weights of its best validation mask mAP@0.5 and scores the test
    set once, with COCO's bbox and segm mAP (pycocotools, data.detection_eval) and
    bootstrap 95% intervals over the test images.

How to run
    python 04b_instance_seg/train.py                          # shapes, ~30 min on 2 cores
    python 04b_instance_seg/train.py --dataset pennfudan      # pedestrians, ~60 min
    python 04b_instance_seg/train.py --weights imagenet       # ImageNet ResNet-18 (internet)
    python 04b_instance_seg/train.py --dataset pennfudan --weights coco --image-size 512 --learning-rate 0.0001
                                          # fine-tune torchvision's COCO Mask R-CNN (internet)
    python 04b_instance_seg/train.py --smoke                  # tiny pictures, under a minute
    python 04b_instance_seg/train.py --resume                 # continue an interrupted run
    python 04b_instance_seg/train.py --strategy mirrored      # data-parallel: every local GPU (or 2 CPU replicas)
    python 04b_instance_seg/predict.py --model-path runs/04b_instance_seg/model.weights.h5 photo.jpg

What to expect
    python 04b_instance_seg/train.py --smoke   # about 20 s on 2 cores, TF import and tracing included
    python 04b_instance_seg/train.py --output-dir runs/04b_instance_seg-shapes
        test mask mAP@0.5 0.978 [0.967, 0.985], box mAP@0.5 0.992; best validation epoch 18
        of 20; about 19 min of training on 2 quiet CPU cores (README.md and results/ have the rest)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import instances
import numpy as np
import shapes

from data import cli, outputs, pennfudan, synthetic
from data.cli import ChapterParser, UserError, require, run_main, seed_everything
from data.detection_eval import coco_map, coco_map_ci95
from parallel import tf_strategy

CHAPTER = "04b_instance_seg"
CONFIG_PATH = Path(__file__).with_name("config.toml")
PENNFUDAN_CONFIG = Path(__file__).with_name("pennfudan.toml")
DATASETS = ("shapes", "pennfudan")
DEVICES = ("auto", "cpu", "cuda")
LOSS_TERMS = ("rpn_class", "rpn_box", "head_class", "head_box", "mask")

# --- Config --------------------------------------------------------------------------------


def parse(argv) -> tuple[dict, object]:
    """The resolved config. With --dataset pennfudan, pennfudan.toml's values replace
    config.toml's defaults; --config FILE, [smoke] and flags then apply on top, as always."""
    parser = ChapterParser(__doc__, CONFIG_PATH, CHAPTER)
    cfg, args = parser.parse_config(argv)
    if cfg["dataset"] == "pennfudan":
        parser.defaults = cli.merge_config(parser.defaults, cli.read_toml(PENNFUDAN_CONFIG),
                                           str(PENNFUDAN_CONFIG))
        cfg, args = parser.parse_config(argv)
    return cfg, args


def check_config(cfg: dict) -> None:
    require(cfg["dataset"] in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {cfg['dataset']!r}")
    require(cfg["weights"] in ("none", "imagenet", "coco"),
            f"--weights must be none, imagenet or coco, got {cfg['weights']!r}")
    require(cfg["image_size"] >= 64 and cfg["image_size"] % 32 == 0,
            f"--image-size must be a multiple of 32, at least 64, got {cfg['image_size']}")
    for key in ("epochs", "batch_size", "train_images", "val_images", "test_images", "max_shapes",
                "fpn_channels", "box_head_units", "rpn_anchors_per_image", "rpn_pre_nms_train",
                "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test", "rois_per_image", "mask_rois_per_image",
                "detections_per_image", "eval_every", "grid_images", "ci_reps"):
        cli.require_at_least(cfg, key, 1)
    cli.require_at_least(cfg, "num_threads", 0)
    require(cfg["device"] in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {cfg['device']!r}")
    cli.require_at_least(cfg, "mask_head_convs", 0)
    cli.require_at_least(cfg, "warmup_epochs", 0)
    cli.require_at_least(cfg, "weight_decay", 0)
    for key in ("learning_rate", "grad_clip", "time_limit_minutes", "anchor_size"):
        cli.require_positive(cfg, key)
    require(cfg["rpn_max_level"] in (5, 6), f"--rpn-max-level must be 5 or 6, got {cfg['rpn_max_level']}")
    require(len(cfg["backbone_filters"]) == 4 == len(cfg["backbone_blocks"]) and cfg["backbone_filters"][0] == 64
            and min(cfg["backbone_blocks"]) >= 1 and min(cfg["backbone_filters"]) >= 1,
            "--backbone-filters needs 4 widths starting with 64, --backbone-blocks 4 counts >= 1")
    require(len(cfg["aspect_ratios"]) >= 1 and min(cfg["aspect_ratios"]) > 0,
            f"--aspect-ratios must be positive numbers, got {cfg['aspect_ratios']}")
    for key in ("rpn_positive_iou", "rpn_negative_iou", "roi_positive_iou", "rpn_nms_iou",
                "detection_nms_iou", "detection_min_score", "score_threshold"):
        require(0 <= cfg[key] <= 1, f"--{key.replace('_', '-')} must be in [0, 1], got {cfg[key]}")
    require(cfg["rpn_negative_iou"] <= cfg["rpn_positive_iou"],
            "--rpn-negative-iou must not be above --rpn-positive-iou")
    require(cfg["rois_per_image"] * cfg["roi_positive_fraction"] >= 1 and cfg["roi_positive_fraction"] <= 1,
            "--roi-positive-fraction times --rois-per-image must give at least one RoI (fraction <= 1)")
    for key in ("val_fraction", "test_fraction"):
        require(0 < cfg[key] < 0.5, f"--{key.replace('_', '-')} must be in (0, 0.5), got {cfg[key]}")
    tf_strategy.check_config(cfg, keras_fit=False)  # a custom loop: it runs across workers


# --- Data ------------------------------------------------------------------------------------


@dataclass
class Example:
    """One picture in its own pixels: what is scored. `labels` are 0-based class indices."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (N, 4) float32 x0, y0, x1, y1
    labels: np.ndarray  # (N,) int64
    masks: np.ndarray  # (N, H, W) bool

    def truth(self) -> dict:
        return {"boxes": self.boxes, "labels": self.labels, "masks": self.masks}


def shapes_examples(count: int, seed: list[int], cfg: dict, prefix: str) -> list[Example]:
    pictures = shapes.draw_pictures(count, seed, cfg["image_size"], cfg["max_shapes"])
    return [Example(f"{prefix}-{i:04d}", p.image, p.boxes, p.labels, p.masks)
            for i, p in enumerate(pictures)]


def pennfudan_example(record) -> Example:
    masks = record.instance_masks()
    return Example(record.image_path.stem, record.image(), pennfudan.boxes_from_masks(masks),
                   np.zeros(len(masks), np.int64), masks)


def split_pennfudan(records, cfg: dict) -> dict[str, list]:
    """Seeded train / val / test lists of records (sorted by name within each)."""
    order = np.random.default_rng(cfg["seed"]).permutation(len(records))
    num_test = max(1, round(cfg["test_fraction"] * len(records)))
    num_val = max(1, round(cfg["val_fraction"] * len(records)))
    parts = {"test": order[:num_test], "val": order[num_test:num_test + num_val],
             "train": order[num_test + num_val:]}
    return {part: [records[i] for i in sorted(indices)] for part, indices in parts.items()}


class Data:
    """The run's class names, training examples per epoch, and validation / test examples."""

    def __init__(self, cfg: dict, data_dir: Path, smoke: bool, output_dir: Path):
        self.cfg = cfg
        if cfg["dataset"] == "shapes":
            self.class_names = list(shapes.CLASSES)
            self.val = shapes_examples(cfg["val_images"], [cfg["seed"], 1], cfg, "val")
            self.test_names = [f"test-{i:04d}" for i in range(cfg["test_images"])]
            self.split = {"train": [f"drawn anew each epoch from seed [{cfg['seed']}, 3, epoch]"],
                          "val": [e.name for e in self.val], "test": self.test_names}
            self.max_instances = cfg["max_shapes"]
            self.num_train = cfg["train_images"]
            return
        self.class_names = ["person"]
        if smoke:
            synthetic.write_pennfudan(output_dir / "smoke-data", count=24, seed=cfg["seed"])
            records = pennfudan.load_pennfudan(output_dir / "smoke-data", fetch=False)
        else:
            records = pennfudan.load_pennfudan(data_dir)
        parts = split_pennfudan(records, cfg)
        self.split = {part: [r.image_path.stem for r in rs] for part, rs in parts.items()}
        self.train = [pennfudan_example(r) for r in parts["train"]]
        self.val = [pennfudan_example(r) for r in parts["val"]]
        self.test_records = parts["test"]
        self.max_instances = max(len(e.labels) for e in self.train)
        self.num_train = len(self.train)

    def training_examples(self, epoch: int) -> list[Example]:
        if self.cfg["dataset"] == "shapes":
            return shapes_examples(self.cfg["train_images"], [self.cfg["seed"], 3, epoch], self.cfg, "train")
        return self.train

    def test(self) -> list[Example]:
        """Drawn or decoded only when the test set is scored (never in a tuning run)."""
        if self.cfg["dataset"] == "shapes":
            return shapes_examples(self.cfg["test_images"], [self.cfg["seed"], 2], self.cfg, "test")
        return [pennfudan_example(r) for r in self.test_records]


def to_input_frame(example: Example, size: int, flip: bool) -> dict:
    """Letterbox a training example (and mirror it) into the network's S x S frame."""
    boxed = instances.letterbox(example.image, size)
    image = boxed.image
    masks = instances.letterbox_masks(example.masks, size, boxed.scale)
    keep = masks.reshape(len(masks), -1).any(1)  # an instance that shrank to nothing is dropped
    masks, labels = masks[keep], example.labels[keep]
    if flip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    boxes = shapes.boxes_from_masks(masks) if len(masks) else np.zeros((0, 4), np.float32)
    return {"image": image, "boxes": boxes, "classes": labels + 1, "masks": masks}


def batches(examples: list[Example], cfg: dict, max_instances: int, epoch: int):
    """Shuffled full batches, ground truth padded to `max_instances` with a valid flag."""
    rng = np.random.default_rng([cfg["seed"], 4, epoch])
    order = rng.permutation(len(examples))
    size, batch_size = cfg["image_size"], cfg["batch_size"]
    for start in range(0, len(order) - batch_size + 1, batch_size):
        batch = {"images": np.zeros((batch_size, size, size, 3), np.float32),
                 "gt_boxes": np.zeros((batch_size, max_instances, 4), np.float32),
                 "gt_classes": np.zeros((batch_size, max_instances), np.int32),
                 "gt_masks": np.zeros((batch_size, max_instances, size, size), np.uint8),
                 "gt_valid": np.zeros((batch_size, max_instances), bool)}
        for slot, index in enumerate(order[start:start + batch_size]):
            item = to_input_frame(examples[index], size, cfg["hflip"] and rng.random() < 0.5)
            count = min(len(item["classes"]), max_instances)
            batch["images"][slot] = item["image"]
            batch["gt_boxes"][slot, :count] = item["boxes"][:count]
            batch["gt_classes"][slot, :count] = item["classes"][:count]
            batch["gt_masks"][slot, :count] = item["masks"][:count]
            batch["gt_valid"][slot, :count] = True
        yield batch


# --- Model -----------------------------------------------------------------------------------
# model.py builds the network (backbone, FPN, RPN, RoI heads) and its losses and detection;
# predict.py shares it.


def build_model(cfg: dict, class_names: list[str]):
    import model as maskrcnn

    if cfg["weights"] == "coco":  # torchvision's COCO Mask R-CNN with new predictors (coco_finetune.py)
        import coco_finetune

        return coco_finetune.build_model(cfg, class_names)
    backbone, backbone_config = maskrcnn.build_backbone(
        cfg["weights"], maskrcnn.scratch_backbone_config(cfg))
    arch = {key: cfg[key] for key in maskrcnn.ARCH_KEYS}
    arch.update(class_names=class_names, backbone=backbone_config)
    return maskrcnn.MaskRCNN(arch, backbone=backbone)


# --- Train -----------------------------------------------------------------------------------


def make_optimizer(cfg: dict, steps_per_epoch: int):
    import keras

    warmup = cfg["warmup_epochs"] * steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg["learning_rate"] / 10, warmup_target=cfg["learning_rate"],
        warmup_steps=warmup, decay_steps=max(1, cfg["epochs"] * steps_per_epoch - warmup), alpha=0.01)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg["weight_decay"],
                                       global_clipnorm=cfg["grad_clip"])
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def make_train_step(model, optimizer, cfg: dict):
    """One traced graph: losses, gradients, an AdamW step. autograph is off: the code has no
    Python control flow on tensors, and converting Keras' optimizer took half the tracing.
    Under the strategy the model was built in, each replica runs `step` on its rows of the
    batch; its losses are its part of the batch's (model.compute_losses counts over the whole
    batch), so the optimizer's sum of the replicas' gradients is the batch's gradient."""
    import tensorflow as tf

    strategy = model.distribute_strategy  # tf.distribute's default one for a plain run

    def step(batch, seed):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(batch["images"], batch["gt_boxes"], batch["gt_classes"],
                                          batch["gt_masks"], batch["gt_valid"], cfg, seed)
            total = tf.add_n(list(losses.values()))
        gradients = tape.gradient(total, model.trainable_variables)
        if strategy.num_replicas_in_sync > 1:  # clip the batch's gradient, not a replica's part
            gradients = tf_strategy.sum_and_clip(gradients, cfg["grad_clip"])
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return {"loss": total, **losses}

    def replicated(batch, seed):  # the replicas' parts of each loss, summed: the batch's
        parts = strategy.run(step, args=(batch, seed))
        return {key: strategy.reduce("SUM", part, axis=None) for key, part in parts.items()}

    graph = tf.function(replicated, autograph=False)
    return lambda batch, seed: graph(tf_strategy.split_batch(strategy, batch), seed)


def train_epoch(train_step, data: Data, cfg: dict, epoch: int, steps_done: int) -> dict:
    totals: dict[str, float] = {}
    count = 0
    for batch in batches(data.training_examples(epoch), cfg, data.max_instances, epoch):
        losses = {k: float(v) for k, v in train_step(batch, np.array([cfg["seed"], steps_done + count],
                                                                     np.int32)).items()}
        if not math.isfinite(losses["loss"]):
            raise UserError(f"the loss became {losses['loss']} at epoch {epoch} ("
                            + ", ".join(f"{k} {v:.3g}" for k, v in losses.items())
                            + "); try a lower --learning-rate")
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    return {key: value / max(count, 1) for key, value in totals.items()} | {"steps": count}


# --- Evaluate --------------------------------------------------------------------------------


def evaluate(model, examples: list[Example], cfg: dict, class_names, intervals: bool = False):
    """(metrics, predictions): COCO mAP of boxes and masks on the examples' own pixels."""
    import model as maskrcnn

    predictions = maskrcnn.detect_instances(model, [e.image for e in examples], cfg["batch_size"])
    truth = [e.truth() for e in examples]
    metrics = {}
    for kind, iou_type in (("mask", "segm"), ("box", "bbox")):
        scored = coco_map(truth, predictions, class_names, iou_type=iou_type)
        metrics.update({f"{kind}_{key}": scored[key] for key in ("map50", "map", "map75")})
        if len(class_names) > 1:
            for name in class_names:
                metrics[f"{kind}_ap50_{name}"] = scored[f"ap50_{name}"]
                metrics[f"{kind}_ap_{name}"] = scored[f"ap_{name}"]
        if intervals:
            ci = coco_map_ci95(truth, predictions, class_names, iou_type=iou_type,
                               reps=cfg["ci_reps"], seed=cfg["seed"])
            metrics.update({f"{kind}_{key}": value for key, value in ci.items()})
    return metrics, predictions


# --- Save ------------------------------------------------------------------------------------


def save_checkpoint(path: Path, model, optimizer, state: dict) -> None:
    """Everything --resume needs: weights, optimizer slots, and the run's history."""
    arrays = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
    with outputs.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, state=json.dumps(state), **arrays)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}; start without --resume")
    with np.load(path) as saved:
        weights = [saved[f"weight_{i}"] for i in range(len(model.get_weights()))]
        slots = [saved[f"optimizer_{i}"] for i in range(len(optimizer.variables))]
        state = json.loads(str(saved["state"]))
    model.set_weights(weights)
    for variable, value in zip(optimizer.variables, slots, strict=True):
        variable.assign(value)
    return state


def save_figures(output_dir: Path, state: dict, cfg: dict, class_names, test=None, predictions=None):
    history = {key: state["history"][key] for key in ("loss", *LOSS_TERMS)}
    outputs.plot_curves(history, output_dir / "loss_curves.png",
                        title="training losses (mean per epoch)")
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    curve = state["val_curve"]
    for key, label in (("mask_map50", "mask mAP@0.5"), ("box_map50", "box mAP@0.5"),
                       ("mask_map", "mask mAP@[.5:.95]")):
        ax.plot(curve["epoch"], curve[key], marker="o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="validation mAP", ylim=(0, 1), title="validation mAP")
    ax.grid(alpha=0.3)
    ax.legend()
    outputs.save_figure(fig, output_dir / "val_map.png")
    if test is None:  # a --no-evaluate-test run draws no test grid
        (output_dir / "test_predictions.png").unlink(missing_ok=True)
        return
    picks = np.linspace(0, len(test) - 1, min(cfg["grid_images"], len(test))).astype(int)
    cells, titles = [], []
    for i in picks:
        zoom = max(1, 256 // max(test[i].image.shape[:2]))  # shapes pictures are drawn at 2x
        cells += [instances.overlay(test[i].image, test[i].truth(), class_names, show_scores=False,
                                    zoom=zoom),
                  instances.overlay(test[i].image, predictions[i], class_names, cfg["score_threshold"],
                                    zoom=zoom)]
        titles += [f"{test[i].name}: truth", f"predicted (>= {cfg['score_threshold']})"]
    outputs.plot_image_grid(cells, titles, output_dir / "test_predictions.png", columns=6, cell=2.4,
                            title="test images: true instances (left), predicted (right)")


# --- Main ------------------------------------------------------------------------------------


def setup_tensorflow(cfg: dict) -> tuple[str, str]:
    """Threads, device, seeds and determinism, before TensorFlow runs anything: (device, its name)."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if cfg["device"] == "cuda" and not gpus:
        raise UserError("--device cuda: TensorFlow sees no GPU here (it needs the CUDA build of "
                        "TensorFlow and an NVIDIA driver); use --device cpu or auto")
    if cfg["num_threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(cfg["num_threads"])
        tf.config.threading.set_inter_op_parallelism_threads(cfg["num_threads"])
    seed_everything(cfg["seed"])
    keras.utils.set_random_seed(cfg["seed"])
    if cfg["device"] == "cpu" or not gpus:
        tf.config.set_visible_devices([], "GPU")
        tf.config.experimental.enable_op_determinism()  # the same run, bit for bit, for a seed
        return "cpu", outputs.run_facts()["cpu"]
    # TensorFlow has no deterministic GPU kernel for crop_and_resize's gradient (it raises
    # "Deterministic GPU implementation of CropAndResizeBackpropImage not available").
    print("on the GPU, op determinism stays off: crop_and_resize's gradient has no deterministic kernel")
    return "cuda", tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)


def run_epochs(model, optimizer, data: Data, cfg: dict, output_dir: Path, state: dict, start: float):
    import model as maskrcnn

    train_step = make_train_step(model, optimizer, cfg)
    budget = 60 * cfg["time_limit_minutes"]
    for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
        epoch_start = time.monotonic()
        losses = train_epoch(train_step, data, cfg, epoch, state["steps"])
        state["train_seconds"] += time.monotonic() - epoch_start
        state["steps"] += losses.pop("steps")
        for key, value in losses.items():
            state["history"].setdefault(key, []).append(value)
        line = f"epoch {epoch:3d}  loss {losses['loss']:.3f}  " + "  ".join(
            f"{k} {losses[k]:.3f}" for k in LOSS_TERMS) + f"  {state['train_seconds'] / 60:.1f} min"
        elapsed = state["wall_seconds"] + time.monotonic() - start
        last = epoch == cfg["epochs"] or elapsed > budget
        if epoch % cfg["eval_every"] == 0 or last:
            metrics, _ = evaluate(model, data.val, cfg, data.class_names)
            for key in ("mask_map50", "mask_map", "box_map50"):
                state["val_curve"].setdefault(key, []).append(metrics[key])
            state["val_curve"].setdefault("epoch", []).append(epoch)
            line += f"  val mask mAP@0.5 {metrics['mask_map50']:.3f}  box {metrics['box_map50']:.3f}"
            if metrics["mask_map50"] > state["best"]["mask_map50"]:  # the checkpoint kept
                state["best"] = {"epoch": epoch, **{k: metrics[k] for k in ("mask_map50", "mask_map", "box_map50", "box_map")}}
                maskrcnn.save_model(model, output_dir / "model.weights.h5")
                line += "  (best)"
        state["wall_seconds"] += time.monotonic() - start
        start = time.monotonic()
        state["epoch"] = epoch
        save_checkpoint(output_dir / "checkpoint.npz", model, optimizer, state)
        print(line, flush=True)
        if last and epoch < cfg["epochs"]:
            print(f"stopping after epoch {epoch}: over --time-limit-minutes {cfg['time_limit_minutes']}")
            break
    return state


def load_best(cfg: dict, output_dir: Path):
    """The weights of the best validation epoch, in the model they were trained in."""
    import model as maskrcnn

    load = maskrcnn.load_model
    if cfg["weights"] == "coco":  # a fine-tune of torchvision's COCO model
        import coco_finetune

        load = coco_finetune.load_model
    return load(output_dir / "model.weights.h5")


def main(argv=None) -> dict:
    cfg, args = parse(argv)
    check_config(cfg)
    args.output_dir = tf_strategy.worker_output_dir(args.output_dir, cfg)  # the chief's, or scratch
    output_dir = outputs.prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite,
                                            resume=cfg["resume"], smoke=args.smoke,
                                            data_dir=str(args.data_dir))
    start = time.monotonic()
    data = Data(cfg, args.data_dir, args.smoke, output_dir)
    outputs.write_split(output_dir, data.split, resume=cfg["resume"])
    require(data.num_train >= cfg["batch_size"], f"--batch-size {cfg['batch_size']} is more than the "
            f"{data.num_train} training images; use a smaller --batch-size")
    device, device_name = setup_tensorflow(cfg)  # TensorFlow is imported only now
    strategy = tf_strategy.make_strategy(cfg)  # "default": one device, as a plain run
    tf_strategy.check_batch(cfg["batch_size"], strategy)
    steps_per_epoch = data.num_train // cfg["batch_size"]
    with strategy.scope():  # the weights and AdamW's state, one copy per replica
        model = build_model(cfg, data.class_names)
        optimizer = make_optimizer(cfg, steps_per_epoch)
        optimizer.build(model.trainable_variables)  # before tracing: the step graph is traced once
    tf_strategy.sync_batchnorm(model, strategy)
    state = {"epoch": 0, "steps": 0, "history": {}, "val_curve": {}, "train_seconds": 0.0,
             "wall_seconds": 0.0, "best": {"epoch": 0, "mask_map50": -1.0}}
    if cfg["resume"]:
        state = load_checkpoint(output_dir / "checkpoint.npz", model, optimizer)
        print(f"resumed from {output_dir / 'checkpoint.npz'} after epoch {state['epoch']}")
    print(f"{cfg['dataset']}: {data.num_train} training images per epoch, {len(data.val)} validation, "
          f"{model.count_params():,} parameters", flush=True)
    if state["epoch"] < cfg["epochs"]:  # from here a failure keeps the run's files, to resume
        outputs.training_started(output_dir)
    state = run_epochs(model, optimizer, data, cfg, output_dir, state, start)
    best = load_best(cfg, output_dir)
    metrics = {}
    test = predictions = None
    if cfg["evaluate_test"]:  # the test set, once
        test = data.test()
        metrics, predictions = evaluate(best, test, cfg, data.class_names, intervals=True)
    metrics.update({f"val_{k}": v for k, v in state["best"].items() if k != "epoch"},
                   best_epoch=state["best"]["epoch"], epochs=state["epoch"],
                   train_seconds=state["train_seconds"], wall_seconds=state["wall_seconds"],
                   num_train=data.num_train, num_val=len(data.val),
                   num_test=len(data.split["test"]), dataset=cfg["dataset"], weights=cfg["weights"],
                   **outputs.run_facts(("tensorflow", "keras", "keras-hub"), device, device_name),
                   **tf_strategy.run_facts(strategy, model))
    save_figures(output_dir, state, cfg, data.class_names, test, predictions)
    outputs.write_metrics(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
