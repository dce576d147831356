"""The checks on train.py's config (config.toml and its flags): each wrong value is one line
that names the flag, before TensorFlow is imported, so flag mistakes answer at once.
"""

from __future__ import annotations

from data import cli
from data.cli import require
from parallel import tf_strategy


def check_config(cfg: dict) -> None:
    """Every value of train.py's config; raises UserError (one line) at the first wrong one."""
    for key in ("epochs", "eval_every", "grid_images", "head_convs"):
        cli.require_at_least(cfg, key, 1)
    cli.require_at_least(cfg, "num_threads", 0, "0 means all cores")
    require(cfg["device"] in ("auto", "cpu", "cuda"),
            f"--device must be auto, cpu or cuda, got {cfg['device']!r}")
    cli.require_at_least(cfg, "batch_size", 2, "BatchNorm")
    cli.require_at_least(cfg, "warmup_epochs", 0)
    cli.require_at_least(cfg, "weight_decay", 0)
    cli.require_at_least(cfg, "color_jitter", 0)
    cli.require_at_least(cfg, "aspect_jitter", 0)
    cli.require_at_least(cfg, "preload_scale", 1)
    for key in ("learning_rate", "grad_clip", "time_limit_minutes", "anchor_size", "scale_min"):
        cli.require_positive(cfg, key)
    require(cfg["scale_min"] <= cfg["scale_max"],
            f"--scale-min {cfg['scale_min']} must not exceed --scale-max {cfg['scale_max']}")
    require(0 < cfg["val_fraction"] < 1, f"--val-fraction must be between 0 and 1, got {cfg['val_fraction']}")
    require(0 < cfg["prior_probability"] < 1,
            f"--prior-probability must be between 0 and 1, got {cfg['prior_probability']}")
    require(0 <= cfg["min_score"] < 1, f"--min-score must be in [0, 1), got {cfg['min_score']}")
    require(0 <= cfg["score_threshold"] <= 1, f"--score-threshold must be in [0, 1], got {cfg['score_threshold']}")
    require(cfg["weights"] in ("coco", "none"), f"--weights must be coco or none, got {cfg['weights']!r}")
    require(len(cfg["resnet_blocks"]) == 4 and min(cfg["resnet_blocks"]) >= 1,
            f"--resnet-blocks must be 4 positive integers (stages P2..P5), got {cfg['resnet_blocks']}")
    require(3 <= cfg["min_level"] <= 5 and cfg["min_level"] <= cfg["max_level"] <= 7,
            f"--min-level / --max-level must satisfy 3 <= min <= 5, min <= max <= 7; "
            f"got {cfg['min_level']}, {cfg['max_level']}")
    stride = 2 ** (cfg["max_level"] if cfg["weights"] == "none" else 7)  # the COCO preset's FPN: P3-P7
    require(cfg["image_size"] >= stride and cfg["image_size"] % stride == 0,
            f"--image-size must be a multiple of 2**max_level = {stride} (the FPN upsamples by 2 "
            f"and adds; --weights coco reaches P7), got {cfg['image_size']}; try {max(stride, round(cfg['image_size'] / stride) * stride)}")
    tf_strategy.check_config(cfg)
