"""The flags detect.py and analyse.py share (a trained model, where to write, which device).

Kept free of torch so that `--help` and flag mistakes answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data.cli import REPO_ROOT, OneLineParser


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
