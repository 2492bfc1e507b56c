"""Claims: which job is producing an artifact, so a job that needs it waits instead of recomputing or failing.

A claim is a small JSON file in `<artifact>.claims/`, one per claimant, written

* at submission, by the SLURM launcher (refusal_lab.launcher), for every artifact a submitted job
  will produce, naming the job's SLURM id: a job still pending in the queue holds its claim;
* at start, by the pipeline, around each stage it runs (`claimed`), naming the SLURM job (when
  there is one), the host and the pid.

A claim is live while its SLURM job is in the queue (`squeue` lists it: pending, running,
requeued) or, without SLURM, while its process runs on this host. A stage that only reads an
upstream artifact (`stages=[sae]` on a store) verifies it; when it is not there yet
(`wait_verified`): it waits while a live claim exists (polling, up to `upstream_timeout_s`,
then a clear timeout), and fails at once when nobody is producing it, naming the command that
does. Claims are advisory: the lock on the artifact (refusal_lab.fingerprint.exclusive) is
what keeps two writers apart.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from refusal_lab.errors import ConfigError
from refusal_lab.fingerprint import write_json_atomic
from refusal_lab.store import StoreMismatchError

log = logging.getLogger(__name__)

POLL_S = 5.0
"""Seconds between checks while waiting for a claimed artifact."""
SUBMIT_GRACE_S = 300.0
"""A submission claim without a SLURM id (the launcher died mid-submit) counts as live this long."""


class UpstreamMissingError(ConfigError):
    """An upstream artifact is missing and no job is producing it."""


class UpstreamTimeoutError(RuntimeError):
    """An upstream artifact claimed by another job did not appear in time."""


def claims_dir(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".claims")


def slurm_job_id() -> str | None:
    """This process's SLURM job as squeue names it (`<array>_<task>` for an array task)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def write_claim(artifact: Path, *, slurm_job: str | None, pid: int | None, kind: str, command: str = "") -> Path:
    """Record that `slurm_job` (or `pid` on this host) is producing `artifact`; returns the claim file."""
    key = f"slurm-{slurm_job}" if slurm_job else f"{socket.gethostname()}-{pid}"
    path = claims_dir(artifact) / f"{key}.json"
    payload = {
        "artifact": str(artifact),
        "kind": kind,
        "slurm_job": slurm_job,
        "host": socket.gethostname(),
        "pid": pid,
        "time": time.time(),
        "command": command,
    }
    write_json_atomic(path, payload)
    return path


@contextmanager
def claimed(artifact: Path, command: str = "") -> Iterator[None]:
    """This process claims `artifact` while the block runs (the stage producing it)."""
    # A submitit local job is known by its id (the pid of its process tree's root): the claim written at
    # submission under that id is replaced here and removed at the end.
    pid = int(os.environ.get("SUBMITIT_LOCAL_JOB_ID") or os.getpid())
    path = write_claim(artifact, slurm_job=slurm_job_id(), pid=pid, kind="running", command=command)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        with suppress(OSError):
            path.parent.rmdir()  # only when no other claim is left


def _squeue_alive(job: str) -> bool | None:
    """True/False when squeue answers for `job`; None when there is no SLURM here."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30, check=False
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # "Invalid job id specified": it left the queue long ago. Any other error (slurmctld busy or
        # restarting) says nothing about the job: count it as alive; upstream_timeout_s bounds the wait.
        return "invalid job id" not in out.stderr.lower()
    return bool(out.stdout.strip())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_alive(claim: dict[str, Any]) -> bool:
    job = claim.get("slurm_job")
    if job:
        alive = _squeue_alive(str(job))
        if alive is not None:
            return alive
    if claim.get("host") == socket.gethostname() and claim.get("pid"):
        return _pid_alive(int(claim["pid"]))
    if claim.get("kind") == "submitted" and not job:
        return time.time() - float(claim.get("time", 0)) < SUBMIT_GRACE_S
    return False  # another host's process, no SLURM to ask: cannot tell, so do not wait forever on it


def live_claims(artifact: Path) -> list[dict[str, Any]]:
    out = []
    folder = claims_dir(artifact)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            claim = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if claim_alive(claim):
            out.append(claim)
    return out


def producing_command(stage: str) -> str:
    """The command that produces `stage`'s artifact for this job's config: its overrides with stages=[stage]."""
    overrides: list[str] = []
    with suppress(Exception):  # outside a Hydra app (tests, notebooks) there are no overrides to repeat
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    job_only = ("stages=", "hydra/launcher=", "hydra.", "sae.hooks=")  # what a sweep varies per job, not the artifact
    keep = [o for o in overrides if not o.startswith(job_only)]
    return shlex.join(["python", "-m", "refusal_lab", f"stages=[{stage}]", *keep])


def wait_verified(
    verify: Callable[[], None], artifacts: list[Path], stage: str, timeout_s: float, poll_s: float | None = None
) -> None:
    """`verify()` the upstream artifact, waiting while another job holds a live claim on one of `artifacts`.

    Raises UpstreamMissingError at once when verification fails and no live claim exists, and
    UpstreamTimeoutError after `timeout_s` of waiting.
    """
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        try:
            verify()
            if announced:
                log.info("upstream: %s is ready; continuing", stage)
            return
        except StoreMismatchError:
            raise  # another config's artifact: waiting cannot fix it
        except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as err:
            live = [c for a in artifacts for c in live_claims(a)]
            if not live:
                raise UpstreamMissingError(
                    f"{err} -- and no job is producing it (no live claim in {claims_dir(artifacts[0])}); "
                    f"produce it with: {producing_command(stage)}"
                ) from err
            who = ", ".join(sorted({str(c.get("slurm_job") or f"{c.get('host')}:{c.get('pid')}") for c in live}))
            if time.monotonic() > deadline:
                raise UpstreamTimeoutError(
                    f"upstream: waited {timeout_s:.0f} s (upstream_timeout_s) for the {stage} artifact that {who} "
                    f"claims, and it is still not ready: {err}"
                ) from err
            if not announced:
                log.info("upstream: %s is being produced by %s; waiting (up to %.0f s)", stage, who, timeout_s)
                announced = True
            time.sleep(POLL_S if poll_s is None else poll_s)
