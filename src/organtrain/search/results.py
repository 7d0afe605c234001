"""What a search leaves behind: the per-organ trials table, the sweep plot, the run summary.

runs/<run_id>/<organ>/metrics/trials.parquet   one row per trial
runs/<run_id>/<organ>/plots/sweep.png          the metric per trial and per searched field
runs/<run_id>/summary.parquet                  one row per organ
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from organtrain.plots import _message_png, _png, display_name

# Why a trial ended: it ran every epoch; its own patience stopped it; the scheduler (ASHA,
# PBT) stopped it for trailing the others; or it failed more often than max_failures.
STOP_REASONS = ("completed", "patience", "scheduler", "error")
PANELS_PER_ROW = 4  # of the sweep plot

TRIAL_FIELDS = [
    pa.field("run_id", pa.string()),
    pa.field("organ", pa.string()),
    pa.field("trained_organ", pa.string()),  # reported by the trial itself
    pa.field("trial_id", pa.string()),
    pa.field("status", pa.string()),  # terminated | error
    pa.field("stop_reason", pa.string()),
    pa.field("epochs", pa.int32()),  # epochs run
    pa.field("epochs_asked", pa.int32()),  # train.epochs of the trial
    pa.field("metric", pa.string()),
    pa.field("best_value", pa.float64()),  # best of the metric over the trial's epochs
    pa.field("best_epoch", pa.int32()),
    pa.field("replicas", pa.int32()),  # num_replicas_in_sync the trial ran with
    pa.field("node_id", pa.string()),  # the Ray node that ran the trial's last epoch
    pa.field("node_ip", pa.string()),  # and its IP address (Tune's)
    pa.field("seconds", pa.float64()),  # training time reported to Tune, resumes included
    pa.field("started", pa.float64()),  # unix time the trial first started
    pa.field("ended", pa.float64()),  # unix time of its last report
    pa.field("error", pa.string()),
    pa.field("config", pa.string()),  # the trial's searched values, JSON
]

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("organ", pa.string()),
        pa.field("state", pa.string()),  # done | failed
        pa.field("model", pa.string()),
        pa.field("trial_id", pa.string()),
        pa.field("trial_config", pa.string()),  # JSON
        pa.field("metric", pa.string()),
        pa.field("val_value", pa.float64()),
        pa.field("test_accuracy", pa.float64()),
        pa.field("test_macro_f1", pa.float64()),
        pa.field("test_macro_roc_auc", pa.float64()),
        pa.field("test_images", pa.int64()),
        pa.field("trials", pa.int64()),
        pa.field("trials_stopped_early", pa.int64()),
        pa.field("trials_errored", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class TrialIdentity:
    """Which trial a Tune result belongs to, from Tune's experiment state."""

    trial_id: str
    config: dict


def trial_rows(
    results,
    identities: dict[str, TrialIdentity],
    *,
    run_id: str,
    organ: str,
    metric: str,
    mode: str,
    epochs: int,
):
    """One dict per trial of a Tune ResultGrid (errored trials included).

    A row's id and configuration are the trial's own (`identities`, by trial folder
    name); its figures come only from results the trial itself reported (they carry its
    trial id). A trial that failed before reporting keeps its id and configuration and
    gets no figures, never those of the trial that used its worker before."""
    rows = []
    for result in results:
        name = Path(result.path).name
        identity = identities.get(name) or TrialIdentity(name, dict(result.config or {}))
        m = result.metrics or {}
        if m.get("trial_id") != identity.trial_id:
            m = {}  # another trial's result: this trial reported nothing of its own
        frame = result.metrics_dataframe if m else None
        values = (
            frame[metric].to_numpy(dtype=float)
            if frame is not None and metric in frame
            else np.array([])
        )
        values = values[np.isfinite(values)]
        best_at = (np.argmin if mode == "min" else np.argmax)(values) if values.size else None
        asked = int(identity.config.get("train.epochs", epochs))
        ran = int(m.get("epoch", 0))
        if result.error is not None:
            reason = "error"
        elif m.get("stopped_early"):
            reason = "patience"
        elif ran >= asked:
            reason = "completed"
        else:
            reason = "scheduler"
        rows.append(
            {
                "run_id": run_id,
                "organ": organ,
                "trained_organ": m.get("trained_organ"),
                "trial_id": identity.trial_id,
                "status": "error" if result.error is not None else "terminated",
                "stop_reason": reason,
                "epochs": ran,
                "epochs_asked": asked,
                "metric": metric,
                "best_value": float(values[best_at]) if best_at is not None else math.nan,
                "best_epoch": int(frame["epoch"].iloc[best_at]) if best_at is not None else 0,
                "replicas": int(m.get("replicas", 0)),
                "node_id": m.get("node_id"),
                "node_ip": m.get("node_ip"),
                "seconds": float(m.get("time_total_s", 0.0)),
                "started": float(m.get("trial_started") or math.nan),
                "ended": float(m.get("timestamp") or math.nan),
                "error": _error_text(result.error),
                "config": json.dumps(identity.config, sort_keys=True),
                **{f"config/{k}": _column_value(v) for k, v in identity.config.items()},
            }
        )
    return sorted(rows, key=lambda r: r["started"] if math.isfinite(r["started"]) else 0)


