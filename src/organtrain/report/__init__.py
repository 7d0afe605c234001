"""The run report: one self-contained HTML page per run (`organtrain report RUN`)."""

from organtrain.report.run import Run, RunNotFoundError, load_run

__all__ = ["REPORT", "Run", "RunNotFoundError", "build_report", "load_run"]


def __getattr__(name: str):
    # build imports scikit-learn, SciPy and matplotlib (about 2 s of CPU): load it only when
    # asked, so that readers of a run folder such as `organtrain status` stay light.
    if name in ("REPORT", "build_report"):
        from organtrain.report import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
