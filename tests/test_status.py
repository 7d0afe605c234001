"""`organtrain status`: hand-written status.json files, and a tiny real `train` run."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from tinyrun import RUN_ID, make_tiny_run

from organtrain.errors import OrgantrainError
from organtrain.report import RunNotFoundError
from organtrain.status import render_status
from organtrain.storage import LocalStorage

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def _status(state="running", updated="2026-01-01T11:59:50Z", **organs) -> bytes:
    return json.dumps(
        {
            "run_id": "s",
            "updated": updated,
            "state": state,
            "metric": "val_accuracy",
            "mode": "max",
            "organs": organs,
        }
    ).encode()


def _organ(
    state,
    total=4,
    pending=0,
    running=0,
    terminated=0,
    error=0,
    best=None,
    message=None,
    test_accuracy=None,
):
    return {
        "state": state,
        "trials": {
            "total": total,
            "pending": pending,
            "running": running,
            "terminated": terminated,
            "error": error,
        },
        "stopped_early": 1 if terminated else 0,
        "best": best,
        "best_trial": None,
        "error": message,
        "test_accuracy": test_accuracy,
    }


def _rows(text: str) -> dict[str, list[str]]:
    """organ -> its cells (split on runs of 2+ spaces)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("organ")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = [c for c in line.split("  ") if c.strip()]
        rows[cells[0].strip()] = [c.strip() for c in cells[1:]]
    return rows


def test_running_sweep(tmp_path):
    store = LocalStorage(tmp_path)
    store.put_bytes(
        "runs/s/status.json",
        _status(
            lung=_organ("searching", pending=1, running=2, terminated=1, best=0.8125),
            colon=_organ(
                "failed",
                error=4,
                message="DataError: colon: 3 training images cannot "
                "fill one global batch of 64; lower input.batch_size or add images\nmore",
            ),
            blood=_organ("pending", pending=4),
        ),
    )
    text = render_status(store, "s", now=NOW)
    assert text.splitlines()[0] == (
        "run s: running, updated 2026-01-01T11:59:50Z (10 s ago); metric val_accuracy (max)"
    )
    rows = _rows(text)
    assert list(rows) == ["lung", "colon", "blood"]
    assert rows["lung"][:7] == ["searching", "1", "2", "1", "0", "1", "0.812"]
    assert rows["colon"][0] == "failed" and rows["colon"][4] == "4"
    assert (
        rows["colon"][-1].startswith("DataError: colon: 3 training")
        and rows["colon"][-1][-1] == "…"
    )
    assert "colon failed:\n  DataError: colon: 3 training images" in text and "\n  more" in text
    assert "warning" not in text


def test_stale_running_sweep_warns(tmp_path):
    store = LocalStorage(tmp_path)
    store.put_bytes(
        "runs/s/status.json",
        _status(updated="2026-01-01T11:00:00+00:00", lung=_organ("searching", running=1)),
    )
    text = render_status(store, "s", now=NOW)
    assert "(60 min ago)" in text
    assert "warning: no update for 60 min" in text and "organtrain sweep` command again" in text


def test_finished_sweep_reads_test_accuracy(tmp_path):
    store = LocalStorage(tmp_path)
    store.put_bytes(
        "runs/s/status.json",
        _status(state="finished", lung=_organ("done", terminated=4, best=0.9, test_accuracy=0.875)),
    )
    rows = _rows(render_status(store, "s", now=NOW))
    assert rows["lung"] == ["done", "4", "0", "0", "0", "1", "0.900", "0.875"]


def test_missing_run_names_the_key(tmp_path):
    store = LocalStorage(tmp_path)
    with pytest.raises(RunNotFoundError, match=r"no run 'nope': .*/runs/nope/ holds no") as err:
        render_status(store, "nope")
    assert isinstance(err.value, OrgantrainError)  # the CLI prints it without a traceback


def test_train_in_progress_from_its_checkpoint(tmp_path):
    store = LocalStorage(tmp_path)
    state = {"epoch": 3, "best_epoch": 2, "history": {}, "settings": {}}
    store.put_bytes("runs/t/lung/checkpoint/state.json", json.dumps(state).encode())
    text = render_status(store, "t", now=NOW)
    assert "0 of 1 organ(s) finished" in text
    assert _rows(text)["lung"][:4] == ["training (or interrupted: re-run to resume)", "—", "3", "2"]


def test_real_train_run(tmp_path):
    store = make_tiny_run(tmp_path, {"lung": ["adenocarcinoma", "benign"]})
    result = json.loads(store.get_bytes(f"runs/{RUN_ID}/lung/result.json"))
    text = render_status(store, RUN_ID)
    assert text.startswith(f"run {RUN_ID}: 1 of 1 organ(s) finished (organtrain train run")
    row = _rows(text)["lung"]
    assert row[:4] == ["done", "simple_cnn", "1", "1"]
    assert row[4] == f"{result['test_accuracy']:.3f}" and row[6] == str(result["test_images"])
