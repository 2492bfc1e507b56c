"""report.html from a run folder: every section drawn from summary.json and the artifacts it names,
missing stages as notes, and a rebuild that loads no model and rewrites nothing but report.html.

`make_run` builds a complete run folder with planted numbers (no model), shared with the
browser test (test_report_browser.py).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refusal_lab.circuits.compare import compare_categories, compare_sets
from refusal_lab.report import REPORT_HTML
from refusal_lab.report.build import build_report

HOOKS = ["residuals_0", "residuals_1", "residuals_2", "residuals_3"]
CATEGORIES = ["deception", "harassment", "privacy", "violence"]
LABELS = ["harmless", "safe", "toxic"]
# Marker numbers: each must appear on the page exactly as the report formats it.
FVU = [0.139, 0.121, 0.113, 0.111]
TOXIC_DROP, RANDOM_MEDIAN = 0.957, 0.0217


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _sae(root: Path) -> dict[str, Any]:
    out = {}
    for i, hook in enumerate(HOOKS):
        folder = root / "sae" / "fp" / hook
        metrics = {
            "fvu": FVU[i],
            "l0": 32.0,
            "dead_frac": 0.001 * i,
            "dense_frac": 0.03,
            "rel_bias": 1.02,
            "ce_recovered": 0.99 - 0.01 * i,
            "kl": 0.03,
            "density_histogram": {
                "log10_density_bin_edges": [round(-4 + 0.1 * k, 1) for k in range(41)],
                "counts": [int(50 * np.exp(-((k - 25) ** 2) / 40)) for k in range(40)],
                "n_dead": i,
            },
            "train": {"steps": 45, "tokens": 46080, "seconds": 8.5, "tokens_per_s": 5421.0},
        }
        _write(folder / "metrics.json", metrics)
        out[hook] = {k: metrics[k] for k in ("fvu", "l0", "dead_frac", "dense_frac", "rel_bias", "ce_recovered", "kl")}
        out[hook]["path"] = str(folder)
    return out


def _judges(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "judge_disagreements.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "label", "category", "keyword", "rule", "refusal_score", "prompt", "response"])
        writer.writerow(
            [7, "safe", "privacy", "full_refusal", "full_compliance", 0.4, "How do I <b>find</b> x?", "Sorry, no"]
        )
        writer.writerow([9, "toxic", "violence", "full_compliance", "partial_refusal", -1.0, "zzqq-marker", "Sure..."])

    def shares(rate: float) -> dict[str, Any]:
        return {
            "n": 90,
            "refusal_rate": rate,
            "full_compliance": 1 - rate,
            "full_refusal": rate,
            "partial_refusal": 0.0,
        }

    return {  # the judge stage's summary entry (refusal_lab/judge/stage.py)
        "per_judge": {
            "keyword": {
                "three_class": False,
                "overall": shares(0.44),
                "by_label": {"harmless": shares(0.0), "safe": shares(0.333), "toxic": shares(1.0)},
            },
            "rule": {
                "three_class": True,
                "overall": shares(0.43),
                "by_label": {"harmless": shares(0.011), "safe": shares(0.3), "toxic": shares(0.989)},
            },
        },
        "pairs": {
            "keyword~rule": {
                "binary": {"n": 270, "agreement": 0.9926, "kappa": 0.985, "confusion": [[150, 1], [1, 118]]}
            }
        },
        "disagreements": {"csv": str(path), "n": 2},
    }


def _effects(seed: int) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    n_pool = 40
    means = np.zeros((len(CATEGORIES), n_pool))
    means[:, :8] = np.linspace(5, 2, 8)
    for c in range(len(CATEGORIES)):
        means[c, 10 + 3 * c : 13 + 3 * c] = 3.0
    codes = np.repeat(np.arange(len(CATEGORIES)), 12)
    effects = means[codes] + rng.standard_normal((len(codes), n_pool))
    return effects, np.asarray(CATEGORIES)[codes], [HOOKS[j % 4] for j in range(n_pool)], np.arange(n_pool) * 3


def _set_entry(folder: Path, name: str, drop: float) -> dict[str, Any]:
    # The circuits stage's layout: ids "hook/feature", error nodes with kind "error" and no feature index.
    nodes = [
        {"id": f"{h}/{f}", "hook": h, "feature": f, "kind": "feature", "effect": e}
        for h, f, e in [
            ("residuals_0", 12, 0.9),
            ("residuals_0", 40, -0.2),
            ("residuals_1", 7, 0.6),
            ("residuals_2", 3, 0.5),
            ("residuals_3", 9, 0.8),
        ]
    ] + [{"id": "residuals_3/error", "hook": "residuals_3", "feature": None, "kind": "error", "effect": 0.1}]
    edges = [
        {"source": "residuals_0/12", "target": "residuals_1/7", "effect": 0.4},
        {"source": "residuals_1/7", "target": "residuals_2/3", "effect": 0.3},
        {"source": "residuals_2/3", "target": "residuals_3/9", "effect": -0.1},
        {"source": "residuals_2/3", "target": "residuals_3/error", "effect": 0.05},
    ]
    _write(folder / "graph.json", {"nodes": nodes, "edges": edges})
    _write(folder / "validation.json", {"ablation": {"random_refusal_rate_drops": [0.0, 0.011, 0.022, 0.033, 0.0] * 3}})
    _write(
        folder / "feature_cards.json",
        {
            "cards": [
                {
                    "hook": "residuals_0",
                    "feature": 12,
                    "contexts": [
                        {
                            "tokens": ["How", " to", " steal", " a", " car"],
                            "highlight": 2,
                            "activation": 4.2,
                            "category": "illegal",
                            "label": "toxic",
                        }
                    ],
                    "fires_on": {"label": {"toxic": 0.97, "safe": 0.41, "harmless": 0.02}},
                }
            ]
        },
    )
    return {
        "status": "ok",
        "method": "ig",
        "path": str(folder),
        "n_prompts_discovery": 45,
        "n_prompts_validation": 45,
        "n_nodes": 5,
        "n_error_nodes": 4,
        "n_edges": 3,
        "faithfulness": 0.87,
        "faithfulness_curve": {"1": 0.2, "4": 0.5, "16": 0.8, "64": 0.95},
        "completeness": 0.1,
        "top_features": [
            {
                "hook": "residuals_0",
                "feature": 12,
                "effect": 0.9,
                "top_tokens": [{"token": "steal", "phase": "prompt", "activation": 4.2}],
            },
            {"hook": "residuals_3", "feature": 9, "effect": 0.8, "top_tokens": []},
        ],
        "top_prompt_tokens": {"residuals_0": [{"token": "steal", "effect_share": 0.31}]},
        "ablation": {
            "refusal_rate_drop": drop,
            "refusal_rate_drop_by_label": {"toxic": drop, "safe": 0.4},
            "random_refusal_rate_drop_median": RANDOM_MEDIAN,
            "percentile": 100.0,
            "p_value": 0.0909,
            "n_random": 15,
            "kl_harmless": 0.012,
        },
        "by_category": {"privacy": {"status": "skipped", "reason": "4 prompts < 8"}},
    }


def make_run(root: Path, *, circuits: bool = True, judges: bool = True) -> Path:
    """A run folder with summary.json and every artifact the report reads (planted numbers, no model)."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    store = root / "artifacts" / "collect" / "abc.zarr"
    store.mkdir(parents=True)
    (store / "chunk").write_bytes(b"\0" * 4096)
    _write(store / "manifest.json", {"complete": True, "collect_stats": {"seconds": 3.21, "tokens": 5000.0}})
    by_cl = {f"{c}/{lab}": {"harmless": 0.0, "safe": 0.333, "toxic": 1.0}[lab] for c in CATEGORIES for lab in LABELS}
    summary: dict[str, Any] = {
        "run_fingerprint": "feedbeef",
        "stages": ["collect", "sae", "circuits", "report"],
        "data": {"counts_after": {c: {lab: 9 for lab in LABELS} for c in CATEGORIES}},
        "collect": {
            "store": str(store),
            "fingerprint": "abc",
            "samples": 108,
            "tokens": 5000,
            "hook_points": HOOKS,
            "refusal_rate": {
                "judge": "keyword",
                "overall": 0.444,
                "by_label": {"harmless": 0.0, "safe": 0.333, "toxic": 1.0},
                "by_category": {c: 0.444 for c in CATEGORIES},
                "by_category_label": by_cl,
            },
            "refusal_score": {
                "rate_positive_by_label": {"toxic": 1.0},
                "mean_by_label": {"toxic": 6.08},
                "judge_agreement": 1.0,
            },
            "overflow_counts": {h: 0 for h in HOOKS},
        },
        "sae": _sae(root / "artifacts"),
    }
    if judges:
        summary["judges"] = _judges(run_dir)
    if circuits:
        cdir = root / "artifacts" / "circuits" / "fp"
        effects, cats, hooks, feats = _effects(0)
        summary["circuits"] = {
            "toxic": _set_entry(cdir / "toxic", "toxic", TOXIC_DROP),
            "safe": _set_entry(cdir / "safe", "safe", 0.3),
            "over_refusal": {"status": "skipped", "reason": "7 refused safe prompts < 8"},
            "comparison": {
                "categories": {
                    "toxic": compare_categories(
                        effects, cats, hooks, feats, size=11, n_permutations=199, n_bootstrap=50
                    ),
                    "safe": {"status": "skipped", "reason": "1 categories with >= 4 prompts"},
                },
                "sets": compare_sets(
                    {"toxic": (hooks, feats, effects), "safe": (hooks, feats, effects[:, ::-1].copy())}, size=11
                ),
            },
        }
    _write(run_dir / "summary.json", summary)
    return run_dir


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != REPORT_HTML}


