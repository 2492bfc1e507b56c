"""`python -m refusal_lab --multirun` through hydra-submitit-launcher: local subprocesses and real SLURM.

Runs the launchers of conf/hydra/launcher/ on the embedded organism (collect only, a few tokens):
`local` (submitit_local) and `slurm` (submitit_slurm) on the single-node cluster that
.ci/slurm.sh starts (sbatch, srun, slurmdbd accounting). Each sweep job must write its own
summary.json in its own sweep subdir and its own store, and a SLURM job requeued mid-collect must
resume from its store and still end the launcher's blocking call successfully. Every sweep starts from a
folder outside the clone (the test's tmp folder), as a user's does: the launchers must come from the install
(issue 18). A sweep whose jobs fail must exit non-zero and name every failed job with its logs (issue 17).

Without `sinfo` on PATH the SLURM tests skip, unless the env var CI is set (.ci/run starts SLURM
there): then they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from refusal_lab.store import ActivationStore, Phase

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
COLLECT_ONLY = ["stages=[collect]", "tracking=disabled", "inference.max_new_tokens=4"]
POSITIONS_SWEEP = [*COLLECT_ONLY, "data.limit=20", "inference.positions=last_prompt,post_instruction"]
COMMON_SAE = [
    "tracking=disabled", "sae.expansion_factor=2", "sae.k=8", "sae.batch_size=128",
    "sae.epochs=null", "sae.train_tokens=1024", "sae.buffer_tokens=512", "sae.stats_tokens=512", "sae.eval_tokens=256",
    "sae.ce_max_samples=4", "sae.device=cpu", "upstream_timeout_s=900",
]  # fmt: skip
"""A small SAE for the organism (as tests/integration/test_shards.py trains)."""
SLURM_LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]
ARRAY_TASK_DIR = re.compile(r"^(\d+)_(\d+)$")
"""`.submitit/<array job id>_<task id>`: submitit submits a sweep of several jobs as one job array."""
JOB_DIR = re.compile(r"^\d+$")
"""`.submitit/<job id>`: a sweep of one job is a plain job."""


@pytest.fixture(scope="module")
def slurm() -> None:
    """A SLURM cluster answering `sinfo` with a node that takes jobs."""
    if shutil.which("sinfo") is None:
        message = "no SLURM here (sinfo is not on PATH); .ci/slurm.sh sets up a single-node cluster as root"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {message}; .ci/run must run .ci/slurm.sh before pytest")
        pytest.skip(message)
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    assert states.returncode == 0 and {"idle", "mixed", "allocated"} & set(states.stdout.split()), (
        f"sinfo is on PATH but no node takes jobs (sinfo: {states.stdout.strip()!r} {states.stderr.strip()!r}); "
        "run .ci/slurm.sh"
    )


def sweep_command(tmp: Path, *overrides: str) -> list[str]:
    """`python -m refusal_lab --multirun` with its sweep folder and artifacts under `tmp`."""
    paths = [f"hydra.sweep.dir={tmp / 'sweep'}", f"artifacts_dir={tmp / 'artifacts'}"]
    return [sys.executable, "-m", "refusal_lab", "--multirun", *overrides, *paths]


def multirun(tmp: Path, *overrides: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = sweep_command(tmp, *overrides)
    return subprocess.run(cmd, cwd=tmp, env=ENV, capture_output=True, text=True, timeout=timeout)


def check_failed_jobs_named(tmp: Path, result: subprocess.CompletedProcess, nums: list[int], total: int) -> str:
    """The sweep exited non-zero and its error names each failed job, its log files and the job's own error."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"{len(nums)} of {total} jobs of the sweep failed" in output, output[-3000:]
    logs = sorted((tmp / "sweep" / ".submitit").rglob("*_log.err"))
    assert len(logs) == total, logs
    for log in logs:
        assert str(log) in output and str(log.with_name(log.name.replace(".err", ".out"))) in output, log
    for num in nums:
        assert f"  #{num} (" in output, (num, output[-3000:])
    return output


def job_dirs(sweep: Path) -> dict[int, Path]:
    """Hydra job number -> the folder holding that job's summary.json."""
    summaries = sorted(sweep.rglob("summary.json"))
    return {int(OmegaConf.load(p.parent / ".hydra" / "hydra.yaml").hydra.job.num): p.parent for p in summaries}


