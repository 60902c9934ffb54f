"""Accuracy budgets decided on paired predictions, with intervals that say what the data can resolve.

The end-to-end rule (run.max_accuracy_drop): a candidate may ship when, on the selection split's images,

    drop = accuracy(teacher) - accuracy(candidate) <= max_drop,

or when it misses that by at most one image while the paired 95% bootstrap interval of the drop still
contains 0 (the candidate is statistically indistinguishable from the teacher). So one image of noise
neither ships a model that is measurably worse nor blocks one that is not. Intervals are percentile
bootstraps over images (2,000 resamples, fixed seed): the same answer on every machine.
"""
from __future__ import annotations

import numpy as np

BOOTSTRAP = 2000


def _resample(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))


def accuracy_ci(correct: np.ndarray, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of an accuracy from per-image correctness."""
    correct = np.asarray(correct, dtype=np.float64)
    if len(correct) == 0:
        return [0.0, 0.0]
    means = correct[_resample(len(correct), seed)].mean(1)
    return [round(float(np.percentile(means, 2.5)), 6), round(float(np.percentile(means, 97.5)), 6)]


def paired_drop(reference_correct: np.ndarray, candidate_correct: np.ndarray, max_drop: float,
                seed: int = 0) -> dict:
    """The drop of `candidate` below `reference` on the same images, its 95% interval and the decision."""
    ref = np.asarray(reference_correct, dtype=np.float64)
    cand = np.asarray(candidate_correct, dtype=np.float64)
    if ref.shape != cand.shape or len(ref) == 0:
        raise ValueError(f"paired comparison needs the same non-empty images, got {ref.shape} and {cand.shape}")
    n = len(ref)
    drop = float(ref.mean() - cand.mean())
    idx = _resample(n, seed)
    diffs = ref[idx].mean(1) - cand[idx].mean(1)
    lo, hi = float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))
    within = drop <= max_drop + 1e-12
    one_image_noise = drop <= max_drop + 1.0 / n + 1e-12 and lo <= 0.0
    return {"drop": round(drop, 6), "ci95": [round(lo, 6), round(hi, 6)], "images": n, "max_drop": max_drop,
            "ok": bool(within or one_image_noise),
            "reason": ("within the budget" if within else
                       "one image over the budget, not distinguishable from the reference" if one_image_noise else
                       f"drop {drop:.4f} > {max_drop:g} (95% interval {lo:+.4f}..{hi:+.4f})"),
            "teacher_only_right": int(((ref == 1) & (cand == 0)).sum()),
            "candidate_only_right": int(((ref == 0) & (cand == 1)).sum())}
