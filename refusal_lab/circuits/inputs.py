"""What the circuits stage reads, and the checks on it before any model loads.

Reads: the activation store's sample table (prompts, labels, categories, refused, responses), a
judge's labels when `circuits.refused_by` names one, and `circuits.contrast_data`. Writes nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refusal_lab.circuits.config import CircuitsConfig, DiscoverySet, MetricKind, RefusedBy
from refusal_lab.circuits.sets import PromptPool
from refusal_lab.config import ConfigError, Positions, Stage
from refusal_lab.stages import RunContext
from refusal_lab.store import ActivationStore, Phase


def sae_hooks(ctx: RunContext) -> list[str]:
    """The hook points that have an SAE: sae.hooks, or every hook point of the run."""
    run_hooks = [p.name for p in ctx.plan.hook_points]
    return [h for h in run_hooks if h in ctx.cfg.sae.hooks] if ctx.cfg.sae.hooks else run_hooks


def circuit_hooks(ctx: RunContext) -> list[str]:
    """The hook points the circuits span: circuits.hooks, or every hook point with an SAE."""
    return list(ctx.cfg.circuits.hooks) or sae_hooks(ctx)


def judgement_fingerprint(ctx: RunContext) -> str:
    """What decided `refused`: the store's column (covered by the store fingerprint), or a judge's labels."""
    cfg = ctx.cfg.circuits
    if cfg.refused_by == RefusedBy.store:
        return "store"
    from refusal_lab import judge

    m = ctx.cfg.model
    return judge.judgement_fingerprint(
        ctx.fingerprints[Stage.collect], cfg.refused_by.value, ctx.cfg.judge, m.name, m.refusal_prefixes
    )


def check_inputs(ctx: RunContext) -> None:
    """Bad input fails here, before any model loads, with one message naming the key and what is valid."""
    cfg, with_sae = ctx.cfg.circuits, sae_hooks(ctx)
    missing = [h for h in cfg.hooks if h not in with_sae]
    if missing:
        raise ConfigError(
            f"circuits.hooks: {missing} have no SAE in this run; valid: the hook points with an SAE {with_sae} "
            "(model.activation_layers, sae.hooks)"
        )
    positions = ctx.cfg.inference.positions
    if not ctx.cfg.inference.save_activations:
        raise ConfigError("inference.save_activations: false stores no token table; circuits needs it (set it true)")
    if cfg.metric.kind == MetricKind.response_score:
        if positions not in (Positions.all, Positions.generated) or ctx.cfg.inference.max_new_tokens == 0:
            raise ConfigError(
                f"inference.positions: {positions.value} stores no response tokens, which circuits.metric.kind="
                "response_score reads; valid: all or generated (with inference.max_new_tokens > 0)"
            )
    elif positions not in (Positions.all, Positions.prompt, Positions.last_prompt):
        raise ConfigError(
            f"inference.positions: {positions.value} does not store the last prompt position, which circuits.metric"
            f".kind={cfg.metric.kind.value} is read at; valid: all, prompt or last_prompt (or metric response_score)"
        )
    needs_harmless = any(s in (DiscoverySet.toxic, DiscoverySet.safe) for s in cfg.sets)
    if needs_harmless and cfg.contrast_data is None and not any(p.label == "harmless" for p in ctx.prompts):
        raise ConfigError(
            "circuits.contrast_data: the run's data has no harmless prompts for the toxic/safe contrast; set "
            "circuits.contrast_data to a data config (e.g. the keys of conf/data/refusal_direction_harmless.yaml) "
            "or drop toxic and safe from circuits.sets"
        )
    if cfg.contrast_data is not None:
        _contrast_prompts(cfg)  # loads (cheap) so that a bad path fails now


def _contrast_prompts(cfg: CircuitsConfig) -> list[Any]:
    from refusal_lab.config import DataConfig
    from refusal_lab.data import load_prompts

    raw = cfg.contrast_data
    if not isinstance(raw, DataConfig):
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        # Through the schema, as a `data` option would be: enum strings become enums, unknown keys fail.
        try:
            raw = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), dict(raw)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"circuits.contrast_data: not a data config ({err}); see conf/data/*.yaml") from err
    assert isinstance(raw, DataConfig)
    return load_prompts(raw)


def load_pool(ctx: RunContext) -> tuple[PromptPool, list[int], list[list[int]] | None]:
    """The store's prompts (+ external contrast prompts), the harmless contrast indices, and responses."""
    cfg = ctx.cfg.circuits
    store = ActivationStore.open(ctx.store_path)
    samples = store.samples()
    prompts = [str(x) for x in samples["prompt"]]
    labels = [str(x) for x in samples["label"]]
    categories = [str(x) for x in samples["category"]]
    if cfg.refused_by == RefusedBy.store:
        refused = np.asarray(samples["refused"], bool)
    else:
        from refusal_lab import judge

        labels_N = judge.refused_labels(ctx.store_path, ctx.artifacts, cfg.refused_by.value, cfg=ctx.cfg.judge)
        refused = np.asarray(labels_N, bool)
    responses = None
    if cfg.metric.kind == MetricKind.response_score:
        responses = _responses(store, np.asarray(samples["sample_id"]))
    if cfg.contrast_data is not None:
        extra = _contrast_prompts(cfg)
        contrast = list(range(len(prompts), len(prompts) + len(extra)))
        prompts += [p.text for p in extra]
        labels += ["harmless"] * len(extra)
        categories += ["contrast"] * len(extra)
        refused = np.concatenate([refused, np.zeros(len(extra), bool)])
        if responses is not None:
            responses += [[] for _ in extra]
    else:
        contrast = [i for i, lab in enumerate(labels) if lab == "harmless"]
    return PromptPool(prompts, labels, categories, refused), contrast, responses


def _responses(store: ActivationStore, sample_ids: np.ndarray) -> list[list[int]]:
    tokens = store.tokens()
    gen = tokens["phase"] == int(Phase.GENERATED)
    order = np.lexsort((tokens["position"][gen], tokens["sample_id"][gen]))
    sid, tid = tokens["sample_id"][gen][order], tokens["token_id"][gen][order]
    by_sample: dict[int, list[int]] = {}
    for s, t in zip(sid.tolist(), tid.tolist(), strict=True):
        by_sample.setdefault(s, []).append(t)
    return [by_sample.get(int(s), []) for s in sample_ids]
