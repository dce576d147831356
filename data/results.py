"""A headline run's record: the one source of each figure quoted in the READMEs.

A chapter's `results/<name>.json` holds the command that made the run, its resolved config
(config.json) and its metrics (metrics.json), copied from the run's output folder. The
READMEs quote these files, and tests/test_results.py checks each quote against them, so a
rerun means replacing one file and the lines that quote it.

Usage (after the run has finished):
    python data/results.py runs/01_mnist 01_mnist/results/mlp.json \\
        --command "python 01_mnist/train.py --output-dir runs/01_mnist"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.cli import UserError, run_main
from data.outputs import write_json


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """The config.json and metrics.json of a finished run."""
    found = []
    for name in ("config.json", "metrics.json"):
        try:
            found.append(json.loads((Path(run_dir) / name).read_text()))
        except FileNotFoundError:
            raise UserError(f"{run_dir}/{name} not found: give the folder of a finished run") from None
        except ValueError as exc:
            raise UserError(f"{run_dir}/{name} is not valid JSON ({exc})") from None
    return found[0], found[1]


def record(run_dir: Path, destination: Path, command: str, note: str = "") -> dict:
    config, metrics = read_run(run_dir)
    entry = {"command": command, "note": note, "config": config, "metrics": metrics}
    write_json(destination, entry)
    return entry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the finished run's output folder")
    parser.add_argument("destination", type=Path, help="<chapter>/results/<name>.json")
    parser.add_argument("--command", required=True, help="the exact command that made the run")
    parser.add_argument("--note", default="", help="how it was measured (machine shared, ...)")
    args = parser.parse_args(argv)
    record(args.run_dir, args.destination, args.command, args.note)
    print(f"recorded {args.run_dir} in {args.destination}")


if __name__ == "__main__":
    run_main(main)
