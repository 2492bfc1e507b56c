"""The edit's evaluation table: every condition on the same held-out prompts, generated together.

Reads and writes nothing; returns the summary.json `edit.table` entry. Conditions (row blocks of
one stacked generation per batch, refusal_lab.edit.intervene.stacked):

    unedited | edit (weights: the writer projection, exactly the checkpoint) | SAE clamp |
    diff-in-means direction ablation (refusal_lab.circuits.direction) | n random same-size sets, edited as the edit

Per condition: refusal rate (keyword judge, the function collect uses) on the held-out refused
safe prompts, toxic prompts and harmless prompts, the drop from unedited on each, and the mean
KL(P_unedited || P_condition) of the next-token distributions over the harmless prompts' positions.
The random sets give median and 5th / 95th percentiles of each column.

Shape letters: R conditions, N prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.behaviour import Judge, generate_under, kl_under
from refusal_lab.edit.intervene import Condition, stacked

GROUPS = ("refused_safe", "toxic", "harmless")
"""Held-out prompt groups: safe prompts the unedited model refused (as the store judged), toxic, harmless."""


@dataclass
class Prompts:
    batches: list[PromptBatch]
    """Prompt-only batches of every group's prompts."""
    groups: list[str]
    """Group of each prompt (PromptBatch.index order)."""
    harmless: list[PromptBatch]
    """The harmless prompts again, for KL."""


def _f(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Prompts,
    conditions: Sequence[Condition],
    judge: Judge,
    n_named: int,
    max_new_tokens: int,
    max_rows: int,
) -> dict[str, Any]:
    """Rows of the table: the first `n_named` conditions by name, the rest summarised as `random`."""
    gen = generate_under(model, prompts.batches, len(conditions), stacked(model, conditions), tokenizer,
                         max_new_tokens, max_rows)  # fmt: skip
    refused = np.array([np.asarray(judge(r), dtype=bool) for r in gen.responses])  # [R, N]
    groups = np.asarray(prompts.groups)
    rates = {g: refused[:, groups == g].mean(1) if (groups == g).any() else np.full(len(conditions), np.nan)
             for g in GROUPS}  # fmt: skip
    kl = np.concatenate([[0.0], kl_under(model, prompts.harmless, len(conditions) - 1,
                                         stacked(model, conditions[1:]), max_rows)])  # fmt: skip

    def row(r: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for g in GROUPS:
            out[f"refusal_{g}"] = _f(rates[g][r])
            out[f"drop_{g}"] = _f(rates[g][0] - rates[g][r])
        out["kl_harmless"] = _f(kl[r])
        return out

    table = {conditions[r].name: row(r) for r in range(n_named)}
    randoms = [row(r) for r in range(n_named, len(conditions))]
    if randoms:
        summary: dict[str, Any] = {"n": len(randoms)}
        for key in randoms[0]:
            values = np.array([x[key] for x in randoms if x[key] is not None], dtype=float)
            summary[key] = {
                "median": _f(np.median(values)) if len(values) else None,
                "p5": _f(np.percentile(values, 5)) if len(values) else None,
                "p95": _f(np.percentile(values, 95)) if len(values) else None,
            }
        table["random"] = summary
    examples = []
    for g in GROUPS:
        for i in np.flatnonzero(groups == g)[:2].tolist():
            examples.append({"group": g, **{conditions[r].name: gen.responses[r][i] for r in range(n_named)}})
    return {"table": table, "n_prompts": {g: int((groups == g).sum()) for g in GROUPS}, "examples": examples}
