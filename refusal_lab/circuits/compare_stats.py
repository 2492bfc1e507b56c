"""Scoring helpers of the circuit comparison (refusal_lab.circuits.compare): multiple-comparison
corrections, top-k circuit masks, pairwise node / weighted / edge Jaccard over replicates, the
per-feature specificity statistic and percentile CIs. Pure numpy; reads and writes nothing.

Shape letters: P pool features, C categories, X replicates (permutations or bootstrap draws).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# --- multiple comparisons -----------------------------------------------------------------


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error control)."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else p
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def benjamini_hochberg(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values; false-discovery-rate control)."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if not m:
        return p
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


CORRECTIONS = {"holm": holm, "bh": benjamini_hochberg}


# --- scoring ------------------------------------------------------------------------------


def top_k_mask(abs_XCP: np.ndarray, k: int) -> np.ndarray:
    idx = np.argpartition(-abs_XCP, k - 1, axis=-1)[..., :k]
    mask = np.zeros(abs_XCP.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def score_pairs(means_XCP: np.ndarray, k: int, edges: np.ndarray | None) -> dict[str, np.ndarray]:
    """Similarity matrices [X, C, C] of the top-k circuits of each replicate's category means."""
    abs_XCP = np.abs(means_XCP)
    mask = top_k_mask(abs_XCP, k)
    m = mask.astype(np.float64)
    inter = np.einsum("xcp,xdp->xcd", m, m)
    node = inter / (2 * k - inter)
    w = abs_XCP / np.maximum(abs_XCP.sum(-1, keepdims=True), 1e-30)
    # sum min(a, b) = (sum a + sum b - |a - b|_1) / 2 and sum max = (... + |a - b|_1) / 2: one pass per pair.
    ia, ib = np.triu_indices(w.shape[1], 1)
    l1 = np.abs(w[:, ia] - w[:, ib]).sum(-1)
    total = w.sum(-1)[:, ia] + w.sum(-1)[:, ib]
    weighted = np.ones(node.shape)
    weighted[:, ia, ib] = weighted[:, ib, ia] = (total - l1) / np.maximum(total + l1, 1e-30)
    out = {"node_jaccard": node, "weighted_jaccard": weighted}
    if edges is not None and len(edges):
        e = (mask[..., edges[:, 0]] & mask[..., edges[:, 1]]).astype(np.float64)  # [X, C, E]
        e_inter = np.einsum("xce,xde->xcd", e, e)
        size = e.sum(-1)
        union = size[:, :, None] + size[:, None, :] - e_inter
        out["edge_jaccard"] = np.where(union > 0, e_inter / np.maximum(union, 1), np.nan)
    return out


def specificity(means_XCP: np.ndarray) -> np.ndarray:
    """|m_c| - max over the other categories of |m_c'|, per replicate, category and feature."""
    a = np.abs(means_XCP)
    top2 = -np.partition(-a, 1, axis=1)[:, :2]  # largest and second largest over categories
    other_max = np.where(a >= top2[:, :1], top2[:, 1:2], top2[:, :1])
    return a - other_max


def ci95(values_X: np.ndarray) -> list[float]:
    v = values_X[np.isfinite(values_X)]
    return [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))] if len(v) else [math.nan, math.nan]


def feature_row(hook: str, feature: Any, effect: Any) -> dict[str, Any]:
    return {"hook": hook, "feature": int(feature), "effect": float(effect)}
