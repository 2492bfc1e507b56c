"""Is refusal one mechanism or many? Circuits of categories (and of discovery sets) compared.

Reads: per-prompt node effects of one discovery set over a candidate pool of features
(`effects.npz`, written by the circuits stage: effects [n_prompts, n_pool], pool_hook,
pool_feature, categories). Writes nothing; returns JSON-ready dicts that the stage puts in
summary.json["circuits"]["comparison"].

Equal sizes. Every category's circuit is re-drawn from the pool as the `k` pool features with
the largest |mean effect| over the category's prompts, with ONE k for every category
(the stage passes the smallest per-category circuit size; k is capped at half the pool so
two circuits cannot overlap just because they fill it). Jaccard indices of sets of different
sizes are biased toward low values; at equal k they are not.

Similarities of the circuits of two categories A, B:
* node Jaccard |A ∩ B| / |A ∪ B| of their top-k feature sets;
* weighted Jaccard sum_j min(w_A, w_B) / sum_j max(w_A, w_B), with w = |mean effect| over the
  whole candidate pool normalised to sum 1 (1 = the same features carry the same share of
  effect). Every category is scored on the same pool (the union of each category's top
  features), so sizes are equal by construction. It is the primary statistic: it is
  continuous (ties make discrete permutation p-values conservative), and unlike top-k overlap
  it does not lose power when many features have similar effects (after shuffling, every
  group's mean is the pooled mean, whose top-k among near-ties is arbitrary);
* edge Jaccard, when the set's graph edges are given: the edges of that graph whose two ends
  both lie in a category's top-k circuit, compared like nodes.

Null. Under "one mechanism" the category labels are exchangeable among the set's prompts, so
the null distribution of each similarity comes from shuffling the labels (group sizes kept)
and re-scoring from the per-prompt effects already computed (no model reruns). p-value
(one-sided: less similar than shuffled labels) = (1 + #{null <= observed}) / (1 + n).
Bootstrap CIs resample prompts with replacement within each category. p-values of the pairs
are corrected for multiple comparisons (Holm by default, or Benjamini-Hochberg).

Shape letters: N prompts, P pool features, C categories, X replicates (permutations or
bootstrap draws).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refusal_lab.circuits.compare_stats import (
    CORRECTIONS,
    benjamini_hochberg,
    ci95,
    feature_row,
    score_pairs,
    specificity,
    top_k_mask,
)
from refusal_lab.progress import progress

log = logging.getLogger(__name__)

ALPHA = 0.05
"""Family-wise (Holm) or false-discovery (BH) level for every verdict."""
DISTINCT_FRACTION = 0.5
"""A pair is `distinct` when its weighted Jaccard CI lies below this fraction of the shuffled-label median."""
SPECIFIC_RATIO = 2.0
"""A category-specific feature's |mean effect| is at least this many times every other category's."""
SHARED_SHARE = 0.8
"""A feature is `shared` when it is in the circuits of at least this share of the categories."""
SET_SHARED, SET_DISTINCT = 0.5, 0.2
"""Descriptive thresholds on the weighted Jaccard CI between discovery sets (see `compare_sets`)."""
MIN_PROMPTS = 4
"""Categories with fewer prompts are left out (the permutation test is exact at any size, but a bootstrap over
fewer than 4 prompts says nothing; the default run has 4-5 discovery prompts per category)."""
CHUNK = 64
"""Replicates scored together (bounds memory at CHUNK * C * C * P floats)."""

VERDICT_RULE = (
    f"Per pair, on the weighted Jaccard of the categories' |mean effect| over the pool: 'shared' when its corrected "
    f"permutation p-value is >= {ALPHA} (the circuits are no less similar than circuits drawn after shuffling "
    f"category labels, i.e. than one mechanism measured on these prompt counts); 'distinct' when p < {ALPHA} and "
    f"the 95% bootstrap CI's upper end is below {DISTINCT_FRACTION} x the shuffled-label median; 'partly_shared' "
    f"otherwise (significantly less similar than one mechanism, but overlapping). Overall: 'shared' when every "
    f"pair is shared, 'distinct' when every pair is distinct, else 'partly_shared'. Shared features: in the circuits "
    f"of >= {SHARED_SHARE:.0%} of the categories. Category-specific features: in the category's circuit, with "
    f"|mean effect| >= {SPECIFIC_RATIO:g} x every other category's, and significant in a permutation test of "
    f"|m_c| - max_other |m_c'| (BH over all tested features, q < {ALPHA})."
)


# --- categories within a set ----------------------------------------------------------------


def compare_categories(
    effects: np.ndarray,
    categories: Sequence[str] | np.ndarray,
    pool_hook: Sequence[str] | np.ndarray,
    pool_feature: Sequence[int] | np.ndarray,
    *,
    size: int,
    n_permutations: int = 1000,
    n_bootstrap: int = 200,
    seed: int = 0,
    correction: str = "holm",
    edges: np.ndarray | None = None,
    min_prompts: int = MIN_PROMPTS,
) -> dict[str, Any]:
    """Pairwise circuit similarity of the categories of one discovery set, with nulls, CIs and verdicts.

    effects [N, P]: per-prompt node effect of each pool feature; categories [N]; pool_hook and
    pool_feature [P] name the pool's features; edges [E, 2]: pool indices (upstream, downstream)
    of the set graph's edges, optional.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: {correction!r} is not one of {sorted(CORRECTIONS)}")
    t0 = time.perf_counter()
    effects_NP = np.asarray(effects, dtype=np.float64)
    cats = np.asarray([str(c) for c in categories])
    hooks = [str(h) for h in pool_hook]
    feats = np.asarray(pool_feature, dtype=np.int64)
    n_pool = effects_NP.shape[1]
    names, counts = np.unique(cats, return_counts=True)
    skipped = {str(c): f"{n} prompts < {min_prompts}" for c, n in zip(names, counts, strict=True) if n < min_prompts}
    kept = [str(c) for c, n in zip(names, counts, strict=True) if n >= min_prompts]
    base: dict[str, Any] = {
        "statistic": "weighted_jaccard",
        "verdict_rule": VERDICT_RULE,
        "n_permutations": n_permutations,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "alpha": ALPHA,
        "correction": correction,
        "skipped_categories": skipped,
        "n_pool": n_pool,
    }
    if len(kept) < 2:
        return {**base, "status": "skipped", "reason": f"{len(kept)} categories with >= {min_prompts} prompts"}
    k = max(1, min(int(size), n_pool // 2))
    rows = np.isin(cats, kept)
    effects_NP, cats = effects_NP[rows], cats[rows]
    codes = np.searchsorted(np.asarray(kept), cats)
    order = np.argsort(codes, kind="stable")  # rows grouped by category: group means are one reduceat
    effects_NP, codes = effects_NP[order], codes[order]
    n, n_cat = len(codes), len(kept)
    sizes = np.bincount(codes, minlength=n_cat)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    edge_idx = None if edges is None else np.asarray(edges, dtype=np.int64).reshape(-1, 2)

    def group_means(rows_XN: np.ndarray) -> np.ndarray:
        """Category means [X, C, P] when row r of the grouped layout holds prompt rows_XN[x, r]."""
        return np.stack([np.add.reduceat(effects_NP[r], starts, axis=0) for r in rows_XN]) / sizes[None, :, None]

    observed_means = group_means(np.arange(n)[None])[0]  # [C, P]
    observed = {name: v[0] for name, v in score_pairs(observed_means[None], k, edge_idx).items()}
    spec_obs = specificity(observed_means[None])[0]

    # Permutations: shuffled labels, same group sizes, scored from the same per-prompt effects.
    rng = np.random.default_rng(seed)
    below = {name: np.zeros((n_cat, n_cat)) for name in observed}
    null_vals: dict[str, list[np.ndarray]] = {name: [] for name in observed}
    spec_exceed = np.zeros((n_cat, n_pool))
    t_perm = time.perf_counter()
    for start in progress(range(0, n_permutations, CHUNK), desc="compare: permutations (chunks)"):
        x = min(CHUNK, n_permutations - start)
        # A random permutation of the prompts over the grouped layout = labels shuffled, group sizes kept.
        means = group_means(np.stack([rng.permutation(n) for _ in range(x)]))
        for name, v in score_pairs(means, k, edge_idx).items():
            below[name] += (v <= observed[name] + 1e-12).sum(0)
            null_vals[name].append(v)
        spec_exceed += (specificity(means) >= spec_obs - 1e-12).sum(0)
    per_perm = (time.perf_counter() - t_perm) / max(n_permutations, 1)
    p_raw = {name: (1 + b) / (1 + n_permutations) for name, b in below.items()}
    null = {name: np.concatenate(v) for name, v in null_vals.items()} if n_permutations else {}

    # Bootstrap: prompts resampled with replacement within each category.
    boot: dict[str, list[np.ndarray]] = {name: [] for name in observed}
    members = [np.flatnonzero(codes == c) for c in range(n_cat)]
    for start in range(0, n_bootstrap, CHUNK):
        x = min(CHUNK, n_bootstrap - start)
        draws = np.concatenate([idx[rng.integers(0, len(idx), size=(x, len(idx)))] for idx in members], axis=1)
        for name, v in score_pairs(group_means(draws), k, edge_idx).items():
            boot[name].append(v)
    boot_all = {name: np.concatenate(v) if v else np.empty((0, n_cat, n_cat)) for name, v in boot.items()}

    pairs = list(itertools.combinations(range(n_cat), 2))
    adjust = CORRECTIONS[correction]
    p_adj = {name: adjust([p_raw[name][a, b] for a, b in pairs]) for name in observed}
    masks = top_k_mask(np.abs(observed_means)[None], k)[0]
    pair_rows, verdicts = [], []
    for i, (a, b) in enumerate(pairs):
        stats = {}
        for name in observed:
            nv = null[name][:, a, b] if n_permutations else np.array([math.nan])
            stats[name] = {
                "value": float(observed[name][a, b]),
                "ci95": ci95(boot_all[name][:, a, b]),
                "null_median": float(np.nanmedian(nv)) if np.isfinite(nv).any() else math.nan,
                "p": float(p_raw[name][a, b]),
                "p_adj": float(p_adj[name][i]),
            }
        wj = stats["weighted_jaccard"]
        if wj["p_adj"] >= ALPHA:
            verdict = "shared"
        elif wj["ci95"][1] < DISTINCT_FRACTION * wj["null_median"]:
            verdict = "distinct"
        else:
            verdict = "partly_shared"
        verdicts.append(verdict)
        both = np.flatnonzero(masks[a] & masks[b])
        only_a, only_b = np.flatnonzero(masks[a] & ~masks[b]), np.flatnonzero(masks[b] & ~masks[a])
        pair_rows.append(
            {
                "a": kept[a],
                "b": kept[b],
                **stats,
                "verdict": verdict,
                "shared_features": [feature_row(hooks[j], feats[j], observed_means[a, j]) for j in both],
                "only_a": [feature_row(hooks[j], feats[j], observed_means[a, j]) for j in only_a],
                "only_b": [feature_row(hooks[j], feats[j], observed_means[b, j]) for j in only_b],
            }
        )
    overall = (
        "shared"
        if all(v == "shared" for v in verdicts)
        else "distinct"
        if all(v == "distinct" for v in verdicts)
        else "partly_shared"
    )

    # Shared features: in most categories' circuits. Specific: a permutation test per (category, feature).
    share = masks.mean(0)
    shared = [
        {**feature_row(hooks[j], feats[j], observed_means[:, j].mean()), "share_of_categories": float(share[j])}
        for j in np.flatnonzero(share >= SHARED_SHARE)
    ]
    tested = np.argwhere(masks)
    spec_p = (1 + spec_exceed[tested[:, 0], tested[:, 1]]) / (1 + n_permutations)
    spec_q = benjamini_hochberg(spec_p)
    specific: dict[str, list[dict[str, Any]]] = {c: [] for c in kept}
    for (c, j), p, q in zip(tested, spec_p, spec_q, strict=True):
        if q < ALPHA and spec_obs[c, j] >= (1 - 1 / SPECIFIC_RATIO) * abs(observed_means[c, j]):
            specific[kept[c]].append({**feature_row(hooks[j], feats[j], observed_means[c, j]), "p": p, "q": float(q)})
    for c in specific:
        specific[c].sort(key=lambda f: -abs(f["effect"]))

    def matrix(name: str, field: str) -> list[list[float | None]]:
        out: list[list[float | None]] = [[1.0 if a == b else None for b in range(n_cat)] for a in range(n_cat)]
        for row in pair_rows:
            a, b = kept.index(row["a"]), kept.index(row["b"])
            out[a][b] = out[b][a] = row[name][field]
        return out

    return {
        **base,
        "status": "ok",
        "size": k,
        "size_rule": f"top-{k} pool features by |mean effect| per category (requested {size}, at most half the pool)",
        "categories": {
            c: {
                "n_prompts": int(sizes[i]),
                "circuit": [
                    feature_row(hooks[j], feats[j], observed_means[i, j])
                    for j in sorted(np.flatnonzero(masks[i]), key=lambda j: -abs(observed_means[i, j]))
                ],
            }
            for i, c in enumerate(kept)
        },
        "pairs": pair_rows,
        "matrix": {
            "categories": kept,
            **{f"{name}": matrix(name, "value") for name in observed},
            "p_adj": matrix("weighted_jaccard", "p_adj"),
        },
        "verdict": overall,
        "verdict_counts": {v: verdicts.count(v) for v in ("shared", "partly_shared", "distinct")},
        "shared_features": shared,
        "category_specific": specific,
        "seconds_per_permutation": per_perm,
        "seconds": time.perf_counter() - t0,
    }


# --- discovery sets (toxic / safe / over_refusal) ------------------------------------------------


def compare_sets(
    sets: Mapping[str, tuple[Sequence[str], Sequence[int], np.ndarray]],
    size: int,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Circuit similarity between discovery sets, e.g. is over-refusal the toxic circuit misfiring?

    sets: name -> (pool_hook [P], pool_feature [P], effect): effect [P] mean node effects, or
    [N, P] per-prompt effects, which add bootstrap CIs. There is no permutation null here: the
    sets differ in their contrast (harmless prompts vs answered safe prompts) and hence in the
    baseline their effects are measured against, so their prompts are not exchangeable. The
    verdict is descriptive, from the weighted Jaccard's CI: 'shared' when its lower end is
    >= SET_SHARED, 'distinct' when its upper end is < SET_DISTINCT, else 'partly_shared'.
    """
    rng = np.random.default_rng(seed)
    names = list(sets)
    keys = sorted(
        {(h, int(f)) for hooks, feats, _ in sets.values() for h, f in zip(_hooks(hooks, feats), feats, strict=True)}
    )
    index = {key: i for i, key in enumerate(keys)}
    k = max(1, int(size))
    aligned: dict[str, np.ndarray] = {}
    for name, (hooks, feats, effect) in sets.items():
        e = np.asarray(effect, dtype=np.float64)
        e = e[None] if e.ndim == 1 else e
        cols = [index[(str(h), int(f))] for h, f in zip(hooks, feats, strict=True)]
        full = np.zeros((e.shape[0], len(keys)))
        full[:, cols] = e  # features outside a set's pool: effect unknown, treated as 0 (not in its circuit)
        aligned[name] = full

    def score(means: dict[str, np.ndarray], a: str, b: str) -> dict[str, float]:
        stacked = np.stack([means[a], means[b]])[None]
        s = score_pairs(stacked, min(k, len(keys)), None)
        return {name: float(v[0, 0, 1]) for name, v in s.items()}

    means = {name: e.mean(0) for name, e in aligned.items()}
    rows = []
    for a, b in itertools.combinations(names, 2):
        obs = score(means, a, b)
        boots: dict[str, list[float]] = {name: [] for name in obs}
        if aligned[a].shape[0] > 1 and aligned[b].shape[0] > 1:
            for _ in range(n_bootstrap):
                draw = {
                    s: aligned[s][rng.integers(0, aligned[s].shape[0], aligned[s].shape[0])].mean(0) for s in (a, b)
                }
                for name, v in score(draw, a, b).items():
                    boots[name].append(v)
        stats = {name: {"value": obs[name], "ci95": ci95(np.asarray(boots[name]))} for name in obs}
        lo, hi = stats["weighted_jaccard"]["ci95"]
        if math.isnan(lo):
            lo = hi = obs["weighted_jaccard"]
        verdict = "shared" if lo >= SET_SHARED else "distinct" if hi < SET_DISTINCT else "partly_shared"
        ma = set(np.argsort(-np.abs(means[a]))[: min(k, len(keys))].tolist())
        mb = set(np.argsort(-np.abs(means[b]))[: min(k, len(keys))].tolist())
        rows.append(
            {
                "a": a,
                "b": b,
                **stats,
                "verdict": verdict,
                "shared_features": [feature_row(keys[j][0], keys[j][1], means[a][j]) for j in sorted(ma & mb)],
                "only_a": [feature_row(keys[j][0], keys[j][1], means[a][j]) for j in sorted(ma - mb)],
                "only_b": [feature_row(keys[j][0], keys[j][1], means[b][j]) for j in sorted(mb - ma)],
            }
        )
    return {
        "sets": names,
        "size": k,
        "statistic": "weighted_jaccard",
        "verdict_rule": (
            f"descriptive (no exchangeable null across sets): 'shared' when the 95% bootstrap CI of the weighted "
            f"Jaccard starts at >= {SET_SHARED}, 'distinct' when it ends below {SET_DISTINCT}, else 'partly_shared'"
        ),
        "pairs": rows,
    }


def _hooks(hooks: Sequence[str], feats: Sequence[int]) -> list[str]:
    """Hooks as a list of str as long as feats (validates the pool's two columns agree)."""
    hooks = [str(h) for h in hooks]
    if len(hooks) != len(feats):
        raise ValueError(f"pool_hook has {len(hooks)} entries but pool_feature has {len(feats)}")
    return hooks


# --- the circuits stage's comparison entry -------------------------------------------------------

EFFECTS = "effects.npz"


def compare_committed_sets(
    set_dirs: Mapping[str, Path],
    entries: Mapping[str, Mapping[str, Any]],
    *,
    seed: int,
    n_permutations: int = 1000,
    n_bootstrap: int = 200,
) -> dict[str, Any]:
    """summary.json["circuits"]["comparison"] from the committed sets' effects.npz (no model).

    set_dirs: pooled set name (toxic, safe, over_refusal) -> its folder; entries: the stage's
    summary entries (for the circuit sizes). Each set's categories are compared at k = the
    smallest committed per-category circuit (else the set's own circuit size); the sets are
    compared with each other at the smallest set circuit.
    """
    by_set: dict[str, Any] = {}
    for_sets: dict[str, tuple[Sequence[str], Sequence[int], np.ndarray]] = {}
    sizes = []
    for name, folder in set_dirs.items():
        entry = entries.get(name) or {}
        path = Path(folder) / EFFECTS
        if entry.get("status") != "ok" or not path.exists():
            by_set[name] = {"status": "skipped", "reason": f"no committed {EFFECTS} for {name}"}
            continue
        with np.load(path) as data:
            effects, pool_hook, pool_feature, cats = (
                data["effects"], data["pool_hook"], data["pool_feature"], data["categories"]
            )  # fmt: skip
        per_cat = [e.get("n_nodes") for e in (entry.get("by_category") or {}).values() if e.get("status") == "ok"]
        size = min([n for n in per_cat if n] or [int(entry.get("n_nodes") or 0) or 20])
        by_set[name] = compare_categories(
            effects, cats, pool_hook, pool_feature, size=size, n_permutations=n_permutations,
            n_bootstrap=n_bootstrap, seed=seed,
        )  # fmt: skip
        for_sets[name] = (pool_hook.tolist(), pool_feature.tolist(), effects)
        sizes.append(int(entry.get("n_nodes") or size))
        result = by_set[name]
        if result.get("status") == "ok":
            ms = 1e3 * result["seconds_per_permutation"]
            verdict = result["verdict"]
            log.info("circuits compare: %s: %s (%d permutations, %.3f ms each)", name, verdict, n_permutations, ms)
        else:
            log.info("circuits compare: %s: skipped (%s)", name, result.get("reason"))
    out: dict[str, Any] = {"categories": by_set}
    if len(for_sets) >= 2:
        out["sets"] = compare_sets(for_sets, min(sizes), n_bootstrap=n_bootstrap, seed=seed)
    return out
