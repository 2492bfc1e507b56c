"""Fit the first-token score's threshold to another judge on half of the responses, report it on the other half.

The halves are split by a hash of the prompt text (as the SAE and circuits splits are), so duplicates of a
prompt never sit on both sides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from refusal_lab.judge.metrics import pair_agreement


def calibration_half(prompts: Sequence[str]) -> np.ndarray:
    """bool [N]: True for the half the threshold is fitted on (even first byte of the prompt's SHA-256)."""
    return np.array([hashlib.sha256(p.encode()).digest()[0] % 2 == 0 for p in prompts], dtype=bool)


def best_threshold(scores: np.ndarray, refused: np.ndarray) -> float:
    """The threshold t maximising mean((scores > t) == refused); ties: the midpoint of the widest best gap.

    Candidates are -inf and the midpoints between consecutive distinct scores (and +inf), so the answer
    never sits on a training score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    refused = np.asarray(refused, dtype=bool)
    if scores.size == 0:
        return 0.0
    order = np.argsort(scores, kind="stable")
    s, r = scores[order], refused[order]
    distinct = np.unique(s)
    # Above a cut between distinct values i and i+1, everything with score > cut is called refused.
    cuts = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1.0]])
    # correct(cut) = #answered with score <= cut + #refused with score > cut
    below = np.searchsorted(s, cuts, side="right")
    answered_cum = np.concatenate([[0], np.cumsum(~r)])
    refused_total = int(r.sum())
    refused_cum = np.concatenate([[0], np.cumsum(r)])
    correct = answered_cum[below] + (refused_total - refused_cum[below])
    best = np.flatnonzero(correct == correct.max())
    # Prefer the cut closest to 0 among equals (the uncalibrated log-odds convention), for stability.
    return float(cuts[best[np.argmin(np.abs(cuts[best]))]])


def calibrate_score(
    scores: np.ndarray, reference_refused: np.ndarray, prompts: Sequence[str], reference: str
) -> dict[str, Any]:
    """Threshold fitted on the calibration half; agreement with `reference` on the held-out half (and at 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    ref = np.asarray(reference_refused, dtype=bool)
    fit = calibration_half(prompts)
    threshold = best_threshold(scores[fit], ref[fit])
    held = ~fit
    held_agreement = pair_agreement(ref[held].astype(np.int64), (scores[held] > threshold).astype(np.int64), 2)
    zero_agreement = pair_agreement(ref[held].astype(np.int64), (scores[held] > 0).astype(np.int64), 2)
    return {
        "threshold": threshold,
        "fitted_against": reference,
        "n_fit": int(fit.sum()),
        "n_held_out": int(held.sum()),
        "held_out": held_agreement,
        "held_out_at_zero": {"agreement": zero_agreement["agreement"], "kappa": zero_agreement["kappa"]},
    }