def check_positions_sweep(tmp: Path, result: subprocess.CompletedProcess) -> list[Path]:
    """Both jobs of POSITIONS_SWEEP succeeded on their own; returns their submitit job folders."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = tmp / "sweep"
    jobs = job_dirs(sweep)
    assert sorted(jobs) == [0, 1], jobs
    nested = [d for d in jobs.values() if d.parent != sweep]
    assert not nested, (
        f"job folders are not direct subdirs of hydra.sweep.dir: {nested}; hydra.sweep.subdir "
        "(${hydra.job.override_dirname}) turns the '/' of a path-valued override (artifacts_dir) into nested folders"
    )
    stores: dict[str, Path] = {}
    for num, job_dir in jobs.items():
        positions = OmegaConf.load(job_dir / ".hydra" / "config.yaml").inference.positions
        summary = json.loads((job_dir / "summary.json").read_text())
        assert summary["stages"] == ["collect"]
        store_path = Path(summary["collect"]["store"])
        assert store_path.parent == tmp / "artifacts" / "collect", store_path
        store = ActivationStore.open(store_path)
        assert store.attrs["config"]["inference"]["positions"] == positions
        assert store.complete and store.n_samples == summary["collect"]["samples"] == 20
        assert summary["collect"]["tokens"] == store.n_tokens
        samples, tokens = store.samples(), store.tokens()
        assert sorted(samples["sample_id"].tolist()) == list(range(20))
        n_prompt = dict(zip(samples["sample_id"].tolist(), samples["n_prompt_tokens"].tolist(), strict=True))
        ids, counts = np.unique(tokens["sample_id"], return_counts=True)
        assert ids.tolist() == list(range(20)), f"job {num} ({positions}): every sample stores tokens"
        last = np.array([n_prompt[s] - 1 for s in tokens["sample_id"].tolist()])
        if positions == "last_prompt":
            assert counts.tolist() == [1] * 20
            assert (tokens["position"] == last).all()
        else:
            assert positions == "post_instruction", positions
            assert (tokens["phase"] == int(Phase.POST_INSTRUCTION)).all()
            n_post = int(counts[0])
            assert n_post > 1 and (counts == n_post).all(), counts
            assert (tokens["position"] > last - n_post).all() and (tokens["position"] <= last).all()
        stores[positions] = store_path
    assert sorted(stores) == ["last_prompt", "post_instruction"]
    assert stores["last_prompt"] != stores["post_instruction"], "different positions must not share a store"
    submitit = [d for d in (sweep / ".submitit").iterdir() if list(d.glob("*_result.pkl"))]
    assert len(submitit) == 2, f"one submitit folder with a result per job: {submitit}"
    return submitit


def test_local_launcher_runs_each_job_in_its_own_subdir(tmp_path):
    start = time.perf_counter()
    result = multirun(tmp_path, "hydra/launcher=local", *POSITIONS_SWEEP, timeout=300)
    check_positions_sweep(tmp_path, result)
    print(f"local sweep of 2 jobs: {time.perf_counter() - start:.1f} s")


FAILING_SWEEP = [*COLLECT_ONLY[:2], "data.limit=4", "inference.max_new_tokens=-1,-2"]
"""Two jobs that each fail in the job with a ConfigError (exit 2), not at compose time."""


def test_local_sweep_with_failed_jobs_exits_non_zero_and_names_them(tmp_path):
    result = multirun(tmp_path, "hydra/launcher=local", *FAILING_SWEEP, timeout=300)
    output = check_failed_jobs_named(tmp_path, result, [0, 1], 2)
    assert "inference.max_new_tokens: -2 is negative" in output, "the job's own error"


UNSETTLED = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING")
"""sacct states after which the job runs (again): a requeued job's last run is not the job's end."""


def sacct_states(job_id: str, duplicates: bool = False, timeout: float = 90) -> list[str]:
    """States of one job from SLURM accounting once it has ended, oldest first (duplicates: one per run).

    Polls until the newest run's state is final, or `timeout` seconds pass (then returns what
    accounting holds, for the caller's assertion to show). The launcher returns when the job's
    result file appears, a moment before SLURM sees the job end, and slurmdbd records a state
    later still: right after a requeued job's second run ends, `sacct -D` may list only
    `REQUEUED` (issue 8), so REQUEUED counts as not yet settled.
    """
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id, *(["-D"] if duplicates else [])]
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
        # "CANCELLED by 0" carries who cancelled it: the first word is the state.
        states = [line.split("|")[1].split()[0] for line in out.splitlines() if line.split("|")[0] == job_id]
        if states and states[-1] not in UNSETTLED or time.time() > deadline:
            return states
        time.sleep(0.5)


@pytest.mark.slurm
def test_slurm_launcher_runs_the_sweep_through_sbatch(slurm, tmp_path):
    start = time.perf_counter()
    result = multirun(tmp_path, *SLURM_LAUNCHER, *POSITIONS_SWEEP, timeout=300)
    folders = check_positions_sweep(tmp_path, result)
    job_ids = sorted(folder.name for folder in folders)
    assert all(ARRAY_TASK_DIR.match(j) for j in job_ids), f"SLURM array task ids expected: {job_ids}"
    array_ids = {ARRAY_TASK_DIR.match(j).group(1) for j in job_ids}  # type: ignore[union-attr]
    assert len(array_ids) == 1, f"one sbatch (one job array) for the sweep: {job_ids}"
    script = (tmp_path / "sweep" / ".submitit" / array_ids.pop()).glob("*_submission.sh")
    script_text = next(script).read_text()
    assert "#SBATCH --partition=debug" in script_text
    assert "#SBATCH --requeue" in script_text and "export OMP_NUM_THREADS=" in script_text, (
        "conf/hydra/launcher/slurm.yaml"
    )
    for job_id in job_ids:
        assert sacct_states(job_id) == ["COMPLETED"], job_id
    print(f"slurm sweep of 2 jobs ({', '.join(job_ids)}): {time.perf_counter() - start:.1f} s")


@pytest.mark.slurm
def test_slurm_sweep_with_failed_jobs_exits_non_zero_and_names_them(slurm, tmp_path):
    result = multirun(tmp_path, *SLURM_LAUNCHER, *FAILING_SWEEP, timeout=300)
    output = check_failed_jobs_named(tmp_path, result, [0, 1], 2)
    assert "SLURM state FAILED" in output and "inference.max_new_tokens: -1 is negative" in output


def requeue_now(job: str) -> None:
    """`scontrol requeue` the job, then SIGKILL its running step's tasks: a preemption that lands at once.

    submitit bypasses the SIGTERM a requeue sends, so without the kill the job works on until slurmstepd gives
    up on the step (KillWait + 2 s): on an idle 2-core machine a test shard's whole collect (~4 s) finished in that
    window and its second run found the part complete (seen in a fresh-clone run). `job` may be an array task
    (`<array id>_<task>`); `scontrol listpids` wants the job id SLURM gave that task.
    """
    job_id = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%A"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()[0]
    listed = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, timeout=30, check=True)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    for line in listed.stdout.splitlines()[1:]:
        pid, _, step = line.split()[:3]
        if step.isdigit():  # the srun step's tasks (the job's Python); not the batch script or the extern step
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def committed_samples(artifacts: Path) -> int:
    for manifest in (artifacts / "collect").glob("*.zarr/manifest.json"):
        try:
            return int(json.loads(manifest.read_text())["committed_samples"])
        except (json.JSONDecodeError, KeyError, FileNotFoundError):  # replaced atomically, but be lenient
            return 0
    return 0


@pytest.mark.slurm
def test_requeued_slurm_job_resumes_and_the_launcher_returns(slurm, tmp_path):
    n_prompts = 200
    # ~15 s of collect on 2 cores, committed every 2 samples: the requeue lands mid-collect.
    cmd = sweep_command(
        tmp_path, *SLURM_LAUNCHER, *COLLECT_ONLY, f"data.limit={n_prompts}", "inference.batch_size=2",
        "inference.commit_tokens=1",
    )  # fmt: skip
    start = time.perf_counter()
    launcher_log = (tmp_path / "launcher.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=launcher_log, stderr=subprocess.STDOUT)
    job_id = None
    try:
        deadline = time.time() + 180
        while (done := committed_samples(tmp_path / "artifacts")) == 0:
            assert proc.poll() is None, (
                "the sweep ended before the store's first commit: " + (tmp_path / "launcher.log").read_text()[-3000:]
            )
            assert time.time() < deadline, "no committed sample after 180 s"
            time.sleep(0.2)
        (folder,) = [d for d in (tmp_path / "sweep" / ".submitit").iterdir() if JOB_DIR.match(d.name)]
        job_id = folder.name
        requeue_now(job_id)
        requeued_at = time.perf_counter() - start
        assert proc.wait(timeout=240) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        if job_id is not None and proc.returncode != 0:
            subprocess.run(["scancel", job_id], timeout=30)
        launcher_log.close()

    assert sacct_states(job_id, duplicates=True) == ["REQUEUED", "COMPLETED"], "exactly two runs of the job"
    (job_dir,) = job_dirs(tmp_path / "sweep").values()
    log_text = (job_dir / "refusal_lab.log").read_text()
    resumed = [int(n) for n in re.findall(r"collect: resuming after (\d+) committed samples", log_text)]
    assert len(resumed) == 1 and done <= resumed[0] < n_prompts, (resumed, done)
    assert log_text.count("store: created") == 1

    summary = json.loads((job_dir / "summary.json").read_text())
    store = ActivationStore.open(Path(summary["collect"]["store"]))
    assert store.complete and store.n_samples == summary["collect"]["samples"] == n_prompts
    sample_ids = store.samples()["sample_id"].tolist()
    assert sorted(sample_ids) == list(range(n_prompts)), "every sample exactly once"
    # Default positions (all): every sample's tokens form one contiguous run, in sample order.
    token_ids = store.tokens()["sample_id"]
    runs = token_ids[np.r_[True, token_ids[1:] != token_ids[:-1]]].tolist()
    assert runs == sample_ids, "token rows of a sample must be contiguous and in the sample table's order"
    print(
        f"requeue at {requeued_at:.1f} s after {done} committed samples, resumed after {resumed[0]}; "
        f"total {time.perf_counter() - start:.1f} s"
    )


@pytest.mark.slurm
def test_slurm_job_failing_after_a_requeue_fails_the_sweep(slurm, tmp_path):
    """Requeued mid-collect, the job's second run finds its prompts gone (a ConfigError, exit 2): the sweep fails."""
    from refusal_lab.data import embedded_prompts_path

    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(embedded_prompts_path(), prompts)
    cmd = sweep_command(
        tmp_path, *SLURM_LAUNCHER, *COLLECT_ONLY, f"data.path={prompts}", "data.limit=200",
        "inference.batch_size=2", "inference.commit_tokens=1",
    )  # fmt: skip
    log_path = tmp_path / "launcher.log"
    with log_path.open("w") as launcher_log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=launcher_log, stderr=subprocess.STDOUT)
        job_id = None
        try:
            deadline = time.time() + 180
            while committed_samples(tmp_path / "artifacts") == 0:
                assert proc.poll() is None, "the sweep ended before the first commit: " + log_path.read_text()[-3000:]
                assert time.time() < deadline, "no committed sample after 180 s"
                time.sleep(0.2)
            (folder,) = [d for d in (tmp_path / "sweep" / ".submitit").iterdir() if JOB_DIR.match(d.name)]
            job_id = folder.name
            requeue_now(job_id)
            prompts.unlink()
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                if job_id is not None:
                    subprocess.run(["scancel", job_id], timeout=30)
    assert sacct_states(job_id, duplicates=True) == ["REQUEUED", "FAILED"], "the second run failed"
    result = subprocess.CompletedProcess(cmd, proc.returncode, log_path.read_text(), "")
    output = check_failed_jobs_named(tmp_path, result, [0], 1)
    assert "SLURM state FAILED" in output and "is not a file" in output, output[-3000:]


