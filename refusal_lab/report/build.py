"""Build `report.html` in a run folder from its summary.json and the artifacts summary.json references.

Reads: `<run_dir>/summary.json`, the SAE folders' metrics.json, the judge disagreement CSV, the
circuits set folders (graph.json, validation.json, feature_cards.json) and the activation
store's folder size. Writes: `<run_dir>/report.html` (temp file, then rename). Loads no model
and recomputes no result: every number on the page is in one of those files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusal_lab.report import REPORT_HTML, circuits, comparison, edit, sections
from refusal_lab.report.html import note, page

log = logging.getLogger(__name__)

SUMMARY = "summary.json"

Section = Callable[[dict[str, Any], Path], str]
SECTIONS: list[tuple[str, str, Section]] = [
    ("run", "Run", sections.overview),
    ("refusal", "Refusal rates", sections.refusal),
    ("judges", "Judges", sections.judges),
    ("storage", "Storage & throughput", sections.storage),
    ("sae", "SAEs", sections.sae),
    ("circuits", "Circuits", circuits.circuits_section),
    ("edit", "Over-refusal edit", edit.edit_section),
    ("comparison", "Category comparison", comparison.comparison_section),
    ("cards", "Feature cards", circuits.cards_section),
]


def render(summary: dict[str, Any], run_dir: Path) -> str:
    """The report page for a summary; a section that fails to render becomes a note naming the error."""
    parts = []
    for sid, title, build in SECTIONS:
        try:
            body = build(summary, run_dir)
        except Exception as err:  # noqa: BLE001 -- one malformed entry must not cost the whole report
            log.warning("report: section %s failed: %s: %s", sid, type(err).__name__, err)
            body = note(f"This section could not be drawn from summary.json: {type(err).__name__}: {err}")
        parts.append((sid, title, body))
    collect = summary.get("collect") or {}
    subtitle = f"run {summary.get('run_fingerprint', '?')} · store {collect.get('fingerprint', '—')} · {run_dir}"
    return page("refusal_lab report", subtitle, parts)


def build_report(run_dir: Path, summary: dict[str, Any] | None = None) -> Path:
    """Write `<run_dir>/report.html` from `summary` (default: the folder's summary.json) and return its path."""
    run_dir = Path(run_dir)
    summary = summary if summary is not None else _read_summary(run_dir)
    out = run_dir / REPORT_HTML
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(summary, run_dir), encoding="utf-8")
    os.replace(tmp, out)
    log.info("report: %s (%.0f kB)", out, out.stat().st_size / 1e3)
    return out


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"report: {path} does not exist; run the pipeline first or pass the run folder")
    return json.loads(path.read_text())
