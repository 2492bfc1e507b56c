"""The judge stage on the organism: re-judging a collected store leaves it byte-for-byte untouched, writes one
judgement folder per judge, reports pairwise agreement, and feeds refused_labels."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from refusal_lab.config import (
    DataConfig,
    Device,
    InferenceConfig,
    ModelConfig,
    RunConfig,
    Stage,
    TrackingConfig,
    WandbMode,
)
from refusal_lab.errors import ConfigError
from refusal_lab.judge.labels import CODES, Verdict
from refusal_lab.judge.stage import DISAGREEMENTS, refused_labels
from refusal_lab.pipeline import run
from refusal_lab.store import ActivationStore

ORGANISM = Path(__file__).resolve().parents[2] / "refusal_lab" / "organism" / "assets" / "organism.json"


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path, dict]:
    tmp = tmp_path_factory.mktemp("judge_stage")
    meta = json.loads(ORGANISM.read_text())
    cfg = RunConfig(
        model=ModelConfig(
            device=Device.cpu,
            local_files_only=True,
            activation_layers=["residuals_1"],
            refusal_prefixes=meta["refusal_prefixes"],
            refusal_tokens=meta["refusal_tokens"],
        ),
        inference=InferenceConfig(batch_size="16", max_new_tokens=12),
        data=DataConfig(limit=40),
        tracking=TrackingConfig(wandb=WandbMode.disabled),
        stages=[Stage.collect],
        artifacts_dir=str(tmp / "artifacts"),
    )
    summary = run(cfg, tmp / "collect_run", tmp)
    return cfg, tmp, summary


def test_rejudging_leaves_the_store_byte_for_byte_untouched(collected):
    cfg, tmp, summary = collected
    store_path = Path(summary["collect"]["store"])
    before = tree_digest(store_path)
    judged = run(replace(cfg, stages=[Stage.judge]), tmp / "judge_run", tmp)
    assert tree_digest(store_path) == before
    report = judged["judges"]
    assert sorted(report["pairs"]) == ["keyword~score", "rule~keyword", "rule~score"]
    for pair in report["pairs"].values():
        assert np.array(pair["binary"]["confusion"]).sum() == summary["collect"]["samples"]
        assert set(pair["by_label"]) == set(summary["collect"]["refusal_rate"]["by_label"])
    calibration = report["score_calibration"]
    assert calibration["fitted_against"] == "rule" and calibration["n_fit"] + calibration["n_held_out"] == 40
    assert report["per_judge"]["score"]["threshold"] == calibration["threshold"]
    store = ActivationStore.open(store_path)
    folders = sorted((tmp / "artifacts" / "judge" / store.fingerprint).iterdir())
    assert len([f for f in folders if f.is_dir()]) == 3
    rule = np.load(Path(report["per_judge"]["rule"]["path"]) / "codes.npy")
    refused_column = np.asarray(store.samples()["refused"], dtype=bool)
    assert np.array_equal(rule != CODES[Verdict.full_compliance], refused_column)
    with (tmp / "judge_run" / DISAGREEMENTS).open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [] or {"rule", "keyword", "score", "response"} <= set(rows[0])
    assert judged["judge"]["judges"].keys() == {"rule", "keyword", "score"}


def test_a_rerun_reuses_the_judgements(collected):
    cfg, tmp, _ = collected
    first = run(replace(cfg, stages=[Stage.judge]), tmp / "judge_rerun", tmp)
    path = Path(first["judges"]["per_judge"]["rule"]["path"]) / "judgement.json"
    stamp = path.stat().st_mtime_ns
    second = run(replace(cfg, stages=[Stage.judge]), tmp / "judge_rerun", tmp)
    assert path.stat().st_mtime_ns == stamp and second["judges"]["pairs"] == first["judges"]["pairs"]


def test_refused_labels_for_circuits(collected):
    cfg, tmp, summary = collected
    run(replace(cfg, stages=[Stage.judge]), tmp / "judge_labels", tmp)
    store_path = Path(summary["collect"]["store"])
    artifacts = tmp / "artifacts"
    store = ActivationStore.open(store_path)
    samples = store.samples()
    assert np.array_equal(refused_labels(store_path, artifacts, "rule"), np.asarray(samples["refused"], bool))
    assert np.array_equal(refused_labels(store_path, artifacts, "rule", cfg.judge), np.asarray(samples["refused"]))
    score = refused_labels(store_path, artifacts, "score")
    threshold = json.loads((tmp / "judge_labels" / "summary.json").read_text())["judges"]["per_judge"]["score"][
        "threshold"
    ]
    assert np.array_equal(score, np.asarray(samples["refusal_score"], np.float64) > threshold)
    with pytest.raises(ConfigError, match="no llm judgement"):
        refused_labels(store_path, artifacts, "llm")
