"""All held-out validation of one discovery set's circuit in one call (issue 9 item 7), for circuits.stage.

Reads and writes nothing; returns the set's validation.json content. Composes
refusal_lab.circuits.validate (faithfulness, completeness, random sets on the metric),
refusal_lab.circuits.behaviour (generation: refusal-rate drops, KL on harmless prompts, and the
difference-in-means direction's own ablation as one more stacked condition) and
refusal_lab.circuits.direction (cosines of the direction with the circuit's decoder rows). The
random sets are drawn once, from the features active on the held-out target prompts, and used
for both the metric and the generations.

Cost (issue 9 item 13): one stacked forward per batch for the faithfulness curve, the empty
circuit and the circuit ablated; one stacked generation per batch for unedited / ablated /
steered / direction / each random set (whose first-token logits also give the metric's
random-set comparison for a last-position metric); one stacked forward per harmless batch for
KL. Cost grows with prompts x conditions, so the stage caps the held-out prompts it validates on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.circuits.baseline import Baseline
from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.behaviour import Judge, behaviour_validation
from refusal_lab.circuits.direction import decoder_cosines
from refusal_lab.circuits.validate import (
    KeepFn,
    MetricFn,
    Ranked,
    active_features,
    json_nodes,
    metric_validation,
    nodes_of,
    random_node_sets,
)
from refusal_lab.sae.model import Sae

log = logging.getLogger(__name__)

ABLATION_SUMMARY_KEYS = (
    "refusal_rate_drop",
    "refusal_rate_drop_by_label",
    "random_refusal_rate_drop_median",
    "percentile",
    "p_value",
    "n_random",
    "kl_harmless",
)
"""The `ablation` entry of summary.json (issue 9 item 10); validation.json keeps everything."""


def validate_circuit(
    model: PreTrainedModel,
    saes: Mapping[str, Sae],
    baseline: Baseline,
    ranked: Ranked,
    metric_fn: MetricFn,
    metric_batches: Sequence[PromptBatch],
    *,
    size: int | None = None,
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    n_random: int = 10,
    seed: int = 0,
    generation: bool = True,
    prompt_batches: Sequence[PromptBatch] | None = None,
    labels: Sequence[str] = (),
    is_target: Sequence[bool] | None = None,
    harmless_batches: Sequence[PromptBatch] = (),
    judge: Judge | None = None,
    judge_name: str = "keyword",
    tokenizer: PreTrainedTokenizerBase | None = None,
    steer_alpha: float = -4.0,
    max_new_tokens: int = 8,
    directions: Mapping[str, torch.Tensor] | None = None,
    max_rows: int = 256,
    logits_to_keep: KeepFn | None = None,
) -> dict[str, Any]:
    """Validation of the circuit (the first `size` nodes of `ranked`, default all) on held-out prompts.

    metric_batches: the held-out target prompts as the metric wants them (with responses for
    response_score); `ranked` may run past the circuit to extend the faithfulness curve. With
    `generation`, prompt_batches (prompt-only batches of the prompts to generate for, default
    metric_batches; labels / is_target in their order), harmless_batches, judge and tokenizer
    are needed; directions (hook -> r) add the difference-in-means direction's ablation.
    logits_to_keep (batch -> int) trims the LM head to the positions the metric reads; when it
    is 1 for every batch and the metric's prompts are the generation's target prompts, the
    metric's random-set comparison is read from the generations' first-token logits instead of
    a separate pass.
    """
    if not ranked:
        return {"status": "empty", "reason": "the circuit has no SAE-feature nodes"}
    t0 = time.perf_counter()
    size = len(ranked) if size is None else min(size, len(ranked))
    circuit = nodes_of(ranked, size)
    active = active_features(model, saes, metric_batches)
    random_sets, pool = random_node_sets(circuit, active, n_random, seed)
    if prompt_batches is None:
        prompt_batches = metric_batches
    random_from_generation = (
        generation
        and logits_to_keep is not None
        and all(logits_to_keep(b) == 1 for b in [*metric_batches, *prompt_batches])
        and same_prompts(metric_batches, prompt_batches, is_target)
    )
    metric = metric_validation(
        model, saes, baseline, metric_batches, ranked, size, metric_fn, sizes=sizes,
        random_sets=[] if random_from_generation else random_sets, max_rows=max_rows, logits_to_keep=logits_to_keep,
    )  # fmt: skip
    seconds = {"metric": time.perf_counter() - t0}
    out: dict[str, Any] = {
        "faithfulness": metric["faithfulness"],
        "faithfulness_curve": metric["faithfulness_curve"],
        "completeness": metric["completeness"],
        "error_nodes": metric["error_nodes"],
        "metric": metric,
        "ablation": None,
        "direction": None,
    }
    if generation:
        if judge is None or tokenizer is None or not harmless_batches:
            raise ValueError("validate_circuit: generation needs harmless_batches, judge and tokenizer")
        t1 = time.perf_counter()
        behaviour = behaviour_validation(
            model, saes, baseline, prompt_batches, labels, harmless_batches, circuit, random_sets, judge, tokenizer,
            is_target=is_target, steer_alpha=steer_alpha, max_new_tokens=max_new_tokens, max_rows=max_rows,
            judge_name=judge_name, directions=directions, metric_fn=metric_fn if random_from_generation else None,
        )  # fmt: skip
        direction = behaviour.pop("direction", None)
        metric_random = behaviour.pop("metric_random", None)
        if metric_random is not None:
            metric["random"] = {**metric_random, "source": "first-token logits of the ablation generations"}
            metric["random_sets"] = [json_nodes(s) for s in random_sets]
        out["ablation"] = behaviour
        if direction is not None and directions:
            out["direction"] = {**direction, "cosines": decoder_cosines(directions, saes, list(ranked)[:size])}
        seconds["behaviour"] = time.perf_counter() - t1
    if metric["random"] is not None:
        metric["random"]["pool"] = pool
        metric["random"]["seed"] = seed
        metric["random"]["per_hook_counts"] = {h: int(i.numel()) for h, i in circuit.items()}
    out["seconds"] = seconds
    log.info(
        "circuits validation: faithfulness %s, completeness %s, refusal-rate drop %s (random median %s) in %.1f s",
        _fmt(out["faithfulness"]),
        _fmt(out["completeness"]),
        _fmt(out["ablation"]["refusal_rate_drop"] if out["ablation"] else None),
        _fmt(out["ablation"]["random_refusal_rate_drop_median"] if out["ablation"] else None),
        sum(seconds.values()),
    )
    return out


def same_prompts(
    metric_batches: Sequence[PromptBatch], prompt_batches: Sequence[PromptBatch], is_target: Sequence[bool] | None
) -> bool:
    """Whether the metric's prompts are exactly the target prompts of the generation batches (as token ids)."""

    def ids(batches: Sequence[PromptBatch], keep: Sequence[bool] | None) -> list[tuple[int, ...]]:
        return sorted(
            tuple(b.prompt_ids(r)) for b in batches for r in range(b.size) if keep is None or keep[b.index[r]]
        )

    return ids(metric_batches, None) == ids(prompt_batches, is_target)


def ablation_summary(validation: Mapping[str, Any]) -> dict[str, Any] | None:
    """The summary.json `ablation` entry from a validate_circuit result (None without generation)."""
    ablation = validation.get("ablation")
    if not ablation:
        return None
    return {k: ablation.get(k) for k in ABLATION_SUMMARY_KEYS}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
