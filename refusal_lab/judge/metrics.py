"""Agreement between judges and accuracy against human labels: confusion matrices, Cohen's kappa, P/R/F1.

Pure functions on int codes; reads and writes nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refusal_lab.judge.labels import VERDICTS, binary_view


def confusion(a: np.ndarray, b: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 [n_classes, n_classes]: rows a's class, columns b's class."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"confusion: needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    return np.bincount(a * n_classes + b, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def kappa(matrix: np.ndarray) -> float | None:
    """Cohen's kappa of a confusion matrix; None when undefined.

    Undefined: no items, or either judge gives a single class. (With one judge constant the formula
    gives 0 whatever the other does, which says nothing about agreement, so it is reported as null.)
    """
    m = np.asarray(matrix, dtype=np.float64)
    n = m.sum()
    if n == 0:
        return None
    rows, cols = m.sum(1) / n, m.sum(0) / n
    if (rows > 0).sum() < 2 or (cols > 0).sum() < 2:
        return None
    observed = np.trace(m) / n
    expected = float(rows @ cols)
    return float((observed - expected) / (1 - expected))


def pair_agreement(a: np.ndarray, b: np.ndarray, n_classes: int) -> dict[str, Any]:
    """n, agreement (NaN-free: None for no items), kappa and the confusion matrix of two code arrays."""
    m = confusion(a, b, n_classes)
    n = int(m.sum())
    return {
        "n": n,
        "agreement": float(np.trace(m) / n) if n else None,
        "kappa": kappa(m),
        "confusion": m.tolist(),
    }


def judges_agreement(
    codes: dict[str, np.ndarray],
    three_class: dict[str, bool],
    labels: list[str],
    partial_is_refused: bool = True,
) -> dict[str, Any]:
    """summary.json["judges"]["pairs"]: every pair of judges, overall and by prompt label.

    `codes` are three-class codes (labels.CODES); a binary judge (three_class False) only uses 0 and 1.
    Binary: 2x2 on the binary view (rows/columns: answered, refused). Three-class: 3x3 in VERDICTS order,
    only where both judges give three classes.
    """
    names = list(codes)
    label_arr = np.asarray(labels)
    pairs: dict[str, Any] = {}
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            entry: dict[str, Any] = {}
            both3 = three_class[first] and three_class[second]
            for scope, mask in [("overall", np.ones(len(label_arr), dtype=bool))] + [
                (f"label:{lab}", label_arr == lab) for lab in sorted(set(labels))
            ]:
                a, b = codes[first][mask], codes[second][mask]
                part = {
                    "binary": pair_agreement(
                        binary_view(a, partial_is_refused).astype(np.int64),
                        binary_view(b, partial_is_refused).astype(np.int64),
                        2,
                    )
                }
                if both3:
                    part["three_class"] = pair_agreement(a, b, 3)
                if scope == "overall":
                    entry.update(part)
                else:
                    entry.setdefault("by_label", {})[scope.split(":", 1)[1]] = part
            pairs[f"{first}~{second}"] = entry
    return {
        "binary_axes": ["answered", "refused"],
        "three_class_axes": [v.value for v in VERDICTS],
        "partial_is_refused": partial_is_refused,
        "pairs": pairs,
    }


def classification_report(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 (None where undefined) and the 3x3 confusion matrix."""
    m = confusion(truth, predicted, 3)
    n = int(m.sum())
    per_class = {}
    for k, verdict in enumerate(VERDICTS):
        tp, predicted_k, actual_k = m[k, k], m[:, k].sum(), m[k, :].sum()
        precision = float(tp / predicted_k) if predicted_k else None
        recall = float(tp / actual_k) if actual_k else None
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall > 0
            else (0.0 if precision is not None and recall is not None else None)
        )
        per_class[verdict.value] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual_k)}
    truth_bin, pred_bin = binary_view(truth), binary_view(predicted)
    return {
        "n": n,
        "accuracy": float(np.trace(m) / n) if n else None,
        "binary_accuracy": float(np.mean(truth_bin == pred_bin)) if n else None,
        "kappa": kappa(m),
        "per_class": per_class,
        "confusion": m.tolist(),
        "axes": [v.value for v in VERDICTS],
    }
