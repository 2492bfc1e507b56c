"""Held-out validation of a circuit through the refusal metric: faithfulness, completeness, random sets.

Reads and writes nothing; returns JSON-ready dicts. Every number is measured on the prompts
given (the set's held-out half), with the spliced model and the contrast baseline:

    faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty))
    completeness(C) = (m(M \\ C) - m(empty)) / (m(M) - m(empty))      (0: nothing refusal-relevant left outside C)

m is the mean metric over the prompts; M the unedited model; C the circuit with every feature
outside it ablated to the baseline and **every error node kept unablated** (a circuit is judged
on its features; the error nodes hold what the SAEs miss); `empty` ablates every feature and
every error node; M \\ C ablates the circuit's features only. The curve takes C as the top-n
nodes of the ranking for each n in `sizes`.

Random sets: `n_random` sets with the circuit's per-hook counts, drawn (seeded) from the
features active on the prompts and outside the circuit. Effect of a set S = m(M) - m(M \\ S)
(positive when the set raises the metric); the circuit's percentile = 100 * share of random
sets with a smaller effect, p = (1 + #random >= circuit) / (1 + n_random).

All conditions of one batch run in one stacked forward (refusal_lab.circuits.ablation), split
into chunks of at most `max_rows` rows.

Shape letters: R conditions, B batch, T positions, F features.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from refusal_lab.circuits.ablation import CLEAN, Condition, Mode, repeat_batch, stacked_edit
from refusal_lab.circuits.baseline import Baseline, BoundBaseline
from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.sae.model import Sae

log = logging.getLogger(__name__)

MetricFn = Callable[[torch.Tensor, PromptBatch], torch.Tensor]
"""(logits [B, T, V], batch) -> metric [B]; e.g. `lambda l, b: refusal_metric(l, b, spec)`."""
KeepFn = Callable[[PromptBatch], int]
"""batch -> logits_to_keep for its forward (0: all positions); e.g. `lambda b: logits_needed(b, spec)`."""
Ranked = Sequence[tuple[str, int]]
"""Circuit nodes as (hook, feature), strongest first."""

ERROR_NODES_NOTE = (
    "error nodes are kept unablated in the circuit C and in M \\ C; the empty circuit ablates every feature "
    "and every error node to the baseline"
)


def nodes_of(ranked: Ranked, n: int | None = None) -> dict[str, torch.Tensor]:
    """The first n ranked nodes as hook -> feature indices."""
    out: dict[str, list[int]] = {}
    for hook, feature in list(ranked)[:n]:
        out.setdefault(hook, []).append(int(feature))
    return {h: torch.tensor(f, dtype=torch.long) for h, f in out.items()}


def chunks(n: int, batch_size: int, max_rows: int) -> list[range]:
    """Condition ranges of at most max_rows // batch_size conditions (at least one)."""
    per = max(1, max_rows // max(1, batch_size))
    return [range(i, min(n, i + per)) for i in range(0, n, per)]


def condition_logits(
    model: nn.Module,
    saes: Mapping[str, Sae],
    baseline: Baseline,
    batches: Sequence[PromptBatch],
    conditions: Sequence[Condition],
    max_rows: int = 256,
    logits_to_keep: KeepFn | None = None,
) -> Iterator[tuple[PromptBatch, range, torch.Tensor]]:
    """(batch, condition range, logits [r * B, T or kept, V]) per batch and chunk of conditions, under no_grad."""
    for batch in batches:
        bound = BoundBaseline(baseline, batch)
        keep = logits_to_keep(batch) if logits_to_keep is not None else 0
        for rng in chunks(len(conditions), batch.size, max_rows):
            chunk = [conditions[i] for i in rng]
            with torch.no_grad(), spliced(model, saes, edit=stacked_edit(chunk, bound, saes), record=False):
                logits = forward_batch(model, repeat_batch(batch, len(chunk)), logits_to_keep=keep)
            yield batch, rng, logits


def condition_metrics(
    model: nn.Module,
    saes: Mapping[str, Sae],
    baseline: Baseline,
    batches: Sequence[PromptBatch],
    conditions: Sequence[Condition],
    metric_fn: MetricFn,
    max_rows: int = 256,
    logits_to_keep: KeepFn | None = None,
) -> np.ndarray:
    """Metric per condition and prompt [R, n_prompts], prompts in the builder's order (PromptBatch.index)."""
    n_prompts = sum(b.size for b in batches)
    out = np.full((len(conditions), n_prompts), np.nan)
    for batch, rng, logits in condition_logits(model, saes, baseline, batches, conditions, max_rows, logits_to_keep):
        values = metric_fn(logits, repeat_batch(batch, len(rng))).double().cpu().numpy()
        out[rng.start : rng.stop, batch.index] = values.reshape(len(rng), batch.size)
    return out


@torch.no_grad()
def active_features(
    model: nn.Module, saes: Mapping[str, Sae], batches: Sequence[PromptBatch], min_prompt_share: float = 0.05
) -> dict[str, torch.Tensor]:
    """hook -> bool [F]: features firing on some real token of at least `min_prompt_share` of the prompts (>= 1)."""
    fired: dict[str, torch.Tensor] = {}
    n_prompts = 0
    for batch in batches:
        with spliced(model, saes) as run:
            forward_batch(model, batch, logits_to_keep=1)
        real = batch.attention_mask.bool()
        for hook, feats in run.feats.items():
            per_prompt = ((feats > 0) & real.to(feats.device)[..., None]).any(1).sum(0).cpu()
            fired[hook] = fired.get(hook, torch.zeros_like(per_prompt)) + per_prompt
        n_prompts += batch.size
    need = max(1, int(np.ceil(min_prompt_share * n_prompts)))
    return {h: c >= need for h, c in fired.items()}


def random_node_sets(
    circuit: Mapping[str, torch.Tensor], active: Mapping[str, torch.Tensor], n: int, seed: int
) -> tuple[list[dict[str, torch.Tensor]], dict[str, str]]:
    """`n` sets with the circuit's count at every hook, drawn from active features outside the circuit.

    Where a hook has too few such features the pool widens, in order, to all active features and
    then to all features; the second value reports the pool used per hook.
    """
    gen = torch.Generator().manual_seed(seed)
    pools: dict[str, torch.Tensor] = {}
    pool_kind: dict[str, str] = {}
    for hook, idx in circuit.items():
        count = int(idx.numel())
        if count == 0:
            continue
        act = active[hook].clone()
        in_circuit = torch.zeros_like(act)
        in_circuit[idx.long()] = True
        for kind, pool in (
            ("active_outside_circuit", act & ~in_circuit),
            ("active", act),
            ("all", torch.ones_like(act)),
        ):
            if int(pool.sum()) >= count:
                pools[hook], pool_kind[hook] = pool.nonzero().flatten(), kind
                break
        if pool_kind[hook] != "active_outside_circuit":
            log.warning("random sets at %s: too few active features outside the circuit; drawn from %s", hook, kind)
    sets = []
    for _ in range(n):
        drawn = {}
        for hook, pool in pools.items():
            pick = torch.randperm(len(pool), generator=gen)[: int(circuit[hook].numel())]
            drawn[hook] = pool[pick].sort().values
        sets.append(drawn)
    return sets, pool_kind


def rank_against(effect: float, random_effects: Sequence[float]) -> dict[str, float]:
    """The circuit's percentile among random effects (0-100) and the empirical p-value."""
    rand = np.asarray(random_effects, dtype=np.float64)
    n = len(rand)
    return {
        "percentile": float(100.0 * np.mean(rand < effect)) if n else float("nan"),
        "p_value": float((1 + np.sum(rand >= effect)) / (1 + n)),
        "random_median": float(np.median(rand)) if n else float("nan"),
    }


def _ratio(num: float, den: float) -> float | None:
    return None if abs(den) < 1e-12 else num / den


def metric_validation(
    model: nn.Module,
    saes: Mapping[str, Sae],
    baseline: Baseline,
    batches: Sequence[PromptBatch],
    ranked: Ranked,
    size: int,
    metric_fn: MetricFn,
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    n_random: int = 10,
    seed: int = 0,
    random_sets: Sequence[dict[str, torch.Tensor]] | None = None,
    max_rows: int = 256,
    logits_to_keep: KeepFn | None = None,
) -> dict:
    """Faithfulness curve and scalar, completeness and the random-set comparison, all in one stacked pass.

    The circuit is the first `size` nodes of `ranked`; the curve may run past it (sizes up to
    len(ranked)). `random_sets` (from `random_node_sets`) lets behaviour validation reuse the same
    sets (an empty list skips the comparison here); without them `n_random` sets are drawn from
    the features active on `batches`.
    """
    size = min(size, len(ranked))
    circuit = nodes_of(ranked, size)
    pool_kind: dict[str, str] = {}
    if random_sets is None:
        active = active_features(model, saes, batches)
        random_sets, pool_kind = random_node_sets(circuit, active, n_random, seed)
    randoms = list(random_sets)
    curve_sizes = sorted({n for n in sizes if n <= len(ranked)} | {size})
    conditions = [
        CLEAN,
        Condition({}, Mode.keep, ablate_errors=True),  # empty circuit
        *[Condition(nodes_of(ranked, n), Mode.keep) for n in curve_sizes],
        Condition(circuit, Mode.ablate),  # M \ C
        *[Condition(s, Mode.ablate) for s in randoms],
    ]
    per_prompt = condition_metrics(model, saes, baseline, batches, conditions, metric_fn, max_rows, logits_to_keep)
    m = per_prompt.mean(axis=1)
    m_full, m_empty = float(m[0]), float(m[1])
    m_curve = dict(zip(curve_sizes, m[2 : 2 + len(curve_sizes)].tolist(), strict=True))
    m_without = float(m[2 + len(curve_sizes)])
    random_effects = (m_full - m[3 + len(curve_sizes) :]).tolist()
    gap = m_full - m_empty
    effect = m_full - m_without
    random = {
        "effect": effect,
        "random_effects": random_effects,
        "n_random": len(randoms),
        "per_hook_counts": {h: int(i.numel()) for h, i in circuit.items()},
        "pool": pool_kind or "given",
        **rank_against(effect, random_effects),
    }
    return {
        "n_prompts": int(per_prompt.shape[1]),
        "size": size,
        "error_nodes": ERROR_NODES_NOTE,
        "metric_full": m_full,
        "metric_empty": m_empty,
        "metric_circuit": m_curve[size],
        "metric_without_circuit": m_without,
        "faithfulness": _ratio(m_curve[size] - m_empty, gap),
        "faithfulness_curve": {str(n): _ratio(v - m_empty, gap) for n, v in m_curve.items()},
        "completeness": _ratio(m_without - m_empty, gap),
        "random": random if randoms else None,
        "random_sets": [json_nodes(s) for s in randoms],
    }


def json_nodes(nodes: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    return {h: [int(i) for i in idx.tolist()] for h, idx in nodes.items()}
