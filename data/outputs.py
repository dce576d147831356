"""Writing a run's outputs: atomic files, config.json / metrics.json, and common plots.

Everything is written to a temporary name in the same folder and renamed into place,
so an interrupted run never leaves a half-written file behind. Plots use matplotlib's
non-interactive Agg backend: nothing is ever shown on screen.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.cli import UserError, usable_cores


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600; give it the usual permissions
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def jsonable(value: Any) -> Any:
    """`value` with paths, NumPy numbers and arrays made JSON types, and NaN / inf as null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")
    return Path(path)


def write_metrics(output_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write <output_dir>/metrics.json and print it as one `key value` line, then where it went."""
    path = write_json(Path(output_dir) / "metrics.json", metrics)
    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, list | tuple) and value and all(isinstance(v, float) for v in value):
            return "[" + ", ".join(f"{v:.3f}" for v in value) + "]"  # an interval
        return str(value)

    print("  ".join(f"{k} {shown(v)}" for k, v in metrics.items()))
    print(f"outputs in {output_dir}")
    return path


# --- One run per folder ----------------------------------------------------------------

# The files that mark a folder as holding a run of ours (never delete a folder that isn't).
RUN_MARKERS = ("config.json", "metrics.json")


def _earlier_run(output_dir: Path) -> dict | None:
    """The config.json of the run already in output_dir (None if there is none)."""
    if not any((output_dir / name).is_file() for name in RUN_MARKERS):
        return None
    try:
        return json.loads((output_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _clear_run(output_dir: Path) -> None:
    """Remove everything an earlier run left in output_dir (files and sub-folders)."""
    for entry in output_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def claim_output_dir(output_dir: Path, *, overwrite: bool = False, resume: bool = False,
                     smoke: bool = False) -> Path:
    """Make output_dir ready for a new run without silently destroying an earlier one.

    A folder that already holds a run (its config.json or metrics.json) is refused with one
    line, before anything in it is touched, unless:
    - `resume`: the run continues there (its checkpoint, config and split are checked by
      the chapter and by `check_resume_config` / `write_split`);
    - `overwrite`: the earlier run's files are all removed first, so none of them can be
      mistaken for this run's (a plot the new run does not make, an old model);
    - both runs are `--smoke` runs: smoke folders are scratch space and are replaced.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; give a folder")
    earlier = _earlier_run(output_dir) if output_dir.is_dir() else None
    if earlier is not None and not resume:
        replace_smoke = smoke and earlier.get("smoke") is True
        if not (overwrite or replace_smoke):
            state = "a finished run" if (output_dir / "metrics.json").is_file() else "an unfinished run"
            raise UserError(f"{output_dir} already holds {state}; pass --overwrite to replace it, "
                            f"or --output-dir NEW_DIR to keep it" +
                            ("" if state == "a finished run" else " (or --resume where the chapter has it)"))
        _clear_run(output_dir)
    existed = sorted(entry.name for entry in output_dir.iterdir()) if output_dir.is_dir() else None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {output_dir}: {exc.strerror}") from None
    _unstarted[output_dir.resolve()] = existed
    return output_dir


# --- A failed start leaves nothing behind -------------------------------------------------

# Output folders claimed by this process whose training has not started yet, each with the
# names that were in it before the claim (None: the claim created the folder).
_unstarted: dict[Path, list[str] | None] = {}


def training_started(output_dir: Path) -> None:
    """Say that the run in output_dir has passed its checks (data read, device found, weights
    loaded) and starts its work: from now on a failure keeps what the run wrote (its
    checkpoint, to resume from). Before this, `discard_unstarted_runs` removes it."""
    _unstarted.pop(Path(output_dir).resolve(), None)


def forget_unstarted_runs() -> None:
    """The process ends well: nothing it claimed is to be removed."""
    _unstarted.clear()


def discard_unstarted_runs() -> list[Path]:
    """Remove what each claimed-but-unstarted run of this process wrote, so that the corrected
    command can use the same folder without --overwrite. Called by `cli.run_main` when a
    run fails; files that were in a folder before its claim (a run being resumed) are kept."""
    removed = []
    for output_dir, existed in list(_unstarted.items()):
        _unstarted.pop(output_dir)
        if not output_dir.is_dir():
            continue
        if existed is None:
            shutil.rmtree(output_dir, ignore_errors=True)
        else:
            for entry in output_dir.iterdir():
                if entry.name in existed:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        removed.append(output_dir)
    return removed


def prepare_output_dir(output_dir: Path, config: dict[str, Any], *, overwrite: bool = False,
                       resume: bool = False, **extra: Any) -> Path:
    """Claim the output dir (see `claim_output_dir`) and save the resolved config as config.json.

    `extra` holds run facts saved beside the config (e.g. `smoke=True`); with `resume`, the
    config of the run being continued must match this one (see `check_resume_config`).
    """
    output_dir = claim_output_dir(output_dir, overwrite=overwrite, resume=resume,
                                  smoke=bool(extra.get("smoke")))
    if resume and (output_dir / "config.json").is_file():
        check_resume_config(output_dir, config)
    write_json(output_dir / "config.json", {**config, **extra})
    return output_dir


# Keys a resumed run may change: how long it goes on, and the flags that only say "resume".
RESUMABLE_KEYS = frozenset({"resume", "epochs", "time_limit_minutes", "evaluate_test",
                            "eval_every", "num_threads", "device", "grid_images"})


def check_resume_config(output_dir: Path, config: dict[str, Any],
                        may_change: frozenset[str] | set[str] = RESUMABLE_KEYS) -> None:
    """Refuse to resume a run whose saved config differs from `config` in another key."""
    try:
        saved = json.loads((Path(output_dir) / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"--resume: {output_dir}/config.json is missing or unreadable; "
                        "start a new run with --overwrite") from None
    changed = sorted(key for key, value in config.items()
                     if key not in may_change and key in saved and saved[key] != jsonable(value))
    if changed:
        first = changed[0]
        raise UserError(f"--resume: the run in {output_dir} was made with {first}="
                        f"{saved[first]!r}, not {config[first]!r} (changed: {', '.join(changed)}); "
                        "resume with its config, or start anew with --overwrite")


def read_split(path: Path) -> dict:
    """The split.json of the run being resumed; one line when it is damaged."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} is not readable JSON of a split; restore it, or start anew "
                        "with --overwrite")
    return saved


def write_split(output_dir: Path, split: dict[str, Sequence[str]], resume: bool = False) -> Path:
    """Save split.json ({"train": [names], "val": [...], "test": [...]}: what each figure was
    measured on). A resumed run must have the same split as the run it continues."""
    path = Path(output_dir) / "split.json"
    split = {part: [str(name) for name in names] for part, names in split.items()}
    if resume and path.is_file():
        saved = read_split(path)
        for part in sorted(set(saved) | set(split)):
            if saved.get(part) != split.get(part):
                raise UserError(f"--resume: the {part} split differs from {path} (another seed, "
                                "fraction or data folder?); resume with the same data and config")
    return write_json(path, split)


# --- What a result was measured on --------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_facts(frameworks: Sequence[str] = (), device: str = "cpu", device_name: str = "") -> dict:
    """Flat facts to store in metrics.json: when, on what, with which library versions.

    Versions are read from the installed packages' metadata, so this needs no framework
    import. Version drift is what breaks study code most often; this makes it visible.
    """
    facts: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu": _cpu_model(),
        "num_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "device": device,
        "device_name": device_name or (_cpu_model() if device == "cpu" else device),
    }
    for package in ("numpy", *frameworks):
        try:
            facts[f"{package.replace('-', '_')}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            facts[f"{package.replace('-', '_')}_version"] = None
    return facts


# --- Plots ---------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return Path(path)


def plot_curves(history: dict[str, Sequence[float]], path: str | os.PathLike,
                title: str = "", xlabel: str = "epoch") -> Path:
    """Learning curves: one panel per metric; `val_<m>` is drawn on the panel of `<m>`."""
    plt = _pyplot()
    names = [k for k in history if not k.startswith("val_")]
    names += [k[4:] for k in history if k.startswith("val_") and k[4:] not in names]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for key, label in ((name, "train"), (f"val_{name}", "val")):
            if key in history and len(history[key]):
                values = list(history[key])
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, y=1.04)  # above the panel titles, not over them
    fig.tight_layout()
    return save_figure(fig, path)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                   title: str = "") -> Path:
    """Confusion matrix with counts in each cell; rows are the true class."""
    plt = _pyplot()
    n = len(class_names)
    size = max(3.5, 0.55 * n + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8 if n > 6 else 10,
                    color="white" if cm[i, j] > threshold else "black")
    ax.set_xticks(range(n), class_names, rotation=45 if n > 6 else 0)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title}  accuracy {accuracy:.2%}".strip())
    return save_figure(fig, path)


def plot_image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: str | os.PathLike,
                    columns: int = 8, cell: float = 1.6, cmap: str | None = None,
                    title: str = "", colors: Sequence[str] | None = None) -> Path:
    """A grid of images (HxW or HxWx3, uint8 or float in [0,1]) with a caption each."""
    plt = _pyplot()
    count = max(len(images), 1)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(cell * columns, (cell + 0.35) * rows),
                             squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index], cmap=cmap)
            ax.set_title(titles[index], fontsize=8,
                         color=colors[index] if colors else "black")
    if not len(images):
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def spread(count: int, wanted: int) -> np.ndarray:
    """`wanted` indices spread evenly over range(count) (all of them when there are fewer)."""
    return np.linspace(0, count - 1, min(wanted, count)).astype(int)


def plot_val_curve(val_curve: dict[str, Sequence[float]], curves: Sequence[tuple[str, str]],
                   path: str | os.PathLike, ylabel: str = "validation mAP") -> Path:
    """The validation figures against the epoch: `curves` names (key, label) pairs of `val_curve`,
    whose "epoch" list holds the epochs they were measured at."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in curves:
        ax.plot(val_curve["epoch"], val_curve[key], marker="o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel=ylabel, ylim=(0, 1), title=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_truth_vs_prediction(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike,
                             score_threshold: float, what: str = "test photos", columns: int = 6,
                             cell: float = 2.4) -> Path:
    """(name, truth drawn, prediction drawn) per example, side by side: the test-set grid."""
    cells, titles = [], []
    for name, truth, predicted in pairs:
        cells += [truth, predicted]
        titles += [f"{name}: truth", f"predicted (>= {score_threshold})"]
    return plot_image_grid(cells, titles, path, columns=columns, cell=cell,
                           title=f"{what}: ground truth (left) and predictions (right)")


def print_detections(path, boxes, labels, scores, class_names: Sequence[str],
                     score_threshold: float) -> list[str]:
    """Print one line per box, `photo  class  score  x0 y0 x1 y1` (pixels), and return them;
    a photo with no box says so on its own line."""
    lines = []
    for box, label, score in zip(boxes, labels, scores, strict=True):
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        lines.append(f"{path}  {class_names[int(label)]}  {float(score):.3f}  {x0} {y0} {x1} {y1}")
        print(lines[-1])
    if not len(boxes):
        print(f"{path}  nothing found (score >= {score_threshold})")
    return lines


def draw_boxes(image: np.ndarray, boxes, labels, class_names: Sequence[str], scores=None,
               colors: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """Boxes (x0, y0, x1, y1 pixels) with 'class score' captions drawn on an RGB uint8 image."""
    from PIL import Image, ImageDraw, ImageFont

    palette = [(220, 20, 60), (230, 200, 0), (255, 120, 0), (30, 144, 255), (50, 205, 50)]
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    width = max(2, min(canvas.size) // 150)
    font = ImageFont.load_default(size=max(11, min(canvas.size) // 22))
    for index, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        name = class_names[int(label)]
        color = (colors or {}).get(name, palette[int(label) % len(palette)])
        caption = name if scores is None else f"{name} {scores[index]:.2f}"
        draw.rectangle([float(v) for v in box], outline=color, width=width)
        draw.text((float(box[0]) + 3, float(box[1]) + 2), caption, fill=color, font=font,
                  stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)
