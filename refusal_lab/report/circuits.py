"""Report sections for the circuits stage: per discovery set the layered graph, faithfulness and
completeness curves, ablation against random sets, the category comparison heatmaps and the
feature cards. Reads summary.json["circuits"] and the set folders' graph.json / validation.json
/ feature_cards.json; computes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_lab.report import plots
from refusal_lab.report.html import Raw, esc, figure, fmt, note, pct, table
from refusal_lab.report.sections import read_json, resolve

SETS = ("toxic", "safe", "over_refusal", "toxic_refused")
GRAPH, VALIDATION, CARDS = "graph.json", "validation.json", "feature_cards.json"
MAX_GRAPH_NODES = 40
"""The graph plot shows the strongest nodes only (by |effect|); the JSON holds all of them."""


def _set_dir(entry: dict[str, Any], circuits: dict[str, Any], name: str, run_dir: Path) -> Path | None:
    for key in ("path", "dir", "folder"):
        if entry.get(key):
            return resolve(entry[key], run_dir)
    root = resolve(circuits.get("path"), run_dir)
    return None if root is None else root / name


def _node_key(node: Any) -> tuple[str, int] | None:
    """(hook, feature) of a node given as a dict, a [hook, feature] pair or a 'hook:feature' string."""
    if isinstance(node, dict):
        hook = node.get("hook")
        error = node.get("error") or node.get("kind") == "error"
        feature = -1 if error else node.get("feature")
        return None if hook is None or feature is None else (str(hook), int(feature))
    if isinstance(node, list | tuple) and len(node) == 2:
        return str(node[0]), int(node[1])
    if isinstance(node, str) and ":" in node:
        hook, feature = node.rsplit(":", 1)
        return hook, -1 if feature in ("error", "err", "-1") else int(feature)
    return None


def graph_plot(graph: dict[str, Any], title: str) -> str | None:
    """The layered drawing of a graph.json (nodes with hook/feature/effect, edges source/target/weight)."""
    raw_nodes = graph.get("nodes") or []
    keyed: dict[tuple[str, int], dict[str, Any]] = {}
    ids: dict[Any, tuple[str, int]] = {}
    for node in raw_nodes:
        key = _node_key(node)
        if key is None:
            continue
        effect = float(node.get("effect", 0.0)) if isinstance(node, dict) else 0.0
        keyed[key] = {
            "hook": key[0],
            "label": "err" if key[1] < 0 else f"f{key[1]}",
            "effect": effect,
            "error": key[1] < 0,
        }
        if isinstance(node, dict) and "id" in node:
            ids[node["id"]] = key
    if not keyed:
        return None
    strongest = sorted(keyed, key=lambda k: -abs(keyed[k]["effect"]))[:MAX_GRAPH_NODES]
    index = {k: i for i, k in enumerate(strongest)}
    edges = []
    for edge in graph.get("edges") or []:
        if isinstance(edge, dict):
            src, dst = (
                edge.get("source", edge.get("src", edge.get("from"))),
                edge.get("target", edge.get("dst", edge.get("to"))),
            )
            weight = edge.get("weight", edge.get("effect", 1.0))
        elif isinstance(edge, list | tuple) and len(edge) >= 2:
            src, dst, weight = edge[0], edge[1], edge[2] if len(edge) > 2 else 1.0
        else:
            continue
        a, b = _lookup(src, ids), _lookup(dst, ids)
        if a in index and b in index:
            edges.append((index[a], index[b], float(weight)))
    hooks = graph.get("hooks") or sorted({k[0] for k in strongest}, key=_hook_sort)
    return plots.layered_graph(list(hooks), [keyed[k] for k in strongest], edges, title)


def _lookup(ref: Any, ids: dict[Any, tuple[str, int]]) -> tuple[str, int] | None:
    if isinstance(ref, str | int) and ref in ids:
        return ids[ref]
    return _node_key(ref)


def _hook_sort(hook: str) -> tuple[int, str]:
    digits = "".join(ch for ch in hook.rsplit("_", 1)[-1] if ch.isdigit())
    return (int(digits) if digits else 0, hook)


def _curve(curve: Any) -> tuple[list[float], list[float]] | None:
    """size -> value as a dict, or a list of [size, value] / {size, value}."""
    if isinstance(curve, dict) and curve:
        items = sorted((float(k), v) for k, v in curve.items() if v is not None)
    elif isinstance(curve, list) and curve:
        items = sorted((float(c["size"]), c["value"]) if isinstance(c, dict) else (float(c[0]), c[1]) for c in curve)
    else:
        return None
    return [x for x, _ in items], [float(y) for _, y in items]


def _random_values(validation: Any) -> list[float] | None:
    """The random sets' refusal-rate drops when validation.json keeps them."""
    if not isinstance(validation, dict):
        return None
    nested = validation.get("ablation")
    ablation: dict[str, Any] = nested if isinstance(nested, dict) else validation
    for key in ("random_refusal_rate_drops", "random_drops", "random"):
        values = ablation.get(key)
        if isinstance(values, list) and values and all(isinstance(v, int | float) for v in values):
            return [float(v) for v in values]
    return None


