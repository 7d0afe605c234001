"""A run folder, read back: which organs it has, how far each got, and where to look.

Two writers make run folders, and both are read the same way:

- `organtrain sweep` writes sweep.json (the organ list), status.json (live progress),
  summary.parquet (one row per organ, at the end) and each organ's result.json;
- `organtrain train` writes only `<organ>/result.json` (and checkpoints while training),
  so its organs are found by listing the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from organtrain.data.manifest import read_parquet
from organtrain.errors import ObjectNotFoundError, OrgantrainError
from organtrain.storage import Storage, join_key, key_part_problem

SWEEP = "sweep.json"
STATUS = "status.json"
SUMMARY = "summary.parquet"
RESULT = "result.json"
TRAINING_STATE = "checkpoint/state.json"  # see checkpoint.py: present while training


class RunNotFoundError(OrgantrainError):
    """No run with that id in the storage."""


def run_prefix(run_id: str) -> str:
    problem = key_part_problem(run_id) if isinstance(run_id, str) else "is not a string"
    if problem:
        raise RunNotFoundError(f"invalid run id {run_id!r}: it {problem}")
    return join_key("runs", run_id)


@dataclass
class OrganRun:
    """What the run folder says about one organ."""

    organ: str
    state: str  # done | failed | pending | searching | evaluating | training
    result: dict | None = None  # <organ>/result.json (TrainResult, plus "search" for sweeps)
    status: dict | None = None  # its entry in status.json
    summary: dict | None = None  # its row of summary.parquet
    training: dict | None = None  # checkpoint/state.json of an unfinished `train`
    error: str | None = None


@dataclass
class Run:
    run_id: str
    storage: Storage  # the storage root (runs/ and datasets/ live under it)
    sweep: dict | None  # sweep.json; None for a `train` run
    status: dict | None  # status.json; None for a `train` run
    summary: list[dict] | None  # summary.parquet rows; None until a sweep finishes
    organs: dict[str, OrganRun] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return run_prefix(self.run_id)

    def key(self, *parts: str) -> str:
        """A key under this run's folder."""
        return join_key(self.prefix, *parts)

    def dataset(self) -> tuple[str, str] | None:
        """(dataset name, version) the run trained on, when anything recorded it."""
        for source in [o.result for o in self.organs.values()] + [self.sweep]:
            if source and source.get("dataset") and source.get("dataset_version"):
                return source["dataset"], source["dataset_version"]
        return None


def read_json(storage: Storage, key: str) -> dict | None:
    """A JSON object, or None when the key does not exist."""
    try:
        return json.loads(storage.get_bytes(key))
    except ObjectNotFoundError:
        return None


def read_table(storage: Storage, key: str) -> list[dict] | None:
    """A Parquet table's rows, or None when the key does not exist."""
    try:
        return read_parquet(storage.get_bytes(key)).to_pylist()
    except ObjectNotFoundError:
        return None


def load_run(storage: Storage, run_id: str) -> Run:
    """Everything the run folder says about its organs; RunNotFoundError if it is empty."""
    prefix = run_prefix(run_id)  # also validates run_id as a key part
    sweep = read_json(storage, join_key(prefix, SWEEP))
    status = read_json(storage, join_key(prefix, STATUS))
    summary = read_table(storage, join_key(prefix, SUMMARY))
    names = _organ_names(storage, prefix, sweep, status, summary)
    if not names and sweep is None and status is None:
        raise RunNotFoundError(
            f"no run {run_id!r}: {storage.url(prefix)}/ holds no sweep.json, status.json or "
            "<organ>/result.json; check the run id and the storage (--config's storage.uri)"
        )
    run = Run(run_id, storage, sweep, status, summary)
    rows = {row["organ"]: row for row in summary or []}
    for organ in names:
        run.organs[organ] = _organ_run(storage, prefix, organ, status, rows.get(organ))
    return run


def _organ_names(storage, prefix, sweep, status, summary) -> list[str]:
    """Organs in the order the sweep listed them; a `train` run's, found by listing (only
    then: a sweep's folder also holds every trial's files, slow to list on S3)."""
    names = list((sweep or {}).get("organs", []))
    names += list((status or {}).get("organs", {}))
    names += [row["organ"] for row in summary or []]
    if sweep is None:
        for info in storage.list(prefix):
            parts = info.key[len(prefix) + 1 :].split("/")
            if (parts[-1] == RESULT and len(parts) == 2) or "/".join(parts[1:]) == TRAINING_STATE:
                names.append(parts[0])
    return list(dict.fromkeys(names))  # unique, first order kept


def _organ_run(storage, prefix, organ, status, summary_row) -> OrganRun:
    result = read_json(storage, join_key(prefix, organ, RESULT))
    entry = (status or {}).get("organs", {}).get(organ)
    error = (summary_row or {}).get("error") or (entry or {}).get("error")
    if summary_row and summary_row.get("state") == "failed":
        state = "failed"
    elif result is not None:
        state = "done"
    elif entry is not None:
        state = entry.get("state", "pending")
    else:
        state = "pending"
    training = None
    if result is None and state not in ("failed",):
        training = read_json(storage, join_key(prefix, organ, TRAINING_STATE))
        if training is not None and entry is None:
            state = "training"
    return OrganRun(organ, state, result, entry, summary_row, training, error)
