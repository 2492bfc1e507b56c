"""Evaluate a judge against human labels in any CSV/TSV/JSON/JSONL table.

    python -m refusal_lab.judge eval FILE --text-column completion --label-column final_label [--judge rule]

Labels may be spelled as XSTest (`1_full_compliance`, ...), OR-Bench (`direct_answer`, ...), by class name, or
as booleans (true = refused); see refusal_lab.judge.labels.parse_verdict.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refusal_lab.errors import ConfigError
from refusal_lab.judge.labels import VERDICTS, parse_verdict, to_codes
from refusal_lab.judge.metrics import classification_report


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a .csv/.tsv (header row), .json (a list of objects) or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ConfigError(f"{path}: a .json table must be a list of objects")
        return rows
    raise ConfigError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv, .json or .jsonl")


def column(rows: list[dict[str, Any]], name: str, path: Path) -> list[Any]:
    if rows and name not in rows[0]:
        raise ConfigError(f"{path}: no column {name!r}; columns: {sorted(rows[0])}")
    return [row[name] for row in rows]


def evaluate(truth: Sequence[Any], predicted: np.ndarray) -> dict[str, Any]:
    """classification_report of parsed human labels against a judge's codes."""
    return classification_report(to_codes(parse_verdict(t) for t in truth), predicted)


def format_report(report: dict[str, Any], judge: str) -> str:
    """Plain-text report: accuracy, per-class P/R/F1 and the confusion matrix."""

    def num(x: float | None) -> str:
        return "  n/a" if x is None else f"{x:5.3f}"

    lines = [
        f"judge {judge}: {report['n']} responses, accuracy {num(report['accuracy'])}, "
        f"binary accuracy {num(report['binary_accuracy'])}, kappa {num(report['kappa'])}",
        f"{'class':<18}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}",
    ]
    for name, c in report["per_class"].items():
        lines.append(f"{name:<18}{num(c['precision']):>10}{num(c['recall']):>8}{num(c['f1']):>8}{c['support']:>9}")
    lines.append("confusion (rows: human label, columns: judge)")
    lines.append(" " * 18 + "".join(f"{v.value[:16]:>17}" for v in VERDICTS))
    for v, row in zip(VERDICTS, report["confusion"], strict=True):
        lines.append(f"{v.value:<18}" + "".join(f"{x:>17}" for x in row))
    return "\n".join(lines)
