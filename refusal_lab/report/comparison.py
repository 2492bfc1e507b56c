"""Report section for the category comparison (summary.json["circuits"]["comparison"], written by
refusal_lab.circuits.compare): similarity heatmaps with significant cells starred, every pair's
statistics, verdicts, shared and category-specific features, and the comparison between sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_lab.report import plots
from refusal_lab.report.html import Raw, esc, figure, fmt, note, table, verdict


def _marks(matrix: dict[str, Any], alpha: float) -> list[list[str]]:
    p = matrix.get("p_adj") or []
    return [
        ["*" if (v is not None and i != j and v < alpha) else "" for j, v in enumerate(row)] for i, row in enumerate(p)
    ]


def comparison_section(summary: dict[str, Any], run_dir: Path) -> str:
    comparison = (summary.get("circuits") or {}).get("comparison")
    if not comparison:
        return note("Category comparison: not computed (the circuits stage did not run or wrote no comparison).")
    out = ""
    by_set = comparison.get("categories") or {}
    for name, comp in by_set.items():
        out += f"<h3>{esc(name)}: categories compared</h3>"
        if comp.get("status") != "ok":
            out += note(f"{name}: {comp.get('status')} ({comp.get('reason', '')}).")
            continue
        m = comp["matrix"]
        alpha = comp.get("alpha", 0.05)
        out += (
            f"<p>Overall: {verdict(comp['verdict'])} — {esc(comp['size_rule'])}; {fmt(comp['n_permutations'])} "
            f"label permutations ({fmt(comp.get('seconds_per_permutation', 0) * 1000)} ms each), "
            f"{fmt(comp['n_bootstrap'])} bootstrap draws, {esc(comp['correction'])} correction, "
            f"seed {fmt(comp['seed'])}.</p>"
        )
        for key, title in (
            ("weighted_jaccard", "weighted Jaccard of |effect|"),
            ("node_jaccard", "node Jaccard (top-k)"),
        ):
            if key in m:
                out += figure(
                    f"heatmap-{name}-{key}",
                    plots.heatmap(m["categories"], m[key], _marks(m, alpha), f"{name}: {title}"),
                    f"{title}; * = less similar than shuffled category labels give "
                    f"({comp['correction']}-corrected p < {alpha}, on the weighted Jaccard).",
                )
        out += f"<p class='muted'>Verdict rule: {esc(comp['verdict_rule'])}</p>"
        out += (
            "<details><summary>Every pair</summary>"
            + table(
                ["a", "b", "weighted J", "95% CI", "shuffled median", "p (corr.)", "node J", "p (corr.)", "verdict"],
                [
                    [
                        p["a"],
                        p["b"],
                        p["weighted_jaccard"]["value"],
                        Raw(f"{fmt(p['weighted_jaccard']['ci95'][0])}–{fmt(p['weighted_jaccard']['ci95'][1])}"),
                        p["weighted_jaccard"]["null_median"],
                        p["weighted_jaccard"]["p_adj"],
                        p["node_jaccard"]["value"],
                        p["node_jaccard"]["p_adj"],
                        Raw(verdict(p["verdict"])),
                    ]
                    for p in comp["pairs"]
                ],
                text_cols=2,
            )
            + "</details>"
        )
        shared = comp.get("shared_features") or []
        out += (
            "<p><b>Shared features</b> (in most categories' circuits): "
            + (", ".join(f"{esc(f['hook'])}/{f['feature']} ({fmt(f['effect'])})" for f in shared) or "none")
            + "</p>"
        )
        specific = {c: v for c, v in (comp.get("category_specific") or {}).items() if v}
        out += (
            "<p><b>Category-specific features</b>: "
            + (
                "; ".join(
                    f"{esc(c)}: " + ", ".join(f"{esc(f['hook'])}/{f['feature']} ({fmt(f['effect'])})" for f in v[:8])
                    for c, v in specific.items()
                )
                or "none"
            )
            + "</p>"
        )
    sets = comparison.get("sets")
    if sets and sets.get("pairs"):
        out += (
            "<h3>Discovery sets compared (is over-refusal the toxic circuit misfiring?)</h3>"
            + table(
                ["a", "b", "weighted J", "95% CI", "node J", "shared features", "verdict"],
                [
                    [
                        p["a"],
                        p["b"],
                        p["weighted_jaccard"]["value"],
                        Raw(f"{fmt(p['weighted_jaccard']['ci95'][0])}–{fmt(p['weighted_jaccard']['ci95'][1])}"),
                        p["node_jaccard"]["value"],
                        len(p["shared_features"]),
                        Raw(verdict(p["verdict"])),
                    ]
                    for p in sets["pairs"]
                ],
                text_cols=2,
            )
            + f"<p class='muted'>{esc(sets['verdict_rule'])} (circuits of {fmt(sets['size'])} features).</p>"
        )
    return out or note("Category comparison: empty.")
