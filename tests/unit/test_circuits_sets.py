"""Discovery sets: hash split disjoint and stable, contrasts as documented, small sets skipped with a reason."""

from __future__ import annotations

import numpy as np

from refusal_lab.circuits.config import DiscoverySet
from refusal_lab.circuits.edges import prune_edges, select_nodes
from refusal_lab.circuits.sets import PromptPool, is_validation, plan_sets, split


def _pool() -> PromptPool:
    prompts, labels, cats, refused = [], [], [], []
    for label in ("harmless", "safe", "toxic"):
        for cat in ("a", "b"):
            n = 30 if cat == "a" else 6  # category b is too small on its own
            for i in range(n):
                prompts.append(f"{label} {cat} prompt number {i}")
                labels.append(label)
                cats.append(cat)
                # Category a: 2 of 3 toxic prompts refused (so both sides of toxic_refused are large enough);
                # category b: every toxic prompt refused (no answered ones: toxic_refused/b is skipped).
                toxic_refused = cat == "b" or i % 3 != 0
                refused.append(toxic_refused if label == "toxic" else label == "safe" and i % 2 == 0)
    return PromptPool(prompts, labels, cats, np.asarray(refused))


def test_discovery_and_validation_are_disjoint_and_split_by_text():
    pool = _pool()
    harmless = [i for i, lab in enumerate(pool.labels) if lab == "harmless"]
    plans = plan_sets(pool, harmless, list(DiscoverySet), True, 0.5, None, None)
    for plan in plans:
        for side in (plan.target, plan.contrast):
            assert not set(side.discovery) & set(side.validation), plan.name
            texts_d = {pool.prompts[i] for i in side.discovery}
            texts_v = {pool.prompts[i] for i in side.validation}
            assert not texts_d & texts_v
            assert all(is_validation(pool.prompts[i], 0.5) for i in side.validation)
    # A duplicate prompt text lands on the same side wherever it appears.
    dup = split([0, 1], ["same text", "same text"], 0.5, None)
    assert dup.discovery == [0, 1] or dup.validation == [0, 1]


def test_sets_have_the_documented_targets_and_contrasts():
    pool = _pool()
    labels, refused = np.asarray(pool.labels), pool.refused
    harmless = [i for i, lab in enumerate(pool.labels) if lab == "harmless"]
    plans = {p.name: p for p in plan_sets(pool, harmless, list(DiscoverySet), True, 0.5, None, None)}
    kinds = ("toxic", "safe", "over_refusal", "toxic_refused")
    assert set(plans) == {f"{k}{c}" for k in kinds for c in ("", "/a", "/b")}
    tox = plans["toxic"]
    assert {labels[i] for i in tox.target.discovery + tox.target.validation} == {"toxic"}
    assert {labels[i] for i in tox.contrast.discovery + tox.contrast.validation} == {"harmless"}
    over = plans["over_refusal"]
    target = over.target.discovery + over.target.validation
    contrast = over.contrast.discovery + over.contrast.validation
    assert all(labels[i] == "safe" and refused[i] for i in target)
    assert all(labels[i] == "safe" and not refused[i] for i in contrast)
    assert len(target) == 18 and len(contrast) == 18
    # toxic_refused: the same label on both sides, split by what the model did.
    tr = plans["toxic_refused"]
    target = tr.target.discovery + tr.target.validation
    contrast = tr.contrast.discovery + tr.contrast.validation
    assert all(labels[i] == "toxic" and refused[i] for i in target)
    assert all(labels[i] == "toxic" and not refused[i] for i in contrast)
    assert len(target) == 20 + 6 and len(contrast) == 10
    assert tr.skipped is None
    per_cat = plans["toxic_refused/a"]
    assert {pool.categories[i] for i in per_cat.target.discovery + per_cat.contrast.discovery} == {"a"}


def test_small_sets_are_skipped_with_the_reason():
    pool = _pool()
    harmless = [i for i, lab in enumerate(pool.labels) if lab == "harmless"]
    plans = {p.name: p for p in plan_sets(pool, harmless, list(DiscoverySet), True, 0.5, None, None)}
    assert plans["toxic"].skipped is None and plans["toxic/a"].skipped is None
    assert plans["toxic/b"].skipped == "6 toxic prompts (fewer than 8)"
    assert plans["over_refusal/b"].skipped == "3 refused safe prompts (fewer than 8)"
    assert plans["toxic_refused/b"].skipped == "6 refused toxic prompts (fewer than 8)"
    # A model that refuses every toxic prompt (the organism) leaves the pooled set skipped with its reason.
    refused = pool.refused | (np.asarray(pool.labels) == "toxic")
    all_refused = PromptPool(pool.prompts, pool.labels, pool.categories, refused)
    plans = {p.name: p for p in plan_sets(all_refused, harmless, [DiscoverySet.toxic_refused], False, 0.5, None, None)}
    assert plans["toxic_refused"].skipped == "0 answered toxic prompts (fewer than 8)"


def test_caps_keep_the_lowest_hashes_per_part():
    prompts = [f"p{i}" for i in range(100)]
    capped = split(range(100), prompts, 0.5, 10)
    full = split(range(100), prompts, 0.5, None)
    assert len(capped.discovery) == 10 and set(capped.discovery) <= set(full.discovery)


def test_node_selection_and_edge_pruning():
    effects = {"residuals_0": np.array([0.0, 5.0, -3.0, 0.1]), "residuals_1": np.array([1.0, 0.0, 0.0, -0.05])}
    nodes = select_nodes(effects, threshold=0.0, share=0.95, size=10)
    assert [(h, f) for h, f, _ in nodes] == [("residuals_0", 1), ("residuals_0", 2), ("residuals_1", 0)]
    assert len(select_nodes(effects, 0.0, 1.0, 2)) == 2
    assert [f for _, f, _ in select_nodes(effects, 2.0, 1.0, 10)] == [1, 2]
    edges = {(("r0", 0), ("r1", 0)): 4.0, (("r0", 1), ("r1", 0)): -1.0, (("r0", 2), ("r1", 0)): 0.1}
    assert set(prune_edges(edges, 0.0, 0.7)) == {(("r0", 0), ("r1", 0))}  # 4.0 of 5.1 covers 70%
    assert len(prune_edges(edges, 0.0, 0.8)) == 2
    assert len(prune_edges(edges, 0.5, 1.0)) == 2
