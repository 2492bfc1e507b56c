"""The report's sections, each from summary.json and the artifacts it references (read, never recomputed).

Every function takes the summary (and the run folder, for relative paths) and returns the
section body as HTML; a section whose stage did not run, or whose artifact is gone, becomes
a short note.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from refusal_lab.report import plots
from refusal_lab.report.html import Raw, esc, figure, fmt, note, pct, table

log = logging.getLogger(__name__)

SAE_PLOTS = (
    ("fvu", "FVU", "fraction of variance unexplained on held-out tokens (lower is better)"),
    ("l0", "L0", "mean active latents per token"),
    ("dead_frac", "dead fraction", "share of latents active on no held-out token"),
    ("ce_recovered", "CE recovered", "share of the zero-ablation CE loss increase the SAE recovers (1 = perfect)"),
)


def read_json(path: Path | None) -> Any:
    """The JSON at `path`, or None when there is no such file (a missing artifact is a note, not an error)."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("report: cannot read %s (%s)", path, err)
        return None


def resolve(path: Any, run_dir: Path) -> Path | None:
    if not path:
        return None
    p = Path(str(path))
    return p if p.is_absolute() else run_dir / p


# --- run and prompts ---------------------------------------------------------------------------


def overview(summary: dict[str, Any], run_dir: Path) -> str:
    rows = [
        ("run folder", str(run_dir)),
        ("run fingerprint", summary.get("run_fingerprint")),
        ("stages", ", ".join(summary.get("stages", []))),
    ]
    collect = summary.get("collect") or {}
    if collect:
        rows += [("activation store", collect.get("store")), ("hook points", ", ".join(collect.get("hook_points", [])))]
    out = table(["", "value"], rows, text_cols=2)
    counts = (summary.get("data") or {}).get("counts_after")
    if counts:
        labels = sorted({lab for row in counts.values() for lab in row})
        out += "<h3>Prompts by category and label (after filtering and balancing)</h3>"
        out += table(["category", *labels], [[c, *(counts[c].get(lab, 0) for lab in labels)] for c in sorted(counts)])
    return out


def refusal(summary: dict[str, Any], run_dir: Path) -> str:
    collect = summary.get("collect")
    if not collect or "refusal_rate" not in collect:
        return note("No refusal rates: the collect stage's entry is not in summary.json.")
    rr = collect["refusal_rate"]
    out = f"<p>Judge: {esc(rr.get('judge', 'keyword'))}. Overall refusal rate {pct(rr.get('overall'))}.</p>"
    by_label = rr.get("by_label", {})
    out += figure(
        "refusal-by-label",
        plots.grouped_bars(list(by_label), {"refusal rate": list(by_label.values())}, "refusal rate", "by label"),
        "Share of responses the collect stage's judge calls refusals, per prompt label.",
    )
    by_cl = rr.get("by_category_label", {})
    if by_cl:
        cats = sorted({k.split("/", 1)[0] for k in by_cl})
        labels = sorted({k.split("/", 1)[1] for k in by_cl})
        series = {lab: [by_cl.get(f"{c}/{lab}") for c in cats] for lab in labels}
        out += figure(
            "refusal-by-category",
            plots.grouped_bars(cats, series, "refusal rate", "by category and label"),
            "Refusal rate per OR-Bench category, one bar per prompt label.",
        )
        out += table(["category", *labels], [[c, *(Raw(pct(by_cl.get(f"{c}/{lab}"))) for lab in labels)] for c in cats])
    score = collect.get("refusal_score") or {}
    if score:
        out += "<h3>First-token refusal score</h3>" + table(
            ["label", "mean log-odds", "share > 0"],
            [
                [lab, score.get("mean_by_label", {}).get(lab), Raw(pct(v))]
                for lab, v in score.get("rate_positive_by_label", {}).items()
            ],
        )
        out += f"<p>Agreement of the keyword judge with score &gt; 0: {pct(score.get('judge_agreement'))}.</p>"
    return out


def judges(summary: dict[str, Any], run_dir: Path) -> str:
    report = summary.get("judges")
    if not report or not report.get("per_judge"):
        collect_pairs = ((summary.get("collect") or {}).get("judges") or {}).get("pairs") or {}
        text = note("Judges: the judge stage did not run (no 'judges' in summary.json); rates above use one judge.")
        return text + (_agreement(collect_pairs, "the collect stage's judges") if collect_pairs else "")
    entries = report["per_judge"]
    names = list(entries)
    labels = sorted({lab for e in entries.values() for lab in (e.get("by_label") or {})})
    series = {n: [(entries[n].get("by_label", {}).get(lab) or {}).get("refusal_rate") for lab in labels] for n in names}
    dis = report.get("disagreements") or {}
    out = figure(
        "judges-by-label",
        plots.grouped_bars(labels, series, "refusal rate", "refusal rate by label, per judge"),
        "Each judge's refusal rate (binary view) per prompt label.",
    )
    rows = []
    for n in names:
        e = entries[n]
        rows.append(
            [n, Raw(pct((e.get("overall") or {}).get("refusal_rate")))]
            + [Raw(pct((e.get("by_label", {}).get(lab) or {}).get("refusal_rate"))) for lab in labels]
            + [e.get("threshold")]
        )
    out += table(["judge", "overall", *labels, "threshold"], rows)
    out += _agreement(report.get("pairs") or {}, "judges")
    out += disagreements(dis, run_dir)
    return out


