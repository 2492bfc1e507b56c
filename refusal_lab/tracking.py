"""Experiment tracking: W&B when enabled, a do-nothing stand-in otherwise.

Code never branches on "is W&B on?": it calls `tracker.log(...)` either way (nanoGPT's habit).
The W&B run id is derived from the run folder, and `resume="allow"`, so a requeued SLURM job
keeps logging into the same run instead of starting a new one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from refusal_lab.config import TrackingConfig, WandbMode

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def image(self, key: str, path: Path) -> None: ...
    def finish(self) -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def image(self, key: str, path: Path) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict[str, Any], name: str) -> None:
        import wandb

        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or name,
            id=run_id,
            resume="allow",
            mode=cfg.wandb.value,
            dir=str(run_dir),
            config=config,
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def image(self, key: str, path: Path) -> None:
        self.run.log({key: self._wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: TrackingConfig, run_dir: Path, config: dict[str, Any], name: str) -> Tracker:
    if cfg.wandb == WandbMode.disabled:
        return NullTracker()
    return WandbTracker(cfg, run_dir, config, name)
