"""Circuit size by a faithfulness target (issue 16 item 1): the fewest top-ranked features that recover it.

Reads and writes nothing. Marks et al. pick the node threshold so that the circuit recovers most
of the metric; here the nodes are already ranked by |attribution|, so the size is searched along
that ranking, on the set's *discovery* prompts (the held-out half stays for validation):

    faithfulness(n) = (m(top n kept) - m(empty)) / (m(M) - m(empty))      (refusal_lab.circuits.validate)

Doubling first (1, 2, 4, ... and the whole ranking, all in one stacked pass), then bisection
between the last size below the target and the first one at or above it (one pass per step).
Faithfulness need not be monotone in n; the search returns a size that meets the target whose
bisection neighbour below does not. A ranking that never reaches the target keeps the size with
the best faithfulness seen, and says so (`met: false`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_lab.circuits.ablation import CLEAN, Condition, Mode
from refusal_lab.circuits.baseline import Baseline
from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.validate import KeepFn, MetricFn, Ranked, condition_metrics, nodes_of
from refusal_lab.sae.model import Sae

FaithfulnessFn = Callable[[Sequence[int]], dict[int, float | None]]
"""sizes -> faithfulness of the top-n nodes for each n (None where the metric gap is zero)."""


@dataclass
class SizeSearch:
    """Where the search stopped, and every size it measured."""

    target: float
    size: int
    faithfulness: float | None
    met: bool
    n_candidates: int
    tried: dict[int, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": "faithfulness_target",
            "target": self.target,
            "n_nodes": self.size,
            "met": self.met,
            "faithfulness_discovery": self.faithfulness,
            "n_candidates": self.n_candidates,
            "searched": {str(n): f for n, f in sorted(self.tried.items())},
            "reason": None
            if self.met
            else f"the top {self.n_candidates} ranked features reach faithfulness {_fmt(self.faithfulness)} at most "
            f"(size {self.size} kept, the best seen) < target {self.target}",
        }


def _score(f: float | None) -> float:
    return float("-inf") if f is None else f


def search_size(faithfulness_of: FaithfulnessFn, n_candidates: int, target: float) -> SizeSearch:
    """The fewest of `n_candidates` ranked nodes whose faithfulness reaches `target` (doubling, then bisection)."""
    if n_candidates == 0:
        return SizeSearch(target, 0, None, False, 0)
    doubling = sorted({min(2**k, n_candidates) for k in range(n_candidates.bit_length() + 1)})
    tried = dict(faithfulness_of(doubling))
    hi = next((n for n in doubling if _score(tried[n]) >= target), None)
    if hi is None:
        best = max(doubling, key=lambda n: (_score(tried[n]), -n))
        return SizeSearch(target, best, tried[best], False, n_candidates, tried)
    lo = max((n for n in doubling if n < hi), default=0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried.update(faithfulness_of([mid]))
        if _score(tried[mid]) >= target:
            hi = mid
        else:
            lo = mid
    return SizeSearch(target, hi, tried[hi], True, n_candidates, tried)


def model_faithfulness(
    model: Any,
    saes: Mapping[str, Sae],
    baseline: Baseline,
    batches: Sequence[PromptBatch],
    ranked: Ranked,
    metric_fn: MetricFn,
    max_rows: int = 256,
    logits_to_keep: KeepFn | None = None,
) -> FaithfulnessFn:
    """faithfulness_of for search_size on the spliced model; m(M) and m(empty) are measured once."""
    ends = condition_metrics(
        model, saes, baseline, batches, [CLEAN, Condition({}, Mode.keep, ablate_errors=True)], metric_fn,
        max_rows, logits_to_keep,
    ).mean(axis=1)  # fmt: skip
    m_full, m_empty = float(ends[0]), float(ends[1])
    gap = m_full - m_empty

    def faithfulness_of(sizes: Sequence[int]) -> dict[int, float | None]:
        conditions = [Condition(nodes_of(ranked, n), Mode.keep) for n in sizes]
        m = condition_metrics(model, saes, baseline, batches, conditions, metric_fn, max_rows, logits_to_keep)
        return {
            n: None if abs(gap) < 1e-12 else (float(v) - m_empty) / gap
            for n, v in zip(sizes, m.mean(axis=1), strict=True)
        }

    return faithfulness_of


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
