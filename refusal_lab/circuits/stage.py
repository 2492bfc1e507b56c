"""The circuits stage: causal SAE-feature circuits per discovery set, each committed on its own.

Reads: the activation store's sample table (prompts, labels, categories, refused, responses),
the SAE folders of the sae stage, the model. Writes `<artifacts>/circuits/<fingerprint>/`:

    sets/<set>[__<category>]/effects.npz   per-prompt node effects over a feature pool (for compare)
                             positions.npz per-position effects per hook (inspection)
                             graph.json    nodes (features + error nodes) and pruned edges
                             validation.json
                             set.json      the set's summary entry, written last: the commit marker
    done.json                the stage's summary entry, written last

A killed run continues after the last committed set; a rerun with done.json skips the stage.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from refusal_lab.circuits.compare import compare_committed_sets
from refusal_lab.circuits.config import ALGORITHM_VERSION, OUTPUT_NEUTRAL_FIELDS, CircuitsConfig, DiscoverySet
from refusal_lab.circuits.inputs import check_inputs, circuit_hooks, judgement_fingerprint, load_pool
from refusal_lab.circuits.runner import SetRunner
from refusal_lab.circuits.selective import NAME as SELECTIVE
from refusal_lab.circuits.sets import SetPlan, plan_sets
from refusal_lab.config import ConfigError, Stage
from refusal_lab.fingerprint import fingerprint, write_json_atomic
from refusal_lab.report.cards import write_feature_cards
from refusal_lab.sae.saelens import load_sae
from refusal_lab.stages import RunContext, to_plain

log = logging.getLogger(__name__)

DONE = "done.json"
SET_MARKER = "set.json"


class CircuitsStage:
    name: ClassVar[Stage] = Stage.circuits
    inputs: ClassVar[tuple[Stage, ...]] = (Stage.collect, Stage.sae)

    def fingerprint(self, ctx: RunContext) -> str:
        cfg = ctx.cfg.circuits
        settings = {k: v for k, v in to_plain(cfg).items() if k not in OUTPUT_NEUTRAL_FIELDS}
        return fingerprint(
            {
                "store": ctx.fingerprints[Stage.collect],
                "sae": ctx.fingerprints[Stage.sae],
                "judgement": judgement_fingerprint(ctx),
                "circuits": settings,
                "hooks": circuit_hooks(ctx),
                "seed": ctx.cfg.seed,
                "algorithm": ALGORITHM_VERSION,
            }
        )

    def artifact(self, ctx: RunContext) -> Path:
        return ctx.artifacts / "circuits" / ctx.fingerprints[Stage.circuits]

    def prepare(self, ctx: RunContext) -> None:
        check_inputs(ctx)

    def verify(self, ctx: RunContext) -> None:
        if not (self.artifact(ctx) / DONE).exists():
            raise ConfigError(f"stages: no finished circuits stage in {self.artifact(ctx)}; add circuits to stages")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        return run_circuits(ctx, self.artifact(ctx))


def _skipped(plan: SetPlan, cfg: CircuitsConfig) -> dict[str, Any]:
    return {
        "status": "skipped",
        "reason": plan.skipped,
        "method": cfg.method.value,
        "n_prompts_discovery": len(plan.target.discovery),
        "n_prompts_validation": len(plan.target.validation),
    }


def _set_folder(out_dir: Path, plan: SetPlan) -> Path:
    return out_dir / "sets" / plan.name.replace("/", "__")


def run_circuits(ctx: RunContext, out_dir: Path) -> dict[str, Any]:
    """Run (or continue, or skip) every discovery set; return summary.json's `circuits` entry."""
    done = out_dir / DONE
    if done.exists():
        log.info("circuits: %s is complete; skipping", done)
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    cfg = ctx.cfg.circuits
    pool, contrast, responses = load_pool(ctx)
    plans = plan_sets(
        pool, contrast, cfg.sets, cfg.by_category, cfg.validation_share, cfg.max_prompts, cfg.contrast_limit
    )
    sae_root = ctx.paths[Stage.sae]
    runner: SetRunner | None = None
    # Pooled sets' sizes, for the categories (circuits.category_sizes); also from sets an earlier process committed.
    pooled_sizes: dict[DiscoverySet, int] = {}

    def set_runner() -> SetRunner:
        nonlocal runner
        if runner is None:
            saes = {h: load_sae(sae_root / h).eval() for h in circuit_hooks(ctx)}
            for sae in saes.values():
                sae.requires_grad_(False)
            runner = SetRunner(ctx, pool, contrast, responses, saes)
            runner.pooled_sizes = pooled_sizes
        return runner

    entries: dict[str, dict[str, Any]] = {}
    with torch.random.fork_rng():
        torch.manual_seed(ctx.cfg.seed)
        for plan in plans:
            folder = _set_folder(out_dir, plan)
            marker = folder / SET_MARKER
            if marker.exists():
                entries[plan.name] = json.loads(marker.read_text())
                log.info("circuits: %s is committed; skipping", plan.name)
                if plan.pooled and entries[plan.name].get("status") == "ok":
                    pooled_sizes[plan.kind] = entries[plan.name]["n_nodes"]
                continue
            if plan.skipped:
                log.info("circuits: %s skipped: %s", plan.name, plan.skipped)
                entry = _skipped(plan, cfg)
            else:
                entry = set_runner().run(plan, folder)
                log.info(
                    "circuits: %s: %d nodes, %s edges, faithfulness %s (%.1f s)",
                    plan.name,
                    entry["n_nodes"],
                    entry["n_edges"],
                    entry.get("faithfulness"),
                    entry["seconds"],
                )
            write_json_atomic(marker, entry)
            entries[plan.name] = entry
        if {DiscoverySet.over_refusal, DiscoverySet.toxic} <= set(cfg.sets):
            entries[SELECTIVE] = _selective(out_dir, plans, entries, set_runner)
    summary = _nest(entries)
    summary["specificity"] = specificity_table(entries)
    summary["seconds"] = time.perf_counter() - t0
    summary["path"] = str(out_dir)
    # Category comparison from the committed effects.npz (no model), and feature cards for the report.
    pooled = {p.name: _set_folder(out_dir, p) for p in plans if "/" not in p.name}
    summary["comparison"] = compare_committed_sets(pooled, summary, seed=ctx.cfg.seed)
    write_feature_cards(ctx.store_path, sae_root, pooled, summary, ctx.tokenizer)
    write_json_atomic(done, summary)
    return summary


