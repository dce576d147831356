"""04 (composite.py): put a person on a new background with a semantic-segmentation model.

What it teaches: the 2020 study's trick, done well. A segmentation model (torchvision's
DeepLabV3 or LR-ASPP, trained on COCO with the 21 VOC labels; class 15 is "person")
gives every pixel a person probability. The probability becomes a *soft* alpha matte
(matting.py: a ramp, a guided filter that follows the photo's own edges, a small
feather), and the person is blended over

- replace: another photo, resized to *cover* the frame (aspect kept, center-cropped);
- blur:    the photo's own background, blurred (portrait mode), without the person's glow;
- gray:    the photo's own background in grayscale, the person in color.

The photo is segmented at a working resolution (its longest side = --working-size) and
the probability is upsampled to full size; the composite has the photo's full resolution.

How to run:
    python 04_semantic_bg/composite.py --foreground person.jpg --background beach.jpg
    python 04_semantic_bg/composite.py --foreground person.jpg --mode blur \
        --model lraspp_mobilenet_v3_large --output-dir runs/04_semantic_bg-composite-blur   # ~3x faster
    python 04_semantic_bg/composite.py --foreground person.jpg --background beach.jpg \
        --mode all --weights runs/04_semantic_bg/model.pt \
        --output-dir runs/04_semantic_bg-composite-own  # offline: the model train.py made
    python 04_semantic_bg/composite.py --smoke          # synthetic photos, untrained model

How sure the model is: the summary line and metrics.json give the *uncertain share*, the
share of the pixels the matte keeps at all (person probability above --matte-low) that it
keeps only in part (below --matte-high): a sure prediction keeps it to a thin band along
the outline. When the share is above --max-uncertain, or the person covers less than
--small-person of the photo (or nearly all of it), one line on stderr says that the photo
looks out of the model's range, and why (metrics.json: out_of_range,
out_of_range_reasons). The composites are written all the same, since only the user can
judge them, but never silently. A person below --min-person is "no person found": an
error (exit 2), with only the mask written. An untrained model (--weights random) gets no
range check.

Weights: --weights coco (the default) is torchvision's COCO_WITH_VOC_LABELS_V1 file for
--model, downloaded once into torch.hub's cache, $TORCH_HOME/hub/checkpoints/ (by default
~/.cache/torch/hub/checkpoints/), and read from there afterwards: copied there, the file
works offline. A cached file that cannot be used (cut off, or another model's) is named in
one line: delete it, and the next run downloads it again.

A folder that holds an earlier composite is refused unless --overwrite; a run that fails
before it segments the photo (a missing file, no GPU, no weights) leaves nothing there.
--device auto uses a CUDA GPU when torch sees one; --num-threads 0 uses all CPU cores.

Outputs in --output-dir: composite_<mode>.jpg, mask.png (the alpha matte), figure.png
(mask | person cut out | background with the person's hole), metrics.json (the person
share, the uncertain share and the range verdict, with the device and library versions),
config.json.

What to expect (measured on 2 CPU cores, a PennFudanPed photo resized to 1920x1080,
--mode replace; seconds from reading the photos to the last file written, after the
model is loaded; loading torch and the model adds 2-5 s per process):
    --weights runs/04_semantic_bg/model.pt (U-Net, 320 px)                 1.1 s
    --weights random --model lraspp_mobilenet_v3_large (640 px)            0.84 s
    --weights random --model deeplabv3_resnet50 (640 px)                   1.82 s
    --weights random --model deeplabv3_resnet101 (640 px)                  2.33 s
Random weights because the COCO weights cannot be downloaded where this was measured;
the weights do not change the time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import matting
import numpy as np
from PIL import Image

from data import outputs
from data.cli import ChapterParser, UserError, require, run_main, seed_everything
from data.images import read_rgb
from data.outputs import atomic_path, plot_image_grid, prepare_output_dir, run_facts, write_json

# default output: runs/04_semantic_bg-composite/, beside (not inside: train.py --overwrite clears
# its own folder) the run of train.py
CHAPTER = "04_semantic_bg-composite"
CONFIG_PATH = Path(__file__).with_name("composite.toml")
ALL_PERSON = 0.95  # a person share above this leaves no background to replace: out of range

# --- Config -------------------------------------------------------------------------


def check_config(cfg: dict) -> tuple[str, ...]:
    """Validate the flags; return the modes to write."""
    require(cfg["mode"] in (*matting.MODES, "all"),
            f"--mode must be one of {', '.join(matting.MODES)} or all, got {cfg['mode']!r}")
    require(cfg["refine"] in matting.REFINEMENTS,
            f"--refine must be one of {', '.join(matting.REFINEMENTS)}, got {cfg['refine']!r}")
    require(0.0 <= cfg["matte_low"] < cfg["matte_high"] <= 1.0,
            "need 0 <= --matte-low < --matte-high <= 1")
    require(cfg["output_format"] in ("jpg", "png"), "--output-format must be jpg or png")
    require(cfg["working_size"] >= 0, "--working-size must be 0 (automatic) or a size in pixels")
    require(cfg["num_threads"] >= 0, f"--num-threads must be 0 (all cores) or more, got {cfg['num_threads']}")
    require(cfg["device"] in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {cfg['device']!r}")
    require(1 <= cfg["jpeg_quality"] <= 100, f"--jpeg-quality must be in 1..100, got {cfg['jpeg_quality']}")
    require(0.0 <= cfg["max_uncertain"] <= 1.0, f"--max-uncertain is a share in [0, 1], got {cfg['max_uncertain']}")
    require(0.0 <= cfg["small_person"] < 1.0, f"--small-person is a share in [0, 1), got {cfg['small_person']}")
    require(bool(cfg["weights"]), "--weights must be coco, random or a .pt file from train.py")
    require(cfg["weights"] in ("coco", "random") or Path(cfg["weights"]).is_file(),
            f"weights file not found: {cfg['weights']} (--weights takes coco, random or a .pt from train.py)")
    return matting.MODES if cfg["mode"] == "all" else (cfg["mode"],)


# --- Data ---------------------------------------------------------------------------


def write_smoke_inputs(folder: Path, seed: int) -> tuple[Path, Path]:
    """A PennFudan-style photo with people, and a wide (non-square) RGBA background."""
    from data.synthetic import write_pennfudan

    root = write_pennfudan(folder, count=1, seed=seed, image_size=(320, 240))
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:150, 0:400]
    sky = np.stack([80 + x * 0.3, 140 + y * 0.5, 220 - y * 0.4], axis=2) + rng.normal(0, 6, (150, 400, 3))
    background = folder / "background.png"
    rgba = np.dstack([np.clip(sky, 0, 255).astype(np.uint8), np.full((150, 400), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(background)
    return root / "PNGImages" / "FudanPed00001.png", background


# --- Model: load_segmenter and segment_photo are in segmenters.py ----------------------


# --- Save ---------------------------------------------------------------------------


def write_image(path: Path, image: np.ndarray, jpeg_quality: int = 92) -> Path:
    picture = Image.fromarray(image)
    with atomic_path(path) as tmp:
        if path.suffix == ".jpg":
            picture.save(tmp, format="JPEG", quality=jpeg_quality)
        else:
            picture.save(tmp, format="PNG")
    return path


def save_figure(path: Path, foreground: np.ndarray, alpha: np.ndarray) -> None:
    """The study's figure: mask | person cut out | background with the person's hole."""
    height, width = alpha.shape
    small_height, small_width = matting.fit_longest_side(height, width, min(480, max(height, width)))
    size = (small_width, small_height)
    photo = cv2.resize(foreground, size, interpolation=cv2.INTER_AREA)
    small_alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
    person, hole = matting.cutouts(photo, small_alpha)
    mask = np.repeat(np.round(small_alpha * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    plot_image_grid([mask, person, hole], ["mask (alpha)", "person cut out", "background, person's hole"],
                    path, columns=3, cell=3.2)


def read_inputs(cfg: dict, modes: tuple[str, ...], smoke: bool, output_dir: Path):
    """(foreground, background or None): EXIF-upright RGB, whatever the files' modes."""
    if smoke and not cfg["foreground"]:
        foreground_path, background_path = write_smoke_inputs(output_dir / "smoke_inputs", cfg["seed"])
        cfg["foreground"] = str(foreground_path)
        cfg["background"] = cfg["background"] or str(background_path)
    require(bool(cfg["foreground"]), "--foreground PHOTO is required (the photo with the person)")
    require("replace" not in modes or bool(cfg["background"]),
            f"--mode {cfg['mode']} needs --background PHOTO (or use --mode blur / gray)")
    return read_rgb(cfg["foreground"]), read_rgb(cfg["background"]) if "replace" in modes else None


