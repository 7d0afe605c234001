"""The locks of a run: one per run id, held by a `sweep`, and one per organ of a run,
held by whoever writes that organ's results (a `train`, or a sweep for each organ).

Here rather than in train.py, which imports TensorFlow: `datasets gc` reads these locks to
keep the dataset versions that running runs read.
"""

from __future__ import annotations

from organtrain.storage import Storage, join_key
from organtrain.storage.lock import LockHeld, StorageLock

RUN_LOCKS = "locks/runs"  # outside runs/, so the readers of a run never see them

# A lock's holder rewrites it every 30 s (storage.lock.HEARTBEAT_S); one not rewritten for
# 10 minutes belongs to a process that died on another host (on this host, a dead
# holder's lock is taken over at once).
RUN_LOCK_STALE_S = 600


class RunLocked(LockHeld):
    """Another live `sweep` or `train` is writing this run id (exit code 3)."""


def run_lock(storage: Storage, run_id: str) -> StorageLock:
    """`locks/runs/<run_id>.json`, held by a sweep for its whole run. Outside `runs/`, so
    the readers of a run (report, status) never see it."""
    return StorageLock(
        storage, join_key(RUN_LOCKS, f"{run_id}.json"), what=f"run {run_id}",
        stale_after=RUN_LOCK_STALE_S, error=RunLocked,
    )  # fmt: skip


def organ_lock(storage: Storage, run_id: str, organ: str) -> StorageLock:
    """`locks/runs/<run_id>/<organ>.json`, held by whoever writes runs/<run_id>/<organ>/:
    a `train` of that organ, or a sweep for each organ it searches."""
    return StorageLock(
        storage, join_key(RUN_LOCKS, run_id, f"{organ}.json"),
        what=f"{organ} of run {run_id}", stale_after=RUN_LOCK_STALE_S, error=RunLocked,
    )  # fmt: skip


__all__ = ["RUN_LOCKS", "RUN_LOCK_STALE_S", "RunLocked", "organ_lock", "run_lock"]
