"""The pipeline as a loop over stage specs: upstream artifacts are verified, not trusted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from refusal_lab.config import ConfigError, Stage
from refusal_lab.pipeline import run, stage_specs
from refusal_lab.store import StoreMismatchError
from tests.integration.test_collect import make_cfg


def test_stages_are_declared_in_pipeline_order():
    specs = stage_specs()
    order = list(Stage)
    assert [order.index(s) for s in specs] == sorted(order.index(s) for s in specs)
    for name, spec in specs.items():
        assert spec.name == name
        assert all(order.index(i) < order.index(name) for i in spec.inputs), (name, spec.inputs)


def test_sae_on_an_explicit_store_of_another_config_is_refused(tiny_llama, shared_data, tmp_path):
    """Issue 8 item 2: SAEs trained on a store of other layers/positions must never be filed under this config."""
    store = tmp_path / "store.zarr"
    collected = replace(make_cfg(tiny_llama, shared_data, tmp_path), store_path=str(store))
    run(collected, tmp_path / "r1", tmp_path)
    other = replace(
        collected,
        model=replace(collected.model, activation_layers=["residuals_0-1"]),
        stages=[Stage.sae],
    )
    with pytest.raises(StoreMismatchError) as err:
        run(other, tmp_path / "r2", tmp_path)
    message = str(err.value)
    assert f"store_path: {store} was collected by another config" in message
    assert "collect fingerprint" in message
    assert not (tmp_path / "artifacts" / "sae").exists(), "nothing may be trained on a mismatched store"
    assert not (tmp_path / "r2").exists()


def test_sae_without_any_store_names_the_missing_input(tiny_llama, shared_data, tmp_path):
    cfg = replace(
        make_cfg(tiny_llama, shared_data, tmp_path), store_path=str(tmp_path / "none.zarr"), stages=[Stage.sae]
    )
    with pytest.raises(Exception, match="store_path: .* holds no activation store; add collect to stages"):
        run(cfg, tmp_path / "run", tmp_path)


def test_rerun_of_a_finished_collect_is_not_refused_on_disk_space(tiny_llama, shared_data, tmp_path, monkeypatch):
    """Issue 8 item 1: the same command after a later stage crashed must not fail with 'needs about N GB'."""
    import shutil
    from collections import namedtuple

    cfg = make_cfg(tiny_llama, shared_data, tmp_path)
    first = run(cfg, tmp_path / "r1", tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(1, 1, 0))  # the disk is now full
    again = run(cfg, tmp_path / "r2", tmp_path)
    assert again["collect"]["samples"] == first["collect"]["samples"]
    with pytest.raises(ConfigError, match="store_path: the store needs about"):
        run(replace(cfg, artifacts_dir=str(tmp_path / "elsewhere")), tmp_path / "r3", tmp_path)