def entry_table(entry: dict[str, Any]) -> str:
    ablation = entry.get("ablation") or {}
    rows = [
        ["method", entry.get("method")],
        [
            "prompts (discovery / validation)",
            f"{fmt(entry.get('n_prompts_discovery'))} / {fmt(entry.get('n_prompts_validation'))}",
        ],
        [
            "nodes (SAE features) / error nodes / edges",
            f"{fmt(entry.get('n_nodes'))} / {fmt(entry.get('n_error_nodes'))} / {fmt(entry.get('n_edges'))}",
        ],
        ["size rule / target / met (faithfulness on discovery prompts)", _size_text(entry.get("size"))],
        ["faithfulness (everything outside the circuit ablated, error nodes kept)", entry.get("faithfulness")],
        ["completeness (the circuit ablated)", entry.get("completeness")],
        ["refusal-rate drop, circuit ablated (held-out targets)", ablation.get("refusal_rate_drop")],
        ["refusal-rate drop, median of random same-size sets", ablation.get("random_refusal_rate_drop_median")],
        [
            "circuit's percentile among random sets / p-value / n random",
            f"{fmt(ablation.get('percentile'))} / {fmt(ablation.get('p_value'))} / {fmt(ablation.get('n_random'))}",
        ],
        ["KL on harmless prompts (circuit ablated)", ablation.get("kl_harmless")],
    ]
    if ablation.get("refusal_rate_before") is not None:
        rows.insert(
            5,
            [
                "refusal rate before / after ablation (held-out targets)",
                f"{fmt(ablation.get('refusal_rate_before'))} / {fmt(ablation.get('refusal_rate_after'))}",
            ],
        )
    if ablation.get("refusal_rate_drop_steered") is not None:
        rows.append(
            [
                f"refusal-rate drop, circuit steered (alpha {fmt(ablation.get('steer_alpha'))}) / KL harmless",
                f"{fmt(ablation.get('refusal_rate_drop_steered'))} / {fmt(ablation.get('kl_harmless_steered'))}",
            ]
        )
    direction = ablation.get("direction") or {}
    if direction.get("refusal_rate_drop") is not None:
        rows.append(
            [
                "baseline: difference-in-means direction projected out, refusal-rate drop / KL harmless",
                f"{fmt(direction.get('refusal_rate_drop'))} / {fmt(direction.get('kl_harmless'))}",
            ]
        )
    out = table(["", "value"], [[Raw(esc(k)), v if not isinstance(v, str) else Raw(esc(v))] for k, v in rows])
    by_label = ablation.get("refusal_rate_drop_by_label") or {}
    if by_label:
        out += table(["label", "refusal-rate drop (circuit ablated)"], list(by_label.items()))
    examples = ablation.get("examples") or []
    if examples:
        keys = [k for k in ("label", "unedited", "ablated", "steered") if any(k in e for e in examples)]
        out += "<details><summary>Example generations (unedited, circuit ablated, steered)</summary>"
        out += table(keys, [[e.get(k, "") for k in keys] for e in examples], text_cols=len(keys)) + "</details>"
    return out


