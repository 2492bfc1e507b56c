"""What the pipeline knows about a stage: a `StageSpec` per stage, and the `RunContext` they share.

A stage declares its name, the upstream stages whose artifacts it reads (`inputs`), the
fingerprint of its artifact (from the config, the upstream fingerprints and its own
ALGORITHM_VERSION), the artifact's path, a cheap `prepare` check that runs before any model
loads, `verify` (is this stage's committed artifact there and made by this config? called
when a downstream stage runs without this one), and `run`, which returns the stage's entry in
summary.json. The pipeline (refusal_lab.pipeline) is a loop over these specs and knows no
stage's internals.

Adding a stage: write a class satisfying `StageSpec` next to the stage's code, add its name
to `refusal_lab.config.Stage` (in pipeline order) and one line to `stage_specs` below.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Protocol

from refusal_lab import shards
from refusal_lab.collect import CollectPlan, check_disk, collect_fingerprint, run_collect
from refusal_lab.config import ConfigError, RunConfig, Stage
from refusal_lab.data import Prompt, prompts_fingerprint
from refusal_lab.fingerprint import fingerprint
from refusal_lab.store import StoreMismatchError, read_json, store_meta
from refusal_lab.summary import collect_summary


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


@dataclass
class RunContext:
    """Everything the stages of one run share; built by the pipeline before any model loads."""

    cfg: RunConfig
    run_dir: Path
    launch_dir: Path
    artifacts: Path
    """Resolved root of the fingerprint-keyed stage artifacts."""
    prompts: list[Prompt]
    tokenizer: Any
    plan: CollectPlan
    store_path: Path
    """The activation store: `store_path` when set, else `<artifacts>/collect/<collect fingerprint>.zarr`."""
    fingerprints: dict[Stage, str] = field(default_factory=dict)
    """Every registered stage's fingerprint (also of stages not run: downstream stages name their inputs by them)."""
    paths: dict[Stage, Path] = field(default_factory=dict)
    """Every registered stage's artifact path."""
    summary: dict[str, Any] = field(default_factory=dict)
    """summary.json as it grows; a stage may read upstream entries."""
    tracker: Any = None
    model_loader: Callable[[], Any] | None = None
    """Loads the model once per run (set by the pipeline); stages call `ctx.model()`."""
    _model: Any = None

    def model(self) -> Any:
        """The run's model, loaded on first use and shared by every stage that needs it."""
        if self._model is None:
            assert self.model_loader is not None
            self._model = self.model_loader()
        return self._model


class StageSpec(Protocol):
    """A pipeline stage as the pipeline sees it (see the module docstring)."""

    name: ClassVar[Stage]
    inputs: ClassVar[tuple[Stage, ...]]

    def fingerprint(self, ctx: RunContext) -> str:
        """Names the artifact after exactly what decides its content (upstream fingerprints are in ctx)."""
        ...

    def artifact(self, ctx: RunContext) -> Path:
        """Where the committed artifact lives (the pipeline holds an exclusive lock on it while `run` writes)."""
        ...

    def prepare(self, ctx: RunContext) -> None:
        """Cheap checks for a stage that will run, before any model loads; raise ConfigError."""
        ...

    def verify(self, ctx: RunContext) -> None:
        """For a stage that does not run but feeds one that does: its artifact exists and matches; else raise."""
        ...

    def run(self, ctx: RunContext) -> Any:
        """Produce (or resume, or skip) the artifact; return the stage's summary.json entry."""
        ...


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


def stage_specs() -> dict[Stage, StageSpec]:
    """Every implemented stage, in pipeline order (the Stage enum's order)."""
    # Imported here: stage packages import refusal_lab.config, which must finish loading first.
    from refusal_lab.circuits.stage import CircuitsStage
    from refusal_lab.judge.spec import JudgeStage
    from refusal_lab.report.stage import ReportStage
    from refusal_lab.sae.spec import SaeStage

    specs: list[StageSpec] = [CollectStage(), JudgeStage(), SaeStage(), CircuitsStage(), ReportStage()]
    order = list(Stage)
    return {spec.name: spec for spec in sorted(specs, key=lambda s: order.index(s.name))}
