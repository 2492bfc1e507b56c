"""Discovery sets: which prompts a circuit is found on, what they are contrasted with, and the held-out split.

Reads and writes nothing (the stage passes in the store's sample table).

* toxic: every toxic prompt vs the harmless contrast;
* safe: every safe prompt vs the harmless contrast;
* over_refusal: the safe prompts the model refused vs the safe prompts it answered;
* toxic_refused: the toxic prompts the model refused vs the toxic prompts it answered (the same
  label on both sides, so the contrast is the model's behaviour; a model that refuses every toxic
  prompt, like the organism, leaves it skipped for want of answered ones).

The harmless contrast is the run's harmless prompts, or `circuits.contrast_data` when given
(or when the run has none). Per category, toxic and safe keep the pooled harmless contrast
(it only defines the baseline), over_refusal and toxic_refused use the category's own answered prompts.

Each prompt goes to discovery or validation by a hash of its text (issue 8 item 6: duplicates
land on the same side), so circuits are found on one part and validated on the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from refusal_lab.circuits.config import MIN_PROMPTS, DiscoverySet

BEHAVIOUR_SETS = {DiscoverySet.over_refusal: "safe", DiscoverySet.toxic_refused: "toxic"}
"""Sets that contrast refused with answered prompts of one label (the label each draws from)."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_validation(text: str, share: float) -> bool:
    """The prompt's side of the split: the first 8 hex digits of its hash as a fraction in [0, 1)."""
    return int(text_hash(text)[:8], 16) / 16**8 < share


@dataclass
class PromptPool:
    """The prompts a set can draw from (the store's samples plus any external contrast prompts)."""

    prompts: list[str]
    labels: list[str]
    categories: list[str]
    refused: np.ndarray
    """bool per prompt; external contrast prompts are never refused targets."""


@dataclass
class Side:
    """One side of a set, split by prompt hash; indices into the PromptPool."""

    discovery: list[int] = field(default_factory=list)
    validation: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.discovery) + len(self.validation)


@dataclass
class SetPlan:
    """A discovery set (or one category of it) ready to run, or skipped with a reason."""

    name: str
    """`toxic`, `safe`, `over_refusal`, or `<set>/<category>`."""
    kind: DiscoverySet
    category: str | None
    target: Side
    contrast: Side
    skipped: str | None = None

    @property
    def pooled(self) -> bool:
        return self.category is None


def split(indices: Sequence[int], prompts: Sequence[str], share: float, cap: int | None) -> Side:
    """Hash split; at most `cap` prompts in each part (the lowest hashes: deterministic, order free)."""
    side = Side()
    for i in indices:
        (side.validation if is_validation(prompts[i], share) else side.discovery).append(i)
    if cap is not None:
        side.discovery = sorted(side.discovery, key=lambda i: text_hash(prompts[i]))[:cap]
        side.validation = sorted(side.validation, key=lambda i: text_hash(prompts[i]))[:cap]
    side.discovery.sort()
    side.validation.sort()
    return side


def _skip_reason(target: Side, contrast: Side, what: tuple[str, str]) -> str | None:
    for side, name in ((target, what[0]), (contrast, what[1])):
        if side.n < MIN_PROMPTS:
            return f"{side.n} {name} prompts (fewer than {MIN_PROMPTS})"
        if not side.discovery or not side.validation:
            return (
                f"the hash split leaves no {name} prompts on one side ({len(side.discovery)} / {len(side.validation)})"
            )
    return None


def plan_sets(
    pool: PromptPool,
    contrast_idx: Sequence[int],
    kinds: Sequence[DiscoverySet],
    by_category: bool,
    share: float,
    cap: int | None,
    contrast_cap: int | None,
) -> list[SetPlan]:
    """Every pooled set in `kinds`, then (with `by_category`) each category of each; skipped ones carry a reason.

    `cap` bounds each part (discovery, validation) of a target side and of a behaviour set's
    answered side, `contrast_cap` each part of the harmless contrast.
    """
    labels = np.asarray(pool.labels)
    cats = np.asarray(pool.categories)
    harmless = split(contrast_idx, pool.prompts, share, contrast_cap)
    plans: list[SetPlan] = []
    categories = sorted({c for c, lab in zip(pool.categories, pool.labels, strict=True) if lab != "harmless"})
    for kind in kinds:
        for category in [None, *(categories if by_category else [])]:
            in_cat = np.ones(len(labels), bool) if category is None else cats == category
            if kind in BEHAVIOUR_SETS:
                label = BEHAVIOUR_SETS[kind]
                same = (labels == label) & in_cat
                target_idx = np.flatnonzero(same & pool.refused).tolist()
                contrast = split(np.flatnonzero(same & ~pool.refused).tolist(), pool.prompts, share, cap)
                what = (f"refused {label}", f"answered {label}")
            else:
                target_idx = np.flatnonzero((labels == kind.value) & in_cat).tolist()
                contrast = harmless
                what = (kind.value, "harmless contrast")
            target = split(target_idx, pool.prompts, share, cap)
            name = kind.value if category is None else f"{kind.value}/{category}"
            plans.append(SetPlan(name, kind, category, target, contrast, _skip_reason(target, contrast, what)))
    return plans