def _agreement(pairs: dict[str, Any], whose: str) -> str:
    if not pairs:
        return ""
    rows = []
    for name, v in pairs.items():
        b = v.get("binary") or {}
        rows.append([name.replace("~", " vs "), b.get("n"), b.get("agreement"), b.get("kappa")])
    return f"<h3>Agreement between {esc(whose)} (binary view)</h3>" + table(
        ["pair", "n", "agreement", "Cohen's κ"], rows
    )


def disagreements(dis: dict[str, Any], run_dir: Path, limit: int = 500) -> str:
    path = resolve(dis.get("csv"), run_dir)
    if path is None or not path.is_file():
        return note("No disagreement table: the judge stage wrote none (or it was removed).")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return note(f"{path.name} is empty.")
    header, body = rows[0], rows[1:]
    shown = body[:limit]
    more = f" (first {limit} of {len(body)} shown; all in {path.name})" if len(body) > limit else ""
    return (
        f'<p><a href="#disagreements" onclick="return openDetails(\'disagreements\')">'
        f"{len(body)} responses on which judges disagree</a> (from {esc(path.name)}).</p>"
        f'<details id="disagreements"><summary>Disagreements{esc(more)}</summary>'
        '<input class="filter" data-table="disagreements-table" placeholder="filter rows (text match)">'
        + table(header, shown, table_id="disagreements-table", text_cols=len(header))
        + "</details>"
    )


# --- storage and throughput --------------------------------------------------------------------


def _folder_bytes(path: Path) -> int | None:
    if not path.exists():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def storage(summary: dict[str, Any], run_dir: Path) -> str:
    collect = summary.get("collect")
    if not collect:
        return note("No storage figures: the collect stage's entry is not in summary.json.")
    store = resolve(collect.get("store"), run_dir)
    size = _folder_bytes(store) if store else None
    tokens, hooks = collect.get("tokens"), len(collect.get("hook_points", []))
    rows: list[list[Any]] = [
        ["samples", collect.get("samples")],
        ["stored tokens", tokens],
        ["hook points", hooks],
        ["store size on disk (bytes, all files)", size],
    ]
    # The collect stage's own timing, kept in the store's manifest when the store was written by this version.
    stats = (read_json(store / "manifest.json") if store else None) or {}
    for key, value in (stats.get("collect_stats") or {}).items():
        if isinstance(value, int | float):
            rows.append([f"collect {key.replace('_', ' ')}", value])
    for key in ("seconds", "tokens_per_s", "prompts_per_s", "generated_tokens_per_s", "peak_memory_gb"):
        if isinstance(collect.get(key), int | float):
            rows.append([f"collect {key}", collect[key]])
    for key, value in (collect.get("throughput") or {}).items():
        if isinstance(value, int | float):
            rows.append([f"collect {key}", value])
    overflow = collect.get("overflow_counts") or {}
    if overflow:
        rows.append(
            ["float16 overflows per hook point", Raw(", ".join(f"{esc(h)}: {fmt(v)}" for h, v in overflow.items()))]
        )
    out = table(["", "value"], rows)
    sae_rows = []
    for hook, entry in (summary.get("sae") or {}).items():
        train = (read_json(_metrics_path(entry, run_dir)) or {}).get("train") or {}
        if train:
            sae_rows.append(
                [hook, train.get("steps"), train.get("tokens"), train.get("seconds"), train.get("tokens_per_s")]
            )
    if sae_rows:
        out += "<h3>SAE training throughput</h3>" + table(["hook", "steps", "tokens", "seconds", "tokens/s"], sae_rows)
    timings = summary.get("timings") or summary.get("stage_seconds")
    if isinstance(timings, dict) and timings:
        out += "<h3>Stage wall time (s)</h3>" + table(["stage", "seconds"], list(timings.items()))
    return out


# --- SAEs ----------------------------------------------------------------------------------------


def _metrics_path(entry: dict[str, Any], run_dir: Path) -> Path | None:
    folder = resolve(entry.get("path"), run_dir)
    return None if folder is None else folder / "metrics.json"


def sae(summary: dict[str, Any], run_dir: Path) -> str:
    entries = summary.get("sae")
    if not entries:
        return note("SAEs: the sae stage did not run (no 'sae' in summary.json).")
    hooks = list(entries)
    out = table(
        ["hook", "FVU", "L0", "dead", "dense", "rel. bias", "CE recovered", "KL"],
        [
            [
                h,
                e.get("fvu"),
                e.get("l0"),
                e.get("dead_frac"),
                e.get("dense_frac"),
                e.get("rel_bias"),
                e.get("ce_recovered"),
                e.get("kl"),
            ]
            for h, e in entries.items()
        ],
    )
    for key, name, caption in SAE_PLOTS:
        out += figure(
            f"sae-{key}", plots.lines_over_layers(hooks, [entries[h].get(key) for h in hooks], name, name), caption
        )
    out += "<h3>Feature density (held-out tokens)</h3>"
    for h in hooks:
        metrics = read_json(_metrics_path(entries[h], run_dir))
        hist = (metrics or {}).get("density_histogram")
        if not hist:
            out += note(f"{h}: no density histogram (metrics.json missing at {entries[h].get('path')}).")
            continue
        out += figure(
            f"sae-density-{h}",
            plots.density_histogram(hist["log10_density_bin_edges"], hist["counts"], hist.get("n_dead", 0), h),
            f"{h}: live latents per log10(share of held-out tokens they fire on).",
        )
    return out
