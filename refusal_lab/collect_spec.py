"""The collect stage as the pipeline sees it (refusal_lab.stages.StageSpec): fingerprint, store path, run.

Reads the run context's prompts, tokenizer and plan; writes the activation store through
refusal_lab.collect (or, for a sharded collect, its parts through refusal_lab.shards).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from pathlib import Path
from typing import Any, ClassVar

from refusal_lab import shards
from refusal_lab.collect import check_disk, collect_fingerprint, run_collect
from refusal_lab.config import ConfigError, Stage
from refusal_lab.data import prompts_fingerprint
from refusal_lab.fingerprint import fingerprint
from refusal_lab.stages import RunContext, to_plain
from refusal_lab.store import StoreMismatchError, read_json, store_meta
from refusal_lab.summary import collect_summary


def package_versions() -> dict[str, str]:
    names = ["refusal_lab", "torch", "transformers", "tokenizers", "zarr", "numcodecs", "numpy", "hydra-core"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class CollectStage:
    """Generation, judging and activation capture into the Zarr store (refusal_lab.collect)."""

    name: ClassVar[Stage] = Stage.collect
    inputs: ClassVar[tuple[Stage, ...]] = ()

    def fingerprint(self, ctx: RunContext) -> str:
        return fingerprint(collect_fingerprint(ctx.cfg, ctx.plan, prompts_fingerprint(ctx.prompts)))

    def artifact(self, ctx: RunContext) -> Path:
        return shards.shard_artifact(ctx)  # a shard job's part (refusal_lab.shards), else ctx.store_path

    def prepare(self, ctx: RunContext) -> None:
        if not shards.prepare_parts(ctx):
            check_disk(ctx.plan, ctx.store_path, ctx.cfg.inference)

    def verify(self, ctx: RunContext) -> None:
        path, want = ctx.store_path, ctx.fingerprints[Stage.collect]
        if shards.verify_parts(path, want):  # a sharded collect's parts index: every part there and complete
            return
        meta = store_meta(path)
        if meta is None:
            raise ConfigError(
                f"store_path: {path} holds no activation store; add collect to stages, or set store_path to the "
                "store this config collected"
            )
        if meta["fingerprint"] != want:
            raise StoreMismatchError(
                f"store_path: {path} was collected by another config (store fingerprint {meta['fingerprint']}, "
                f"this config's collect fingerprint {want}: model, layers, positions, generation or prompts differ); "
                "point store_path at the store this config collected, or add collect to stages to collect it"
            )
        manifest = read_json(path / "manifest.json")
        if not (manifest and manifest.get("complete")):
            raise ConfigError(f"store_path: {path} is incomplete; add collect to stages to finish it")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg, plan = ctx.cfg, ctx.plan
        attrs = {
            "model": cfg.model.name,
            "revision": cfg.model.revision,
            "tokenizer": ctx.tokenizer.name_or_path,
            "chat_template": ctx.tokenizer.chat_template,
            "chat_format": dataclasses.asdict(plan.fmt),
            "config": to_plain(cfg),
            "versions": package_versions(),
        }
        parts_entry = shards.collect_parts(ctx, attrs)  # a shard job, or a run finding a sharded store
        if parts_entry is not None:
            return parts_entry
        run_collect(cfg, ctx.prompts, ctx.tokenizer, plan, ctx.store_path, ctx.fingerprints[Stage.collect], attrs)
        entry = collect_summary(ctx.store_path)
        if ctx.tracker is not None:
            ctx.tracker.summary({"collect/" + k: v for k, v in entry["refusal_rate"]["by_label"].items()})
        return entry
