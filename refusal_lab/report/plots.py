"""The report's plots: matplotlib figures serialised to inline SVG (text kept as text, no fonts embedded).

Each function takes numbers already in summary.json or an artifact it references and returns
an `<svg>` element; nothing here computes a statistic.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "refusal_lab", "font.size": 9})

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def to_svg(fig: Any) -> str:
    """The figure as an inline <svg> element (XML prolog and DOCTYPE dropped)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    # The RDF metadata block only names the creator; dropping it keeps rebuilt pages byte-identical.
    return re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg") :], flags=re.S)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float | None]], ylabel: str, title: str) -> str:
    """Bars per group, one colour per series (e.g. refusal rate per label, one bar per judge)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(groups) * max(1, len(series)) ** 0.5 + 1.5), 3.0))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        v = [np.nan if y is None else float(y) for y in values]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, label=name, color=PALETTE[i % len(PALETTE)])
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return to_svg(fig)


def lines_over_layers(hooks: Sequence[str], values: Sequence[float | None], ylabel: str, title: str) -> str:
    """One metric across hook points (in layer-spec order)."""
    fig, ax = plt.subplots(figsize=(3.4, 2.5))
    v = [np.nan if y is None else float(y) for y in values]
    ax.plot(range(len(hooks)), v, marker="o", color=PALETTE[0])
    ax.set_xticks(range(len(hooks)), [h.replace("residuals_", "res ") for h in hooks], rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return to_svg(fig)


def density_histogram(edges: Sequence[float], counts: Sequence[int], n_dead: int, title: str) -> str:
    """Counts of live latents per log10(density) bin, as the SAE stage saved them."""
    fig, ax = plt.subplots(figsize=(3.4, 2.5))
    e = np.asarray(edges, dtype=float)
    ax.bar(e[:-1], counts, width=np.diff(e), align="edge", color=PALETTE[0])
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({n_dead} dead)")
    ax.spines[["top", "right"]].set_visible(False)
    return to_svg(fig)


def curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, title: str) -> str:
    """Several (x, y) curves on one axis (faithfulness / completeness over circuit size)."""
    fig, ax = plt.subplots(figsize=(3.8, 2.7))
    for i, (name, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, marker="o", ms=3, label=name, color=PALETTE[i % len(PALETTE)])
    ax.axhline(1.0, color="#999", lw=0.8, ls="--")
    ax.axhline(0.0, color="#999", lw=0.8, ls=":")
    if series and all(min(x) > 0 for x, _ in series.values() if len(x)):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return to_svg(fig)


def versus_random(circuit: float, random: Sequence[float] | None, median: float | None, xlabel: str, title: str) -> str:
    """The circuit's value against the random same-size sets (their values when saved, else their median)."""
    fig, ax = plt.subplots(figsize=(3.8, 2.7))
    if random:
        ax.hist(random, bins=min(20, max(5, len(random) // 2)), color="#bbb", label=f"{len(random)} random sets")
    if median is not None and not (isinstance(median, float) and math.isnan(median)):
        ax.axvline(median, color="#555", ls="--", label="random median")
    ax.axvline(circuit, color=PALETTE[3], lw=2, label="circuit")
    ax.set_xlabel(xlabel)
    ax.set_yticks([] if not random else ax.get_yticks())
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return to_svg(fig)


def heatmap(
    labels: Sequence[str], matrix: Sequence[Sequence[float | None]], marks: Sequence[Sequence[str]], title: str
) -> str:
    """Similarity matrix with a mark per cell (significance), values printed in the cells."""
    m = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix])
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 0.9 + 0.5 * n))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            if i != j and np.isfinite(m[i, j]):
                color = "white" if m[i, j] < 0.6 else "black"
                ax.text(j, i, f"{m[i, j]:.2f}{marks[i][j]}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    return to_svg(fig)


def layered_graph(
    hooks: Sequence[str],
    nodes: Sequence[Mapping[str, Any]],
    edges: Sequence[tuple[int, int, float]],
    title: str,
) -> str:
    """Nodes in one column per hook point (layer order), ranked by |effect|; edge width and opacity by |weight|.

    nodes: {hook, label, effect, error}; edges: (node index, node index, weight).
    Red raises the refusal metric, blue lowers it; squares are error nodes.
    """
    column = {h: i for i, h in enumerate(hooks)}
    rows: dict[str, int] = {}
    pos = []
    for node in sorted(range(len(nodes)), key=lambda i: -abs(float(nodes[i]["effect"]))):
        h = nodes[node]["hook"]
        rows[h] = rows.get(h, 0) + 1
        pos.append((node, column.get(h, 0), rows[h]))
    xy = {node: (c, -r) for node, c, r in pos}
    height = max(rows.values(), default=1)
    fig, ax = plt.subplots(figsize=(1.2 + 2.0 * max(1, len(hooks)), 1.0 + 0.32 * height))
    wmax = max((abs(w) for _, _, w in edges), default=1.0) or 1.0
    for a, b, w in edges:
        if a in xy and b in xy:
            (x0, y0), (x1, y1) = xy[a], xy[b]
            ax.plot(
                [x0, x1],
                [y0, y1],
                color=PALETTE[3] if w > 0 else PALETTE[0],
                lw=0.3 + 2.5 * abs(w) / wmax,
                alpha=0.2 + 0.6 * abs(w) / wmax,
                zorder=1,
            )
    emax = max((abs(float(n["effect"])) for n in nodes), default=1.0) or 1.0
    for node, (x, y) in xy.items():
        n = nodes[node]
        e = float(n["effect"])
        ax.scatter(
            [x],
            [y],
            s=30 + 170 * abs(e) / emax,
            marker="s" if n.get("error") else "o",
            color=PALETTE[3] if e > 0 else PALETTE[0],
            edgecolor="black",
            linewidth=0.4,
            zorder=2,
        )
        ax.text(x + 0.08, y, str(n["label"]), fontsize=6.5, va="center", zorder=3)
    ax.set_xticks(range(len(hooks)), hooks)
    ax.set_yticks([])
    ax.set_xlim(-0.4, len(hooks) - 0.3)
    ax.set_ylim(-height - 0.7, -0.3)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title)
    return to_svg(fig)
