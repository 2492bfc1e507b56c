"""The whole circuits stage on tiny random Llama and Mistral models with SAEs trained in the test.

Random models refuse nothing, so over_refusal is skipped for lack of refused prompts (fine); toxic
and safe run against harmless contrast prompts from circuits.contrast_data (OR-Bench has none).
Checked: shapes, valid JSON without NaN, the documented files; a killed run continues after the
last committed set and a rerun skips the finished stage; bad input fails before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from refusal_lab.circuits import stage as circuits_stage
from refusal_lab.circuits.config import CircuitsConfig, DiscoverySet, MetricConfig, MetricKind
from refusal_lab.circuits.sets import text_hash
from refusal_lab.config import (
    ConfigError,
    DataConfig,
    DataSource,
    InferenceConfig,
    ModelConfig,
    Positions,
    RunConfig,
    Stage,
    TrackingConfig,
    WandbMode,
)
from refusal_lab.devices import Device
from refusal_lab.pipeline import run
from refusal_lab.sae.config import SaeConfig


def make_cfg(model_dir: Path, shared_data: Path, tmp: Path, data_limit: int = 40, **circuits) -> RunConfig:
    contrast = {
        "source": "table",
        "path": str(shared_data / "refusal_direction" / "splits" / "harmless_train.json"),
        "prompt_column": "instruction",
        "category_column": "category",
        "label_column": None,
        "default_label": "harmless",
        "limit": 24,
    }
    defaults = dict(
        sets=[DiscoverySet.toxic, DiscoverySet.safe, DiscoverySet.over_refusal, DiscoverySet.toxic_refused],
        by_category=False,
        ig_steps=2,
        n_random=2,
        faithfulness_sizes=[2, 4],
        max_new_tokens=2,
        circuit_size=8,
        max_circuit_size=8,  # the faithfulness-target search (default 0.8) within the top 8
        contrast_data=contrast,
        contrast_limit=12,
        batch_size=16,
    )
    return RunConfig(
        model=ModelConfig(
            name=str(model_dir),
            device=Device.cpu,
            local_files_only=True,
            activation_layers=["residuals_0-1"],
            refusal_tokens=["▁I"],
        ),
        inference=InferenceConfig(batch_size="8", max_new_tokens=3),
        data=DataConfig(source=DataSource.or_bench, path=str(shared_data / "or_bench"), limit=data_limit),
        sae=SaeConfig(expansion_factor=2, k=8, batch_size=256, epochs=1.0, ce_max_samples=4),
        circuits=CircuitsConfig(**{**defaults, **circuits}),
        tracking=TrackingConfig(wandb=WandbMode.disabled),
        stages=[Stage.collect, Stage.sae, Stage.circuits],
        artifacts_dir=str(tmp / "artifacts"),
    )


def _no_nan(text: str) -> object:
    def bad(value: str) -> float:
        raise AssertionError(f"non-finite number {value} in JSON")

    return json.loads(text, parse_constant=bad)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_whole_stage_on_tiny_models(kind, tiny_llama, tiny_mistral, shared_data, tmp_path):
    model_dir = tiny_llama if kind == "llama" else tiny_mistral
    target = 0.8 if kind == "llama" else None  # mistral: the fixed count circuit_size (target null)
    cfg = make_cfg(model_dir, shared_data, tmp_path, faithfulness_target=target)
    summary = run(cfg, tmp_path / "run", tmp_path)
    _no_nan((tmp_path / "run" / "summary.json").read_text())
    circuits = summary["circuits"]
    assert (
        circuits["over_refusal"]["status"] == "skipped" and "refused safe prompts" in circuits["over_refusal"]["reason"]
    )
    assert circuits["toxic_refused"] == {
        "status": "skipped",
        "reason": "0 refused toxic prompts (fewer than 8)",
        "method": "ig",
        "n_prompts_discovery": 0,
        "n_prompts_validation": 0,
    }
    for name in ("toxic", "safe"):
        entry = circuits[name]
        assert entry["status"] == "ok", entry
        assert entry["n_prompts_discovery"] > 0 and entry["n_prompts_validation"] > 0
        assert 0 < entry["n_nodes"] <= 8
        size = entry["size"]
        assert size["target"] == target and size["n_nodes"] == entry["n_nodes"]
        assert size["faithfulness"] == entry["faithfulness"] and size["completeness"] == entry["completeness"]
        if target is None:
            assert size["rule"] == "fixed" and size["met"] is None
        else:
            assert size["rule"] == "faithfulness_target"
            assert size["faithfulness_discovery"] == size["searched"][str(entry["n_nodes"])]
            assert size["met"] == (size["faithfulness_discovery"] >= target) and (size["reason"] is None) == size["met"]
        folder = Path(entry["folder"])
        graph = _no_nan((folder / "graph.json").read_text())
        assert isinstance(graph, dict)
        assert graph["hooks"] == ["residuals_0", "residuals_1"]
        features = [n for n in graph["nodes"] if n["kind"] == "feature"]
        assert len(features) == entry["n_nodes"] and len(graph["edges"]) == entry["n_edges"]
        _no_nan((folder / "validation.json").read_text())
        npz = np.load(folder / "effects.npz")
        n, pool = npz["effects"].shape
        assert n == entry["n_prompts_discovery"] == len(npz["categories"]) == len(npz["prompt_hash"])
        assert pool == len(npz["pool_hook"]) == len(npz["pool_feature"]) and pool >= entry["n_nodes"]
        assert np.isfinite(npz["effects"]).all()
        assert set(npz["labels"].tolist()) == {name}
        assert entry["ablation"]["n_random"] == 2


def mark_half_refused(monkeypatch, label: str) -> None:
    """The stage's prompt pool with every other `label` prompt (by text hash parity) marked refused."""
    real_load = circuits_stage.load_pool

    def half_refused(ctx):
        pool, contrast, responses = real_load(ctx)
        chosen = np.asarray(pool.labels) == label
        parity = np.asarray([int(text_hash(p)[-1], 16) % 2 == 0 for p in pool.prompts])
        pool.refused = pool.refused | (chosen & parity)
        return pool, contrast, responses

    monkeypatch.setattr(circuits_stage, "load_pool", half_refused)


