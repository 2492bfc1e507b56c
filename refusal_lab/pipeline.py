"""Stage order, fingerprint-keyed artifacts, resume, and summary.json.

Everything cheap is checked before anything expensive starts: prompts load, the tokenizer
loads, the layer spec fits the model's config, the store fits on its disk. Stages talk
through disk: collect writes `<artifacts>/collect/<fingerprint>.zarr`, sae writes
`<artifacts>/sae/<fingerprint>/<hook>/`. A stage whose committed artifact exists is
skipped, so a rerun (or a requeued SLURM job) simply continues.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import platform
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from refusal_lab.collect import check_disk, collect_fingerprint, plan_collect, run_collect
from refusal_lab.config import ConfigError, RunConfig, Stage
from refusal_lab.data import load_prompts_with_report, prompts_fingerprint
from refusal_lab.fingerprint import exclusive, fingerprint, write_json_atomic
from refusal_lab.models import load_model, load_tokenizer
from refusal_lab.sae.config import OUTPUT_NEUTRAL_FIELDS
from refusal_lab.summary import collect_summary
from refusal_lab.tracking import make_tracker

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


def to_plain(cfg: Any) -> Any:
    """Dataclasses/enums -> JSON-ready dicts (for fingerprints, attrs and W&B config)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Enum):
        return cfg.value
    if isinstance(cfg, list | tuple):
        return [to_plain(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: to_plain(v) for k, v in cfg.items()}
    return cfg


def package_versions() -> dict[str, str]:
    names = ["refusal_lab", "torch", "transformers", "tokenizers", "zarr", "numcodecs", "numpy", "hydra-core"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def sae_fingerprint(cfg: RunConfig, collect_fp: str) -> str:
    """Names the SAE artifacts: the store, the seed and every SAE setting that changes the SAEs."""
    settings = {k: v for k, v in to_plain(cfg.sae).items() if k not in OUTPUT_NEUTRAL_FIELDS}
    return fingerprint({"store": collect_fp, "sae": settings, "seed": cfg.seed})


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


def run(cfg: RunConfig, run_dir: Path, launch_dir: Path) -> dict[str, Any]:
    """Run the configured stages and return summary.json's content."""
    torch.manual_seed(cfg.seed)
    artifacts = (launch_dir / cfg.artifacts_dir).resolve()

    # --- everything that can fail cheaply, before any model weights load ---
    prompts, report = load_prompts_with_report(cfg.data)
    log.info("data: %d prompts after filtering and balancing", len(prompts))
    tokenizer = load_tokenizer(cfg.model)
    plan = plan_collect(cfg, tokenizer, prompts)
    collect_fp = fingerprint(collect_fingerprint(cfg, plan, prompts_fingerprint(prompts)))
    store_path = (
        (launch_dir / cfg.store_path).resolve() if cfg.store_path else artifacts / "collect" / f"{collect_fp}.zarr"
    )
    if Stage.collect in cfg.stages:
        check_disk(plan, store_path, cfg.inference)
    sae_fp = sae_fingerprint(cfg, collect_fp)
    run_fp = fingerprint({"collect": collect_fp, "sae": sae_fp, "stages": [s.value for s in cfg.stages]})
    summary: dict[str, Any] = _check_run_dir(run_dir, run_fp)
    summary.update({"run_fingerprint": run_fp, "stages": [s.value for s in cfg.stages], "data": report.to_dict()})

    tracker = make_tracker(cfg.tracking, run_dir, to_plain(cfg), name=f"{cfg.model.name.split('/')[-1]}-{run_dir.name}")
    try:
        if Stage.collect in cfg.stages:
            attrs = {
                "model": cfg.model.name,
                "revision": cfg.model.revision,
                "tokenizer": tokenizer.name_or_path,
                "chat_template": tokenizer.chat_template,
                "chat_format": dataclasses.asdict(plan.fmt),
                "config": to_plain(cfg),
                "versions": package_versions(),
            }
            with exclusive(store_path):
                run_collect(cfg, prompts, tokenizer, plan, store_path, collect_fp, attrs)
            summary["collect"] = collect_summary(store_path)
            tracker.summary({"collect/" + k: v for k, v in summary["collect"]["refusal_rate"]["by_label"].items()})
            write_json_atomic(run_dir / SUMMARY, summary)
        if Stage.sae in cfg.stages:
            from refusal_lab.sae.stage import run_sae_stage

            sae_dir = artifacts / "sae" / sae_fp
            with exclusive(sae_dir):
                results = run_sae_stage(
                    cfg.sae,
                    store_path,
                    sae_dir,
                    model_loader=lambda: (load_model(cfg.model), tokenizer),
                    seed=cfg.seed,
                    tracker=tracker,
                )
            summary["sae"] = results
            write_json_atomic(run_dir / SUMMARY, summary)
    finally:
        tracker.finish()
    log.info("summary: %s", run_dir / SUMMARY)
    return summary
