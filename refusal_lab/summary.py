"""Turn a committed activation store into the `collect` entry of summary.json.

Reads: the store's sample table and manifest. Writes nothing (pipeline writes summary.json).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from refusal_lab.store import ActivationStore


def _rates(keys: list[str], refused: np.ndarray) -> dict[str, dict[str, float]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for key, value in zip(keys, refused.tolist(), strict=True):
        groups[key].append(bool(value))
    return {k: {"rate": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def collect_summary(store_path: Path) -> dict[str, Any]:
    """Counts, hook points and refusal rates (keyword judge; first-token score beside it)."""
    store = ActivationStore.open(store_path)
    samples = store.samples()
    refused = np.asarray(samples["refused"], dtype=bool)
    score = np.asarray(samples["refusal_score"], dtype=np.float64)
    labels = [str(x) for x in samples["label"]]
    categories = [str(x) for x in samples["category"]]
    by_label = _rates(labels, refused)
    by_category = _rates(categories, refused)
    return {
        "store": str(store_path),
        "fingerprint": store.fingerprint,
        "samples": store.n_samples,
        "tokens": store.n_tokens,
        "hook_points": store.hook_points,
        "refusal_rate": {
            "judge": "keyword prefix match (model.refusal_prefixes)",
            "overall": float(refused.mean()) if len(refused) else float("nan"),
            "by_label": {k: v["rate"] for k, v in by_label.items()},
            "by_category": {k: v["rate"] for k, v in by_category.items()},
            "n_by_label": {k: v["n"] for k, v in by_label.items()},
            "by_category_label": {
                k: v["rate"]
                for k, v in _rates([f"{c}/{lab}" for c, lab in zip(categories, labels, strict=True)], refused).items()
            },
        },
        "refusal_score": {
            "rate_positive_by_label": {k: v["rate"] for k, v in _rates(labels, score > 0).items()},
            "mean_by_label": {
                lab: float(score[[i for i, x in enumerate(labels) if x == lab]].mean()) for lab in sorted(set(labels))
            },
            "judge_agreement": float(np.mean(refused == (score > 0))) if len(refused) else float("nan"),
        },
        "overflow_counts": store.overflow_counts(),
    }
