"""The chapter's flags: the checks on train.py's config (config.toml and its flags), and the
flags detect.py and analyse.py share (a trained model, where to write, which device).

Kept free of torch so that `--help` and flag mistakes answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data import cli, distributed
from data.cli import REPO_ROOT, OneLineParser, require


def check_config(cfg: dict) -> None:
    """train.py's values, each with a one-line error that names the flag."""
    cli.require_at_least(cfg, "image_size", 64)
    cli.require_at_least(cfg, "epochs", 1)
    cli.require_at_least(cfg, "batch_size", 2, "BatchNorm")
    distributed.per_process_batch(cfg["batch_size"], distributed.world_from_env().size)
    cli.require_positive(cfg, "learning_rate")
    require(0 < cfg["val_fraction"] < 1, f"--val-fraction must be between 0 and 1, got {cfg['val_fraction']}")
    require(0 <= cfg["ema_decay"] < 1, f"--ema-decay must be in [0, 1), got {cfg['ema_decay']}")
    cli.require_at_least(cfg, "preload_scale", 1)
    require(0 < cfg["crop_scale_min"] <= 1, f"--crop-scale-min must be in (0, 1], got {cfg['crop_scale_min']}")
    # The head's GroupNorm has 32 groups; 2+ channels per group keeps a 1x1 map normalizable.
    require(cfg["fpn_channels"] >= 64 and cfg["fpn_channels"] % 32 == 0,
            f"--fpn-channels must be a multiple of 32, at least 64, got {cfg['fpn_channels']}")
    for key in ("eval_every", "grid_images"):
        cli.require_at_least(cfg, key, 1)
    for key in ("warmup_epochs", "weight_decay", "color_jitter", "num_threads", "num_workers"):
        cli.require_at_least(cfg, key, 0)
    cli.require_positive(cfg, "grad_clip")
    cli.require_positive(cfg, "time_limit_minutes")
    for key in ("mosaic_prob", "zoom_out_prob", "score_threshold"):
        require(0 <= cfg[key] <= 1, f"--{key.replace('_', '-')} must be in [0, 1], got {cfg[key]}")
    require(cfg["device"] in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {cfg['device']!r}")


def inference_parser(doc: str, output_name: str, model_help: str) -> OneLineParser:
    parser = OneLineParser(description=doc.strip().splitlines()[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-path", type=Path, required=True, help=model_help)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / output_name,
                        help="where the results go")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="keep boxes at least this confident")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a CUDA GPU when PyTorch sees one, else the CPU")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="CPU threads for PyTorch (0 = all the machine's cores)")
    return parser


def check_common(parser: OneLineParser, args: argparse.Namespace) -> argparse.Namespace:
    if not 0 <= args.score_threshold <= 1:
        parser.error(f"--score-threshold must be between 0 and 1, got {args.score_threshold}")
    if args.num_threads < 0:
        parser.error(f"--num-threads must be at least 0, got {args.num_threads}")
    return args
