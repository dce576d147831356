"""04b: instance segmentation with a Mask R-CNN written for Keras 3, trained from scratch.

What it teaches: how Mask R-CNN finds each object with its box, class and mask, and how to
train it in a custom loop: a seeded split, letterboxed input frames mirrored at random, the
model (model.py: ResNet, FPN, RPN, RoIAlign, box and mask heads), AdamW with warm-up and cosine
decay, one traced train step, validation mask mAP@0.5 that keeps the best epoch, and the test
set scored once, with COCO's box and mask mAP and bootstrap 95% intervals. --dataset shapes
draws squares, circles and triangles (shapes.py); --dataset pennfudan trains on 170 street
photos with pennfudan.toml's values (--help shows each; config.json lists the files applied).

    python 04b_instance_seg/train.py --smoke                  # tiny pictures, about a minute
    python 04b_instance_seg/train.py                          # shapes, at most 29 min on 2 cores
    python 04b_instance_seg/train.py --dataset pennfudan      # pedestrians, at most 58 min
    python 04b_instance_seg/train.py --resume                 # continue an interrupted run
    python 04b_instance_seg/predict.py --model-path runs/04b_instance_seg/model.weights.h5 photo.jpg

04b_instance_seg/README.md: the figures and their commands, the history, --weights, --strategy.
Beside this file: run_setup.py (config, run folder, TensorFlow, --resume), examples.py (the
pictures), report.py (plots, metrics.json's run facts).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import examples
import instances
import numpy as np
import report
import shapes
from run_setup import check_config, claim_output_dir, parse, resume, setup_tensorflow

from data import checkpoints, outputs
from data.cli import UserError, require, run_main
from data.detection_eval import coco_map, coco_map_ci95
from data.runclock import RunClock
from parallel import tf_strategy

LOSS_TERMS = ("rpn_class", "rpn_box", "head_class", "head_box", "mask")

# --- Data ------------------------------------------------------------------------------------


def split_pennfudan(records, cfg: dict) -> dict[str, list]:
    """Seeded train / val / test lists of records (sorted by name within each)."""
    order = np.random.default_rng(cfg["seed"]).permutation(len(records))
    num_test = max(1, round(cfg["test_fraction"] * len(records)))
    num_val = max(1, round(cfg["val_fraction"] * len(records)))
    parts = {"test": order[:num_test], "val": order[num_test:num_test + num_val], "train": order[num_test + num_val:]}
    return {part: [records[i] for i in sorted(indices)] for part, indices in parts.items()}


class Data:
    """The split: class names, training examples per epoch, validation and test examples.
    shapes: validation and test pictures fixed by the seed, training pictures drawn anew each
    epoch; pennfudan: the photos split by the seed (split.json records each part's names)."""

    def __init__(self, cfg: dict, data_dir: Path, smoke: bool, output_dir: Path):
        self.cfg = cfg
        if cfg["dataset"] == "shapes":
            self.class_names = list(shapes.CLASSES)
            self.max_instances, self.num_train = cfg["max_shapes"], cfg["train_images"]
            self.val = examples.draw_shapes(cfg["val_images"], [cfg["seed"], 1], cfg, "val")
            self.split = {"train": [f"drawn anew each epoch from seed [{cfg['seed']}, 3, epoch]"],
                          "val": [e.name for e in self.val], "test": [f"test-{i:04d}" for i in range(cfg["test_images"])]}
            return
        parts = split_pennfudan(examples.pennfudan_records(data_dir, smoke, output_dir, cfg["seed"]), cfg)
        self.class_names, self.test_records = ["person"], parts["test"]  # the test photos are decoded only to be scored
        self.split = {part: [r.image_path.stem for r in rs] for part, rs in parts.items()}
        self.train = [examples.pennfudan_example(r) for r in parts["train"]]
        self.val = [examples.pennfudan_example(r) for r in parts["val"]]
        self.max_instances, self.num_train = max(len(e.labels) for e in self.train), len(self.train)

    def training_examples(self, epoch: int) -> list[examples.Example]:
        if self.cfg["dataset"] == "shapes":
            return examples.draw_shapes(self.cfg["train_images"], [self.cfg["seed"], 3, epoch], self.cfg, "train")
        return self.train

    def test(self) -> list[examples.Example]:
        """Drawn or decoded only when the test set is scored (never in a tuning run)."""
        if self.cfg["dataset"] == "shapes":
            return examples.draw_shapes(self.cfg["test_images"], [self.cfg["seed"], 2], self.cfg, "test")
        return [examples.pennfudan_example(r) for r in self.test_records]


def to_input_frame(example: examples.Example, size: int, flip: bool) -> dict:
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


def batches(examples: list, cfg: dict, max_instances: int, epoch: int):
    """Shuffled full batches of input frames, half of them mirrored (with hflip)."""
    rng = np.random.default_rng([cfg["seed"], 4, epoch])
    order = rng.permutation(len(examples))
    for start in range(0, len(order) - cfg["batch_size"] + 1, cfg["batch_size"]):
        frames = [to_input_frame(examples[index], cfg["image_size"], cfg["hflip"] and rng.random() < 0.5)
                  for index in order[start:start + cfg["batch_size"]]]
        yield instances.stack_frames(frames, max_instances)  # ground truth padded: one traced graph


# --- Model -----------------------------------------------------------------------------------
# model.py (shared with predict.py): backbone, FPN, RPN, RoIAlign, heads, losses, detection.


def build_model(cfg: dict, class_names: list[str]):
    import model as maskrcnn

    if cfg["weights"] == "coco":  # torchvision's COCO Mask R-CNN with new predictors (coco_finetune.py)
        import coco_finetune

        return coco_finetune.build_model(cfg, class_names)
    backbone, backbone_config = maskrcnn.build_backbone(cfg["weights"], maskrcnn.scratch_backbone_config(cfg))
    arch = {key: cfg[key] for key in maskrcnn.ARCH_KEYS} | {"class_names": class_names, "backbone": backbone_config}
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
    """One traced graph: losses, gradients, an AdamW step (autograph off: no Python control flow
    on tensors here). Under a strategy each replica runs `step` on its rows of the batch; its
    losses are its part of the batch's, so the sum of the replicas' gradients is the batch's."""
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
    totals, count = {}, 0  # each loss summed over the epoch's steps
    for batch in batches(data.training_examples(epoch), cfg, data.max_instances, epoch):
        seed = np.array([cfg["seed"], steps_done + count], np.int32)  # the step's RoI and anchor sampling
        losses = {k: float(v) for k, v in train_step(batch, seed).items()}
        if not math.isfinite(losses["loss"]):
            terms = ", ".join(f"{k} {v:.3g}" for k, v in losses.items())
            raise UserError(f"the loss became {losses['loss']} at epoch {epoch} ({terms}); try a lower --learning-rate")
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    return {key: value / max(count, 1) for key, value in totals.items()} | {"steps": count}


def validate(model, data: Data, cfg: dict, state: dict, epoch: int, output_dir: Path) -> str:
    """Validation mAP; the rule that keeps an epoch: a mask mAP@0.5 above every earlier epoch's
    saves its weights as model.weights.h5 (a tie keeps the earlier one). The test set plays no part."""
    import model as maskrcnn

    metrics, _ = evaluate(model, data.val, cfg, data.class_names)
    for key in ("mask_map50", "mask_map", "box_map50"):
        state["val_curve"].setdefault(key, []).append(metrics[key])
    state["val_curve"].setdefault("epoch", []).append(epoch)
    line = f"  val mask mAP@0.5 {metrics['mask_map50']:.3f}  box {metrics['box_map50']:.3f}"
    if metrics["mask_map50"] > state["best"]["mask_map50"]:
        state["best"] = {"epoch": epoch, **{k: metrics[k] for k in ("mask_map50", "mask_map", "box_map50", "box_map")}}
        maskrcnn.save_model(model, output_dir / "model.weights.h5")
        line += "  (best)"
    return line


def new_state() -> dict:
    """The run's record, saved in checkpoint.npz every epoch (run_setup.resume reads it back)."""
    return {"epoch": 0,  # the last epoch finished
            "steps": 0,  # optimizer steps so far (with the seed, they key each step's sampling)
            "history": {},  # each loss's mean per epoch
            "val_curve": {},  # validation mAPs, and the epochs they were measured at
            "best": {"epoch": 0, "mask_map50": -1.0},  # the epoch kept, and its validation mAPs
            "train_seconds": 0.0, "wall_seconds": 0.0}  # the RunClock's times


def run_epochs(model, optimizer, data: Data, cfg: dict, output_dir: Path, state: dict) -> dict:
    """Train, validate every eval_every epochs and at the last one, checkpoint every epoch. The
    last is cfg["epochs"], or the epoch during which the working time passed the time limit."""
    train_step = make_train_step(model, optimizer, cfg)
    clock = RunClock(cfg["time_limit_minutes"], state["wall_seconds"], state["train_seconds"])
    for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
        epoch_start = time.monotonic()
        losses = train_epoch(train_step, data, cfg, epoch, state["steps"])
        clock.add_training(time.monotonic() - epoch_start)
        state["steps"] += losses.pop("steps")
        for key in ("loss", *LOSS_TERMS):
            state["history"].setdefault(key, []).append(losses[key])
        line = f"epoch {epoch:3d}  " + "  ".join(f"{k} {losses[k]:.3f}" for k in ("loss", *LOSS_TERMS))
        line += f"  {clock.train_seconds / 60:.1f} min"
        last = epoch == cfg["epochs"] or clock.out_of_time()
        if epoch % cfg["eval_every"] == 0 or last:
            line += validate(model, data, cfg, state, epoch, output_dir)
            last = last or clock.out_of_time()  # the limit passed during validation
        clock.lap()
        state.update(epoch=epoch, **clock.state())
        checkpoints.save_arrays(output_dir / "checkpoint.npz", state, model.get_weights(),  # all --resume needs
                                [v.numpy() for v in optimizer.variables])
        print(line, flush=True)
        if last and epoch < cfg["epochs"]:
            print(clock.stop_message(epoch, cfg["epochs"]))
            break
    return state


# --- Evaluate --------------------------------------------------------------------------------


def evaluate(model, examples: list, cfg: dict, class_names, intervals: bool = False):
    """(metrics, predictions): COCO mAP of boxes and masks on the examples' own pixels."""
    import model as maskrcnn

    predictions = maskrcnn.detect_instances(model, [e.image for e in examples], cfg["batch_size"])
    truth, metrics = [e.truth() for e in examples], {}
    for kind, iou_type in (("mask", "segm"), ("box", "bbox")):
        scored = coco_map(truth, predictions, class_names, iou_type=iou_type)
        metrics.update({f"{kind}_{key}": scored[key] for key in ("map50", "map", "map75")})
        if len(class_names) > 1:  # each class's AP too
            metrics.update({f"{kind}_{ap}_{name}": scored[f"{ap}_{name}"] for name in class_names for ap in ("ap50", "ap")})
        if intervals:
            ci = coco_map_ci95(truth, predictions, class_names, iou_type=iou_type,
                               reps=cfg["ci_reps"], seed=cfg["seed"])
            metrics.update({f"{kind}_{key}": value for key, value in ci.items()})
    return metrics, predictions


# --- Main ------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    cfg, args = parse(argv)
    check_config(cfg)
    output_dir = claim_output_dir(cfg, args)  # with config.json; an earlier run is never replaced silently
    data = Data(cfg, args.data_dir, args.smoke, output_dir)
    outputs.write_split(output_dir, data.split, resume=cfg["resume"])
    require(data.num_train >= cfg["batch_size"], f"--batch-size {cfg['batch_size']} is more than the "
            f"{data.num_train} training images; use a smaller --batch-size")
    device, device_name = setup_tensorflow(cfg)  # TensorFlow is imported only now
    strategy = tf_strategy.make_strategy(cfg)  # "default": one device, as a plain run
    tf_strategy.check_batch(cfg["batch_size"], strategy)
    with strategy.scope():  # the weights and AdamW's state, one copy per replica
        model = build_model(cfg, data.class_names)
        optimizer = make_optimizer(cfg, steps_per_epoch=data.num_train // cfg["batch_size"])
        optimizer.build(model.trainable_variables)  # before tracing: the step graph is traced once
    tf_strategy.sync_batchnorm(model, strategy)
    state = resume(output_dir / "checkpoint.npz", model, optimizer) if cfg["resume"] else new_state()
    print(f"{cfg['dataset']}: {data.num_train} training images per epoch, {len(data.val)} validation, "
          f"{model.count_params():,} parameters", flush=True)
    if state["epoch"] < cfg["epochs"]:  # from here a failure keeps the run's files, to resume
        outputs.training_started(output_dir)
    state = run_epochs(model, optimizer, data, cfg, output_dir, state)
    metrics, test, predictions = {}, None, None
    if cfg["evaluate_test"]:  # the test set, once, with the weights `validate` kept
        import model as maskrcnn
        best, test = maskrcnn.load_model(output_dir / "model.weights.h5"), data.test()  # a COCO fine-tune's too
        metrics, predictions = evaluate(best, test, cfg, data.class_names, intervals=True)
    metrics.update(report.run_summary(state, data, cfg, device, device_name, strategy, model))
    report.save_figures(output_dir, state, cfg, data.class_names, test, predictions)
    outputs.write_metrics(output_dir, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
