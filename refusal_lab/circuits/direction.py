"""The difference-in-means refusal direction per hook point: the baseline a feature circuit must beat.

Reads: the activation store (last prompt position rows) or the model. Writes nothing.

    r_h = mean(x_h | toxic, refused) - mean(x_h | harmless, answered)      (float64 means, Arditi et al. 2024)

x_h is the activation at hook h at the last prompt token (the last post-instruction template
token, where the first response token is predicted). Ablation projects r_h out at every
position of its own hook point, x <- x - r^ r^T x, for every hook point at once (prompt and every
generated token), and is judged like a circuit's ablation (refusal_lab.circuits.behaviour):
refusal-rate drop on the target prompts and KL on harmless ones. `decoder_cosines` compares
r_h with the circuit features' decoder rows at the same hook.

Shape letters: N tokens, B batch, T positions, D d_model, F features.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.behaviour import Judge, generate_under, kl_under, projection_interventions
from refusal_lab.circuits.spliced import forward_batch
from refusal_lab.hooks import HookFn, hooks_registered
from refusal_lab.layers import HookPoint
from refusal_lab.sae.model import Sae
from refusal_lab.store import ActivationStore, Phase

log = logging.getLogger(__name__)


def last_prompt_rows(store: ActivationStore, sample_ids: Sequence[int]) -> np.ndarray:
    """Store rows of the last prompt token of each sample (in `sample_ids` order); KeyError if one is missing."""
    tokens = store.tokens()
    samples = store.samples()
    n_prompt = dict(
        zip(np.asarray(samples["sample_id"]).tolist(), np.asarray(samples["n_prompt_tokens"]).tolist(), strict=True)
    )
    sid = tokens["sample_id"].astype(np.int64)
    last = (tokens["phase"] == int(Phase.POST_INSTRUCTION)) & (
        tokens["position"].astype(np.int64) == np.array([n_prompt.get(s, -1) for s in sid.tolist()]) - 1
    )
    row_of = dict(zip(sid[last].tolist(), np.flatnonzero(last).tolist(), strict=True))
    missing = [s for s in sample_ids if s not in row_of]
    if missing:
        raise KeyError(
            f"store {store.path} holds no last-prompt-token activations for samples {missing[:5]}: collect with "
            "inference.positions all, prompt, last_prompt or post_instruction"
        )
    return np.array([row_of[s] for s in sample_ids], dtype=np.int64)


def _mean_rows(store: ActivationStore, hook: str, rows: np.ndarray) -> torch.Tensor:
    order = np.sort(rows)
    values = store.decode(hook, np.asarray(store.acts(hook).get_orthogonal_selection((order, slice(None)))))
    return torch.from_numpy(values.astype(np.float64)).mean(0)


def directions_from_store(
    store: ActivationStore, hooks: Sequence[str], refused_ids: Sequence[int], answered_ids: Sequence[int]
) -> dict[str, torch.Tensor]:
    """hook -> r [D] float64 from the store's last-prompt-token activations of the two sample groups."""
    if not refused_ids or not answered_ids:
        raise ValueError("directions_from_store: both groups need at least one sample")
    pos, neg = last_prompt_rows(store, refused_ids), last_prompt_rows(store, answered_ids)
    return {h: _mean_rows(store, h, pos) - _mean_rows(store, h, neg) for h in hooks}


@torch.no_grad()
def _means_from_model(
    model: nn.Module, hooks: Sequence[str], batches: Sequence[PromptBatch]
) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    current: list[PromptBatch] = []  # the batch being run, read by the hooks

    def keep(hook: str) -> HookFn:
        def fn(x_BTD: torch.Tensor) -> None:
            rows = torch.arange(x_BTD.shape[0], device=x_BTD.device)
            at_BD = x_BTD[rows, current[-1].last_prompt_index.to(x_BTD.device)].double().sum(0).cpu()
            sums[hook] = sums[hook] + at_BD if hook in sums else at_BD

        return fn

    with hooks_registered(model, {HookPoint.from_name(h): keep(h) for h in hooks}):
        for batch in batches:
            current.append(batch)
            forward_batch(model, batch, logits_to_keep=1)
    n = sum(b.size for b in batches)
    if n == 0:
        raise ValueError("directions_from_model: no prompts")
    return {h: sums[h] / n for h in hooks}


