"""W&B for a sweep, read back from the offline run's `.wandb` records (tests/integration/wandb_records.py).

`python -m refusal_lab -m ...` (Hydra's basic launcher, one job) runs collect and sae on the
organism with W&B offline. The run must sit in the sweep's group, carry the stages as its job
type and the overrides as its name, and hold the resolved config, the SAE training curves,
final metrics, refusal rates and throughput, the table of responses and judgements, and the
SAEs as an artifact (by reference, as large ones are). A job killed and run again (a SLURM
requeue) must log into the same run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_shards import COMMON, REPO
from tests.integration.wandb_records import history, of_type, read_records, summary

pytestmark = pytest.mark.slow  # two pipeline runs of a minute or more each on 2 cores

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}
OVERRIDES = [o for o in COMMON if not o.startswith("tracking=")] + [
    "tracking=offline",
    "sae.log_every=2",  # a curve of several points over the 8 steps
    "tracking.reference_mb=0.01",  # the organism's SAEs are larger: logged by reference, as a 7B model's are
    "stages=[collect,sae]",
]


def sweep(tmp: Path) -> list[str]:
    return [
        sys.executable, "-m", "refusal_lab", "--multirun", *OVERRIDES,
        f"hydra.sweep.dir={tmp / 'sweep'}", f"artifacts_dir={tmp / 'artifacts'}",
    ]  # fmt: skip


def wandb_files(job_dir: Path) -> list[Path]:
    return sorted(job_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wandb")
    result = subprocess.run(sweep(tmp), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp


def test_offline_run_holds_config_metrics_table_and_artifacts(sweep_run):
    job = sweep_run / "sweep" / "0"
    (path,) = wandb_files(job)
    records = read_records(path)
    (run,) = of_type(records, "run")
    assert run.run_group == str(sweep_run / "sweep")[-128:], "group = the sweep folder"
    assert run.job_type == "collect+sae"
    assert "data.limit=26" in run.display_name and "sae.k=8" in run.display_name, run.display_name
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["inference"]["batch_size"] == "4" and config["sae"]["k"] == 8, "the resolved config"

    steps = history(records)
    curve = [s for s in steps if "sae/step" in s]
    assert len(curve) >= 2 and curve[-1]["sae/step"] > curve[0]["sae/step"], "SAE training curves"
    final = summary(records)
    for hook in ["residuals_0", "residuals_3"]:
        assert 0 <= final[f"sae/{hook}/fvu"] < 1.5, final.get(f"sae/{hook}/fvu")
    assert 0 <= final["collect/refusal_rate/by_label/toxic"] <= 1
    assert final["collect/samples"] == 26 and final["collect/tokens_per_s"] > 0

    (table,) = [s for s in steps if s.get("collect/responses/_type") == "table-file"]
    assert table["collect/responses/nrows"] == 26
    content = json.loads((path.parent / "files" / table["collect/responses/path"]).read_text())
    assert {"prompt", "response", "label", "refused", "refusal_score"} <= set(content["columns"])
    responses = {row[content["columns"].index("response")] for row in content["data"]}
    assert len(responses) > 1, "the model's responses, not placeholders"

    (sae,) = [a for a in of_type(records, "artifact") if a.type == "sae"]
    refs = [e.ref for e in sae.manifest.contents]
    assert refs and all(r.startswith("file://") for r in refs), "a large artifact is logged by reference"
    sae_dir = Path(json.loads((job / "summary.json").read_text())["sae"]["residuals_0"]["path"]).parent
    assert all(r.startswith(sae_dir.as_uri() + "/") for r in refs), refs[:3]
    assert {f"{sae_dir.as_uri()}/{h}/sae_weights.safetensors" for h in ["residuals_0", "residuals_3"]} <= set(refs)


def test_a_requeued_job_logs_into_the_same_run(tmp_path):
    first = subprocess.Popen(sweep(tmp_path), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = tmp_path / "sweep" / "0"
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "artifacts").glob("sae/*/residuals_*")):  # killed while the SAEs train
            assert first.poll() is None, "the job ended before the SAE stage started"
            assert time.time() < deadline
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert not (job / "summary.json").exists() or "sae" not in json.loads((job / "summary.json").read_text())
    again = subprocess.run(sweep(tmp_path), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    files = wandb_files(job)
    assert len(files) == 2, files
    # Offline files are named run-<time>-<run id>.wandb. The killed job's writer may not have flushed its
    # run record before SIGKILL, so its id is read from the file name; the rerun's record must be complete.
    ids = [f.stem.rsplit("-", 1)[1] for f in files]
    assert ids[0] == ids[1], ("the requeued job resumes the same W&B run", files)
    rerun = of_type(read_records(files[1]), "run")[0]
    assert rerun.run_id == ids[1] and rerun.resume
    killed = of_type(read_records(files[0]), "run")
    if killed:  # flushed before the kill: the same group and name as the rerun
        assert killed[0].run_group == rerun.run_group and killed[0].display_name == rerun.display_name
    assert "sae/residuals_0/fvu" in summary(read_records(files[1])), "the rerun finishes the run's record"
