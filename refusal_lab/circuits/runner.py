"""One discovery set's circuit: attribution, node and edge selection, held-out validation, its files.

`SetRunner.run(plan, folder)` writes `graph.json`, `effects.npz`, `positions.npz` and
`validation.json` into the set's folder and returns the set's summary entry; committing it
(`set.json`) is the stage's job (refusal_lab.circuits.stage).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refusal_lab.circuits.attribution import NodeEffects, node_effects, top_activations
from refusal_lab.circuits.baseline import Baseline, mean_baseline, zero_baseline
from refusal_lab.circuits.batches import PromptBatch, make_text_batches, prefix_token_count
from refusal_lab.circuits.config import BaselineKind, CircuitsConfig, DiscoverySet
from refusal_lab.circuits.describe import top_features, top_prompt_tokens, top_tokens_of
from refusal_lab.circuits.direction import directions_from_model
from refusal_lab.circuits.edges import ERROR, edge_effects, hook_order, prune_edges, select_nodes
from refusal_lab.circuits.held_out import ablation_summary, validate_circuit
from refusal_lab.circuits.metric import MetricSpec, logits_needed, metric_spec, refusal_metric
from refusal_lab.circuits.selective import NAME, SCORING, normalised, read_means, selective_nodes, write_means
from refusal_lab.circuits.sets import BEHAVIOUR_SETS, PromptPool, SetPlan, plan_sets, split, text_hash
from refusal_lab.circuits.size import model_faithfulness, search_size
from refusal_lab.fingerprint import write_json_atomic
from refusal_lab.models import chat_format
from refusal_lab.refusal import keyword_refusal
from refusal_lab.sae.model import Sae
from refusal_lab.stages import RunContext


class SetRunner:
    """Runs one discovery set at a time against shared model, SAEs and baselines."""

    def __init__(
        self,
        ctx: RunContext,
        pool: PromptPool,
        harmless: list[int],
        responses: list[list[int]] | None,
        saes: dict[str, Sae],
    ) -> None:
        self.ctx, self.cfg, self.pool, self.responses, self.saes = ctx, ctx.cfg.circuits, pool, responses, saes
        self.model = ctx.model()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = ctx.tokenizer
        self.spec: MetricSpec = metric_spec(self.cfg.metric, self.tokenizer, ctx.cfg.model.refusal_tokens)
        self.device = next(self.model.parameters()).device
        self._baselines: dict[tuple[int, ...], Baseline] = {}
        self._effects: dict[tuple[str | int, ...], tuple[dict[int, int], NodeEffects]] = {}
        self._directions: dict[str, torch.Tensor] | None = None
        self.harmless = harmless
        self.pooled_sizes: dict[DiscoverySet, int] = {}
        """Pooled sets' circuit sizes (the stage fills it, also from committed sets): categories take them."""
        fmt, _ = chat_format(ctx.cfg.model, self.tokenizer)
        self.n_prefix = prefix_token_count(self.tokenizer, fmt)

    def batches(self, idx: list[int], with_responses: bool | None = None) -> list[PromptBatch]:
        use = self.spec.needs_responses if with_responses is None else with_responses
        responses = [self.responses[i] for i in idx] if (use and self.responses is not None) else None
        return make_text_batches(
            self.ctx.cfg.model,
            self.tokenizer,
            [self.pool.prompts[i] for i in idx],
            self.cfg.batch_size,
            self.ctx.cfg.inference.max_prompt_tokens,
            responses,
            self.device,
        )

    def baseline(self, contrast: list[int]) -> Baseline:
        if self.cfg.baseline == BaselineKind.zero:
            return zero_baseline(self.saes)
        key = tuple(contrast)
        if key not in self._baselines:
            self._baselines[key] = mean_baseline(self.model, self.saes, self.batches(contrast, False), self.n_prefix)
        return self._baselines[key]

    def run(self, plan: SetPlan, folder: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        cfg = self.cfg
        baseline = self.baseline(plan.contrast.discovery)
        batches = self.batches(plan.target.discovery)
        effects = self.effects(plan, batches, baseline)
        means = {h: effects.mean_feats(h) for h in effects.hooks}
        nodes, size = self.choose_nodes(plan, means, batches, baseline)
        # The faithfulness curve may run past the circuit (a 32-feature circuit can be necessary without
        # being sufficient); the circuit is always a prefix of this ranking.
        ranking = select_nodes(means, 0.0, 1.0, max([*cfg.faithfulness_sizes, len(nodes)]))
        error_means = {h: float(effects.errors[h].mean()) for h in effects.hooks}
        floor = min((abs(e) for _, _, e in nodes), default=float("inf"))
        n_error_nodes = sum(abs(v) >= floor for v in error_means.values())
        with_edges = plan.pooled or cfg.category_edges
        # Each downstream node costs one backward pass, so edges are computed among the top of the circuit
        # (nodes are strongest first); edge_nodes caps that, null takes every node.
        edge_nodes = len(nodes) if cfg.edge_nodes is None else min(cfg.edge_nodes, len(nodes))
        edge_circuit = {h: [f for hh, f, _ in nodes[:edge_nodes] if hh == h] for h in effects.hooks}
        edges = (
            prune_edges(
                edge_effects(self.model, self.saes, batches, baseline, self.spec, edge_circuit),
                cfg.edge_threshold,
                cfg.edge_share,
            )
            if with_edges
            else {}
        )
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "graph.json", _graph(plan, nodes, error_means, edges, effects.hooks, cfg))
        self._write_effects(folder, plan, effects, nodes)
        write_means(folder, means)
        validation = self.validate(plan, nodes, ranking, baseline)
        write_json_atomic(folder / "validation.json", validation)
        entry: dict[str, Any] = {
            "status": "ok",
            "method": cfg.method.value,
            "baseline": cfg.baseline.value,
            "n_prompts_discovery": len(plan.target.discovery),
            "n_prompts_validation": len(plan.target.validation),
            "n_contrast_discovery": len(plan.contrast.discovery),
            "n_contrast_validation": len(plan.contrast.validation),
            "n_nodes": len(nodes),
            "n_error_nodes": n_error_nodes,
            "n_edges": len(edges) if with_edges else None,
            "edge_nodes": edge_nodes if with_edges else None,
            "metric_mean": float(effects.metric.mean()),
            "error_node_effects": error_means,
            "top_features": top_features(effects, nodes, self.tokenizer, cfg.top_features),
            "top_prompt_tokens": top_prompt_tokens(effects, self.tokenizer, cfg.top_prompt_tokens),
            **{k: validation.get(k) for k in ("faithfulness", "faithfulness_curve", "completeness")},
            "size": {
                **size,
                "faithfulness": validation.get("faithfulness"),
                "completeness": validation.get("completeness"),
            },
            "ablation": ablation_summary(validation),
            "metric_random": _metric_random(validation),
            "folder": str(folder),
            "seconds": time.perf_counter() - t0,
        }
        return entry

    def choose_nodes(
        self, plan: SetPlan, means: dict[str, np.ndarray], batches: list[PromptBatch], baseline: Baseline
    ) -> tuple[list[tuple[str, int, float]], dict[str, Any]]:
        """The circuit's nodes, strongest first, and the summary's `size` entry: by the faithfulness target on
        the discovery prompts (refusal_lab.circuits.size), or the fixed count when the target is null.

        With category_sizes "pooled" a category takes its pooled set's size (the search is most of a
        category's cost) and its faithfulness at that size is measured on its discovery prompts."""
        cfg = self.cfg
        if cfg.faithfulness_target is None:
            nodes = select_nodes(means, cfg.node_threshold, cfg.node_share, cfg.circuit_size)
            return nodes, {"rule": "fixed", "target": None, "n_nodes": len(nodes), "met": None}
        candidates = select_nodes(means, cfg.node_threshold, 1.0, cfg.max_circuit_size)
        faithfulness_of = model_faithfulness(
            self.model,
            self.saes,
            baseline,
            batches,
            [(h, f) for h, f, _ in candidates],
            lambda logits, batch: refusal_metric(logits, batch, self.spec),
            logits_to_keep=lambda batch: logits_needed(batch, self.spec),
        )
        pooled_size = self.pooled_sizes.get(plan.kind)
        if not plan.pooled and cfg.category_sizes == "pooled" and pooled_size is not None:
            n = min(pooled_size, len(candidates))
            faithfulness = faithfulness_of([n])[n] if n else None
            met = faithfulness is not None and faithfulness >= cfg.faithfulness_target
            return candidates[:n], {
                "rule": "pooled_set_size",
                "target": cfg.faithfulness_target,
                "n_nodes": n,
                "met": met,
                "faithfulness_discovery": faithfulness,
                "n_candidates": len(candidates),
                "searched": {},
                "reason": None
                if met
                else f"the pooled set's size {pooled_size} reaches faithfulness "
                f"{'n/a' if faithfulness is None else f'{faithfulness:.3f}'} on this category (not searched: "
                "circuits.category_sizes=pooled)",
            }
        search = search_size(faithfulness_of, len(candidates), cfg.faithfulness_target)
        if plan.pooled:
            self.pooled_sizes[plan.kind] = search.size
        return candidates[: search.size], search.to_json()

    def effects(self, plan: SetPlan, batches: list[PromptBatch], baseline: Baseline) -> NodeEffects:
        """Node effects of the set's discovery prompts; a category reuses its pooled set's rows (same prompts,
        same split, same baseline), so only its top activations take a forward pass."""
        key = (plan.kind.value, *plan.contrast.discovery)
        if key not in self._effects and not plan.pooled:
            # Resumed after an earlier process committed the pooled set: compute the pooled effects again, as
            # an uninterrupted run has them. The category's own batches give other floats (the batch changes
            # the order of the sums, ~1e-7), and a rerun must end with an uninterrupted run's files.
            pooled = self.pooled_plan(plan.kind)
            if pooled.skipped is None and pooled.contrast.discovery == plan.contrast.discovery:
                self.effects(pooled, self.batches(pooled.target.discovery), baseline)
        cached = self._effects.get(key)
        if cached is not None and all(i in cached[0] for i in plan.target.discovery):
            rows = [cached[0][i] for i in plan.target.discovery]
            return cached[1].subset(rows, top_activations(self.model, self.saes, batches))
        cfg = self.cfg
        effects = node_effects(self.model, self.saes, batches, baseline, self.spec, cfg.method, cfg.ig_steps)
        if plan.pooled:
            self._effects[key] = ({i: r for r, i in enumerate(plan.target.discovery)}, effects)
        return effects

    def pooled_plan(self, kind: DiscoverySet) -> SetPlan:
        """The pooled set of `kind` as the stage plans it (refusal_lab.circuits.sets.plan_sets)."""
        cfg = self.cfg
        plans = plan_sets(
            self.pool, self.harmless, [kind], False, cfg.validation_share, cfg.max_prompts, cfg.contrast_limit
        )
        return plans[0]

    def validate(
        self,
        plan: SetPlan,
        nodes: list[tuple[str, int, float]],
        ranking: list[tuple[str, int, float]],
        baseline: Baseline,
    ) -> dict[str, Any]:
        """Held-out validation (refusal_lab.circuits.held_out): every number on the set's validation prompts.

        Pooled sets also generate (ablation and steering, against the random sets) on the held-out
        toxic and safe prompts, the targets marked, with KL on the held-out harmless contrast.
        """
        cfg, spec = self.cfg, self.spec
        generation = plan.pooled
        kwargs: dict[str, Any] = {}
        if generation:
            harmless = self.harmless_validation(plan)
            held_out = sorted(set(plan.target.validation) | set(self.held_out_toxic_safe()) | set(harmless))
            targets = set(plan.target.validation)
            kwargs = {
                "prompt_batches": self.batches(held_out, False),
                "labels": [self.specificity_label(i) for i in held_out],
                "is_target": [i in targets for i in held_out],
                "harmless_batches": self.batches(harmless, False),
                "judge": self.judge,
                "judge_name": "keyword",
                "tokenizer": self.tokenizer,
                "steer_alpha": cfg.steer_alpha,
                "max_new_tokens": cfg.max_new_tokens,
                "directions": self.directions(),
            }
        return validate_circuit(
            self.model,
            self.saes,
            baseline,
            [(h, f) for h, f, _ in ranking],
            lambda logits, batch: refusal_metric(logits, batch, spec),
            self.batches(plan.target.validation),
            logits_to_keep=lambda batch: logits_needed(batch, spec),
            size=len(nodes),
            sizes=cfg.faithfulness_sizes,
            n_random=cfg.n_random,
            seed=self.ctx.cfg.seed,
            generation=generation,
            **kwargs,
        )

    def specificity_label(self, i: int) -> str:
        """The label a drop is reported under: toxic, refused_safe / answered_safe (by `refused`), harmless."""
        label = self.pool.labels[i]
        if label == "safe":
            return "refused_safe" if self.pool.refused[i] else "answered_safe"
        return label

    def run_selective(self, plan: SetPlan, folder: Path, over_refusal: Path, toxic: Path) -> dict[str, Any]:
        """The selective over-refusal circuit (refusal_lab.circuits.selective) from the committed over_refusal
        and toxic sets' mean effects, validated on the over_refusal set's held-out prompts."""
        t0 = time.perf_counter()
        cfg = self.cfg
        a_or, a_tox = read_means(over_refusal), read_means(toxic)
        nodes = selective_nodes(a_or, a_tox, cfg.node_share, cfg.circuit_size)
        if not nodes:
            return {"status": "skipped", "reason": "no feature raises over-refusal more than toxic refusal"}
        baseline = self.baseline(plan.contrast.discovery)
        top = top_activations(self.model, self.saes, self.batches(plan.target.discovery))
        scored = [(h, f, e) for h, f, e in nodes]
        hooks = list(self.saes)
        folder.mkdir(parents=True, exist_ok=True)
        graph = _graph(plan, scored, {}, {}, hooks, cfg)
        graph["set"], graph["effect_sign"] = NAME, f"selectivity score ({SCORING})"
        write_json_atomic(folder / "graph.json", graph)
        validation = self.validate(plan, nodes, nodes, baseline)
        write_json_atomic(folder / "validation.json", validation)
        shares_or, shares_tox = normalised(a_or), normalised(a_tox)
        features = [
            {
                "hook": h,
                "feature": f,
                "score": e,
                "share_over_refusal": float(shares_or[h][f]),
                "share_toxic": float(shares_tox[h][f]),
                "top_tokens": top_tokens_of(top, h, f, self.tokenizer),
            }
            for h, f, e in nodes[: cfg.top_features]
        ]
        return {
            "status": "ok",
            "scoring": SCORING,
            "from_sets": ["over_refusal", "toxic"],
            "n_nodes": len(nodes),
            "nodes_by_hook": {h: sum(1 for hh, _, _ in nodes if hh == h) for h in hook_order(hooks)},
            "top_features": features,
            **{k: validation.get(k) for k in ("faithfulness", "completeness")},
            "ablation": ablation_summary(validation),
            "metric_random": _metric_random(validation),
            "folder": str(folder),
            "seconds": time.perf_counter() - t0,
        }

    def judge(self, responses: Sequence[str]) -> list[bool]:
        prefixes = self.ctx.cfg.model.refusal_prefixes
        return [keyword_refusal(r, prefixes) for r in responses]

    def held_out_toxic_safe(self) -> list[int]:
        """Validation-side toxic and safe prompts (the hash split), at most max_prompts of each label."""
        out: list[int] = []
        for label in ("toxic", "safe"):
            idx = [i for i, lab in enumerate(self.pool.labels) if lab == label]
            out += split(idx, self.pool.prompts, self.cfg.validation_share, self.cfg.max_prompts).validation
        return out

    def harmless_validation(self, plan: SetPlan) -> list[int]:
        """The held-out harmless prompts for KL (the harmless contrast's validation part; a behaviour set's
        contrast is answered prompts of its own label, so it takes the run's harmless prompts)."""
        if plan.kind not in BEHAVIOUR_SETS:
            return plan.contrast.validation
        idx = self.harmless
        return split(idx, self.pool.prompts, self.cfg.validation_share, self.cfg.contrast_limit).validation

    def directions(self) -> dict[str, torch.Tensor] | None:
        """Difference-in-means refusal direction per hook: toxic refused minus harmless answered (discovery side)."""
        if self._directions is None:
            pool, share = self.pool, self.cfg.validation_share
            refused = [i for i, lab in enumerate(pool.labels) if lab == "toxic" and pool.refused[i]]
            answered = [i for i in self.harmless if not pool.refused[i]]
            pos = split(refused, pool.prompts, share, self.cfg.max_prompts).discovery
            neg = split(answered, pool.prompts, share, self.cfg.contrast_limit).discovery
            if not pos or not neg:
                self._directions = {}
            else:
                self._directions = directions_from_model(
                    self.model, list(self.saes), self.batches(pos, False), self.batches(neg, False)
                )
        return self._directions or None

    def _write_effects(
        self,
        folder: Path,
        plan: SetPlan,
        effects: NodeEffects,
        nodes: list[tuple[str, int, float]],
    ) -> None:
        """effects.npz for circuits.compare (format in coord INTERFACES) and positions.npz for inspection."""
        idx = plan.target.discovery
        cats = np.asarray([self.pool.categories[i] for i in idx])
        pool_nodes = {(h, f) for h, f, _ in nodes}
        for category in sorted(set(cats.tolist())):
            rows = cats == category
            per_cat = {h: effects.feats[h][rows].mean(0) for h in effects.hooks}
            pool_nodes |= {(h, f) for h, f, _ in select_nodes(per_cat, 0.0, 1.0, self.cfg.circuit_size)}
        order = hook_order(effects.hooks)
        pool = sorted(pool_nodes, key=lambda n: (order.index(n[0]), n[1]))
        np.savez(
            folder / "effects.npz",
            effects=np.stack([effects.feats[h][:, f] for h, f in pool], 1).astype(np.float32)
            if pool
            else np.zeros((len(idx), 0), np.float32),
            pool_hook=np.asarray([h for h, _ in pool], dtype=str),
            pool_feature=np.asarray([f for _, f in pool], dtype=np.int64),
            categories=cats.astype(str),
            labels=np.asarray([self.pool.labels[i] for i in idx], dtype=str),
            prompt_hash=np.asarray([text_hash(self.pool.prompts[i]) for i in idx], dtype=str),
        )
        lengths = np.asarray([len(t) for t in effects.token_ids], np.int64)
        arrays: dict[str, np.ndarray] = {
            "lengths": lengths,
            "token_ids": np.concatenate(effects.token_ids),
            "phases": np.concatenate(effects.phases),
        }
        for h in effects.hooks:
            arrays[f"features__{h}"] = np.concatenate(effects.pos_feats[h])
            arrays[f"error__{h}"] = np.concatenate(effects.pos_errors[h])
        np.savez(folder / "positions.npz", **arrays)  # pyright: ignore[reportArgumentType]