def directions_from_model(
    model: nn.Module,
    hooks: Sequence[str],
    refused_batches: Sequence[PromptBatch],
    answered_batches: Sequence[PromptBatch],
) -> dict[str, torch.Tensor]:
    """hook -> r [D] float64 from forwards over the two prompt groups (activation at last_prompt_index)."""
    pos = _means_from_model(model, hooks, refused_batches)
    neg = _means_from_model(model, hooks, answered_batches)
    return {h: pos[h] - neg[h] for h in hooks}


def direction_ablation(
    model: PreTrainedModel,
    directions: Mapping[str, torch.Tensor],
    prompt_batches: Sequence[PromptBatch],
    labels: Sequence[str],
    harmless_batches: Sequence[PromptBatch],
    judge: Judge,
    tokenizer: PreTrainedTokenizerBase,
    *,
    is_target: Sequence[bool] | None = None,
    max_new_tokens: int = 8,
    max_rows: int = 256,
) -> dict[str, Any]:
    """Refusal-rate drop (overall on targets, by label) and KL on harmless prompts with every r_h projected out."""
    n_prompts = sum(b.size for b in prompt_batches)
    if len(labels) != n_prompts:
        raise ValueError(f"direction_ablation: {len(labels)} labels for {n_prompts} prompts")
    target = np.ones(n_prompts, dtype=bool) if is_target is None else np.asarray(is_target, dtype=bool)
    both = projection_interventions(model, directions, [False, True])
    responses = generate_under(model, prompt_batches, 2, both, tokenizer, max_new_tokens, max_rows).responses
    refused = np.array([np.asarray(judge(r), dtype=bool) for r in responses])
    rate = refused[:, target].mean(axis=1) if target.any() else np.full(2, np.nan)
    by_label = {}
    for label in sorted(set(labels)):
        rows = np.array([lab == label for lab in labels])
        by_label[label] = float(refused[0, rows].mean() - refused[1, rows].mean())
    kl = kl_under(model, harmless_batches, 1, projection_interventions(model, directions, [True]), max_rows)
    return {
        "hooks": sorted(directions),
        "norms": {h: float(d.norm()) for h, d in directions.items()},
        "refusal_rate_before": float(rate[0]),
        "refusal_rate_after": float(rate[1]),
        "refusal_rate_drop": float(rate[0] - rate[1]),
        "refusal_rate_drop_by_label": by_label,
        "kl_harmless": float(kl[0]),
        "max_new_tokens": max_new_tokens,
    }


def decoder_cosines(
    directions: Mapping[str, torch.Tensor], saes: Mapping[str, Sae], circuit: Sequence[tuple[str, int]]
) -> dict[str, Any]:
    """Cosine of each circuit feature's decoder row with its hook's r_h, and where |cos| ranks among all features."""
    rows = []
    for hook, feature in circuit:
        if hook not in directions:
            continue
        w = saes[hook].W_dec.detach().double().cpu()
        r = directions[hook].double().cpu()
        cos_F = (w @ r) / (w.norm(dim=-1) * r.norm()).clamp_min(1e-12)
        value = float(cos_F[feature])
        rows.append(
            {
                "hook": hook,
                "feature": int(feature),
                "cosine": value,
                # Share of the hook's features with a smaller |cos|: 100 = the most aligned feature.
                "abs_percentile": float(100.0 * (cos_F.abs() < abs(value)).double().mean()),
            }
        )
    abs_cos = np.array([abs(r["cosine"]) for r in rows])
    d_model = next(iter(directions.values())).numel() if directions else 0
    return {
        "features": rows,
        "max_abs_cosine": float(abs_cos.max()) if len(rows) else None,
        "mean_abs_cosine": float(abs_cos.mean()) if len(rows) else None,
        # E|cos| of two random directions in d_model dimensions, for scale.
        "random_mean_abs_cosine": float(np.sqrt(2 / (np.pi * d_model))) if d_model else None,
    }
