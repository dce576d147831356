"""The compositing math of chapter 04, in numpy and OpenCV only (no torch), so it can be
tested with known answers: cover-resize a background, turn a person probability into a
soft alpha matte, and composite in the study's three modes.

    alpha = soft_matte(probability, image)          # (H, W) float32 in [0, 1]
    out = composite(image, alpha, "replace", background)   # or "blur", "gray"

Why a *soft* matte: a hard 0/1 cut of an upsampled mask gives a jagged, one-pixel
staircase edge and keeps a rim of the old background around hair and shoulders. The
matte keeps the model's probability near the edge, snaps it to the photo's own edges
with a guided filter (He et al. 2010), and feathers what is left with a small blur.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

MODES = ("replace", "blur", "gray")
REFINEMENTS = ("guided", "blur", "none")


# --- Backgrounds ----------------------------------------------------------------------


def cover_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale `image` to *cover* width x height (keep the aspect ratio), then center-crop.

    Like CSS `object-fit: cover`: nothing is stretched and no border is left; whatever
    sticks out past the frame on the longer side is cut off equally on both ends.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    source_height, source_width = image.shape[:2]
    scale = max(width / source_width, height / source_height)
    new_width = max(width, round(source_width * scale))
    new_height = max(height, round(source_height * scale))
    # INTER_AREA when shrinking avoids aliasing; bilinear when enlarging.
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_width, new_height), interpolation=interpolation)
    top, left = (new_height - height) // 2, (new_width - width) // 2
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def gray_background(image: np.ndarray) -> np.ndarray:
    """The photo itself in grayscale (ITU-R 601 luma), as 3 equal RGB channels."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """A wide Gaussian blur, computed at reduced size: same look, a fraction of the time."""
    if sigma <= 0:
        return image.astype(np.float32)
    factor = max(1, int(sigma // 4))  # keep >= 4 px of sigma at the reduced size
    height, width = image.shape[:2]
    small = cv2.resize(image.astype(np.float32), (max(1, width // factor), max(1, height // factor)),
                       interpolation=cv2.INTER_AREA) if factor > 1 else image.astype(np.float32)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma / factor, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR) if factor > 1 else small


def blurred_background(image: np.ndarray, alpha: np.ndarray, sigma: float) -> np.ndarray:
    """Portrait mode: the photo's background, blurred *without* the person in it.

    A plain blur of the whole photo smears the person's colors into a glow around them.
    Weighting by (1 - alpha) and dividing by the blurred weight (normalized convolution)
    fills the person's hole from the surrounding background only.
    """
    weight = 1.0 - alpha.astype(np.float32)
    numerator = _gaussian(image.astype(np.float32) * weight[:, :, None], sigma)
    denominator = _gaussian(weight, sigma)[:, :, None]
    plain = _gaussian(image, sigma)  # where the person covers everything nearby
    filled = numerator / np.maximum(denominator, 1e-6)
    mix = np.clip(denominator / 0.05, 0.0, 1.0)  # trust the fill where enough background is near
    return np.clip(mix * filled + (1 - mix) * plain, 0, 255)


# --- The alpha matte ------------------------------------------------------------------


def box_mean(image: np.ndarray, radius: int) -> np.ndarray:
    return cv2.boxFilter(image, cv2.CV_32F, (2 * radius + 1, 2 * radius + 1),
                         borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a grayscale guide in [0, 1]: an edge-preserving
    smoothing of `source` whose edges follow the guide's (the matte follows the hair)."""
    mean_guide = box_mean(guide, radius)
    mean_source = box_mean(source, radius)
    covariance = box_mean(guide * source, radius) - mean_guide * mean_source
    variance = box_mean(guide * guide, radius) - mean_guide * mean_guide
    a = covariance / (variance + eps)
    b = mean_source - a * mean_guide
    return box_mean(a, radius) * guide + box_mean(b, radius)


def soft_matte(probability: np.ndarray, image: np.ndarray | None = None, low: float = 0.3,
               high: float = 0.7, refine: str = "guided", feather: float = 2.0,
               radius: int | None = None, eps: float = 1e-3) -> np.ndarray:
    """Person probability (H, W) in [0, 1] -> alpha matte (H, W) float32 in [0, 1].

    1. A linear ramp between `low` and `high`: confident pixels become 0 or 1 exactly,
       the uncertain band near the edge stays soft (the class probability itself).
    2. `refine="guided"`: the guided filter, with the photo as guide, moves that soft band
       onto the photo's real edges; `"blur"` only feathers; `"none"` skips both.
    3. A Gaussian feather of `feather` px removes the staircase of the upsampled mask.
    """
    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    alpha = np.clip((probability.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    if refine == "guided" and image is not None:
        height, width = alpha.shape
        # ~0.6% of the long side: 12 px on a 1920-px photo, 3 px on a 480-px one
        radius = radius or max(2, round(0.006 * max(height, width)))
        guide = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        alpha = guided_filter(guide, alpha, radius, eps)
    if refine != "none" and feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=feather, borderType=cv2.BORDER_REFLECT)
    return np.clip(alpha, 0.0, 1.0).astype(np.float32)


# --- Compositing ----------------------------------------------------------------------


def composite(foreground: np.ndarray, alpha: np.ndarray, mode: str,
              background: np.ndarray | None = None, blur_sigma: float | None = None) -> np.ndarray:
    """Blend the person (alpha) over a new background, at the foreground's size.

    replace: `background` cover-resized to the frame; blur: the photo's own background
    blurred (portrait mode; `blur_sigma` defaults to 1.2% of the long side); gray: the
    photo's own background in grayscale. Returns uint8 RGB.
    """
    height, width = foreground.shape[:2]
    if alpha.shape != (height, width):
        raise ValueError(f"alpha is {alpha.shape}, the foreground is {(height, width)}")
    if mode == "replace":
        if background is None:
            raise ValueError("mode 'replace' needs a background image")
        behind = cover_resize(background, width, height).astype(np.float32)
    elif mode == "blur":
        sigma = blur_sigma if blur_sigma is not None else 0.012 * max(height, width)
        behind = blurred_background(foreground, alpha, sigma)
    elif mode == "gray":
        behind = gray_background(foreground).astype(np.float32)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    a = alpha.astype(np.float32)[:, :, None]
    out = a * foreground.astype(np.float32) + (1.0 - a) * behind
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def uncertain_share(probability: np.ndarray, low: float = 0.3, high: float = 0.7) -> float:
    """How unsure the model is of the person it found: of the pixels above `low` (those the
    matte keeps at all), the share below `high` (only partly kept: the matte's soft band).
    A sure prediction keeps this to its outline's band; a photo unlike the training photos
    leaves wide areas in between. 0.0 when no pixel is above `low`."""
    kept = probability > low
    count = int(kept.sum())
    return float((kept & (probability < high)).sum() / count) if count else 0.0


def cutouts(foreground: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The study's figure panels: the person on black, and the background with the hole."""
    a = alpha.astype(np.float32)[:, :, None]
    person = np.round(foreground * a).astype(np.uint8)
    hole = np.round(foreground * (1.0 - a)).astype(np.uint8)
    return person, hole


def fit_longest_side(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) scaled so the longer side is `longest` (never below 1 px)."""
    scale = longest / max(height, width)
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))