def _size_text(size: Any) -> str:
    if not isinstance(size, dict):
        return "n/a"
    if size.get("target") is None:
        return f"fixed count ({fmt(size.get('n_nodes'))} features)"
    met = "met" if size.get("met") else "not met"
    return (
        f"faithfulness target {fmt(size.get('target'))}: {met} at {fmt(size.get('n_nodes'))} features "
        f"({fmt(size.get('faithfulness_discovery'))})"
    )


LABELS = ("toxic", "refused_safe", "answered_safe", "harmless")


def specificity_table(circuits: dict[str, Any]) -> str:
    """One row per circuit: its size, target, met, held-out faithfulness, and refusal-rate drops by label."""
    spec = circuits.get("specificity") or {}
    if not spec:
        return ""
    rows = []
    for name, row in spec.items():
        entry = circuits.get(name) or {}
        size = entry.get("size") or {}
        drops = row.get("drop_by_label") or {}
        met = size.get("met")
        rows.append(
            [name, row.get("n_nodes"), size.get("target"), "n/a" if met is None else ("yes" if met else "no")]
            + [entry.get("faithfulness"), entry.get("completeness")]
            + [drops.get(label) for label in LABELS]
            + [row.get("random_target_drop_median"), row.get("kl_harmless")]
        )
    head = ["circuit", "features", "target", "met", "faithfulness", "completeness"]
    head += [f"drop {label}" for label in LABELS] + ["random drop (targets)", "KL harmless"]
    return (
        "<h3>Size and specificity</h3>"
        + note(
            "Refusal-rate drop by label on held-out prompts when each circuit is ablated (refused_safe / "
            "answered_safe: safe prompts the unedited model refused / answered). A selective over-refusal "
            "circuit drops refused_safe and leaves toxic."
        )
        + table(head, rows, table_id="circuits-specificity")
    )


def discovery_set(name: str, entry: dict[str, Any], circuits: dict[str, Any], run_dir: Path) -> str:
    if entry.get("status") != "ok":
        return f"<h3>{esc(name)}</h3>" + note(
            f"{name}: {entry.get('status', 'not run')} ({entry.get('reason', 'no reason given')})."
        )
    folder = _set_dir(entry, circuits, name, run_dir)
    out = f"<h3>{esc(name)}</h3>" + entry_table(entry)
    graph = read_json(folder / GRAPH) if folder else None
    svg = graph_plot(graph, f"{name} circuit") if isinstance(graph, dict) else None
    out += (
        figure(
            f"graph-{name}",
            svg,
            f"{name}: nodes by hook point (columns, layer order), strongest {MAX_GRAPH_NODES} by "
            "|effect|; red raises the refusal metric, blue lowers it; squares are error nodes; edge width ~ |effect|.",
        )
        if svg
        else note(f"{name}: no graph.json in {folder}.")
    )
    series = {}
    for key, label in (("faithfulness_curve", "faithfulness"), ("completeness_curve", "completeness")):
        c = _curve(entry.get(key))
        if c:
            series[label] = c
    if series:
        out += figure(
            f"faithfulness-{name}",
            plots.curves(
                series, "circuit size (features)", "share of the full model's metric", f"{name}: faithfulness"
            ),
            "Faithfulness (m(C) - m(∅)) / (m(M) - m(∅)) with everything outside the top-n features ablated to the "
            "contrast mean (error nodes kept); completeness with those features ablated.",
        )
    else:
        out += note(f"{name}: no faithfulness curve in summary.json.")
    ablation = entry.get("ablation") or {}
    if ablation.get("refusal_rate_drop") is not None:
        validation = read_json(folder / VALIDATION) if folder else None
        out += figure(
            f"ablation-{name}",
            plots.versus_random(
                float(ablation["refusal_rate_drop"]),
                _random_values(validation),
                ablation.get("random_refusal_rate_drop_median"),
                "refusal-rate drop",
                f"{name}: ablation vs random sets",
            ),
            f"Refusal-rate drop on held-out {name} prompts with the circuit ablated, against random feature sets "
            f"of the same size and per-hook counts (percentile {fmt(ablation.get('percentile'))}, "
            f"p = {fmt(ablation.get('p_value'))}).",
        )
    tokens = entry.get("top_prompt_tokens") or {}
    if tokens:
        out += "<details><summary>Prompt tokens that drive the metric, per hook point</summary>"
        for hook, items in tokens.items():
            out += (
                f"<b>{esc(hook)}</b> "
                + ", ".join(f"<code>{esc(t.get('token'))}</code> {pct(t.get('effect_share'))}" for t in items[:20])
                + "<br>"
            )
        out += "</details>"
    by_cat = entry.get("by_category") or {}
    if by_cat:
        out += (
            "<details><summary>Per-category circuits</summary>"
            + table(
                ["category", "status", "prompts", "nodes", "faithfulness", "completeness", "percentile", "p"],
                [
                    [
                        c,
                        e.get("status"),
                        e.get("n_prompts_discovery"),
                        e.get("n_nodes"),
                        e.get("faithfulness"),
                        e.get("completeness"),
                        (e.get("ablation") or {}).get("percentile"),
                        (e.get("ablation") or {}).get("p_value"),
                    ]
                    for c, e in sorted(by_cat.items())
                ],
                text_cols=2,
            )
            + "</details>"
        )
    return out