def range_check(person_fraction: float, uncertain: float, cfg: dict) -> list[str] | None:
    """Why the photo looks out of the model's range ([] if it does not); None for an
    untrained model (--weights random), which has no range to judge by."""
    if cfg["weights"] == "random":
        return None
    reasons = []
    if uncertain > cfg["max_uncertain"]:
        reasons.append(f"the model is unsure of {uncertain:.0%} of what it calls person "
                       f"(--max-uncertain {cfg['max_uncertain']})")
    if person_fraction < cfg["small_person"]:
        reasons.append(f"the person covers only {person_fraction:.1%} of the photo "
                       f"(--small-person {cfg['small_person']})")
    if person_fraction > ALL_PERSON:
        reasons.append(f"the model calls {person_fraction:.0%} of the photo person, leaving no background")
    return reasons


def write_composites(cfg: dict, modes: tuple[str, ...], foreground: np.ndarray,
                     background: np.ndarray | None, alpha: np.ndarray, output_dir: Path) -> None:
    height, width = alpha.shape
    for mode in modes:
        image = matting.composite(foreground, alpha, mode, background,
                                  blur_sigma=cfg["blur"] * max(height, width))
        write_image(output_dir / f"composite_{mode}.{cfg['output_format']}", image, cfg["jpeg_quality"])
    save_figure(output_dir / "figure.png", foreground, alpha)


