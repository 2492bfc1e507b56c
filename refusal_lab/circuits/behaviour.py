"""Behavioural validation: does ablating (or steering) a circuit change what the model *does*?

Reads and writes nothing; returns JSON-ready dicts.

* Refusal rate: greedy generation (refusal_lab.generation, `max_new_tokens` tokens, default 8:
  the judgement is made in the first tokens) of the held-out target prompts, unedited, with the
  circuit's features ablated to the baseline, with them steered (alpha along their unit decoder
  directions), and with each random set ablated; each response judged by the caller's judge
  (the function collect uses, so the two agree). Drop = rate unedited - rate edited, overall on
  the target prompts and by label on every prompt given.
* KL: mean over real positions of KL(P_model || P_edited) of the next-token distributions on
  harmless prompts (the ablation should not disturb ordinary answering).

Conditions of one batch are generated together (the batch repeated per condition), never one
generation per set. The difference-in-means direction's ablation (refusal_lab.circuits.direction)
runs as one more stacked condition, through `projection_interventions` combined with the splice.

Shape letters: R conditions, B batch, T positions, V vocabulary, M new tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.circuits.ablation import CLEAN, Condition, Mode, repeat_batch, stacked_edit
from refusal_lab.circuits.baseline import Baseline, BoundBaseline
from refusal_lab.circuits.batches import PromptBatch, pad_id_of, select_rows
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.circuits.validate import MetricFn, chunks, rank_against
from refusal_lab.generation import generate_greedy
from refusal_lab.hooks import HookFn, hooks_registered
from refusal_lab.layers import HookPoint
from refusal_lab.progress import progress
from refusal_lab.sae.model import Sae

log = logging.getLogger(__name__)

Judge = Callable[[Sequence[str]], Sequence[bool] | np.ndarray]
"""responses -> refused (one bool each); wrap the judge collect uses."""
Interventions = Callable[[PromptBatch, range], AbstractContextManager]
"""(un-repeated batch, condition range) -> context in which `repeat_batch(batch, len(range))` runs those conditions."""


def feature_interventions(
    model: nn.Module, saes: Mapping[str, Sae], baseline: Baseline | None, conditions: Sequence[Condition]
) -> Interventions:
    """Feature-edit conditions on the spliced model."""

    def context(batch: PromptBatch, rng: range) -> AbstractContextManager:
        bound = BoundBaseline(baseline, batch) if baseline is not None else None
        return spliced(model, saes, edit=stacked_edit([conditions[i] for i in rng], bound, saes), record=False)

    return context


def generation_eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus the model's generation_config EOS ids (as collect stops on)."""
    eos = tokenizer.eos_token_id
    assert isinstance(eos, int), "a chat model's tokenizer has an EOS token"
    ids = {eos}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if extra is not None:
        ids |= {int(e) for e in ([extra] if isinstance(extra, int) else extra)}
    return sorted(ids)


@dataclass
class Generated:
    """Responses of every condition, and optionally the metric from the prefill's last-position logits."""

    responses: list[list[str]]
    """[R][n_prompts], prompts in the builder's order (PromptBatch.index)."""
    metric: np.ndarray | None = None
    """[R, n_prompts] metric_fn on the first-token logits (only for metrics that read the last prompt position)."""


