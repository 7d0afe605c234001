"""What a command shows on the terminal: quiet by default, more with -v.

Three levels, set once per command by `configured(verbosity)`:

- 0 (default): each command's result lines (stdout), organtrain's NOTICE lines (where
  the work runs, waits, resumes), progress bars, and every warning and error.
- 1 (`-v`): also organtrain's INFO lines, the details of each stage.
- 2 (`-vv`): also the libraries' INFO lines and TensorFlow's native start-up log.

The libraries' noise is switched off where it starts, never by filtering the text:
TF_CPP_MIN_LOG_LEVEL for TensorFlow's C++ log, the root logger's level for the libraries'
Python loggers (boto's "Found credentials in environment variables" is INFO), one logger's
level for Ray's token notice (`_QUIETED`). The oneDNN notice that TensorFlow 2.21 writes
through Abseil while it loads has no switch that keeps the numbers as they are:
`_QuietImport` mutes file descriptor 2 for that one import (shown if the import fails).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile

# Between INFO and WARNING: a line worth showing without -v (a stage starts, the command
# waits for something, it resumes earlier work), not a problem.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

_verbosity = 0

# Library loggers whose WARNING records are notices, not problems, below -vv.
_QUIETED = {
    # "Token authentication is enabled for this Ray cluster", on every local Ray: its
    # secure default, which organtrain keeps. (RAY_AUTH_MODE=token would say it without
    # the notice, but Ray reads it once, at import, and it would also ask a token of a
    # cluster without authentication given with --address.)
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}


def notice(logger: logging.Logger, message: str, *args) -> None:
    logger.log(NOTICE, message, *args)


def verbose() -> bool:
    """True under -v: commands print their details too."""
    return _verbosity >= 1


class _Formatter(logging.Formatter):
    """organtrain's own lines as they are; other libraries' warnings say whose they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.name == "organtrain" or record.name.startswith("organtrain."):
            return message
        return f"{record.levelname.lower()} ({record.name}): {message}"


@contextlib.contextmanager
def configured(verbosity: int):
    """Logging levels and handler for one command; everything is put back afterwards, so
    that calling `organtrain.cli.main` in a process (tests, notebooks) leaves its logging
    as it was."""
    global _verbosity
    before, _verbosity = _verbosity, verbosity
    try:
        with contextlib.ExitStack() as stack:
            handler = stack.enter_context(_stderr_handler())
            stack.enter_context(_levels(verbosity))
            stack.enter_context(_line_buffered_stdout())
            if verbosity < 2:
                # Before TensorFlow is imported (read once): its C++ INFO and WARNING
                # lines (CPU instruction notices and the like). Ray passes it to trials.
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
                stack.enter_context(_quiet_import("tensorflow", handler))
            yield
    finally:
        _verbosity = before


@contextlib.contextmanager
def _stderr_handler():
    handler = logging.StreamHandler()  # sys.stderr as it is now (pytest may capture it)
    handler.setFormatter(_Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


@contextlib.contextmanager
def _levels(verbosity: int):
    """organtrain's loggers at NOTICE, INFO (-v) or DEBUG (-vv); the libraries' at WARNING,
    INFO with -vv; below -vv, the loggers of _QUIETED at theirs."""
    levels = {
        "": logging.INFO if verbosity >= 2 else logging.WARNING,
        "organtrain": {0: NOTICE, 1: logging.INFO}.get(verbosity, logging.DEBUG),
        **(_QUIETED if verbosity < 2 else {}),
    }
    loggers = {name: logging.getLogger(name or None) for name in levels}
    before = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(levels[name])
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(before[name])


@contextlib.contextmanager
def _line_buffered_stdout():
    """Each result line as soon as it is printed, also into a pipe or a SLURM log (block
    buffering would hold them until the command ends, after everything on stderr)."""
    switch = getattr(sys.stdout, "line_buffering", None) is False
    switch = switch and hasattr(sys.stdout, "reconfigure")
    if switch:
        sys.stdout.reconfigure(line_buffering=True)
    try:
        yield
    finally:
        if switch:
            sys.stdout.reconfigure(line_buffering=False)


@contextlib.contextmanager
def _quiet_import(name: str, handler: logging.StreamHandler):
    """`name`'s first import, if this command makes it, with its native stderr muted."""
    finder = _QuietImport(name, handler)
    if name not in sys.modules:
        sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Imports one package (TensorFlow) with its native stderr muted, wherever in the
    command that first import happens (prepare, training, the sweep driver, predict), and
    only if it happens: `status` or `report` never pay for a TensorFlow import.

    Why: TensorFlow 2.21 writes "oneDNN custom operations are on" (twice: two libraries
    with their own copy of Abseil) and Abseil's "All log messages before
    absl::InitializeLog()" straight to file descriptor 2 while it loads, before any setting
    is read; TF_CPP_MIN_LOG_LEVEL does not reach them, and TF_ENABLE_ONEDNN_OPTS=0 would
    change the numbers (README, "Reproducible"). What the import writes there is shown if
    the import fails."""

    def __init__(self, name: str, handler: logging.StreamHandler):
        self.name, self.handler = name, handler

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # this one import; the search below must not find us
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _MutedLoader(spec.loader, self.handler)
        return spec


class _MutedLoader(importlib.abc.Loader):
    def __init__(self, loader, handler: logging.StreamHandler):
        self.loader, self.handler = loader, handler

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _native_stderr_muted(self.handler):
            self.loader.exec_module(module)

    def __getattr__(self, name):  # resource readers and the like: the real loader's
        return getattr(self.loader, name)


@contextlib.contextmanager
def _native_stderr_muted(handler: logging.StreamHandler):
    """File descriptor 2 goes to a temporary file while the block runs; Python's own
    stderr (warnings, log records) keeps going to the terminal. If the block fails, what
    went to the file is written out, then the error goes on."""
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        python_on_fd2 = False  # a captured sys.stderr (pytest): only native writes use fd 2
    if sys.stderr is not None:
        sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
    with tempfile.TemporaryFile() as native:
        os.dup2(native.fileno(), 2)
        if python_on_fd2:
            sys.stderr = terminal
            handler.setStream(terminal)
        try:
            yield
        except BaseException:
            native.seek(0)
            os.write(saved, native.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if python_on_fd2:
                sys.stderr = python_stderr
                handler.setStream(python_stderr)
            terminal.close()


def duration(seconds: float) -> str:
    """4.1 s, 2 min 10 s, 1 h 05 min: as a person reads it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
