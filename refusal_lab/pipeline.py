"""Stage order, fingerprint-keyed artifacts, resume, and summary.json.

The pipeline is a loop over stage specs (refusal_lab.stages): it knows no stage's internals, only
their order (`stage_specs`, the registry: the one place that lists the stages).
Everything cheap is checked before anything expensive starts: prompts load, the tokenizer
loads, the layer spec fits the model's config, every stage computes its fingerprint and runs
its `prepare` check (the store fits on its disk, the circuits inputs exist, ...), and every
upstream artifact a run reads without producing it is verified against this config's
fingerprint. Stages talk through disk: collect writes `<artifacts>/collect/<fingerprint>.zarr`,
sae writes `<artifacts>/sae/<fingerprint>/<hook>/`, circuits `<artifacts>/circuits/<fingerprint>/`.
A stage whose committed artifact exists is skipped, so a rerun (or a requeued SLURM job)
simply continues.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from refusal_lab.circuits.stage import CircuitsStage
from refusal_lab.claims import claimed, wait_verified
from refusal_lab.collect import plan_collect
from refusal_lab.collect_spec import CollectStage
from refusal_lab.config import ConfigError, RunConfig, Stage
from refusal_lab.data import load_prompts_with_report
from refusal_lab.edit.stage import EditStage
from refusal_lab.fingerprint import fingerprint, write_json_atomic
from refusal_lab.judge.spec import JudgeStage
from refusal_lab.models import load_model, load_tokenizer
from refusal_lab.report.stage import ReportStage
from refusal_lab.sae.spec import SaeStage
from refusal_lab.shards import claim_paths
from refusal_lab.stage_jobs import locked, stage_locks
from refusal_lab.stages import RunContext, StageSpec, to_plain
from refusal_lab.tracking import make_tracker

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


def stage_specs() -> dict[Stage, StageSpec]:
    """Every implemented stage, in pipeline order (the Stage enum's order)."""
    specs: list[StageSpec] = [CollectStage(), JudgeStage(), SaeStage(), CircuitsStage(), EditStage(), ReportStage()]
    order = list(Stage)
    return {spec.name: spec for spec in sorted(specs, key=lambda s: order.index(s.name))}


def _check_run_dir(run_dir: Path, run_fp: str) -> dict[str, Any]:
    """A run folder may only be reused by the same run; returns what it already holds."""
    path = run_dir / SUMMARY
    if not path.exists():
        return {}
    existing = json.loads(path.read_text())
    if existing.get("run_fingerprint") != run_fp:
        raise ConfigError(
            f"hydra.run.dir: {run_dir} holds a different run (fingerprint {existing.get('run_fingerprint')} "
            f"!= {run_fp}); choose another hydra.run.dir or delete it"
        )
    return existing


def _selected(cfg: RunConfig, specs: dict[Stage, StageSpec]) -> list[StageSpec]:
    missing = [s.value for s in cfg.stages if s not in specs]
    if missing:
        raise ConfigError(f"stages: {missing} are not implemented; valid stages: {[s.value for s in specs]}")
    return [spec for name, spec in specs.items() if name in cfg.stages]


def stage_inputs(spec: StageSpec, cfg: RunConfig) -> tuple[Stage, ...]:
    """The stages `spec` reads: its declared `inputs`, and those a setting adds.

    circuits.refused_by=score|llm|classifier reads labels that only the judge stage makes, so the judge
    stage is then an input of circuits and is verified with the other upstreams before any model loads.
    """
    extra = (Stage.judge,) if spec.name == Stage.circuits and cfg.circuits.refused_by.needs_judge_stage else ()
    return (*spec.inputs, *extra)


def _upstream(spec: StageSpec, specs: dict[Stage, StageSpec], cfg: RunConfig) -> list[Stage]:
    """Every stage `spec` reads from, directly or through another input (pipeline order)."""
    seen: set[Stage] = set()
    todo = list(stage_inputs(spec, cfg))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(stage_inputs(specs[name], cfg))
    return [name for name in specs if name in seen]


def _fingerprint_all(ctx: RunContext, specs: dict[Stage, StageSpec]) -> None:
    for spec in specs.values():  # pipeline order: upstream fingerprints exist when a stage asks for them
        ctx.fingerprints[spec.name] = spec.fingerprint(ctx)
        ctx.paths[spec.name] = spec.artifact(ctx)


def _committed(spec: StageSpec, ctx: RunContext) -> bool:
    """Whether the stage's artifact is already committed for this config (its `verify` passes): a cache hit."""
    try:
        spec.verify(ctx)
    except Exception:  # noqa: BLE001 -- verify raises whatever its stage's check raises when the artifact is not there
        return False
    return True


def plan_stages(cfg: RunConfig, ctx: RunContext) -> list[StageSpec]:
    """Fingerprints and paths of every stage; checks of the selected ones and of the inputs they only read.

    Runs before any model loads: everything here is config, tokenizer and file metadata.
    """
    specs = stage_specs()
    selected = _selected(cfg, specs)
    _fingerprint_all(ctx, specs)
    verified: set[Stage] = set()
    for spec in selected:
        for name in _upstream(spec, specs, cfg):
            if name not in cfg.stages and name not in verified:
                # Waits while another job (running, or queued) claims the artifact; fails at once otherwise.
                verify = functools.partial(specs[name].verify, ctx)
                wait_verified(verify, claim_paths(ctx, name), name.value, cfg.upstream_timeout_s)
                verified.add(name)
        spec.prepare(ctx)
    return selected


def make_context(cfg: RunConfig, run_dir: Path, launch_dir: Path) -> tuple[RunContext, Any]:
    """The run's context up to the store path (prompts, tokenizer, plan; no weights) and the data report."""
    artifacts = (launch_dir / cfg.artifacts_dir).resolve()

    # --- everything that can fail cheaply, before any model weights load ---
    prompts, report = load_prompts_with_report(cfg.data)
    log.info("data: %d prompts after filtering and balancing", len(prompts))
    tokenizer = load_tokenizer(cfg.model)
    plan = plan_collect(cfg, tokenizer, prompts)
    ctx = RunContext(
        cfg=cfg,
        run_dir=run_dir,
        launch_dir=launch_dir,
        artifacts=artifacts,
        prompts=prompts,
        tokenizer=tokenizer,
        plan=plan,
        store_path=artifacts / "collect" / "pending.zarr",  # replaced below once the collect fingerprint is known
        model_loader=lambda: load_model(cfg.model),
    )
    collect_spec = stage_specs()[Stage.collect]
    collect_fp = collect_spec.fingerprint(ctx)
    ctx.store_path = (
        (launch_dir / cfg.store_path).resolve() if cfg.store_path else artifacts / "collect" / f"{collect_fp}.zarr"
    )
    return ctx, report


def planned_context(cfg: RunConfig, launch_dir: Path) -> RunContext:
    """Every stage's fingerprint and artifact path for `cfg`, from config, prompts and tokenizer alone.

    The launcher (refusal_lab.launcher) claims the artifacts of a job's stages when it submits
    the job (refusal_lab.claims); nothing is checked or waited for here.
    """
    ctx, _ = make_context(cfg, launch_dir, launch_dir)
    _fingerprint_all(ctx, stage_specs())
    return ctx


def run(cfg: RunConfig, run_dir: Path, launch_dir: Path) -> dict[str, Any]:
    """Run the configured stages and return summary.json's content."""
    torch.manual_seed(cfg.seed)
    ctx, report = make_context(cfg, run_dir, launch_dir)
    selected = plan_stages(cfg, ctx)
    run_fp = fingerprint({s.name.value: ctx.fingerprints[s.name] for s in selected})
    summary: dict[str, Any] = _check_run_dir(run_dir, run_fp)
    summary.update({"run_fingerprint": run_fp, "stages": [s.value for s in cfg.stages], "data": report.to_dict()})
    ctx.summary = summary

    ctx.tracker = make_tracker(
        cfg.tracking, run_dir, to_plain(cfg), name=f"{cfg.model.name.split('/')[-1]}-{run_dir.name}"
    )
    try:
        for spec in selected:
            t_stage = time.perf_counter()
            hit = "hit: its committed artifact is there" if _committed(spec, ctx) else "miss: it will be produced"
            log.info("%s: start; cache %s; artifact %s", spec.name.value, hit, ctx.paths[spec.name])
            with claimed(ctx.paths[spec.name]), locked(stage_locks(spec, ctx)):
                summary[spec.name.value] = spec.run(ctx)
            ctx.tracker.stage_done(spec.name.value, summary[spec.name.value], ctx.paths[spec.name])
            write_json_atomic(run_dir / SUMMARY, summary)
            seconds = time.perf_counter() - t_stage
            log.info("%s: end (%.1f s); artifact %s", spec.name.value, seconds, ctx.paths[spec.name])
    finally:
        ctx.tracker.finish()
    log.info("summary: %s", run_dir / SUMMARY)
    return summary
