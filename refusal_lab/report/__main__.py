"""Rebuild a run folder's report.html from its summary.json and artifacts (no model, no recomputation).

python -m refusal_lab.report outputs/2026-11-30/01-23-45
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from refusal_lab.report.build import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m refusal_lab.report", description="Rebuild a run folder's report.html from its artifacts."
    )
    parser.add_argument("run_dir", type=Path, help="a run folder holding summary.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build_report(args.run_dir)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
