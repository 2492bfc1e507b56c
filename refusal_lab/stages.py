"""What the pipeline knows about a stage: a `StageSpec` per stage, and the `RunContext` they share.

A stage declares its name, the upstream stages whose artifacts it reads (`inputs`), the
fingerprint of its artifact (from the config, the upstream fingerprints and its own
ALGORITHM_VERSION), the artifact's path, a cheap `prepare` check that runs before any model
loads, `verify` (is this stage's committed artifact there and made by this config? called
when a downstream stage runs without this one), and `run`, which returns the stage's entry in
summary.json. The pipeline (refusal_lab.pipeline) is a loop over these specs and knows no
stage's internals.

This module imports no stage (every stage imports it): the registry of stages lives in
refusal_lab.pipeline, the one place that orders them. Adding a stage: write a class
satisfying `StageSpec` next to the stage's code (collect's is refusal_lab.collect_spec), add
its name to `refusal_lab.config.Stage` (in pipeline order) and one line to
`refusal_lab.pipeline.stage_specs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from refusal_lab.config import RunConfig, Stage

if TYPE_CHECKING:
    from refusal_lab.collect_plan import CollectPlan
    from refusal_lab.data import Prompt


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