def _error_text(error) -> str | None:
    if error is None:
        return None
    text = str(error).strip()
    # Tune wraps the trial's exception; its last line is the one that says what happened.
    last = [line for line in text.splitlines() if line.strip()][-1:] or [text]
    return last[0][:500]


def _column_value(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value)
    return float(value)


def trials_table(rows: Sequence[dict]) -> pa.Table:
    config_columns = sorted({k for r in rows for k in r if k.startswith("config/")})
    fields = list(TRIAL_FIELDS)
    for name in config_columns:
        kinds = {type(r.get(name)) for r in rows if r.get(name) is not None}
        fields.append(pa.field(name, pa.float64() if kinds <= {float} else pa.string()))
    schema = pa.schema(fields)
    records = [{f.name: _cell(r.get(f.name), f.type) for f in fields} for r in rows]
    return pa.Table.from_pylist(records, schema=schema)


def _cell(value, kind):
    if value is not None and kind == pa.string() and not isinstance(value, str):
        return json.dumps(value)
    return value


def summary_table(rows: Sequence[dict]) -> pa.Table:
    names = SUMMARY_SCHEMA.names
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], SUMMARY_SCHEMA)


def sweep_png(
    rows: Sequence[dict],
    *,
    organ: str,
    metric: str,
    space_kinds: dict,
    chosen: str | None = None,
) -> bytes:
    """Left: the metric of every trial, in start order, marked by why it stopped. Then one
    panel per searched field: the metric against the field's values, to see what mattered.
    The chosen trial (`chosen`, a trial id) is ringed in every panel, and its searched
    values (architecture, augmentation, ...) are written under the title."""
    title = f"{organ} — search ({len(rows)} trials)"
    scored = [r for r in rows if math.isfinite(r["best_value"])]
    if not scored:
        return _message_png("no trial reported a validation metric", title=title)
    # Every searched field gets its panel (the demo searches seven), four panels a row.
    searched = [k for k, kind in space_kinds.items() if kind != "fixed"]
    winner = next((r for r in scored if chosen is not None and r["trial_id"] == chosen), None)
    columns = min(PANELS_PER_ROW, 1 + len(searched))
    rows_of_panels = math.ceil((1 + len(searched)) / columns)
    fig = Figure(figsize=(4.0 * columns, 3.2 * rows_of_panels + 0.6), layout="constrained")
    grid = fig.subplots(rows_of_panels, columns, squeeze=False).ravel()
    for unused in grid[1 + len(searched) :]:
        unused.set_visible(False)
    axes = grid[: 1 + len(searched)]
    markers = {"completed": "o", "patience": "s", "scheduler": "v", "error": "x"}
    ax = axes[0]
    for reason, marker in markers.items():
        points = [(i + 1, r["best_value"]) for i, r in enumerate(rows)
                  if r["stop_reason"] == reason and math.isfinite(r["best_value"])]  # fmt: skip
        if points:
            x, y = zip(*points, strict=True)
            ax.scatter(x, y, marker=marker, label=reason.replace("_", " "), s=36)
    if winner is not None:
        _ring(ax, rows.index(winner) + 1, winner["best_value"], label="chosen")
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(f"best {display_name(metric, 40)}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(title="stopped by", fontsize="small")
    for ax, key in zip(axes[1:], searched, strict=True):
        column = f"config/{key}"
        values = [r.get(column) for r in scored]
        y = [r["best_value"] for r in scored]
        if all(isinstance(v, float) for v in values):
            ax.scatter(values, y, s=36)
            if space_kinds[key] == "loguniform":
                ax.set_xscale("log")
            position = winner.get(column) if winner is not None else None
        else:
            labels = sorted({str(v) for v in values})
            x = [labels.index(str(v)) for v in values]
            ax.scatter(x, y, s=36)
            ax.set_xticks(range(len(labels)), [_tick_label(v) for v in labels])
            position = labels.index(str(winner.get(column))) if winner is not None else None
        if winner is not None:
            _ring(ax, position, winner["best_value"])
        ax.set_xlabel(key)
    if winner is not None:
        width = 45 * columns  # characters that fit across the figure at the title's size
        title = "\n".join([title, *textwrap.wrap(chosen_settings(winner, searched), width)])
    fig.suptitle(title)
    return _png(fig)


def _ring(ax, x, y, label: str | None = None) -> None:
    ax.scatter([x], [y], s=180, facecolors="none", edgecolors="crimson", linewidths=2,
               label=label, zorder=3)  # fmt: skip


def chosen_settings(row: dict, searched: Sequence[str]) -> str:
    """The chosen trial's searched values, as `field=value` pairs (e.g. for a title)."""
    parts = []
    for key in searched:
        value = row.get(f"config/{key}")
        if isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key.partition('.')[2]}={_tick_label(str(value))}")
    return "chosen: " + ", ".join(parts)


def _tick_label(text: str) -> str:
    return display_name(text.strip('"'), 16)