def load_model(cfg: dict):
    """(device, model ready on it, the person class, working size, description)."""
    import segmenters  # torch loads only now: a bad flag or file fails in well under a second

    seed_everything(cfg["seed"])
    device = segmenters.start_torch(cfg["device"], cfg["num_threads"], cfg["seed"])
    model, person_class, working_size, description = segmenters.load_segmenter(
        cfg["weights"], cfg["model"], cfg["working_size"])
    return device, segmenters.prepare_model(model, device), person_class, working_size, description


def main(argv=None) -> dict:
    parser = ChapterParser(__doc__, CONFIG_PATH, CHAPTER)
    cfg, args = parser.parse_config(argv)
    modes = check_config(cfg)
    output_dir = prepare_output_dir(args.output_dir, cfg, overwrite=args.overwrite, smoke=args.smoke)
    start = time.monotonic()
    foreground, background = read_inputs(cfg, modes, args.smoke, output_dir)
    read_seconds = time.monotonic() - start

    device, model, person_class, working_size, description = load_model(cfg)
    import segmenters  # already loaded by load_model, after the flags were checked

    # inputs, device and model are in hand: what is written from here is kept, even the mask of a
    # photo with no person in it; a failure before this left nothing (data.cli.run_main)
    outputs.training_started(output_dir)

    start = time.monotonic()
    probability = segmenters.segment_photo(model, foreground, person_class, working_size, device)
    segment_seconds = time.monotonic() - start
    height, width = probability.shape
    alpha = matting.soft_matte(probability, foreground, cfg["matte_low"], cfg["matte_high"],
                               cfg["refine"], feather=cfg["feather"] * max(height, width))
    mask_path = write_image(output_dir / "mask.png", np.round(alpha * 255).astype(np.uint8))
    person_fraction = float((alpha > 0.5).mean())
    uncertain = matting.uncertain_share(probability, cfg["matte_low"], cfg["matte_high"])
    metrics = {"model": description, "working_size": working_size, "width": width, "height": height,
               "person_fraction": person_fraction, "max_person_probability": float(probability.max()),
               "uncertain_share": uncertain, "segment_seconds": segment_seconds,
               **run_facts(("torch", "torchvision"), device=device.type,
                           device_name=segmenters.device_name(device))}
    if person_fraction < cfg["min_person"] and cfg["weights"] != "random":  # untrained: no verdict
        write_json(output_dir / "metrics.json", {**metrics, "person_found": False})
        raise UserError(f"no person found in {cfg['foreground']} (highest person probability "
                        f"{probability.max():.2f}); the mask was written to {mask_path}")
    write_composites(cfg, modes, foreground, background, alpha, output_dir)
    seconds = read_seconds + time.monotonic() - start
    reasons = range_check(person_fraction, uncertain, cfg)
    metrics.update(person_found=True, seconds=seconds, out_of_range=None if reasons is None else bool(reasons),
                   out_of_range_reasons=reasons or [])
    write_json(output_dir / "metrics.json", metrics)
    if reasons:  # written all the same: the user judges the composite, told what to look for
        print(f"warning: {cfg['foreground']} looks out of this model's range: {'; '.join(reasons)}. "
              "The composites were written; check them (a COCO model, --weights coco, covers "
              "portraits and close-ups)", file=sys.stderr, flush=True)
    print(f"{description} at {working_size} px: person in {person_fraction:.1%} of "
          f"{width}x{height}, uncertain share {uncertain:.0%}; {', '.join(modes)} written in "
          f"{seconds:.2f} s -> {output_dir}")
    return metrics


if __name__ == "__main__":
    run_main(main)