def test_toxic_refused_runs_on_refused_vs_answered_toxic_prompts(tiny_llama, shared_data, tmp_path, monkeypatch):
    # A random model refuses nothing; mark half the toxic prompts refused so both sides of toxic_refused
    # exist, as on a weakly aligned real model.
    mark_half_refused(monkeypatch, "toxic")
    cfg = make_cfg(tiny_llama, shared_data, tmp_path, sets=[DiscoverySet.toxic_refused], data_limit=80)
    entry = run(cfg, tmp_path / "run", tmp_path)["circuits"]["toxic_refused"]
    assert entry["status"] == "ok", entry
    assert entry["n_contrast_discovery"] > 0 and entry["n_contrast_validation"] > 0
    npz = np.load(Path(entry["folder"]) / "effects.npz")
    assert set(npz["labels"].tolist()) == {"toxic"}
    # The held-out KL is on harmless prompts, not on the answered toxic contrast.
    assert entry["ablation"]["kl_harmless"] is not None
    assert "toxic" in entry["ablation"]["refusal_rate_drop_by_label"]


def test_selective_circuit_and_drops_by_label_for_every_set(tiny_llama, shared_data, tmp_path, monkeypatch):
    # Mark half the safe prompts refused so over_refusal runs and the selective circuit follows.
    mark_half_refused(monkeypatch, "safe")
    sets = [DiscoverySet.toxic, DiscoverySet.over_refusal]
    cfg = make_cfg(tiny_llama, shared_data, tmp_path, sets=sets, data_limit=80, faithfulness_target=None)
    circuits = run(cfg, tmp_path / "run", tmp_path)["circuits"]
    selective = circuits["over_refusal_selective"]
    assert selective["status"] == "ok", selective
    assert selective["from_sets"] == ["over_refusal", "toxic"] and 0 < selective["n_nodes"] <= 8
    for feature in selective["top_features"]:
        assert feature["score"] == pytest.approx(feature["share_over_refusal"] - feature["share_toxic"], abs=1e-6)
        assert feature["score"] > 0 and feature["share_over_refusal"] > 0
    graph = json.loads((Path(selective["folder"]) / "graph.json").read_text())
    assert [(n["hook"], n["feature"]) for n in graph["nodes"]][:3] == [
        (f["hook"], f["feature"]) for f in selective["top_features"][:3]
    ]
    spec = circuits["specificity"]
    assert set(spec) == {"toxic", "over_refusal", "over_refusal_selective"}
    for name, row in spec.items():
        # held-out toxic, safe split by the unedited model's refusal, and harmless prompts
        assert set(row["drop_by_label"]) == {"toxic", "refused_safe", "answered_safe", "harmless"}, (name, row)
        assert row["n_nodes"] == circuits[name]["n_nodes"]
    assert selective["ablation"]["n_random"] == 2  # validated against random same-size sets