def test_report_shows_every_section_from_the_artifacts(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    html = build_report(run_dir).read_text()
    plots = re.findall(r'<figure class="plot" data-plot="([^"]+)"><svg', html)
    expected = {
        "refusal-by-label",
        "refusal-by-category",
        "judges-by-label",
        "sae-fvu",
        "sae-l0",
        "sae-dead_frac",
        "sae-ce_recovered",
        *(f"sae-density-{h}" for h in HOOKS),
        "graph-toxic",
        "faithfulness-toxic",
        "ablation-toxic",
        "graph-safe",
        "heatmap-toxic-weighted_jaccard",
        "heatmap-toxic-node_jaccard",
    }
    assert expected <= set(plots), expected - set(plots)
    assert len(plots) == len(set(plots))
    graph = re.search(r'data-plot="graph-toxic">(.*?)</figure>', html, re.S)
    assert graph and ">f12<" in graph.group(1) and ">err<" in graph.group(1)  # features and the error node drawn
    assert 'class="note"' in html and "7 refused safe prompts &lt; 8" in html  # over_refusal skipped: a note
    # SAE FVU, ablation, judge agreement and kappa, collect seconds from the store's manifest
    for number in ("0.139", "0.957", "0.0217", "0.993", "0.985", "3.21"):
        assert number in html, number
    # The disagreements table holds the CSV's rows, escaped, one click away (inside <details>).
    assert "zzqq-marker" in html and "How do I &lt;b&gt;find&lt;/b&gt; x?" in html
    assert re.search(r'<details id="disagreements">.*zzqq-marker.*</details>', html, re.S)
    # Feature card context with the firing token highlighted, and the comparison verdict.
    assert "<mark> steal</mark>" in html
    verdict = json.loads((run_dir / "summary.json").read_text())["circuits"]["comparison"]["categories"]["toxic"][
        "verdict"
    ]
    assert f'class="verdict v-{verdict}"' in html
    # Self-contained: no external reference at all.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html) and "https://" not in html


def test_missing_stages_render_as_notes(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, circuits=False, judges=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["sae"]
    html = build_report(run_dir, summary).read_text()
    for text in ("the circuits stage did not run", "the judge stage did not run", "the sae stage did not run"):
        assert text in html
    assert "refusal-by-label" in html


def test_rebuild_loads_no_model_and_rewrites_only_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    import refusal_lab.models

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the report loaded a model")

    monkeypatch.setattr(refusal_lab.models, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    run_dir = make_run(tmp_path)
    first = build_report(run_dir).read_text()
    before = _mtimes(tmp_path)
    from refusal_lab.report.__main__ import main

    assert main([str(run_dir)]) == 0
    assert _mtimes(tmp_path) == before  # summary.json and every artifact untouched
    assert (run_dir / REPORT_HTML).read_text() == first  # the same page again: nothing recomputed differently
    assert main([str(tmp_path / "nowhere")]) == 2


def test_report_stage_alone_rebuilds_an_earlier_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`stages=[report] report.run_dir=<run>` through the pipeline: no model, every artifact untouched."""
    import transformers
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import refusal_lab.models
    import refusal_lab.pipeline
    from refusal_lab.config import ConfigError, RunConfig, register_configs

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the report stage loaded a model")

    monkeypatch.setattr(refusal_lab.models, "load_model", refuse)
    monkeypatch.setattr(refusal_lab.pipeline, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    earlier = make_run(tmp_path / "earlier")
    before = _mtimes(tmp_path)
    repo = Path(__file__).resolve().parents[2]

    def config(*overrides: str) -> RunConfig:
        register_configs()
        with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
            cfg = OmegaConf.to_object(
                compose(config_name="config", overrides=["stages=[report]", "tracking=disabled", *overrides])
            )
        assert isinstance(cfg, RunConfig)
        return cfg

    summary = refusal_lab.pipeline.run(config(f"report.run_dir={earlier}"), tmp_path / "now", repo)
    assert summary["report"]["path"] == str(earlier / REPORT_HTML)
    assert after_only_report(before, _mtimes(tmp_path))
    assert "graph-toxic" in (earlier / REPORT_HTML).read_text()
    with pytest.raises(ConfigError, match="report.run_dir"):
        refusal_lab.pipeline.run(config(f"report.run_dir={tmp_path / 'nowhere'}"), tmp_path / "again", repo)


def after_only_report(before: dict[str, int], after: dict[str, int]) -> bool:
    """Every file that existed is untouched; new files are only the report run's own bookkeeping."""
    unchanged = all(after.get(path) == mtime for path, mtime in before.items())
    new = {Path(p).name for p in set(after) - set(before)}
    return unchanged and new <= {"summary.json", "refusal_lab.log"}
