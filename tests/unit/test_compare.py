"""Cross-category circuit comparison on planted per-prompt effects (no model).

The permutation test must be calibrated (identical circuits: p-values uniform over seeds) and
have power (planted category-specific features: found, pairs not called shared).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from refusal_lab.circuits.compare import compare_categories, compare_committed_sets, compare_sets
from refusal_lab.circuits.compare_stats import benjamini_hochberg, holm

N_POOL = 60
CATS = ("fraud", "privacy", "violence")


def ks_uniform_p(x: np.ndarray) -> float:
    """One-sample Kolmogorov-Smirnov p-value against U(0, 1) (Stephens' approximation, as in Numerical Recipes)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    i = np.arange(1, n + 1)
    d = max(float(np.max(i / n - x)), float(np.max(x - (i - 1) / n)))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    j = np.arange(1, 101)
    return float(np.clip(2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j**2 * lam**2)), 0.0, 1.0))


def planted(
    seed: int, specific: int = 0, shared: int = 10, n_per_cat: int = 24, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, dict[str, list[int]]]:
    """Per-prompt effects [N, P]: `shared` features with the same mean in every category, plus
    `specific` features per category whose effect exists only in that category."""
    rng = np.random.default_rng(seed)
    mean_CP = np.zeros((len(CATS), N_POOL))
    mean_CP[:, :shared] = rng.choice([-1, 1], shared) * np.linspace(6, 3, shared)
    planted_idx: dict[str, list[int]] = {}
    for c, cat in enumerate(CATS):
        idx = list(range(20 + c * specific, 20 + (c + 1) * specific))
        mean_CP[c, idx] = rng.choice([-1, 1], specific) * 3.0
        planted_idx[cat] = idx
    codes = np.repeat(np.arange(len(CATS)), n_per_cat)
    effects = mean_CP[codes] + noise * rng.standard_normal((len(codes), N_POOL))
    hooks = [f"residuals_{j % 4}" for j in range(N_POOL)]
    return effects, np.asarray(CATS)[codes], hooks, np.arange(N_POOL) * 7, planted_idx


def test_ks_helper_matches_the_tabulated_critical_value() -> None:
    # n = 100: D = 0.1340 is the 5% critical value (1.358 / (sqrt(n) + 0.12 + 0.11 / sqrt(n))).
    grid = (np.arange(100) + 0.5) / 100
    assert ks_uniform_p(grid) > 0.99
    assert ks_uniform_p(np.clip(grid + 0.134 - 0.005, 0, 1)) == pytest.approx(0.05, abs=0.01)
    assert ks_uniform_p(grid**2) < 1e-3


def test_identical_circuits_give_uniform_p_values_over_seeds() -> None:
    p_values, verdicts = [], []
    for seed in range(100):
        effects, cats, hooks, feats, _ = planted(seed, specific=0, shared=12)
        out = compare_categories(
            effects, cats, hooks, feats, size=12, n_permutations=199, n_bootstrap=0, seed=1000 + seed
        )
        pair = next(p for p in out["pairs"] if (p["a"], p["b"]) == ("fraud", "privacy"))
        p_values.append(pair["weighted_jaccard"]["p"])
        verdicts.append(out["verdict"])
    assert ks_uniform_p(np.asarray(p_values)) > 0.01, sorted(p_values)
    # Holm at 0.05 over the three pairs: at most ~5% of the runs may call anything non-shared.
    assert verdicts.count("shared") >= 90, verdicts


def test_planted_category_specific_features_are_found() -> None:
    effects, cats, hooks, feats, planted_idx = planted(3, specific=5, shared=10)
    out = compare_categories(effects, cats, hooks, feats, size=15, n_permutations=999, n_bootstrap=100, seed=0)
    assert out["status"] == "ok" and out["size"] == 15
    for cat, idx in planted_idx.items():
        found = {(f["hook"], f["feature"]) for f in out["category_specific"][cat]}
        assert found == {(hooks[j], int(feats[j])) for j in idx}, (cat, found)
        assert len(out["categories"][cat]["circuit"]) == 15  # equal size for every category
    for pair in out["pairs"]:
        assert pair["weighted_jaccard"]["p_adj"] < 0.05
        assert pair["verdict"] == "partly_shared"  # 10 of 15 features shared: different, not disjoint
        assert len(pair["shared_features"]) == 10
        wj = pair["weighted_jaccard"]
        assert wj["ci95"][0] <= wj["value"] <= wj["ci95"][1]
    assert out["verdict"] == "partly_shared"
    assert {f["feature"] for f in out["shared_features"]} == {int(feats[j]) for j in range(10)}