def test_killed_run_continues_after_the_last_committed_set_and_a_rerun_skips(
    tiny_llama, shared_data, tmp_path, monkeypatch
):
    cfg = make_cfg(tiny_llama, shared_data, tmp_path, sets=[DiscoverySet.toxic, DiscoverySet.safe])
    real_run = circuits_stage.SetRunner.run
    calls: list[str] = []

    def killed_after_first(self, plan, folder):
        if calls:
            raise KeyboardInterrupt("killed")  # the second set never commits
        calls.append(plan.name)
        return real_run(self, plan, folder)

    monkeypatch.setattr(circuits_stage.SetRunner, "run", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "run", tmp_path)
    assert calls == ["toxic"]

    def counted(self, plan, folder):
        calls.append(plan.name)
        return real_run(self, plan, folder)

    monkeypatch.setattr(circuits_stage.SetRunner, "run", counted)
    calls.clear()
    first = run(cfg, tmp_path / "run", tmp_path)
    assert calls == ["safe"], "the committed toxic set must not be recomputed"
    assert first["circuits"]["toxic"]["status"] == first["circuits"]["safe"]["status"] == "ok"
    calls.clear()
    again = run(cfg, tmp_path / "run", tmp_path)
    assert calls == [] and again["circuits"] == first["circuits"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda c: replace(c, circuits=replace(c.circuits, hooks=["residuals_2"])), "circuits.hooks: ['residuals_2']"),
        (
            lambda c: replace(c, inference=replace(c.inference, positions=Positions.generated)),
            "inference.positions: generated does not store the last prompt position",
        ),
        (
            lambda c: replace(
                c,
                circuits=replace(c.circuits, metric=MetricConfig(kind=MetricKind.response_score)),
                inference=replace(c.inference, positions=Positions.last_prompt),
            ),
            "inference.positions: last_prompt stores no response tokens",
        ),
        (
            lambda c: replace(c, circuits=replace(c.circuits, contrast_data=None)),
            "circuits.contrast_data: the run's data has no harmless prompts",
        ),
    ],
)
def test_bad_input_fails_before_any_model_loads(change, needle, tiny_llama, shared_data, tmp_path, monkeypatch):
    import refusal_lab.pipeline as pipeline

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    cfg = change(make_cfg(tiny_llama, shared_data, tmp_path))
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run", tmp_path)
    assert needle in str(err.value)
    assert not (tmp_path / "artifacts").exists()


def test_unknown_discovery_set_is_one_config_error():
    with pytest.raises(ConfigError, match=r"circuits.sets: \['over_refusals'\] are not discovery sets; valid: "):
        CircuitsConfig(sets=["over_refusals"])  # type: ignore[list-item]


def test_fingerprint_covers_the_judgement_the_saes_and_the_settings(tiny_llama, shared_data, tmp_path):
    from refusal_lab.circuits.config import RefusedBy
    from refusal_lab.pipeline import planned_context

    cfg = make_cfg(tiny_llama, shared_data, tmp_path)

    def circuits_fp(c: RunConfig) -> str:
        return planned_context(c, tmp_path).fingerprints[Stage.circuits]

    base = circuits_fp(cfg)
    assert circuits_fp(replace(cfg, circuits=replace(cfg.circuits, batch_size=3))) == base  # batching only
    for changed in (
        replace(cfg, circuits=replace(cfg.circuits, refused_by=RefusedBy.rule)),
        replace(cfg, sae=replace(cfg.sae, k=4)),
        replace(cfg, circuits=replace(cfg.circuits, ig_steps=3)),
        replace(cfg, inference=replace(cfg.inference, max_new_tokens=2)),
    ):
        assert circuits_fp(changed) != base


def _no_model_loads(monkeypatch) -> None:
    import refusal_lab.pipeline as pipeline

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)


def test_refused_by_a_judge_without_its_judgement_fails_before_any_model_loads(
    tiny_llama, shared_data, tmp_path, monkeypatch
):
    """Issue 17 item 2: the judge stage is an input of circuits under refused_by=score; missing, it fails first."""
    from refusal_lab.circuits.config import RefusedBy

    _no_model_loads(monkeypatch)
    cfg = make_cfg(tiny_llama, shared_data, tmp_path, refused_by=RefusedBy.score)
    assert Stage.judge not in cfg.stages
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run", tmp_path)
    message = str(err.value)
    assert "circuits.refused_by=score: circuits reads the score judgement of store" in message
    assert "add judge to stages (with score in judge.judges), or run the judge stage first" in message
    assert "produce it with: python -m refusal_lab 'stages=[judge]'" in message
    assert not (tmp_path / "artifacts").exists(), "nothing may run before the missing input is reported"


