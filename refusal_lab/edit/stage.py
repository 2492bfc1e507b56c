"""The edit stage: a circuit's SAE features edited out of the model, saved as a checkpoint and evaluated.

Reads: the circuits artifact (the source circuit's nodes, `sets/<set>/graph.json` or any nodes
JSON), the SAE folders, the store's sample table (held-out prompts as circuits splits them), the
model. Writes `<artifacts>/edit/<fingerprint>/`:

    nodes.json      the edited features and each writer's basis rank
    checkpoint/     the edited model (save_pretrained: config, weights, generation config, tokenizer, chat template)
    done.json       the stage's summary entry, written last: the commit marker

A rerun with done.json skips the stage; a killed run starts again (it is one stacked pass).

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("<artifacts>/edit/<fp>/checkpoint")
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import AutoModelForCausalLM

from refusal_lab.circuits.batches import PromptBatch, make_text_batches
from refusal_lab.circuits.config import DiscoverySet
from refusal_lab.circuits.direction import directions_from_model
from refusal_lab.circuits.inputs import circuit_hooks, load_pool
from refusal_lab.circuits.selective import NAME as SELECTIVE
from refusal_lab.circuits.sets import split
from refusal_lab.circuits.spliced import forward_batch
from refusal_lab.circuits.stage import SET_MARKER
from refusal_lab.circuits.validate import active_features, random_node_sets
from refusal_lab.config import ConfigError, Stage
from refusal_lab.edit.config import ALGORITHM_VERSION, OUTPUT_NEUTRAL_FIELDS
from refusal_lab.edit.evaluate import Prompts, evaluate
from refusal_lab.edit.intervene import Condition, clamp_fns, direction_fns, projected, projection_fns, writer_bases
from refusal_lab.edit.weights import check_editable, save_edited
from refusal_lab.fingerprint import fingerprint, write_json_atomic
from refusal_lab.refusal import keyword_refusal
from refusal_lab.sae.saelens import load_sae
from refusal_lab.stages import RunContext, to_plain

log = logging.getLogger(__name__)

DONE = "done.json"
CHECKPOINT = "checkpoint"


class EditStage:
    name: ClassVar[Stage] = Stage.edit
    inputs: ClassVar[tuple[Stage, ...]] = (Stage.collect, Stage.sae, Stage.circuits)

    def fingerprint(self, ctx: RunContext) -> str:
        settings = {k: v for k, v in to_plain(ctx.cfg.edit).items() if k not in OUTPUT_NEUTRAL_FIELDS}
        return fingerprint(
            {
                "circuits": ctx.fingerprints[Stage.circuits],
                "sae": ctx.fingerprints[Stage.sae],
                "edit": settings,
                "seed": ctx.cfg.seed,
                "algorithm": ALGORITHM_VERSION,
            }
        )

    def artifact(self, ctx: RunContext) -> Path:
        return ctx.artifacts / "edit" / ctx.fingerprints[Stage.edit]

    def prepare(self, ctx: RunContext) -> None:
        check_inputs(ctx)

    def verify(self, ctx: RunContext) -> None:
        if not (self.artifact(ctx) / DONE).exists():
            raise ConfigError(f"stages: no finished edit stage in {self.artifact(ctx)}; add edit to stages")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        return run_edit(ctx, self.artifact(ctx))


def source_path(ctx: RunContext) -> Path:
    source = ctx.cfg.edit.source
    root = ctx.paths[Stage.circuits]
    return root / source if source.endswith(".json") else root / "sets" / source / "graph.json"


def check_inputs(ctx: RunContext) -> None:
    """Bad input fails here, before any model loads, with the key, the value and what is valid."""
    cfg = ctx.cfg.edit
    sets = [s.value for s in ctx.cfg.circuits.sets]
    if {DiscoverySet.over_refusal, DiscoverySet.toxic} <= set(ctx.cfg.circuits.sets):
        sets.append(SELECTIVE)  # the selective over-refusal circuit (refusal_lab.circuits.selective)
    if not cfg.source.endswith(".json") and cfg.source not in sets:
        raise ConfigError(
            f"edit.source: {cfg.source!r} is not a circuits set of this run; valid: {sets} (circuits.sets) or a "
            "path ending in .json relative to the circuits artifact"
        )
    hooks = circuit_hooks(ctx)
    bad = [h for h in cfg.hooks if h not in hooks]
    if bad:
        raise ConfigError(f"edit.hooks: {bad} are not hook points of the circuits; valid: {hooks}")
    path = source_path(ctx)
    if Stage.circuits not in ctx.cfg.stages and not path.is_file():
        raise ConfigError(f"edit.source: {path} does not exist; add circuits to stages or give another source")


def source_skipped(path: Path) -> str | None:
    """Why the source circuit is missing when the circuits stage skipped its set (its set.json says so), else None."""
    marker = path.parent / SET_MARKER
    if path.name != "graph.json" or path.is_file() or not marker.is_file():
        return None
    entry = json.loads(marker.read_text())
    if entry.get("status") != "skipped":
        return None
    return f"edit.source: the circuits stage skipped the set {path.parent.name!r}: {entry.get('reason')}"


def load_nodes(path: Path, hooks: list[str], max_features: int | None) -> dict[str, list[int]]:
    """hook -> features from a nodes JSON (graph.json layout), in file order, filtered and capped."""
    if not path.is_file():
        raise ConfigError(f"edit.source: {path} does not exist (did the circuits stage skip this set?)")
    nodes = json.loads(path.read_text()).get("nodes", [])
    chosen = [
        (str(n["hook"]), int(n["feature"]))
        for n in nodes
        if n.get("kind", "feature") == "feature" and n.get("feature") is not None and (not hooks or n["hook"] in hooks)
    ][:max_features]
    if not chosen:
        raise ConfigError(f"edit.source: {path} has no feature node (edit.hooks={hooks}); nothing to edit")
    out: dict[str, list[int]] = {}
    for hook, feature in chosen:
        out.setdefault(hook, []).append(feature)
    return out


def held_out(ctx: RunContext, batch: Any) -> tuple[Prompts, list[PromptBatch], list[PromptBatch]]:
    """Held-out prompts (circuits' hash split) by group, and the discovery-side toxic / harmless batches for r."""
    pool, contrast, _ = load_pool(ctx)
    share, cap = ctx.cfg.circuits.validation_share, ctx.cfg.edit.max_prompts
    safe_refused = [i for i, lab in enumerate(pool.labels) if lab == "safe" and pool.refused[i]]
    toxic = [i for i, lab in enumerate(pool.labels) if lab == "toxic"]
    sides = {
        "refused_safe": split(safe_refused, pool.prompts, share, cap),
        "toxic": split(toxic, pool.prompts, share, cap),
        "harmless": split(contrast, pool.prompts, share, cap),
    }
    idx = [i for side in sides.values() for i in side.validation]
    groups = [g for g, side in sides.items() for _ in side.validation]
    texts = [pool.prompts[i] for i in idx]
    harmless_texts = [pool.prompts[i] for i in sides["harmless"].validation]
    toxic_refused = [i for i in sides["toxic"].discovery if pool.refused[i]]
    answered = [i for i in sides["harmless"].discovery if not pool.refused[i]]
    prompts = Prompts(batch(texts), groups, batch(harmless_texts))
    return prompts, batch([pool.prompts[i] for i in toxic_refused]), batch([pool.prompts[i] for i in answered])


def run_edit(ctx: RunContext, out: Path) -> dict[str, Any]:
    done = out / DONE
    if done.exists():
        log.info("edit: %s is complete; skipping", done)
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    cfg = ctx.cfg.edit
    path = source_path(ctx)
    skipped = source_skipped(path)
    if skipped is not None:  # e.g. over_refusal on a model that refuses too few safe prompts (SmolLM2)
        entry = {"status": "skipped", "reason": skipped, "source": str(path)}
        log.info("edit: skipped: %s", skipped)
        write_json_atomic(done, entry)
        return entry
    nodes = load_nodes(path, list(cfg.hooks), cfg.max_features)
    model = ctx.model()
    model.eval()
    check_editable(model)
    sae_root = ctx.paths[Stage.sae]
    all_hooks = circuit_hooks(ctx)
    saes = {h: load_sae(sae_root / h).eval().requires_grad_(False) for h in all_hooks}
    device = next(model.parameters()).device

    def batch(texts: list[str]) -> list[PromptBatch]:
        if not texts:
            return []
        return make_text_batches(ctx.cfg.model, ctx.tokenizer, texts, cfg.batch_size,
                                 ctx.cfg.inference.max_prompt_tokens, device=device)  # fmt: skip

    prompts, toxic_b, harmless_b = held_out(ctx, batch)
    if not prompts.batches or not prompts.harmless:
        raise ConfigError("edit: the run has no held-out harmless or target prompts to evaluate the edit on")
    with torch.random.fork_rng():
        torch.manual_seed(ctx.cfg.seed)
        bases = writer_bases(model, saes, nodes)
        edit_saes = {h: saes[h] for h in nodes}
        circuit = {h: torch.tensor(f, dtype=torch.long) for h, f in nodes.items()}
        active = active_features(model, edit_saes, prompts.batches)  # over every held-out prompt
        random_sets, pool_kind = random_node_sets(circuit, active, cfg.n_random, ctx.cfg.seed)
        directions = directions_from_model(model, all_hooks, toxic_b, harmless_b) if toxic_b and harmless_b else {}
        conditions = [
            Condition("unedited", {}),
            Condition("edit", projection_fns(bases)),
            Condition("sae_clamp", clamp_fns(model, saes, nodes, cfg.clamp_value)),
        ]
        if directions:
            conditions.append(Condition("diff_in_means", direction_fns(directions)))
        n_named = len(conditions)
        for i, s in enumerate(random_sets):
            rand_nodes = {h: idx.tolist() for h, idx in s.items()}
            conditions.append(Condition(f"random_{i}", projection_fns(writer_bases(model, saes, rand_nodes))))
        judge_prefixes = ctx.cfg.model.refusal_prefixes
        result = evaluate(
            model, ctx.tokenizer, prompts, conditions, lambda rs: [keyword_refusal(r, judge_prefixes) for r in rs],
            n_named, cfg.max_new_tokens, cfg.max_rows,
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    ranks = {p.name: int(u.shape[1]) for p, u in bases.items()}
    write_json_atomic(out / "nodes.json", {"source": str(path), "nodes": nodes, "writer_ranks": ranks})
    entry: dict[str, Any] = {
        "source": str(path),
        "nodes": nodes,
        "n_features": sum(len(f) for f in nodes.values()),
        "writer_ranks": ranks,
        "random_pool": pool_kind,
        "judge": "keyword",
        "max_new_tokens": cfg.max_new_tokens,
        **result,
        "checkpoint": None,
    }
    if cfg.save_checkpoint:
        ckpt = out / CHECKPOINT
        save_edited(model, ctx.tokenizer, bases, ckpt)
        check = check_checkpoint(model, bases, ckpt, prompts.batches[:1]) if cfg.verify_checkpoint else None
        entry["checkpoint"] = {"path": str(ckpt), "logit_check": check}
    entry["seconds"] = time.perf_counter() - t0
    entry["path"] = str(out)
    write_json_atomic(done, entry)
    log.info("edit: %s", json.dumps(entry["table"]))
    return entry


@torch.no_grad()
def check_checkpoint(model: Any, bases: Any, ckpt: Path, batches: list[PromptBatch]) -> dict[str, float]:
    """Max |logit difference| between the reloaded checkpoint and the hook-based edit on the live model."""
    edited = AutoModelForCausalLM.from_pretrained(ckpt, dtype=next(model.parameters()).dtype)
    edited.to(next(model.parameters()).device).eval()
    diff, scale = 0.0, 0.0
    for b in batches:
        with projected(model, bases):
            want = forward_batch(model, b)
        got = forward_batch(edited, b)
        real = b.attention_mask.bool()
        diff = max(diff, float((got - want)[real].abs().max()))
        scale = max(scale, float(want[real].abs().max()))
    del edited
    return {"max_abs_diff": diff, "max_abs_logit": scale}
