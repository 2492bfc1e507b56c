"""The report stage as the pipeline sees it (refusal_lab.stages.StageSpec).

Reads: summary.json as the run built it so far (or `report.run_dir`'s summary.json) and the
artifacts it names. Writes: `<run folder>/report.html`. It always redraws the page (a few
seconds; nothing is recomputed), so the page matches the summary it sits beside.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from refusal_lab.config import Stage
from refusal_lab.errors import ConfigError
from refusal_lab.fingerprint import fingerprint
from refusal_lab.report.build import REPORT_HTML, SUMMARY, build_report
from refusal_lab.stages import RunContext

log = logging.getLogger(__name__)

ALGORITHM_VERSION = 1
"""Bump whenever the page's content changes for the same summary and artifacts."""


def source_dir(ctx: RunContext) -> Path:
    """The run folder the report is drawn from: report.run_dir (relative to the launch dir) or this run's."""
    configured = ctx.cfg.report.run_dir
    return (ctx.launch_dir / configured).resolve() if configured else ctx.run_dir


class ReportStage:
    name: ClassVar[Stage] = Stage.report
    inputs: ClassVar[tuple[Stage, ...]] = ()  # reads summary.json entries, whatever ran

    def fingerprint(self, ctx: RunContext) -> str:
        return fingerprint({"report": ALGORITHM_VERSION})

    def artifact(self, ctx: RunContext) -> Path:
        return source_dir(ctx) / REPORT_HTML

    def locks(self, ctx: RunContext) -> list[Path]:
        # No lock file beside report.html: the page is written to a temp file and renamed, so two writers
        # cannot tear it, and the last one wins with a complete page.
        return []

    def prepare(self, ctx: RunContext) -> None:
        folder = source_dir(ctx)
        if ctx.cfg.report.run_dir and not (folder / SUMMARY).is_file():
            raise ConfigError(
                f"report.run_dir: {ctx.cfg.report.run_dir} holds no {SUMMARY} ({folder}); give a run folder of an "
                "earlier run, or null to draw this run's report"
            )

    def verify(self, ctx: RunContext) -> None:
        if not self.artifact(ctx).is_file():
            raise ConfigError(f"stages: no report at {self.artifact(ctx)}; add report to stages")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        folder = source_dir(ctx)
        own = folder == ctx.run_dir
        # This run's page is drawn from the summary as it stands (every earlier stage's entry is in it).
        path = build_report(folder, ctx.summary if own else None)
        return {"path": str(path), "source": str(folder)}