def circuits_section(summary: dict[str, Any], run_dir: Path) -> str:
    circuits = summary.get("circuits")
    if not circuits:
        return note("Circuits: the circuits stage did not run (no 'circuits' in summary.json).")
    names = [s for s in SETS if s in circuits] + [
        s for s in circuits if s not in SETS and isinstance(circuits[s], dict) and "status" in circuits[s]
    ]
    if not names:
        return note("Circuits: summary.json['circuits'] holds no discovery set.")
    return specificity_table(circuits) + "".join(discovery_set(n, circuits[n], circuits, run_dir) for n in names)


# --- feature cards -------------------------------------------------------------------------------


def _context_html(ctx: dict[str, Any]) -> str:
    tokens = ctx.get("tokens") or []
    at = ctx.get("highlight", -1)
    text = "".join(f"<mark>{esc(t)}</mark>" if i == at else esc(t) for i, t in enumerate(tokens))
    where = f"{esc(ctx.get('category', ''))}/{esc(ctx.get('label', ''))}, activation {fmt(ctx.get('activation'))}"
    return f'<div class="ctx">{text}</div><span class="muted">{where}</span>'


def cards_section(summary: dict[str, Any], run_dir: Path) -> str:
    circuits = summary.get("circuits")
    if not circuits:
        return note("Feature cards: the circuits stage did not run.")
    out = ""
    for name in [s for s in SETS if s in circuits]:
        entry = circuits[name]
        if entry.get("status") != "ok" or not entry.get("top_features"):
            continue
        folder = _set_dir(entry, circuits, name, run_dir)
        extra = read_json(folder / CARDS) if folder else None
        by_key = {(c["hook"], int(c["feature"])): c for c in (extra or {}).get("cards", [])}
        cards = []
        for f in entry["top_features"]:
            card = by_key.get((f["hook"], int(f["feature"])), {})
            tokens = ", ".join(
                f"<code>{esc(t['token'])}</code> ({esc(t.get('phase', ''))}, {fmt(t.get('activation'))})"
                for t in f.get("top_tokens", [])
            )
            body = f"<h4>{esc(f['hook'])} / feature {f['feature']} — effect {fmt(f['effect'])}</h4>"
            body += f"<div>top tokens: {tokens or '—'}</div>"
            for ctx in card.get("contexts", [])[:4]:
                body += _context_html(ctx)
            fires = card.get("fires_on") or {}
            for key in ("label", "category"):
                shares = fires.get(key) or {}
                if shares:
                    body += (
                        f"<div>fires on ({key}): "
                        + ", ".join(f"{esc(k)} {pct(v)}" for k, v in shares.items())
                        + "</div>"
                    )
            cards.append(f'<div class="card">{body}</div>')
        out += f"<h3>{esc(name)}: top features</h3>"
        if not by_key:
            out += note(f"{name}: no {CARDS} (contexts and firing shares); showing the summary's top tokens only.")
        out += '<div class="cards">' + "".join(cards) + "</div>"
    return out or note("Feature cards: no discovery set has top features.")