def _selective(
    out_dir: Path, plans: list[SetPlan], entries: dict[str, dict[str, Any]], set_runner: Callable[[], SetRunner]
) -> dict[str, Any]:
    """The selective over-refusal circuit, committed like a set (after the over_refusal and toxic sets)."""
    folder = out_dir / "sets" / SELECTIVE
    marker = folder / SET_MARKER
    if marker.exists():
        log.info("circuits: %s is committed; skipping", SELECTIVE)
        return json.loads(marker.read_text())
    sources = [DiscoverySet.over_refusal.value, DiscoverySet.toxic.value]
    not_ok = [name for name in sources if entries[name].get("status") != "ok"]
    if not_ok:
        entry: dict[str, Any] = {"status": "skipped", "reason": f"needs the {' and '.join(not_ok)} circuit(s)"}
    else:
        plan = next(p for p in plans if p.name == DiscoverySet.over_refusal.value)
        over_refusal, toxic = (_set_folder(out_dir, next(p for p in plans if p.name == n)) for n in sources)
        entry = set_runner().run_selective(plan, folder, over_refusal, toxic)
        log.info("circuits: %s: %s nodes by hook %s", SELECTIVE, entry.get("n_nodes"), entry.get("nodes_by_hook"))
    write_json_atomic(marker, entry)
    return entry


def specificity_table(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per pooled set (and the selective circuit): refusal-rate drop by label when its circuit is ablated."""
    table: dict[str, Any] = {}
    for name, entry in entries.items():
        ablation = entry.get("ablation") or {}
        if "/" in name or not ablation.get("refusal_rate_drop_by_label"):
            continue
        table[name] = {
            "n_nodes": entry.get("n_nodes"),
            "drop_by_label": ablation["refusal_rate_drop_by_label"],
            "target_drop": ablation.get("refusal_rate_drop"),
            "random_target_drop_median": ablation.get("random_refusal_rate_drop_median"),
            "p_value": ablation.get("p_value"),
            "kl_harmless": ablation.get("kl_harmless"),
        }
    return table


def _nest(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"toxic": {..., "by_category": {cat: {...}}}, ...} from flat `set` / `set/category` entries."""
    out: dict[str, Any] = {}
    for name, entry in entries.items():
        kind, _, category = name.partition("/")
        if category:
            out.setdefault(kind, {}).setdefault("by_category", {})[category] = entry
        else:
            out.setdefault(kind, {}).update(entry)
    return out
