"""Turn a committed activation store into the `collect` entry of summary.json.

Reads: the store's sample table, manifest and attrs (the run config that collected it). Writes nothing
(pipeline writes summary.json).
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


def _free_judges(store: ActivationStore, samples: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """Agreement of the judges every store can afford: the store's rule column, keyword, score at 0."""
    from refusal_lab.judge.core import keyword_codes, score_codes
    from refusal_lab.judge.labels import CODES, Verdict
    from refusal_lab.judge.metrics import judges_agreement

    prefixes = list(store.attrs.get("config", {}).get("model", {}).get("refusal_prefixes", []))
    refused = np.asarray(samples["refused"], dtype=bool)
    codes = {
        "rule": np.where(refused, CODES[Verdict.full_refusal], CODES[Verdict.full_compliance]).astype(np.int8),
        "score": score_codes(np.asarray(samples["refusal_score"], dtype=np.float64), 0.0),
    }
    if prefixes:
        codes["keyword"] = keyword_codes([str(r) for r in samples["response"]], prefixes)
    return judges_agreement(codes, dict.fromkeys(codes, False), labels)


def collect_summary(store_path: Path) -> dict[str, Any]:
    """Counts, hook points and refusal rates (the rule judge's binary view; first-token score beside it)."""
    store = ActivationStore.open(store_path)
    samples = store.samples()
    refused = np.asarray(samples["refused"], dtype=bool)
    score = np.asarray(samples["refusal_score"], dtype=np.float64)
    labels = [str(x) for x in samples["label"]]
    categories = [str(x) for x in samples["category"]]
    by_label = _rates(labels, refused)
    by_category = _rates(categories, refused)
    judges = _free_judges(store, samples, labels)
    return {
        "store": str(store_path),
        "fingerprint": store.fingerprint,
        "samples": store.n_samples,
        "tokens": store.n_tokens,
        "hook_points": store.hook_points,
        "refusal_rate": {
            "judge": "rule judge, binary view (refusal_lab.judge.rules; judge.partial_is_refused)",
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
            # The rule judge's binary view vs score > 0 (the full three-class report: the judge stage).
            "judge_agreement": judges["pairs"]["rule~score"]["binary"]["agreement"],
        },
        "judges": judges,
        "overflow_counts": store.overflow_counts(),
    }
