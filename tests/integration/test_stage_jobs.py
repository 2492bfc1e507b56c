"""Stage jobs: per-hook SAE jobs on a shared store, and jobs that wait for (or fail on) an upstream artifact.

In-process `pipeline.run` on the organism (configs from test_shards). Claims (refusal_lab.claims)
stand in for "another job is producing it": a claim held by a live process makes a job wait,
no claim (or a dead claimant's) makes it fail at once naming the command that produces it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from refusal_lab import claims
from refusal_lab.claims import UpstreamMissingError, UpstreamTimeoutError, write_claim
from refusal_lab.pipeline import run
from tests.integration.test_shards import REPO, config

HOOKS = ["residuals_0", "residuals_1", "residuals_2", "residuals_3"]


@pytest.fixture(scope="module")
def store_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The store folder's name (the collect fingerprint) of the test config, from one collect run."""
    tmp = tmp_path_factory.mktemp("probe")
    return Path(run(config(f"artifacts_dir={tmp}", "stages=[collect]"), tmp / "run", REPO)["collect"]["store"]).name


@pytest.fixture
def sleeper():
    """A live process to hold a claim, as a running or queued job would."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_missing_upstream_fails_at_once_naming_the_command(tmp_path):
    start = time.monotonic()
    with pytest.raises(
        UpstreamMissingError, match=r"no job is producing it.*python -m refusal_lab 'stages=\[collect\]'"
    ):
        run(config(f"artifacts_dir={tmp_path}", "stages=[sae]"), tmp_path / "run", REPO)
    assert time.monotonic() - start < 60, "no waiting without a claim"


def test_a_dead_claimant_does_not_make_a_job_wait(tmp_path, store_name):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "collect" / store_name
    write_claim(target, slurm_job=None, pid=int(dead.stdout), kind="running")
    with pytest.raises(UpstreamMissingError, match="no live claim"):
        run(config(f"artifacts_dir={tmp_path}", "stages=[sae]"), tmp_path / "run", REPO)


def test_a_claimed_upstream_times_out_with_a_clear_message(tmp_path, sleeper, monkeypatch, store_name):
    monkeypatch.setattr(claims, "POLL_S", 0.2)
    target = tmp_path / "collect" / store_name
    write_claim(target, slurm_job=None, pid=sleeper.pid, kind="running")
    with pytest.raises(UpstreamTimeoutError, match=rf"waited 2 s .*collect artifact that .*:{sleeper.pid} claims"):
        run(config(f"artifacts_dir={tmp_path}", "stages=[sae]", "upstream_timeout_s=2"), tmp_path / "run", REPO)


def test_a_job_waits_for_a_claimed_upstream_then_runs(tmp_path, sleeper, monkeypatch, store_name):
    monkeypatch.setattr(claims, "POLL_S", 0.2)
    target = tmp_path / "collect" / store_name
    write_claim(target, slurm_job=None, pid=sleeper.pid, kind="submitted")  # a queued collect job
    outcome: dict[str, object] = {}

    def sae_job() -> None:
        try:
            outcome["summary"] = run(config(f"artifacts_dir={tmp_path}", "stages=[sae]"), tmp_path / "sae", REPO)
        except BaseException as err:  # reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=sae_job)
    thread.start()
    time.sleep(3)
    assert thread.is_alive() and not outcome, f"the sae job must wait for the claimed store: {outcome}"
    run(config(f"artifacts_dir={tmp_path}", "stages=[collect]"), tmp_path / "collect-job", REPO)
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert isinstance(summary, dict) and sorted(summary["sae"]) == HOOKS


def test_per_hook_sae_jobs_share_one_folder_and_equal_one_job(tmp_path):
    run(config(f"artifacts_dir={tmp_path}", "stages=[collect,sae]"), tmp_path / "all", REPO)
    one_job = {h: Path(e["path"]) for h, e in run(config(f"artifacts_dir={tmp_path}", "stages=[sae]"),
               tmp_path / "again", REPO)["sae"].items()}  # fmt: skip
    split = tmp_path / "split"
    jobs = [("residuals_0",), ("residuals_1", "residuals_3")]
    for n, hooks in enumerate(jobs):
        summary = run(
            config(f"artifacts_dir={split}", "stages=[collect,sae]", f"sae.hooks=[{','.join(hooks)}]"),
            tmp_path / f"job{n}",
            REPO,
        )
        assert sorted(summary["sae"]) == sorted(hooks), "a job trains exactly its sae.hooks"
        for hook in hooks:
            path = Path(summary["sae"][hook]["path"])
            assert path.parent.name == one_job[hook].parent.name, "sae.hooks stays out of the SAE fingerprint"
            a = load_file(str(path / "sae_weights.safetensors"))
            b = load_file(str(one_job[hook] / "sae_weights.safetensors"))
            assert all(np.array_equal(a[k], b[k]) for k in a), f"{hook}: same SAE as the all-hooks job"
    folder = split / "sae" / one_job["residuals_0"].parent.name
    assert sorted(p.name for p in folder.glob("*.lock")) == ["residuals_0.lock", "residuals_1.lock", "residuals_3.lock"]
    with pytest.raises(Exception, match=r"sae.hooks: \['mlp_9'\] are not hook points"):
        run(config(f"artifacts_dir={split}", "stages=[sae]", "sae.hooks=[mlp_9]"), tmp_path / "bad", REPO)
