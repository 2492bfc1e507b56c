"""The run's report: one self-contained report.html (inline SVG, CSS and JS; opens offline).

    python -m refusal_lab.report outputs/<date>/<time>                 # rebuild from a run folder's artifacts
    python -m refusal_lab stages=[report] report.run_dir=outputs/...   # the same through the pipeline

`build_report` and `render` live in refusal_lab.report.build; this package imports nothing at
load time because refusal_lab.config imports its config module, and matplotlib should not
load with every config.
"""

REPORT_HTML = "report.html"