def squeue_tasks(array_id: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def part_committed(index_dir: Path, shard: int) -> int:
    manifest = index_dir / f"part-{shard:05d}-of-00003.zarr" / "manifest.json"
    try:
        return int(json.loads(manifest.read_text())["committed_samples"])
    except (OSError, ValueError, KeyError):
        return 0


SHARDED = [
    *COMMON_SAE,
    "data.limit=240",  # 120 batches of 2 round-robin over 3 shards: 80 prompts, ~10 s of collect each
    "inference.max_new_tokens=16",
    "inference.batch_size=2",
    "inference.commit_tokens=1",
]


@pytest.mark.slow
@pytest.mark.slurm
def test_sharded_collect_array_then_sae_jobs_on_the_joined_store_with_a_requeued_task(slurm, tmp_path):
    """3 shard tasks (one SLURM array), then 2 per-hook SAE tasks submitted while the shards still run.

    The SAE tasks wait for the parts (claims written at submission and at start), shard 1 is
    requeued after its first commit and resumes its part, and the SAEs train on the joined store.
    """
    collect_cmd = [
        *sweep_command(tmp_path, *SLURM_LAUNCHER, *SHARDED, "stages=[collect]", "inference.shards=3",
                       "inference.shard=0,1,2"),
    ]  # fmt: skip
    collect_cmd[collect_cmd.index(f"hydra.sweep.dir={tmp_path / 'sweep'}")] = f"hydra.sweep.dir={tmp_path / 'collect'}"
    sae_cmd = sweep_command(
        tmp_path, *SLURM_LAUNCHER, *SHARDED, "stages=[sae]", "sae.hooks=[residuals_0],[residuals_1]"
    )
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("collect", "sae")}
    procs: dict[str, subprocess.Popen] = {}
    array_id = None
    try:
        procs["collect"] = subprocess.Popen(
            collect_cmd, cwd=tmp_path, env=ENV, stdout=logs["collect"], stderr=subprocess.STDOUT
        )
        deadline = time.time() + 240
        while array_id is None:
            folders = [d.name for d in (tmp_path / "collect" / ".submitit").glob("*_*") if ARRAY_TASK_DIR.match(d.name)]
            array_id = folders[0].split("_")[0] if folders else None
            assert procs["collect"].poll() is None, (tmp_path / "collect.log").read_text()[-3000:]
            assert time.time() < deadline, "the shard array was not submitted within 240 s"
            time.sleep(0.5)
        # The SAE array goes in behind the shards (it needs their parts): its tasks must wait, not fail.
        procs["sae"] = subprocess.Popen(sae_cmd, cwd=tmp_path, env=ENV, stdout=logs["sae"], stderr=subprocess.STDOUT)
        index_dir = next((tmp_path / "artifacts" / "collect").glob("*.zarr"), None)
        while index_dir is None or part_committed(index_dir, 1) == 0:
            assert procs["collect"].poll() is None, "the shards ended before shard 1's first commit"
            assert time.time() < deadline + 240, "shard 1 committed nothing"
            time.sleep(0.2)
            index_dir = next((tmp_path / "artifacts" / "collect").glob("*.zarr"), None)
        done = part_committed(index_dir, 1)
        requeue_now(f"{array_id}_1")
        for name in ("collect", "sae"):
            assert procs[name].wait(timeout=900) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        if array_id is not None and any(p.returncode != 0 for p in procs.values()):
            subprocess.run(["scancel", array_id], timeout=30)
        for log in logs.values():
            log.close()

    task = f"{array_id}_1"
    assert sacct_states(task, duplicates=True) == ["REQUEUED", "COMPLETED"], "shard 1 ran twice"
    shard_logs = {
        int(OmegaConf.load(d / ".hydra" / "config.yaml").inference.shard): d
        for d in job_dirs(tmp_path / "collect").values()
    }
    log_text = (shard_logs[1] / "refusal_lab.log").read_text()
    resumed = [int(n) for n in re.findall(r"collect: resuming after (\d+) committed samples", log_text)]
    assert len(resumed) == 1 and done <= resumed[0] < 80, (resumed, done)

    joined = ActivationStore.open(index_dir)
    assert joined.n_samples == 240 and sorted(joined.samples()["sample_id"].tolist()) == list(range(240))
    token_ids = joined.tokens()["sample_id"]
    runs = token_ids[np.r_[True, token_ids[1:] != token_ids[:-1]]].tolist()
    assert runs == joined.samples()["sample_id"].tolist(), "joined rows in the single run's order"

    sae_jobs = job_dirs(tmp_path / "sweep")
    assert sorted(sae_jobs) == [0, 1]
    trained = {}
    for job_dir in sae_jobs.values():
        summary = json.loads((job_dir / "summary.json").read_text())
        (hook,) = summary["sae"]
        trained[hook] = Path(summary["sae"][hook]["path"])
    assert sorted(trained) == ["residuals_0", "residuals_1"]
    assert trained["residuals_0"].parent == trained["residuals_1"].parent, "one SAE folder, one task per hook"
    sae_log = "".join((d / "refusal_lab.log").read_text() for d in sae_jobs.values())
    assert "upstream: collect is being produced by" in sae_log, "an SAE task waited for the shards"
