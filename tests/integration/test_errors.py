"""Bad input gets one clear error naming the key, the value and what is valid, before expensive work."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from refusal_lab.config import ConfigError
from refusal_lab.pipeline import run
from refusal_lab.store import StoreMismatchError
from tests.integration.test_collect import make_cfg

REPO = Path(__file__).resolve().parents[2]


def cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [
        sys.executable,
        "-m",
        "refusal_lab",
        "tracking=disabled",
        f"hydra.run.dir={cwd / 'run'}",
        f"artifacts_dir={cwd / 'artifacts'}",
        *overrides,
    ]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_out_of_range_layer_names_model_and_depth_before_loading_weights(tiny_llama, shared_data, tmp_path):
    cfg = make_cfg(tiny_llama, shared_data, tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, activation_layers=["residuals_1", "mlp_7"]))
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run", tmp_path)
    assert f"mlp_7 is out of range for {tiny_llama} (3 layers: 0-2)" in str(err.value)
    assert not (tmp_path / "artifacts").exists(), "nothing may be written before the inputs are checked"


def test_store_path_holding_another_run_is_refused(tiny_llama, shared_data, tmp_path):
    cfg = replace(make_cfg(tiny_llama, shared_data, tmp_path), store_path=str(tmp_path / "store.zarr"))
    run(cfg, tmp_path / "r1", tmp_path)
    other = replace(cfg, inference=replace(cfg.inference, max_new_tokens=2))
    with pytest.raises(StoreMismatchError) as err:
        run(other, tmp_path / "r2", tmp_path)
    assert str(tmp_path / "store.zarr") in str(err.value)


def test_run_dir_holding_another_run_is_refused(tiny_llama, shared_data, tmp_path):
    cfg = make_cfg(tiny_llama, shared_data, tmp_path)
    run(cfg, tmp_path / "run", tmp_path)
    with pytest.raises(ConfigError) as err:
        run(replace(cfg, inference=replace(cfg.inference, max_new_tokens=2)), tmp_path / "run", tmp_path)
    assert "hydra.run.dir" in str(err.value) and "holds a different run" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data=or_bench", "data.path=/nonexistent/or_bench"], "data.path"),
        (["data=or_bench", "data.categories=[cooking]"], "cooking"),
        (["inference.max_new_tokens=-3"], "inference.max_new_tokens: -3 is negative"),
        (["model.activation_layers=[resid_3]"], "model.activation_layers: invalid layer spec 'resid_3'"),
    ],
)
def test_cli_reports_one_clear_error_and_exits_2(overrides, needle, tmp_path):
    result = cli(*overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert needle in output
    assert "Traceback" not in output
    assert not (tmp_path / "artifacts").exists(), "nothing may be written before the inputs are checked"