def test_refused_by_a_judge_the_judge_stage_does_not_run_fails_before_any_model_loads(
    tiny_llama, shared_data, tmp_path, monkeypatch
):
    from refusal_lab.circuits.config import RefusedBy
    from refusal_lab.judge.config import JudgeConfig, JudgeName

    _no_model_loads(monkeypatch)
    cfg = make_cfg(tiny_llama, shared_data, tmp_path, refused_by=RefusedBy.llm)
    cfg = replace(cfg, stages=[Stage.collect, Stage.judge, Stage.sae, Stage.circuits])
    cfg = replace(cfg, judge=JudgeConfig(judges=[JudgeName.rule, JudgeName.score]))
    with pytest.raises(ConfigError, match=r"circuits.refused_by=llm: .* \(judge.judges=\['rule', 'score'\]\); add llm"):
        run(cfg, tmp_path / "run", tmp_path)
    assert not (tmp_path / "artifacts").exists()


def test_refused_by_a_judge_plans_once_its_judgement_is_committed(tiny_llama, shared_data, tmp_path):
    """The same check passes once the judge stage has run on the store (no SAE or circuits work needed)."""
    from refusal_lab.circuits.config import RefusedBy
    from refusal_lab.pipeline import make_context, plan_stages

    cfg = make_cfg(tiny_llama, shared_data, tmp_path, data_limit=12, refused_by=RefusedBy.score)
    later = replace(cfg, stages=[Stage.sae, Stage.circuits])
    run(replace(cfg, stages=[Stage.collect]), tmp_path / "collected", tmp_path)
    with pytest.raises(ConfigError, match="circuits.refused_by=score"):
        plan_stages(later, make_context(later, tmp_path / "plan", tmp_path)[0])
    run(replace(cfg, stages=[Stage.judge]), tmp_path / "judged", tmp_path)
    planned = plan_stages(later, make_context(later, tmp_path / "plan", tmp_path)[0])
    assert [s.name for s in planned] == [Stage.sae, Stage.circuits]


@pytest.mark.parametrize("category_sizes", ["pooled", "search"])
def test_categories_take_the_pooled_size_and_edges_are_capped_to_the_top_edge_nodes(
    category_sizes, tiny_llama, shared_data, tmp_path
):
    cfg = make_cfg(
        tiny_llama,
        shared_data,
        tmp_path,
        data_limit=60,
        sets=[DiscoverySet.toxic],
        by_category=True,
        category_sizes=category_sizes,
        edge_nodes=2,
    )
    cfg = replace(cfg, data=replace(cfg.data, categories=["harmful", "violence"]))  # two categories of >= 8 prompts
    toxic = run(cfg, tmp_path / "run", tmp_path)["circuits"]["toxic"]
    assert toxic["status"] == "ok" and toxic["size"]["rule"] == "faithfulness_target"
    # Edges only among the top edge_nodes features of the circuit (graph.json lists nodes strongest first).
    assert toxic["edge_nodes"] == min(2, toxic["n_nodes"])
    graph = json.loads((Path(toxic["folder"]) / "graph.json").read_text())
    top = {n["id"] for n in [n for n in graph["nodes"] if n["kind"] == "feature"][: toxic["edge_nodes"]]}
    errors = {n["id"] for n in graph["nodes"] if n["kind"] == "error"}
    assert graph["edges"] and all({e["source"], e["target"]} <= top | errors for e in graph["edges"])
    ran = {c: e for c, e in toxic["by_category"].items() if e["status"] == "ok"}
    assert ran, toxic["by_category"]
    for category, entry in ran.items():
        size = entry["size"]
        assert size["n_nodes"] == entry["n_nodes"], category
        if category_sizes == "pooled":
            assert size["rule"] == "pooled_set_size" and size["searched"] == {}, (category, size)
            assert entry["n_nodes"] == min(toxic["n_nodes"], size["n_candidates"]), (category, size)
            assert size["met"] == (size["faithfulness_discovery"] >= 0.8), (category, size)
        else:
            assert size["rule"] == "faithfulness_target" and size["searched"], (category, size)
