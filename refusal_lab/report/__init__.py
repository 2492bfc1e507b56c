"""The run's report: one self-contained report.html (inline SVG, CSS and JS; opens offline).

python -m refusal_lab.report outputs/<date>/<time>        # rebuild from a run folder's artifacts
python -m refusal_lab stages=[report] ...                 # the pipeline's report stage
"""

from refusal_lab.report.build import REPORT_HTML, build_report, render

__all__ = ["REPORT_HTML", "build_report", "render"]