def test_disjoint_circuits_are_distinct() -> None:
    effects, cats, hooks, feats, _ = planted(4, specific=8, shared=0)
    out = compare_categories(effects, cats, hooks, feats, size=8, n_permutations=499, n_bootstrap=100, seed=0)
    assert out["verdict"] == "distinct", [(p["a"], p["b"], p["weighted_jaccard"]) for p in out["pairs"]]
    assert out["shared_features"] == []
    assert out["matrix"]["categories"] == list(CATS)
    assert all(out["matrix"]["node_jaccard"][i][i] == 1.0 for i in range(3))


def test_seeded_and_reproducible() -> None:
    effects, cats, hooks, feats, _ = planted(5, specific=2)
    a = compare_categories(effects, cats, hooks, feats, size=10, n_permutations=99, n_bootstrap=20, seed=7)
    b = compare_categories(effects, cats, hooks, feats, size=10, n_permutations=99, n_bootstrap=20, seed=7)
    c = compare_categories(effects, cats, hooks, feats, size=10, n_permutations=99, n_bootstrap=20, seed=8)
    drop = ("seconds", "seconds_per_permutation")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert [p["weighted_jaccard"]["ci95"] for p in a["pairs"]] != [p["weighted_jaccard"]["ci95"] for p in c["pairs"]]


def test_small_categories_are_left_out_and_edges_are_scored() -> None:
    effects, cats, hooks, feats, _ = planted(6, specific=3)
    cats = cats.copy()
    cats[:21] = "tiny"  # 21 of fraud's 24 prompts: fraud keeps 3 (< 4)
    edges = np.array([[0, 1], [1, 2], [20, 21], [26, 27]])
    out = compare_categories(effects, cats, hooks, feats, size=12, n_permutations=49, n_bootstrap=10, edges=edges)
    assert "fraud" in out["skipped_categories"]
    assert out["matrix"]["categories"] == ["privacy", "tiny", "violence"]
    assert all(0.0 <= p["edge_jaccard"]["value"] <= 1.0 for p in out["pairs"])
    one = compare_categories(effects[:8], ["a"] * 8, hooks, feats, size=5, n_permutations=9, n_bootstrap=0)
    assert one["status"] == "skipped"


def test_multiple_comparison_corrections() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])


def test_compare_sets_aligns_pools_by_hook_and_feature() -> None:
    rng = np.random.default_rng(0)
    hooks = ["residuals_0"] * 10 + ["residuals_1"] * 10
    feats = list(range(10)) * 2
    toxic = rng.normal(0, 0.1, (30, 20))
    toxic[:, :5] += 4.0
    # over_refusal: same five features in another pool order; safe: five other ones
    order = rng.permutation(20)
    over = toxic[:, order] + rng.normal(0, 0.1, (30, 20))
    safe = rng.normal(0, 0.1, (30, 20))
    safe[:, 12:17] += 4.0
    out = compare_sets(
        {
            "toxic": (hooks, feats, toxic),
            "over_refusal": ([hooks[i] for i in order], [feats[i] for i in order], over),
            "safe": (hooks, feats, safe.mean(0)),
        },
        size=5,
    )
    verdict = {(p["a"], p["b"]): p["verdict"] for p in out["pairs"]}
    assert verdict[("toxic", "over_refusal")] == "shared"
    assert verdict[("toxic", "safe")] == "distinct"
    assert len(next(p for p in out["pairs"] if p["b"] == "over_refusal")["shared_features"]) == 5


def test_compare_committed_sets_reads_effects_npz(tmp_path: Path) -> None:
    dirs = {}
    for name, seed in (("toxic", 1), ("over_refusal", 2)):
        effects, cats, hooks, feats, _ = planted(seed, specific=3)
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        np.savez(
            dirs[name] / "effects.npz",
            effects=effects.astype(np.float32),
            pool_hook=np.asarray(hooks),
            pool_feature=feats,
            categories=cats,
            labels=np.asarray(["toxic"] * len(cats)),
            prompt_hash=np.asarray([str(i) for i in range(len(cats))]),
        )
    dirs["safe"] = tmp_path / "safe"  # skipped set: no effects.npz
    entries = {
        "toxic": {"status": "ok", "n_nodes": 13, "by_category": {"fraud": {"status": "ok", "n_nodes": 9}}},
        "over_refusal": {"status": "ok", "n_nodes": 12},
        "safe": {"status": "skipped", "reason": "too few"},
    }
    out = compare_committed_sets(dirs, entries, seed=0, n_permutations=99, n_bootstrap=20)
    assert out["categories"]["toxic"]["size"] == 9  # the smallest committed per-category circuit
    assert out["categories"]["over_refusal"]["size"] == 12  # no per-category circuit: the set's own size
    assert out["categories"]["safe"]["status"] == "skipped"
    assert out["sets"]["sets"] == ["toxic", "over_refusal"] and out["sets"]["size"] == 12
    assert json.loads(json.dumps(out)) == out  # JSON-ready for summary.json
