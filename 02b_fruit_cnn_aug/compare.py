"""02b: compare fruit classifiers photo by photo, from the files their runs saved.

What it does
    Reads `test_predictions.json` (or, with --split val, `val_predictions.json`) of each
    run folder: one row per photo with its true and predicted class. Runs in the same
    group (for example the three seeds of a recipe) are averaged photo by photo: a photo
    counts as 2/3 right if two of three seeds got it. Prints each run's accuracy with its
    Wilson 95% interval, each group's mean, and the paired bootstrap of A minus B over the
    photos: both groups see the same resampled photos, so how hard a photo is cancels
    out of the difference. `p_not_better` is the share of resamples where A does not win.

How to run
    python 02b_fruit_cnn_aug/compare.py runs/02b_fruit_cnn_aug runs/02b_fruit_cnn_aug-seed1 \\
        runs/02b_fruit_cnn_aug-seed2 --against runs/02_fruit_cnn runs/02_fruit_cnn-seed1 \\
        runs/02_fruit_cnn-seed2
    python 02b_fruit_cnn_aug/compare.py runs/tune-a --against runs/tune-b --split val

Both groups must have been scored on the same photos (the same split.json test list, or
for --split val the same validation photos).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from data import outputs
from data.classify import wilson
from data.cli import OneLineParser, UserError, run_main
from data.intervals import paired_bootstrap


def parse_args(argv):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders of group A")
    parser.add_argument("--against", nargs="+", type=Path, required=True, metavar="RUN",
                        help="run folders of group B, scored on the same photos")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="which saved predictions to compare (default: test)")
    parser.add_argument("--reps", type=int, default=10000, help="bootstrap resamples (default: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--output", type=Path, default=None, help="also write the result as JSON here")
    return parser.parse_args(argv)


def read_correct(run: Path, split: str) -> tuple[list[str], np.ndarray]:
    """(photo names, sorted; 1.0 where the run's prediction was right) from one run folder."""
    path = run / f"{split}_predictions.json"
    try:
        rows = json.loads(path.read_text())
        pairs = sorted((row["name"], float(row["true"] == row["predicted"])) for row in rows)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: missing or unreadable ({exc.__class__.__name__}); give run folders "
                        f"written by 02_fruit_cnn or 02b_fruit_cnn_aug train.py") from None
    if not pairs:
        raise UserError(f"{path} lists no photos")
    return [name for name, _ in pairs], np.array([right for _, right in pairs])


def read_group(runs: list[Path], split: str, names: list[str] | None) -> tuple[list[str], np.ndarray]:
    """(photo names, (runs, photos) correctness), every run on the same photos."""
    rows = []
    for run in runs:
        run_names, correct = read_correct(run, split)
        names = names or run_names
        if run_names != names:
            raise UserError(f"{run}: its {split} photos differ from the first run's; compare runs "
                            "scored on the same split")
        rows.append(correct)
    return names, np.stack(rows)


def describe(label: str, runs: list[Path], correct: np.ndarray) -> dict:
    per_run = []
    for run, right in zip(runs, correct, strict=True):
        hits, total = int(right.sum()), len(right)
        low, high = wilson(hits, total)
        print(f"  {label} {run}: {hits}/{total} = {hits / total:.1%} [{low:.1%}, {high:.1%}]")
        per_run.append({"run": str(run), "accuracy": hits / total, "accuracy_ci95": [low, high]})
    mean = float(correct.mean())
    spread = f", runs {correct.mean(1).min():.1%} to {correct.mean(1).max():.1%}" if len(runs) > 1 else ""
    print(f"  {label} mean over {len(runs)} run(s): {mean:.1%}{spread}")
    return {"runs": per_run, "mean_accuracy": mean}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.reps < 100:
        raise UserError(f"--reps must be at least 100, got {args.reps}")
    names, a = read_group(args.runs, args.split, None)
    _, b = read_group(args.against, args.split, names)
    print(f"{args.split} accuracy on the same {len(names)} photos:")
    result = {"split": args.split, "num_photos": len(names), "a": describe("A", args.runs, a),
              "b": describe("B", args.against, b)}
    a_photo, b_photo = a.mean(0), b.mean(0)  # each photo: the share of the group's runs right
    paired = paired_bootstrap(lambda i: a_photo[i].mean(), lambda i: b_photo[i].mean(),
                              len(names), reps=args.reps, seed=args.seed)
    low, high = paired["ci95"]
    print(f"A - B: {paired['difference']:+.1%} [{low:+.1%}, {high:+.1%}] (paired bootstrap over "
          f"photos, {args.reps} resamples); p_not_better {paired['p_not_better']:.3f}")
    only_a = int(np.sum((a_photo > 0.5) & (b_photo < 0.5)))
    only_b = int(np.sum((b_photo > 0.5) & (a_photo < 0.5)))
    print(f"photos mostly right in A but mostly wrong in B: {only_a}; the other way round: {only_b}")
    result.update(paired, a_wins=only_a, b_wins=only_b)
    if args.output:
        outputs.write_json(args.output, result)
    return result


if __name__ == "__main__":
    run_main(main)
