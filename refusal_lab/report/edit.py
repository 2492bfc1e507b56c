"""The report's edit section: the over-refusal edit's table (summary.json["edit"]), read, never recomputed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_lab.report.html import esc, fmt, note, table

ROWS = (
    ("unedited", "unedited model"),
    ("edit", "edit: writers orthogonalised (= the saved checkpoint)"),
    ("sae_clamp", "SAE clamp of the same features (hooks)"),
    ("diff_in_means", "diff-in-means direction ablation"),
)
COLUMNS = ("refused_safe", "toxic", "harmless")


def _random_cell(stats: dict[str, Any]) -> str:
    return f"{fmt(stats.get('median'))} [{fmt(stats.get('p5'))}, {fmt(stats.get('p95'))}]"


def edit_table_rows(entry: dict[str, Any]) -> list[list[Any]]:
    """One row per condition: refusal on refused-safe / toxic / harmless, their drops, KL on harmless."""
    tab = entry.get("table") or {}
    keys = [f"refusal_{c}" for c in COLUMNS] + [f"drop_{c}" for c in COLUMNS] + ["kl_harmless"]
    rows: list[list[Any]] = [[label, *(tab[name].get(k) for k in keys)] for name, label in ROWS if name in tab]
    rand = tab.get("random")
    if rand:
        rows.append(
            [f"random same-size sets (n={rand['n']}): median [p5, p95]", *(_random_cell(rand[k]) for k in keys)]
        )
    return rows


def edit_section(summary: dict[str, Any], run_dir: Path) -> str:
    entry = summary.get("edit")
    if entry and entry.get("status") == "skipped":
        return note(f"The edit stage was skipped: {entry.get('reason')}")
    if not entry or "table" not in entry:
        return note("The edit stage did not run (add edit to stages).")
    n = entry.get("n_prompts", {})
    out = (
        f"<p>Source circuit: {esc(entry.get('source'))}; {entry.get('n_features')} SAE features "
        f"({esc(', '.join(f'{h}: {len(f)}' for h, f in entry.get('nodes', {}).items()))}). Held-out prompts: "
        f"{n.get('refused_safe')} safe prompts the unedited model refused, {n.get('toxic')} toxic, {n.get('harmless')} "
        f"harmless; judge {esc(entry.get('judge'))}, {entry.get('max_new_tokens')} new tokens.</p>"
    )
    header = ["condition", "refusal: refused safe", "toxic", "harmless", "drop: refused safe", "toxic", "harmless",
              "KL harmless"]  # fmt: skip
    out += table(header, edit_table_rows(entry), table_id="edit-table")
    ckpt = entry.get("checkpoint") or {}
    if ckpt:
        check = ckpt.get("logit_check") or {}
        out += (
            f"<p>Edited checkpoint: <code>{esc(ckpt.get('path'))}</code> (load with "
            "<code>AutoModelForCausalLM.from_pretrained</code>); reloaded, its logits differ from the hook-based "
            f"edit by at most {fmt(check.get('max_abs_diff'), 6)} "
            f"(largest |logit| {fmt(check.get('max_abs_logit'))}).</p>"
        )
    return out
