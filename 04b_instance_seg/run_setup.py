"""What train.py sets up before the lesson starts: its config, its folder, TensorFlow, --resume.

- `parse`: the resolved config, lowest first: config.toml, pennfudan.toml when the dataset is
  pennfudan, --config FILE, [smoke], flags. --help shows each value that pennfudan.toml
  changes, and config.json lists the files applied (`config_files`).
- `check_config`: every value a flag can take wrong, refused in one line before any work.
- `claim_output_dir`: the run's folder (data/outputs.py's rules), with config.json in it.
- `setup_tensorflow`: threads, device, seeds and op determinism, once the data is checked
  (until then the run has not imported TensorFlow: a wrong flag fails in a second).
- `resume`: with --resume, the weights, AdamW's state and the run's record from checkpoint.npz
  (data/checkpoints.py's one Keras checkpoint format).
"""

from __future__ import annotations

from pathlib import Path

from data import checkpoints, cli, outputs
from data.cli import ChapterParser, UserError, require, seed_everything
from data.outputs import run_facts
from parallel import tf_strategy

CHAPTER = "04b_instance_seg"
CONFIG_PATH = Path(__file__).with_name("config.toml")
PENNFUDAN_CONFIG = Path(__file__).with_name("pennfudan.toml")
DATASETS = ("shapes", "pennfudan")
HELP_TITLE = "04b: instance segmentation with a Mask R-CNN written for Keras 3, trained from scratch."


def parse(argv) -> tuple[dict, object]:
    """(config, args); args.config_files names the config files applied, lowest first."""
    parser = ChapterParser(HELP_TITLE, CONFIG_PATH, CHAPTER)
    pennfudan = cli.read_toml(PENNFUDAN_CONFIG)
    for action in parser._actions:  # "(default: 128)" becomes "(default: 128; --dataset pennfudan: 320)"
        if action.dest in pennfudan and action.dest != "dataset":
            action.help = f"{action.help[:-1]}; --dataset pennfudan: {pennfudan[action.dest]})"
    cfg, args = parser.parse_config(argv)
    files = [CONFIG_PATH]
    if cfg["dataset"] == "pennfudan":  # from --dataset, or from --config FILE's dataset key
        parser.defaults = cli.merge_config(parser.defaults, pennfudan, str(PENNFUDAN_CONFIG))
        cfg, args = parser.parse_config(argv)
        files.append(PENNFUDAN_CONFIG)
    args.config_files = [f"{CHAPTER}/{path.name}" for path in files] + ([str(args.config)] if args.config else [])
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
    for key in ("num_threads", "mask_head_convs", "warmup_epochs", "weight_decay"):
        cli.require_at_least(cfg, key, 0)
    require(cfg["device"] in ("auto", "cpu", "cuda"), f"--device must be one of auto, cpu, cuda, got {cfg['device']!r}")
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


def claim_output_dir(cfg: dict, args) -> Path:
    """The run's folder (a scratch one for a worker other than the chief), claimed, and its
    config.json: the resolved config, --smoke, the data folder and the config files applied."""
    output_dir = tf_strategy.worker_output_dir(args.output_dir, cfg)
    return outputs.prepare_output_dir(output_dir, cfg, overwrite=args.overwrite, resume=cfg["resume"],
                                      smoke=args.smoke, data_dir=str(args.data_dir), config_files=args.config_files)


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
        return "cpu", run_facts()["cpu"]
    # TensorFlow has no deterministic GPU kernel for crop_and_resize's gradient (it raises
    # "Deterministic GPU implementation of CropAndResizeBackpropImage not available").
    print("on the GPU, op determinism stays off: crop_and_resize's gradient has no deterministic kernel")
    return "cuda", tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)


def resume(path: Path, model, optimizer) -> dict:
    """The run's record from checkpoint.npz, its weights and AdamW's state put back."""
    state, weights, slots = checkpoints.load_arrays(path, len(model.get_weights()), len(optimizer.variables))
    model.set_weights(weights)
    for variable, value in zip(optimizer.variables, slots, strict=True):
        variable.assign(value)
    print(f"resumed from {path} after epoch {state['epoch']}")
    return state
