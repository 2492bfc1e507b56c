"""Hydra's submitit launchers, claiming each job's artifacts at submission (refusal_lab.claims).

`conf/hydra/launcher/slurm.yaml` and `local.yaml` select them (the classes live in
hydra_plugins/refusal_lab_launcher, where Hydra looks for launchers). Before submitting, the launcher
computes every job's stage artifacts from its config (prompts and tokenizer only, as the
pipeline does before loading weights) and, for a sharded collect, lists the job's part in the
store's parts index; right after submission it writes one claim per artifact naming the job's
SLURM id (or, for local jobs, its pid). A job of another sweep that needs one of these
artifacts then waits while the producing job is still pending in the queue, instead of failing
or collecting the store again. A config that cannot be planned here is left to fail in its job,
with its own message, and claims nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from hydra.core.utils import JobReturn
from omegaconf import OmegaConf, open_dict

from refusal_lab.claims import write_claim

log = logging.getLogger(__name__)


def job_artifacts(launcher: Any, overrides: list[str]) -> list[Path]:
    """Artifact paths the job with `overrides` will produce ([] when its config cannot be planned here)."""
    from refusal_lab.config import RunConfig
    from refusal_lab.pipeline import planned_context
    from refusal_lab.shards import register_planned_part

    try:
        job_cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
        with open_dict(job_cfg):
            del job_cfg["hydra"]
        cfg = OmegaConf.to_object(job_cfg)
        assert isinstance(cfg, RunConfig)
        ctx = planned_context(cfg, Path(os.getcwd()))
        register_planned_part(ctx)
    except Exception as err:  # the job reports its own config error when it runs
        log.warning("launcher: cannot plan the artifacts of job %s (%s); it claims none at submission", overrides, err)
        return []
    return [ctx.paths[name] for name in cfg.stages if name in ctx.paths]


class Claiming:
    """Mixin for BaseSubmititLauncher: claims at submission, between submitit's map_array and the wait."""

    _EXECUTOR: str

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        planned = [job_artifacts(self, list(o)) for o in job_overrides]
        submit = submitit.AutoExecutor.map_array
        local = self._EXECUTOR == "local"

        def map_array_and_claim(executor: Any, fn: Any, *iterables: Any) -> list[Any]:
            jobs = submit(executor, fn, *iterables)
            for job, artifacts in zip(jobs, planned, strict=True):
                for artifact in artifacts:
                    write_claim(
                        artifact,
                        slurm_job=None if local else str(job.job_id),
                        pid=int(job.job_id) if local else None,
                        kind="submitted",
                    )
            return jobs

        # The base class submits and then blocks until every job ends: the claims go in between.
        with mock.patch.object(submitit.AutoExecutor, "map_array", map_array_and_claim):
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
