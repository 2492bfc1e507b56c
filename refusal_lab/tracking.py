"""Experiment tracking: W&B when enabled, a do-nothing stand-in otherwise.

Code never branches on "is W&B on?": it calls `tracker.log(...)` either way (nanoGPT's habit).

A sweep shows up as one W&B group: `group` is the sweep folder (hydra.sweep.dir), `job_type`
the stages the job runs (`collect`, `sae`, `collect+sae`, ...), and the run's name its
overrides (`inference.shard=3`, `sae.hooks=[residuals_0]`). The run id is derived from the run
folder and `resume="allow"`, so a requeued SLURM job (same folder) keeps logging into the same
run instead of starting a new one.

What is logged, besides the resolved config (`wandb.init(config=...)`) and what stages log as
they run (SAE training curves, through `log`): after each stage, `stage_done` logs its
summary.json entry's numbers under `<stage>/...` in the run summary, and per stage:
collect: throughput and refusal rates, and a table of responses and judgements
(`tracking.table_rows` rows, evenly spaced); sae: the SAE folders; circuits: the circuit graphs;
report: the report. Those are W&B artifacts, uploaded when small and logged by reference to
their path when larger than `tracking.reference_mb` (a store or 32 SAEs of a 7B model).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

from refusal_lab.config import TrackingConfig, WandbMode

log = logging.getLogger(__name__)

MAX_NAME = 128
"""W&B's limit for run names and groups."""
MAX_SUMMARY_KEYS = 2000
"""A stage entry's numbers logged at most (a circuits entry can hold thousands)."""
JOB_ONLY_OVERRIDES = ("hydra.", "hydra/", "artifacts_dir=", "store_path=", "tracking.")
"""Overrides that locate or track a job rather than say what it computes: left out of run names."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def image(self, key: str, path: Path) -> None: ...
    def stage_done(self, stage: str, entry: Any, artifact: Path | None) -> None: ...
    def finish(self) -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def image(self, key: str, path: Path) -> None:
        pass

    def stage_done(self, stage: str, entry: Any, artifact: Path | None) -> None:
        pass

    def finish(self) -> None:
        pass


def flat_numbers(entry: Any, prefix: str, out: dict[str, float] | None = None) -> dict[str, float]:
    """Numeric leaves of a nested summary entry, keyed `prefix/a/b` (lists indexed), NaN/inf left out."""
    out = {} if out is None else out
    if len(out) >= MAX_SUMMARY_KEYS:
        return out
    if isinstance(entry, bool):
        out[prefix] = float(entry)
    elif isinstance(entry, int | float):
        if math.isfinite(float(entry)):
            out[prefix] = entry
    elif isinstance(entry, dict):
        for key, value in entry.items():
            flat_numbers(value, f"{prefix}/{key}", out)
    elif isinstance(entry, list | tuple) and len(entry) <= 64:  # long lists are curves or per-prompt data
        for i, value in enumerate(entry):
            flat_numbers(value, f"{prefix}/{i}", out)
    return out


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sweep_identity(run_dir: Path) -> tuple[str | None, str | None]:
    """(group, name) of a Hydra job: the sweep folder and the job's overrides; (None, None) outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra app (tests, notebooks)
        return None, None
    group = None
    if hydra.mode == RunMode.MULTIRUN:
        sweep = Path(str(hydra.sweep.dir))
        group = str(sweep)[-MAX_NAME:]
    overrides = [o for o in hydra.overrides.task if not o.startswith(JOB_ONLY_OVERRIDES)]
    name = ",".join(overrides)[:MAX_NAME] or None
    return group, name


def responses_table(store_path: Path, rows: int) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the responses-and-judgements table: `rows` samples evenly spaced in store order."""
    import numpy as np

    from refusal_lab.store import ActivationStore

    samples = ActivationStore.open(store_path).samples()
    n = len(samples["sample_id"])
    picks = np.unique(np.linspace(0, n - 1, num=min(rows, n)).round().astype(int)) if n else []
    columns = ["sample_id", "label", "category", "prompt", "response", "refused", "refusal_score"]
    data = [
        [
            int(samples["sample_id"][i]),
            str(samples["label"][i]),
            str(samples["category"][i]),
            str(samples["prompt"][i]),
            str(samples["response"][i]),
            bool(samples["refused"][i]),
            float(samples["refusal_score"][i]),
        ]
        for i in picks
    ]
    return columns, data


class WandbTracker:
    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict[str, Any], name: str) -> None:
        import wandb

        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        group, sweep_name = sweep_identity(run_dir)
        stages = config.get("stages") or []
        os.environ.setdefault("WANDB_SILENT", "true")
        self.cfg = cfg
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or sweep_name or name,
            group=cfg.group or group,
            job_type="+".join(str(s) for s in stages) or None,
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

    def stage_done(self, stage: str, entry: Any, artifact: Path | None) -> None:
        self.summary(flat_numbers(entry, stage))
        if stage == "collect" and isinstance(entry, dict) and entry.get("store"):
            self._collect(Path(entry["store"]))  # a shard job's: its part
        kinds = {"sae": "sae", "circuits": "circuit-graphs", "report": "report"}
        if stage in kinds and artifact is not None and artifact.exists():
            self.artifact(f"{stage}-{artifact.name}", kinds[stage], artifact)

    def _collect(self, store: Path) -> None:
        from refusal_lab.store import ActivationStore

        with suppress(Exception):  # throughput is only in a store this code wrote (collect_stats attrs)
            stats = ActivationStore.open(store).attrs.get("collect_stats") or {}
            if stats.get("seconds"):
                self.summary(
                    {"collect/tokens_per_s": stats["tokens"] / stats["seconds"], "collect/seconds": stats["seconds"]}
                )
        if self.cfg.table_rows > 0:
            try:
                columns, rows = responses_table(store, self.cfg.table_rows)
            except Exception as err:  # noqa: BLE001 -- a missing table must not fail the run it describes
                log.warning("tracking: no responses table (%s)", err)
                return
            table = self._wandb.Table(columns=list[Any](columns), data=list[Any](rows))
            self.run.log({"collect/responses": table})

    def artifact(self, name: str, kind: str, path: Path) -> None:
        """Log `path` as a W&B artifact: uploaded when small, by reference to its path when large."""
        art = self._wandb.Artifact(name=name.replace("/", "-")[:MAX_NAME], type=kind)
        size = folder_bytes(path)
        if size > self.cfg.reference_mb * 1e6:
            art.add_reference(path.resolve().as_uri(), checksum=False)
        elif path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: TrackingConfig, run_dir: Path, config: dict[str, Any], name: str) -> Tracker:
    if cfg.wandb == WandbMode.disabled:
        return NullTracker()
    return WandbTracker(cfg, run_dir, config, name)
