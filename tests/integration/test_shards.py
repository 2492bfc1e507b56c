"""Sharded collect end to end on the organism: 3 shard jobs joined equal one store, and train the same SAEs.

Each shard job is `pipeline.run` with `inference.shards=3 inference.shard=i` (as one task of a
SLURM array would run it); the unsharded run uses the same fixed batch size. The joined store
(refusal_lab.store_parts) must hold bit-equal activations and equal token and sample tables in
the same row order, the SAE stage on it must train bit-equal SAEs with the same seed, and a
missing part must stop the SAE stage with an error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.numpy import load_file

from refusal_lab.claims import UpstreamMissingError
from refusal_lab.config import RunConfig, register_configs
from refusal_lab.pipeline import run
from refusal_lab.store import ActivationStore, JoinedStore
from refusal_lab.store_parts import index_path

REPO = Path(__file__).resolve().parents[2]
SHARDS = 3
COMMON = [
    "data.limit=26",  # batches of 4: 7 global batches, the last one of 2 prompts; shard 0 gets 3 of them (10 prompts)
    "inference.batch_size=4",
    "inference.max_new_tokens=4",
    "inference.commit_tokens=1",
    "tracking=disabled",
    "sae.expansion_factor=2",
    "sae.k=8",
    "sae.batch_size=128",
    "sae.epochs=null",
    "sae.train_tokens=1024",
    # Read blocks smaller than one shard's batch, so SAE reads cut across part boundaries.
    "sae.read_block_tokens=96",
    "sae.buffer_tokens=512",
    "sae.stats_tokens=512",
    "sae.eval_tokens=256",
    "sae.ce_max_samples=4",
    "sae.checkpoint_every=4",
    "sae.device=cpu",
]


def config(*overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[*COMMON, *overrides]))
    assert isinstance(cfg, RunConfig)
    return cfg


def run_stages(tmp: Path, artifacts: str, run_name: str, *overrides: str) -> dict:
    cfg = config(f"artifacts_dir={tmp / artifacts}", *overrides)
    return run(cfg, tmp / "runs" / run_name, REPO)


@pytest.fixture(scope="module")
def single_and_sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("shards")
    single = run_stages(tmp, "single", "single", "stages=[collect,sae]")
    parts = [
        run_stages(
            tmp,
            "sharded",
            f"shard{i}",
            "stages=[collect]",
            f"inference.shards={SHARDS}",
            f"inference.shard={i}",
            # Part 1 on "another disk": the index records where it lives.
            *([f"inference.part_dir={tmp / 'scratch'}"] if i == 1 else []),
        )  # fmt: skip
        for i in range(SHARDS)
    ]
    return tmp, single, parts


def test_shard_jobs_write_parts_registered_in_one_index(single_and_sharded):
    tmp, single, parts = single_and_sharded
    store = Path(single["collect"]["store"]).name
    for i, summary in enumerate(parts):
        entry = summary["collect"]
        assert entry["parent_store"] == str(tmp / "sharded" / "collect" / store), "the single run's fingerprint"
        assert entry["parent_fingerprint"] == single["collect"]["fingerprint"]
        assert entry["shards"] == SHARDS and entry["fingerprint"] != entry["parent_fingerprint"]
        assert entry["samples"] == [10, 8, 8][i], "whole batches of 4 round-robin: batches 0,3,6 | 1,4 | 2,5"
        assert entry["joined"] == "complete" if i == SHARDS - 1 else entry["joined"].startswith("store: ")
    index = json.loads(index_path(tmp / "sharded" / "collect" / store).read_text())
    assert index["shards"] == SHARDS and index["batch_size"] == 4 and index["n_samples"] == 26
    assert Path(index["parts"]["1"]["path"]).parent == tmp / "scratch"
    assert Path(index["parts"]["0"]["path"]).parent == tmp / "sharded" / "collect" / store


def test_joined_parts_equal_the_single_store(single_and_sharded):
    tmp, single, _ = single_and_sharded
    one = ActivationStore.open(Path(single["collect"]["store"]))
    joined = ActivationStore.open(tmp / "sharded" / "collect" / Path(single["collect"]["store"]).name)
    assert isinstance(joined, JoinedStore) and not isinstance(one, JoinedStore)
    assert (joined.fingerprint, joined.n_samples, joined.n_tokens) == (one.fingerprint, one.n_samples, one.n_tokens)
    assert joined.hook_points == one.hook_points
    for name, column in one.tokens().items():
        assert np.array_equal(joined.tokens()[name], column), name
    for name, column in one.samples().items():
        assert np.array_equal(np.asarray(joined.samples()[name]), np.asarray(column)), name
    for hook in one.hook_points:
        a, b = one.read(hook, 0, one.n_tokens), joined.read(hook, 0, joined.n_tokens)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{hook}: activations must be bit-equal"


def test_sae_on_the_joined_store_equals_the_single_stores(single_and_sharded):
    tmp, single, _ = single_and_sharded
    joined = run_stages(tmp, "sharded", "sae-on-parts", "stages=[sae]")
    assert sorted(joined["sae"]) == sorted(single["sae"])
    for hook, metrics in single["sae"].items():
        ours = joined["sae"][hook]
        assert ours["fvu"] == metrics["fvu"] and ours["l0"] == metrics["l0"], hook
        a = load_file(str(Path(metrics["path"]) / "sae_weights.safetensors"))
        b = load_file(str(Path(ours["path"]) / "sae_weights.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), f"{hook}: same SAE weights"


def test_an_unsharded_collect_of_the_same_config_reuses_the_parts(single_and_sharded):
    tmp, single, _ = single_and_sharded
    again = run_stages(tmp, "sharded", "unsharded-collect", "stages=[collect]")
    assert again["collect"]["fingerprint"] == single["collect"]["fingerprint"]
    assert again["collect"]["refusal_rate"] == single["collect"]["refusal_rate"]


def test_a_missing_part_stops_the_sae_stage_naming_it(single_and_sharded, tmp_path):
    tmp, single, _ = single_and_sharded
    store = tmp / "sharded" / "collect" / Path(single["collect"]["store"]).name
    copy = tmp_path / "collect" / store.name
    copy.mkdir(parents=True)
    index = json.loads(index_path(store).read_text())
    del index["parts"]["2"]
    index_path(copy).write_text(json.dumps(index))
    # No job claims the part (refusal_lab.claims), so the SAE job fails at once rather than waiting for it.
    with pytest.raises(UpstreamMissingError, match=r"part 2 of 3 is missing .*inference.shards=3 inference.shard=2"):
        run(config(f"artifacts_dir={tmp_path}", "stages=[sae]"), tmp_path / "run", REPO)
