"""95% intervals for the figures the chapters report, framework-free.

The test sets here are small (60 fruit photos, 60 detection photos, 30 PennFudan photos),
so one photo moves a figure by 2 to 3 points. Every headline figure therefore comes with an
interval that says how far another sample of photos could move it:

- accuracy-like figures (a count of successes out of n): the Wilson score interval, which
  stays inside [0, 1] and behaves at 0/n and n/n, where the textbook p ± 1.96·se does not;
- pooled figures (mAP, IoU summed over all pixels): a seeded bootstrap over test images
  (resample the images with replacement, recompute the pooled figure, take the 2.5% and
  97.5% percentiles);
- "A vs B on the same photos": a paired bootstrap of the difference, which cancels the
  photos' own difficulty and is much tighter than comparing two separate intervals.

    from data.intervals import wilson_ci95, bootstrap_ci95
    wilson_ci95(55, 60)                      # [0.819..., 0.964...]
    bootstrap_ci95(lambda idx: scores[idx].mean(), len(scores), seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_ci95(successes: int, total: int) -> list[float]:
    """Wilson score 95% interval for a proportion successes / total, as [low, high]."""
    if total <= 0:
        raise ValueError("wilson_ci95 needs at least one trial")
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be in 0..{total}, got {successes}")
    p = successes / total
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = Z95 * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, no rounding dust
    high = 1.0 if successes == total else min(1.0, centre + half)
    return [low, high]


def _resamples(num_items: int, reps: int, seed: int) -> np.ndarray:
    if num_items <= 0:
        raise ValueError("a bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_items, size=(reps, num_items))


def bootstrap_ci95(statistic: Callable[[np.ndarray], float], num_items: int,
                   reps: int = 1000, seed: int = 0) -> list[float]:
    """Percentile 95% interval of `statistic(indices)` over `reps` resamples of the items.

    `statistic` gets an int array of item indices (with repeats) and returns the figure
    recomputed on those items, pooled the same way as the reported figure.
    """
    values = np.array([statistic(idx) for idx in _resamples(num_items, reps, seed)], np.float64)
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def pooled_ratio_ci95(numerators: Sequence[float], denominators: Sequence[float],
                      reps: int = 1000, seed: int = 0) -> list[float]:
    """Bootstrap interval of sum(numerators) / sum(denominators) over items (e.g. pooled IoU)."""
    num, den = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    if num.shape != den.shape:
        raise ValueError("numerators and denominators need the same length")
    idx = _resamples(len(num), reps, seed)
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return [float(low), float(high)]


def paired_bootstrap(statistic_a: Callable[[np.ndarray], float],
                     statistic_b: Callable[[np.ndarray], float], num_items: int,
                     reps: int = 1000, seed: int = 0) -> dict:
    """A minus B on the same items: the observed difference, its 95% interval, and the share
    of resamples in which A does not beat B (a one-sided bootstrap p-value).

    Both statistics see the same resampled indices each time, so what the photos have in
    common (an easy photo is easy for both) cancels out of the difference.
    """
    everything = np.arange(num_items)
    observed = float(statistic_a(everything) - statistic_b(everything))
    diffs = np.array([statistic_a(idx) - statistic_b(idx)
                      for idx in _resamples(num_items, reps, seed)], np.float64)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": observed, "ci95": [float(low), float(high)],
            "p_not_better": float(np.mean(diffs <= 0))}