def generate_under(
    model: PreTrainedModel,
    batches: Sequence[PromptBatch],
    n_conditions: int,
    interventions: Interventions,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int = 8,
    max_rows: int = 256,
    eos_ids: Sequence[int] | None = None,
    metric_fn: MetricFn | None = None,
    n_prompts: int | None = None,
) -> Generated:
    """Greedy responses per condition, decoded as collect decodes them.

    With `metric_fn`, the metric is computed from the prefill's logits at the last prompt position
    (passed as [B, 1, V]): exact for a metric that reads only that position (first_token_score or
    logit_diff on prompt-only batches), so an ablation's metric comes with its generation for free.
    `n_prompts` sizes the output when the batches hold only some of the prompts (rows by PromptBatch.index).
    """
    eos = list(eos_ids) if eos_ids is not None else generation_eos_ids(model, tokenizer)
    pad = pad_id_of(tokenizer)
    if n_prompts is None:
        n_prompts = sum(b.size for b in batches)
    out = [[""] * n_prompts for _ in range(n_conditions)]
    metric = np.full((n_conditions, n_prompts), np.nan) if metric_fn is not None else None
    for batch in progress(batches, desc=f"circuits: ablation generations ({n_conditions} conditions)"):
        for rng in chunks(n_conditions, batch.size, max_rows):
            stacked = repeat_batch(batch, len(rng))
            with interventions(batch, rng):
                gen = generate_greedy(model, stacked.input_ids, stacked.attention_mask, max_new_tokens, eos, pad)
            tokens, n_valid = gen.tokens_BM.cpu(), gen.valid_BM.sum(-1).cpu().tolist()
            for row in range(stacked.size):
                r, b = rng[row // batch.size], row % batch.size
                text = tokenizer.decode(tokens[row, : n_valid[row]].tolist(), skip_special_tokens=True)
                out[r][batch.index[b]] = str(text)
            if metric is not None and metric_fn is not None:
                values = metric_fn(gen.first_logits_BV[:, None, :], stacked).double().cpu().numpy()
                metric[rng.start : rng.stop, batch.index] = values.reshape(len(rng), batch.size)
    return Generated(out, metric)


@torch.no_grad()
def kl_under(
    model: nn.Module,
    batches: Sequence[PromptBatch],
    n_conditions: int,
    interventions: Interventions,
    max_rows: int = 256,
) -> np.ndarray:
    """[R] mean over real positions of KL(P_model || P_condition) of next-token distributions."""
    sums = np.zeros(n_conditions)
    count = 0
    for batch in batches:
        logp = torch.log_softmax(forward_batch(model, batch).float(), dim=-1)
        real = batch.attention_mask.bool().to(logp.device)
        count += int(real.sum())
        for rng in chunks(n_conditions, batch.size, max_rows):
            with interventions(batch, rng):
                logits = forward_batch(model, repeat_batch(batch, len(rng)))
            logq = torch.log_softmax(logits.float(), dim=-1).view(len(rng), *logp.shape)
            kl_RBT = (logp.exp()[None] * (logp[None] - logq)).sum(-1)
            sums[rng.start : rng.stop] += (kl_RBT * real[None]).sum((1, 2)).double().cpu().numpy()
    return sums / max(count, 1)


def _rates(refused: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[R] refusal rate over the prompts `rows` (NaN when there are none)."""
    return refused[:, rows].mean(axis=1) if rows.any() else np.full(refused.shape[0], np.nan)


def _f(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def projection_interventions(
    model: nn.Module, directions: Mapping[str, torch.Tensor], project: Sequence[bool]
) -> Interventions:
    """Condition r projects every hook's direction r_h out of its activation (x - r^ r^T x) when project[r]."""
    units = {h: d / d.norm().clamp_min(1e-12) for h, d in directions.items()}

    def context(batch: PromptBatch, rng: range) -> AbstractContextManager:
        on = torch.tensor([project[i] for i in rng])
        if not bool(on.any()):
            return nullcontext()
        fns: dict[HookPoint, HookFn] = {}
        for hook, unit in units.items():

            def fn(x_BTD: torch.Tensor, unit: torch.Tensor = unit) -> torch.Tensor:
                r = on.numel()
                u = unit.to(x_BTD.device, x_BTD.dtype)
                x = x_BTD.view(r, x_BTD.shape[0] // r, *x_BTD.shape[1:])
                coef = (x @ u)[..., None] * on.to(x.device, x.dtype)[:, None, None, None]
                return (x - coef * u).view_as(x_BTD)

            fns[HookPoint.from_name(hook)] = fn
        return hooks_registered(model, fns)

    return context


def combined(*parts: Interventions) -> Interventions:
    """All parts' hooks at once (the spliced SAE edit first, then e.g. a projection)."""

    def context(batch: PromptBatch, rng: range) -> AbstractContextManager:
        stack = ExitStack()
        for part in parts:
            stack.enter_context(part(batch, rng))
        return stack

    return context


def behaviour_validation(
    model: PreTrainedModel,
    saes: Mapping[str, Sae],
    baseline: Baseline,
    prompt_batches: Sequence[PromptBatch],
    labels: Sequence[str],
    harmless_batches: Sequence[PromptBatch],
    circuit: Mapping[str, torch.Tensor],
    random_sets: Sequence[Mapping[str, torch.Tensor]],
    judge: Judge,
    tokenizer: PreTrainedTokenizerBase,
    *,
    is_target: Sequence[bool] | None = None,
    steer_alpha: float = -4.0,
    max_new_tokens: int = 8,
    max_rows: int = 256,
    judge_name: str = "keyword",
    n_examples: int = 3,
    directions: Mapping[str, torch.Tensor] | None = None,
    metric_fn: MetricFn | None = None,
) -> dict:
    """Refusal-rate drops (circuit ablated, steered, random sets ablated) and KL on harmless prompts.

    `labels` and `is_target` follow the prompts' order in `prompt_batches` (PromptBatch.index);
    the headline drop is over the target prompts (all, by default), the by-label drops over all.
    With `directions`, the difference-in-means directions projected out run as one more
    condition (result under "direction"). With `metric_fn` (a metric of the last prompt position
    only), the metric's random-set comparison comes from the same generations ("metric_random").
    """
    n_prompts = sum(b.size for b in prompt_batches)
    if len(labels) != n_prompts:
        raise ValueError(f"behaviour_validation: {len(labels)} labels for {n_prompts} prompts")
    target = np.ones(n_prompts, dtype=bool) if is_target is None else np.asarray(is_target, dtype=bool)
    circuit = dict(circuit)
    conditions = [CLEAN, Condition(circuit, Mode.ablate), Condition(circuit, Mode.steer, steer_alpha)]
    if directions:
        conditions.append(CLEAN)  # the direction's row: no feature edit, the projection below
    first_random = len(conditions)
    conditions += [Condition(dict(s), Mode.ablate) for s in random_sets]
    project = [bool(directions) and r == 3 for r in range(len(conditions))]
    # Random sets only matter on the target prompts: when other prompts ride along (their label's
    # effect reported beside), the random sets generate for the targets alone.
    split_randoms = not bool(target.all()) and len(conditions) > first_random
    n_main = first_random if split_randoms else len(conditions)
    parts = [feature_interventions(model, saes, baseline, conditions[:n_main])]
    if directions:
        parts.append(projection_interventions(model, directions, project[:n_main]))
    gen = generate_under(
        model, prompt_batches, n_main, combined(*parts), tokenizer, max_new_tokens, max_rows, metric_fn=metric_fn
    )
    if split_randoms:
        target_batches = [
            select_rows(b, rows) for b in prompt_batches if (rows := [r for r, i in enumerate(b.index) if target[i]])
        ]
        rand = generate_under(
            model, target_batches, len(conditions) - n_main,
            feature_interventions(model, saes, baseline, conditions[n_main:]), tokenizer, max_new_tokens, max_rows,
            metric_fn=metric_fn, n_prompts=n_prompts,
        )  # fmt: skip
        gen.responses += rand.responses
        if gen.metric is not None and rand.metric is not None:
            gen.metric = np.concatenate([gen.metric, rand.metric])
    # Random-set rows hold "" for non-target prompts when split; only their target columns are read.
    refused = np.array([np.asarray(judge(r), dtype=bool) for r in gen.responses])  # [R, n_prompts]
    rate = _rates(refused, target)
    drops = rate[0] - rate
    by_label = {}
    for label in sorted(set(labels)):
        rows = np.array([lab == label for lab in labels])
        lab_rate = _rates(refused, rows)
        by_label[label] = {
            "n": int(rows.sum()),
            "refusal_rate": _f(lab_rate[0]),
            "ablated": _f(lab_rate[1]),
            "steered": _f(lab_rate[2]),
            "drop": _f(lab_rate[0] - lab_rate[1]),
            "steered_drop": _f(lab_rate[0] - lab_rate[2]),
            **({"direction_drop": _f(lab_rate[0] - lab_rate[3])} if directions else {}),
        }
    kl_conditions = conditions[1:first_random]
    kl_parts = [feature_interventions(model, saes, baseline, kl_conditions)]
    if directions:
        kl_parts.append(projection_interventions(model, directions, project[1:first_random]))
    kl = kl_under(model, harmless_batches, len(kl_conditions), combined(*kl_parts), max_rows)
    random_drops = drops[first_random:].tolist()
    ranked = rank_against(float(drops[1]), random_drops)
    examples = [
        {"unedited": gen.responses[0][i], "ablated": gen.responses[1][i], "steered": gen.responses[2][i]}
        | {"label": labels[i]}
        for i in np.flatnonzero(target)[:n_examples].tolist()
    ]
    out = {
        "judge": judge_name,
        "max_new_tokens": max_new_tokens,
        "n_prompts": int(target.sum()),
        "refusal_rate_before": _f(rate[0]),
        "refusal_rate_after": _f(rate[1]),
        "refusal_rate_drop": _f(drops[1]),
        "refusal_rate_drop_by_label": {k: v["drop"] for k, v in by_label.items()},
        "by_label": by_label,
        "steer_alpha": steer_alpha,
        "refusal_rate_steered": _f(rate[2]),
        "refusal_rate_drop_steered": _f(drops[2]),
        "random_refusal_rate_drop_median": _f(ranked["random_median"]),
        "random_refusal_rate_drops": [_f(d) for d in random_drops],
        "percentile": _f(ranked["percentile"]),
        "p_value": _f(ranked["p_value"]),
        "n_random": len(random_drops),
        "kl_harmless": _f(kl[0]),
        "kl_harmless_steered": _f(kl[1]),
        "examples": examples,
    }
    if directions:
        out["direction"] = {
            "refusal_rate_after": _f(rate[3]),
            "refusal_rate_drop": _f(drops[3]),
            "refusal_rate_drop_by_label": {k: v["direction_drop"] for k, v in by_label.items()},
            "kl_harmless": _f(kl[2]),
            "norms": {h: float(d.norm()) for h, d in directions.items()},
        }
    if gen.metric is not None:
        m = gen.metric[:, target].mean(axis=1) if target.any() else np.full(len(conditions), np.nan)
        effects = (m[0] - m[first_random:]).tolist()
        out["metric_random"] = {
            "effect": _f(m[0] - m[1]),
            "random_effects": effects,
            "n_random": len(effects),
            **rank_against(float(m[0] - m[1]), effects),
        }
    return out
