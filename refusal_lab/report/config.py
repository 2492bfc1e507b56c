"""Schema of the `report` config group (conf/report/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from refusal_lab.errors import ConfigError


@dataclass
class ReportConfig:
    """The report stage: report.html in the run folder, drawn from summary.json and the artifacts it names."""

    run_dir: str | None = None
    """Run folder whose report to (re)build; None: this run's folder. `stages=[report] report.run_dir=<an earlier
    run folder>` rebuilds that run's report.html from its summary.json and artifacts, loading no model."""

    def __post_init__(self) -> None:
        if self.run_dir is not None and not str(self.run_dir).strip():
            raise ConfigError(f"report.run_dir: {self.run_dir!r} is empty; give a run folder or null (this run)")
