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

A sweep whose jobs fail fails (issue 17): the base launcher raised at the first job without a result and read a
result file as the job's end, which on SLURM it need not be (a job requeued after writing it runs again; a job can
exit non-zero after it). Here every job is waited for, on SLURM until accounting holds its last run's final state, and
then one error names every failed job with its state and log paths (SweepFailedError, exit 1).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from hydra.core.utils import JobReturn, JobStatus
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


UNSETTLED = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "PREEMPTED"}
"""SLURM states after which the job runs (again): not its end, whatever result file its earlier run left."""
UNKNOWN_WAIT_S = 300.0
"""How long a SLURM job may stay unknown to accounting (`sacct` lags the job's end) before it counts as failed."""


class SweepFailedError(RuntimeError):
    """Jobs of a sweep failed; the message names each with its state and logs."""


def settled_state(job: Any, poll_s: float = 2.0) -> str:
    """A SLURM job's state once its last run has ended (REQUEUED and PENDING are waited through)."""
    unknown_since = None
    while True:
        state = str(job.watcher.get_state(job.job_id, mode="force")).split()[0].upper()
        if state == "UNKNOWN":
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > UNKNOWN_WAIT_S:
                return state
        elif state not in UNSETTLED:
            return state
        time.sleep(poll_s)


class Outcome:
    """A submitted job as the base launcher sees it: `results()` never raises, it returns what happened."""

    def __init__(self, job: Any, slurm: bool) -> None:
        self.job, self.slurm = job, slurm
        self.state: str | None = None
        self.error: Exception | None = None

    def results(self) -> list[Any]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        self.job.wait()
        if self.slurm:
            self.state = settled_state(self.job)
        try:
            return self.job.results()  # the last run's result file, now that it has ended
        except (FailedJobError, UncompletedJobError) as err:
            self.error = err
            return [None]

    def failure(self, job_return: JobReturn | None) -> str | None:
        """Why the job failed, or None when it succeeded."""
        if self.error is not None:
            lines = str(self.error).splitlines()
            why = next((line for line in lines if "state:" in line), lines[0])  # submitit's "... (state: FAILED)"
            return f"{why.strip()}; {self.last_error()}"
        if job_return is None or job_return.status != JobStatus.COMPLETED:
            raised = getattr(job_return, "_return_value", None)
            return f"raised {type(raised).__name__}: {raised}"
        if self.slurm and self.state != "COMPLETED":
            return f"wrote a result but its last run ended {self.state}"
        return None

    def last_error(self) -> str:
        """The job's last ERROR log line (its own message, e.g. the ConfigError), from its stdout."""
        try:
            lines = self.job.paths.stdout.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "[ERROR]" in line or "Error:" in line]
        return errors[-1].strip() if errors else "no error line in its log"

    def describe(self, num: int, overrides: Sequence[str], why: str, sweep_dir: Path) -> str:
        paths = self.job.paths
        state = f", SLURM state {self.state}" if self.slurm else ""
        job_dir = sweep_dir / str(num)
        folder = f"\n    job folder: {job_dir}" if job_dir.is_dir() else ""
        return (
            f"  #{num} ({' '.join(overrides)}), job {self.job.job_id}{state}: {why}\n"
            f"    logs: {paths.stderr}\n          {paths.stdout}{folder}"
        )


class Claiming:
    """Mixin for BaseSubmititLauncher: claims at submission, between submitit's map_array and the wait."""

    _EXECUTOR: str

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        planned = [job_artifacts(self, list(o)) for o in job_overrides]
        submit = submitit.AutoExecutor.map_array
        local = self._EXECUTOR == "local"
        outcomes: list[Outcome] = []

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
            outcomes.extend(Outcome(job, slurm=not local) for job in jobs)
            return outcomes

        # The base class submits and then blocks until every job ends: the claims go in between.
        with mock.patch.object(submitit.AutoExecutor, "map_array", map_array_and_claim):
            returns = super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # type: ignore[attr-defined]
        failed = [
            outcome.describe(initial_job_idx + i, overrides, why, sweep_dir)
            for i, (outcome, overrides, job_return) in enumerate(zip(outcomes, job_overrides, returns, strict=True))
            if (why := outcome.failure(job_return)) is not None
        ]
        if failed:
            message = f"{len(failed)} of {len(outcomes)} jobs of the sweep failed:\n" + "\n".join(failed)
            log.error(message)
            raise SweepFailedError(message)
        return returns