def _graph(
    plan: SetPlan,
    nodes: list[tuple[str, int, float]],
    error_means: dict[str, float],
    edges: dict,
    hooks: list[str],
    cfg: CircuitsConfig,
) -> dict[str, Any]:
    def node_id(hook: str, feature: int) -> str:
        return f"{hook}/error" if feature == ERROR else f"{hook}/{feature}"

    return {
        "set": plan.name,
        "method": cfg.method.value,
        "metric": cfg.metric.kind.value,
        "hooks": hook_order(hooks),
        "effect_sign": "positive: the node raises the refusal metric (discovery-prompt mean, summed over positions)",
        "nodes": [{"id": node_id(h, f), "hook": h, "feature": f, "kind": "feature", "effect": e} for h, f, e in nodes]
        + [
            {"id": node_id(h, ERROR), "hook": h, "feature": None, "kind": "error", "effect": v}
            for h, v in error_means.items()
        ],
        "edges": [
            {"source": node_id(*u), "target": node_id(*d), "effect": w}
            for (u, d), w in sorted(edges.items(), key=lambda kv: -abs(kv[1]))
        ],
    }


def _metric_random(validation: dict[str, Any]) -> dict[str, Any] | None:
    """The circuit's metric effect against the random sets' (all sets, per-category ones included)."""
    random = (validation.get("metric") or {}).get("random")
    if not random:
        return None
    keys = ("effect", "n_random", "percentile", "p_value")
    out = {k: random.get(k) for k in keys}
    effects = random.get("random_effects") or []
    out["random_effect_median"] = float(np.median(effects)) if effects else None
    return out
