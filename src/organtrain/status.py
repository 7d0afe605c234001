"""`organtrain status RUN`: where a run stands, as a table for the terminal.

A sweep rewrites runs/<run_id>/status.json every few seconds; this reads it (any machine
with access to the storage can, while the sweep runs elsewhere). A `train` run has no
status.json, so each organ's state comes from its files: result.json once finished,
checkpoint/state.json while training.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

from organtrain.report.run import OrganRun, Run, load_run
from organtrain.storage import Storage

STALE_SECONDS = 300  # a running sweep rewrites status.json every few seconds
ERROR_WIDTH = 60  # characters of an error shown in the table; the whole one follows it


def render_status(storage: Storage, run_id: str, *, now: datetime | None = None) -> str:
    """The run's status as text; RunNotFoundError (naming the key) if there is no run."""
    run = load_run(storage, run_id)
    now = now or datetime.now(timezone.utc)
    if run.status is not None:
        lines = [_sweep_header(run, now), "", _sweep_table(run)]
    else:
        lines = [_files_header(run), "", _files_table(run)]
    errors = [(o.organ, o.error) for o in run.organs.values() if o.error]
    for organ, error in errors:
        lines += ["", f"{organ} failed:", *("  " + line for line in error.splitlines()[:20])]
    return "\n".join(lines)


def _sweep_header(run: Run, now: datetime) -> str:
    status = run.status
    state, updated = status.get("state", "?"), status.get("updated")
    text = f"run {run.run_id}: {state}"
    age = _age_seconds(updated, now)
    if updated:
        text += f", updated {updated}" + (f" ({_ago(age)})" if age is not None else "")
    text += f"; metric {status.get('metric', '?')} ({status.get('mode', '?')})"
    if state == "running" and age is not None and age > STALE_SECONDS:
        text += (
            f"\nwarning: no update for {_ago(age).removesuffix(' ago')}: the sweep's driver may "
            "have stopped; run the same `organtrain sweep` command again to continue it"
        )
    return text


def _sweep_table(run: Run) -> str:
    metric = run.status.get("metric", "metric")
    headers = ["organ", "state", "done", "running", "pending", "errored", "stopped early",
               f"best {metric}", "test accuracy", *IMBALANCE_HEADERS, "error"]  # fmt: skip
    rows = []
    for organ in run.organs.values():
        entry = organ.status or {}
        trials = entry.get("trials") or {}
        rows.append([
            organ.organ, organ.state, *(_count(trials.get(k)) for k in
                                        ("terminated", "running", "pending", "error")),
            _count(entry.get("stopped_early")), _number(entry.get("best")),
            _number(entry.get("test_accuracy") or (organ.result or {}).get("test_accuracy")),
            *_imbalance_cells(organ.result), _short(organ.error),
        ])  # fmt: skip
    return _table(headers, rows)


def _files_header(run: Run) -> str:
    done = sum(o.state == "done" for o in run.organs.values())
    kind = "sweep without status.json" if run.sweep else "organtrain train run"
    return (
        f"run {run.run_id}: {done} of {len(run.organs)} organ(s) finished "
        f"({kind}: states read from each organ's files)"
    )


def _files_table(run: Run) -> str:
    headers = ["organ", "state", "model", "epochs", "best epoch", "test accuracy",
               *IMBALANCE_HEADERS, "macro F1", "test images", "error"]  # fmt: skip
    return _table(headers, [_files_row(o) for o in run.organs.values()])


def _files_row(organ: OrganRun) -> list[str]:
    result = organ.result or {}
    epochs = result.get("epochs_run")
    if epochs is None and organ.training:
        epochs = organ.training.get("epoch")  # epochs finished so far
    best = result.get("best_epoch")
    if best is None and organ.training:
        best = organ.training.get("best_epoch")
    state = organ.state
    if state == "training":
        state = "training (or interrupted: re-run to resume)"
    return [
        organ.organ, state, result.get("model", "—"), _count(epochs), _count(best),
        _number(result.get("test_accuracy")), *_imbalance_cells(organ.result),
        _number(result.get("test_macro_f1")),
        _count(result.get("test_images")), _short(organ.error),
    ]  # fmt: skip


# Accuracy hides a rare diagnosis the model misses: the mean recall over diagnoses, and the
# diagnosis recalled worst, show it.
IMBALANCE_HEADERS = ("balanced accuracy", "lowest recall")


def _imbalance_cells(result: dict | None) -> list[str]:
    """[balanced accuracy, "recall (diagnosis)" of the worst-recalled diagnosis] from a
    result.json; "—" for runs that are not finished or predate these figures."""
    result = result or {}
    recalls = {k: v for k, v in (result.get("test_recall") or {}).items() if v == v}  # not NaN
    if not recalls:
        return [_number(result.get("test_balanced_accuracy")), "—"]
    worst = min(recalls, key=recalls.get)
    return [_number(result.get("test_balanced_accuracy")), f"{recalls[worst]:.3f} ({worst})"]


# --- Formatting -----------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line("-" * w for w in widths), *map(line, rows)])


def _count(value) -> str:
    return "—" if value is None else str(value)


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _short(error: str | None) -> str:
    if not error:
        return ""
    first = error.strip().splitlines()[0] if error.strip() else ""
    return first if len(first) <= ERROR_WIDTH else first[: ERROR_WIDTH - 1] + "…"


def _age_seconds(updated: str | None, now: datetime) -> float | None:
    """Seconds since an ISO 8601 time (a trailing Z, which Python 3.10 cannot parse, is
    read as UTC; a time without zone as UTC)."""
    if not updated:
        return None
    try:
        when = datetime.fromisoformat(updated.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (now - when).total_seconds()


def _ago(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
