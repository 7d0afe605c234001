"""The run report: one self-contained HTML page per run (`organtrain report RUN`)."""

from organtrain.report.build import REPORT, build_report
from organtrain.report.run import Run, RunNotFoundError, load_run

__all__ = ["REPORT", "Run", "RunNotFoundError", "build_report", "load_run"]
