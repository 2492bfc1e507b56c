"""Kill `python -m refusal_lab` with SIGKILL mid-collect, rerun the same command, get the same store.

The killed-and-resumed store must equal an uninterrupted run's store array by array: no
duplicate, no missing sample, no torn chunk; and the store must never read as complete
while it is not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from refusal_lab.store import ActivationStore, StoreIncompleteError

REPO = Path(__file__).resolve().parents[2]


def command(model_dir: Path, shared_data: Path, store: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "refusal_lab",
        "model=llama2_7b",
        f"model.name={model_dir}",
        "model.device=cpu",
        "model.torch_dtype=float32",
        "model.local_files_only=true",
        "model.activation_layers=[all,mlp_0]",
        "data=or_bench",
        f"data.path={shared_data / 'or_bench'}",
        "data.limit=12",
        "inference.batch_size=2",
        "inference.max_new_tokens=5",
        "inference.chunk_tokens=64",
        "inference.commit_tokens=1",  # commit every batch, so that a kill lands between commits
        "tracking=disabled",
        "stages=[collect]",
        f"store_path={store}",
        f"hydra.run.dir={run_dir}",
    ]


def committed(store: Path) -> int:
    try:
        return json.loads((store / "manifest.json").read_text())["committed_samples"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    manifest = json.loads((path / "manifest.json").read_text())
    out = {}
    for name in ["tokens", "samples", "acts"]:
        for key, arr in group[name].arrays():
            n = manifest["committed_tokens"] if name != "samples" else manifest["committed_samples"]
            assert arr.shape[0] == n, f"{name}/{key} holds rows beyond the commit"
            out[f"{name}/{key}"] = arr[:]
    return out


@pytest.mark.parametrize("kill_after", [2, 8])
def test_sigkill_then_rerun_equals_uninterrupted(kill_after, tiny_llama, shared_data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    reference = tmp_path / "reference.zarr"
    subprocess.run(
        command(tiny_llama, shared_data, reference, tmp_path / "ref_run"),
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
    )

    store = tmp_path / "killed.zarr"
    cmd = command(tiny_llama, shared_data, store, tmp_path / "run")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while committed(store) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; use more prompts"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = committed(store)
    assert kill_after <= at_kill < 12
    with pytest.raises(StoreIncompleteError):
        ActivationStore.open(store)

    # Same command again: resumes after the last committed batch.
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming after {at_kill} committed samples" in (tmp_path / "run" / "refusal_lab.log").read_text()

    got, want = arrays(store), arrays(reference)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert sorted(got["samples/sample_id"].tolist()) == list(range(12))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["collect"]["samples"] == 12
