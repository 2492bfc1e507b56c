"""The edit stage on a model that refuses too rarely for its source set (issue 15 item 6, found on SmolLM2):
the circuits stage skipped the set, so the edit stage is skipped with that reason instead of failing."""

from __future__ import annotations

import json
from pathlib import Path

from refusal_lab.circuits.stage import SET_MARKER
from refusal_lab.edit.stage import source_skipped
from refusal_lab.report.edit import edit_section


def _marker(root: Path, name: str, entry: dict) -> Path:
    folder = root / "sets" / name
    folder.mkdir(parents=True)
    (folder / SET_MARKER).write_text(json.dumps(entry))
    return folder / "graph.json"


def test_a_skipped_source_set_gives_its_reason(tmp_path: Path) -> None:
    reason = "3 refused safe prompts (fewer than 8)"
    path = _marker(tmp_path, "over_refusal", {"status": "skipped", "reason": reason})
    why = source_skipped(path)
    assert why is not None and "'over_refusal'" in why and reason in why


def test_a_present_or_unknown_source_is_not_skipped(tmp_path: Path) -> None:
    ok = _marker(tmp_path, "toxic", {"status": "ok"})
    assert source_skipped(ok) is None  # graph.json missing but the set ran: load_nodes names the missing file
    ok.write_text("{}")
    assert source_skipped(ok) is None
    assert source_skipped(tmp_path / "sets" / "absent" / "graph.json") is None
    assert source_skipped(tmp_path / "nodes.json") is None


def test_report_shows_the_skip_reason(tmp_path: Path) -> None:
    page = edit_section({"edit": {"status": "skipped", "reason": "edit.source: no refused safe prompts"}}, tmp_path)
    assert "edit stage was skipped" in page and "no refused safe prompts" in page
    assert "did not run" not in page
