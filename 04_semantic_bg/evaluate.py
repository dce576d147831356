"""04 (evaluate.py): score a model train.py saved on the val or test photos of that run's own split.

What it is for: a tuning run (train.py --no-evaluate-test) never reads its test photos, so
that no choice leans on them. Once the recipe is settled, this scores that run's model.pt
on its test photos, once, without training again. It reads the run's config.json (the
working size, close-up height, flip TTA and boundary tolerance the model was measured
with) and split.json (which photos are val and test), and scores the photos and their
close-ups with the same code train.py ends with (photos.py, fitting.evaluate): on the val
photos it gives the figures train.py wrote, to the last digit on a CPU.

How to run:
    python 04_semantic_bg/evaluate.py --run-dir runs/04_semantic_bg-tune --split test \
        --data-dir /tmp/dd --output-dir runs/04_semantic_bg-tune-test
    python 04_semantic_bg/evaluate.py --smoke     # scores runs/04_semantic_bg-smoke (train.py --smoke)

--data-dir must hold the photos the run was trained on (a --smoke run brings its own, in
its smoke_data/); a split.json naming a photo that is not there is refused, as is a run
folder without model.pt, config.json or split.json. The output folder must not be the
run's own (nor hold it), and an earlier evaluation there is refused unless --overwrite.

Outputs in --output-dir: metrics.json (the split's figures under train.py's names: person_iou,
close_up_iou, pixel_accuracy, boundary_f1 and their _ci95 intervals over the photos for
test; the same with a val_ prefix for val; num_<split>, num_<split>_close_ups, run_dir,
split, and the machine and library versions), per_photo.json (IoU and uncertain share of
each photo and close-up), predictions.png, worst.png (lowest IoU first), close_ups.png,
config.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from photos import load_close_ups, load_photos, photo_rows, save_grids, set_figures

from data.cli import ChapterParser, UserError, require, run_main, seed_everything
from data.outputs import prepare_output_dir, run_facts, write_json
from data.pennfudan import PedRecord, load_pennfudan

# default output: runs/04_semantic_bg-evaluate/, beside (not inside) the runs of train.py
CHAPTER = "04_semantic_bg-evaluate"
CONFIG_PATH = Path(__file__).with_name("evaluate.toml")
RUN_FILES = ("model.pt", "config.json", "split.json")
RUN_KEYS = ("image_size", "closeup_min_height", "flip_tta", "boundary_tolerance", "grid_images")


def check_config(cfg: dict) -> None:
    require(bool(cfg["run_dir"]), "--run-dir is required: the folder of a train.py run (its model.pt, "
            "config.json and split.json)")
    require(cfg["split"] in ("val", "test"), f"--split must be val or test, got {cfg['split']!r}")
    require(cfg["device"] in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {cfg['device']!r}")
    require(cfg["num_threads"] >= 0, f"--num-threads must be 0 (all cores) or more, got {cfg['num_threads']}")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc.__class__.__name__})") from None
    require(isinstance(value, dict), f"{path}: not a JSON object")
    return value


def read_run(run_dir: Path, split: str) -> tuple[dict, list[str], dict[str, list[str]]]:
    """(the run's config, the names of its `split` photos, all of split.json) of a train.py run."""
    require(run_dir.is_dir(), f"--run-dir {run_dir} is not a folder (give the --output-dir of a train.py run)")
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    require(not missing, f"--run-dir {run_dir} has no {', '.join(missing)}: not a finished train.py run")
    run_cfg, parts = read_json(run_dir / "config.json"), read_json(run_dir / "split.json")
    lacking = [key for key in RUN_KEYS if key not in run_cfg]
    require(not lacking, f"{run_dir / 'config.json'} lacks {', '.join(lacking)}: not a config of 04_semantic_bg/train.py")
    names = parts.get(split)
    require(isinstance(names, list) and len(names) > 0 and all(isinstance(name, str) for name in names),
            f"{run_dir / 'split.json'} names no {split} photos")
    return run_cfg, names, parts


def named_records(run_dir: Path, run_cfg: dict, names: list[str], parts: dict, data_dir: Path) -> list[PedRecord]:
    """The records of `names`, in split.json's order; every photo split.json names must be in the data."""
    if run_cfg.get("smoke"):  # a --smoke run drew its photos into its own folder
        records = load_pennfudan(run_dir / "smoke_data", fetch=False)
        where = run_dir / "smoke_data"
    else:
        records, where = load_pennfudan(data_dir), data_dir
    by_name = {record.image_path.name: record for record in records}
    named = [name for part in sorted(parts) if isinstance(parts[part], list) for name in parts[part]]
    absent = [name for name in named if name not in by_name]
    require(not absent, f"{len(absent)} of the {len(named)} photos {run_dir / 'split.json'} names are not in "
            f"{where} (first: {absent[0] if absent else ''}); give the --data-dir the run was trained on")
    return [by_name[name] for name in names]


def main(argv=None) -> dict:
    cfg, args = ChapterParser(__doc__, CONFIG_PATH, CHAPTER).parse_config(argv)
    check_config(cfg)
    run_dir, split = Path(cfg["run_dir"]), cfg["split"]
    run_cfg, names, parts = read_run(run_dir, split)
    output, run = args.output_dir.resolve(), run_dir.resolve()
    require(output != run and output not in run.parents,
            f"--output-dir {args.output_dir} is (or holds) the run being scored; give another folder")
    records = named_records(run_dir, run_cfg, names, parts, args.data_dir)

    import fitting  # torch loads only now: --help and flag or folder errors stay instant
    import segmenters

    seed_everything(cfg["seed"])
    device = segmenters.start_torch(cfg["device"], cfg["num_threads"], cfg["seed"])
    model, checkpoint = segmenters.load_checkpoint(run_dir / "model.pt")
    require(checkpoint["image_size"] == run_cfg["image_size"],
            f"{run_dir}: model.pt was trained at {checkpoint['image_size']} px but config.json says "
            f"{run_cfg['image_size']}: they come from different runs")
    model = segmenters.prepare_model(model, device)
    output_dir = prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite, smoke=args.smoke)

    start = time.monotonic()
    size, tall = run_cfg["image_size"], run_cfg["closeup_min_height"]
    photos, close_ups = load_photos(records, size), load_close_ups(records, size, tall)
    require(len(close_ups) > 0, f"no person in the {len(photos)} {split} photos can be framed for a close-up "
            f"(at least {tall} px tall, clear of the border)")
    scores = fitting.evaluate(model, photos, run_cfg, device, keep_masks=True)
    close_up_scores = fitting.evaluate(model, close_ups, run_cfg, device, keep_masks=True)
    seconds = time.monotonic() - start

    prefix = "" if split == "test" else "val_"  # train.py's names: person_iou is test, val_person_iou val
    figures = set_figures(scores, close_up_scores, close_ups)
    metrics = {**{f"{prefix}{key}": value for key, value in figures.items()},
               f"num_{split}": len(photos), f"num_{split}_close_ups": len(close_ups),
               "run_dir": str(run_dir), "split": split, "best_epoch": checkpoint.get("best_epoch"),
               "evaluate_seconds": seconds, "parameters": segmenters.count_parameters(model),
               **run_facts(("torch", "torchvision"), device=device.type,
                           device_name=segmenters.device_name(device))}
    write_json(output_dir / "metrics.json", metrics)
    write_json(output_dir / "per_photo.json", {split: photo_rows(photos, scores),
                                               f"{split}_close_ups": photo_rows(close_ups, close_up_scores)})
    save_grids(photos, scores, close_ups, close_up_scores, output_dir, split, run_cfg["grid_images"])
    print(f"{split} person IoU {scores.iou:.4f}  close-up IoU {close_up_scores.iou:.4f}  pixel accuracy "
          f"{scores.pixel_accuracy:.4f}  boundary F1 {scores.boundary_f1:.4f}  ({len(photos)} photos, "
          f"{len(close_ups)} close-ups of {run_dir}) -> {output_dir}")
    return metrics


if __name__ == "__main__":
    run_main(main)
