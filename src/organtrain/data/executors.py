"""Where `prepare`'s per-batch work (work.py) runs: threads here, or Ray tasks on a cluster.

Both executors take the same function, the arguments every batch shares and the batches,
and call `on_result(batch_index, result)` on the caller's thread as each batch finishes.
When a batch fails, the batches not started are cancelled, the ones running are waited
for (their results are still delivered: a shard they uploaded is known to the caller,
which removes it if the version is not published), and the first error is raised.

On Ray, every batch is one task of one CPU, spread over the cluster's nodes; at most a
few tasks per CPU are in flight, so the object store holds only those tasks' results.
Storage is opened again on the node from its URI (credentials come from the node's own
chain, never with the task), and a local folder must be there on the node: a task
that cannot find it fails naming the folder and the node.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from organtrain.errors import DataError, ObjectNotFoundError, OrgantrainError
from organtrain.storage import LocalStorage, Storage, open_storage, reopen_args

log = logging.getLogger(__name__)

TASKS_PER_CPU = 2  # Ray tasks in flight per cluster CPU: each node has its next one queued
SETTLE_S = 120  # after a failure, how long running tasks are waited for


@dataclass(frozen=True)
class Reachable:
    """Storage a batch works on: `role` names it in messages ("source", "destination");
    `holds` is a key the driver wrote there, which a node must see too (a node's own
    folder at the same path is not the driver's)."""

    storage: Storage
    role: str
    holds: str | None = None


OnResult = Callable[[int, Any], None]


class Threads:
    """The work in `workers` threads of this process."""

    shares_disk = True  # the batches run where the caller's local files are
    nodes: Counter  # tasks run per Ray node: none here

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.nodes = Counter()

    def cpus(self) -> int:
        return self.workers

    def run(
        self, fn: Callable, shared: tuple, batches: Sequence, on_result: OnResult,
        at_most: int | None = None,
    ) -> None:  # fmt: skip
        """`at_most`: threads at once, when fewer than `workers` suit the work."""
        args = tuple(s.storage if isinstance(s, Reachable) else s for s in shared)
        error = None
        with ThreadPoolExecutor(min(self.workers, at_most or self.workers)) as pool:
            futures = {pool.submit(fn, *args, batch): i for i, batch in enumerate(batches)}
            try:
                for future in _as_finished(futures):
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        error = error or future.exception()
                        for other in futures:  # a full disk fails every batch after it
                            other.cancel()
                        continue
                    on_result(futures[future], future.result())
            except BaseException:  # Ctrl-C: start nothing more
                for other in futures:
                    other.cancel()
                raise
        if error is not None:
            raise error


def _as_finished(futures):
    """Futures as they finish (concurrent.futures.as_completed without its snapshot, so
    ones cancelled after a failure come out at once)."""
    left = set(futures)
    while left:
        done, left = wait(left, return_when="FIRST_COMPLETED")
        yield from done


class RayTasks:
    """The work as Ray tasks on the cluster this process is connected to (ray.init)."""

    shares_disk = False  # a task may run on another machine: it gets what it needs

    def __init__(self):
        import ray

        self.nodes = Counter()  # tasks run per Ray node id
        self.cpu_count = max(1, int(ray.cluster_resources().get("CPU", 1)))
        alive = [n for n in ray.nodes() if n.get("Alive")]
        log.info("prepare's tasks run on the Ray cluster: %d node(s), %d CPU(s)", len(alive),
                 self.cpu_count)  # fmt: skip

    def cpus(self) -> int:
        return self.cpu_count

    def run(
        self, fn: Callable, shared: tuple, batches: Sequence, on_result: OnResult,
        at_most: int | None = None,
    ) -> None:  # fmt: skip
        """`at_most` is for threads on one machine; a cluster runs a task per CPU."""
        import ray

        # A task lost with its node runs again elsewhere (a shard upload is idempotent).
        task = ray.remote(_on_node).options(num_cpus=1, scheduling_strategy="SPREAD", max_retries=3)
        shared_ref = ray.put(tuple(_Reopen.of(s) if isinstance(s, Reachable) else s
                                   for s in shared))  # fmt: skip
        pending = iter(range(len(batches)))
        left = len(batches)  # not submitted yet
        running: dict = {}  # task's result ref -> batch index
        error = None
        try:
            while (left and error is None) or running:
                while left and error is None and len(running) < TASKS_PER_CPU * self.cpu_count:
                    i = next(pending)
                    left -= 1
                    # Made only now (a lazy sequence): a shard's images are read when its
                    # task is sent, so the driver holds those of the tasks in flight only.
                    running[task.remote(fn, shared_ref, batches[i])] = i
                timeout = SETTLE_S if error is not None else None
                done, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
                if not done:  # failed already; a task that does not settle is left to Ray
                    for ref in running:
                        ray.cancel(ref)
                    break
                i = running.pop(done[0])
                try:
                    node, result = ray.get(done[0])
                except ray.exceptions.RayTaskError as err:
                    error = error or _cause(err)
                    continue
                self.nodes[node] += 1
                on_result(i, result)
        except BaseException:  # Ctrl-C or a failed on_result: start and finish nothing more
            for ref in running:
                ray.cancel(ref)
            raise
        if error is not None:
            raise error


def _cause(err) -> BaseException:
    """A task's own error when it is organtrain's (it names the file and what to do), else
    Ray's, with the node's traceback."""
    return err.cause if isinstance(err.cause, OrgantrainError) else err


def _on_node(fn: Callable, shared: tuple, batch) -> tuple[str, Any]:
    """Run one batch on this node: (this node's id, the batch's result)."""
    import ray

    args = tuple(s.open() if isinstance(s, _Reopen) else s for s in shared)
    try:
        result = fn(*args, batch)
    except ObjectNotFoundError as err:
        local = [s for s in shared if isinstance(s, _Reopen) and s.folder]
        if not local:
            raise
        raise ObjectNotFoundError(f"{err} (on Ray node {_node_name()}; {_SHARED_ADVICE})") from None
    return ray.get_runtime_context().get_node_id(), result


_SHARED_ADVICE = (
    "with --address, prepare's tasks read the source and write the shards on the cluster's "
    "nodes, so both must be storage every node reaches: a shared folder mounted at the same "
    "path on every node, or s3://"
)


def _node_name() -> str:
    import ray

    return f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]})"


@dataclass(frozen=True)
class _Reopen:
    """A Reachable as it travels to a task: how to open the storage there."""

    args: dict  # open_storage's
    role: str
    holds: str | None
    folder: str | None  # a local folder's path, checked on the node

    @classmethod
    def of(cls, r: Reachable) -> _Reopen:
        folder = str(r.storage.root) if isinstance(r.storage, LocalStorage) else None
        return cls(reopen_args(r.storage), r.role, r.holds, folder)

    def open(self) -> Storage:
        storage = open_storage(**self.args)
        if self.folder is None:
            return storage
        if not Path(self.folder).is_dir():
            raise DataError(
                f"the {self.role} folder {self.folder} does not exist on Ray node "
                f"{_node_name()}: {_SHARED_ADVICE}"
            )
        if self.holds and not storage.exists(self.holds):
            raise DataError(
                f"the {self.role} folder {self.folder} on Ray node {_node_name()} is not the "
                f"one this prepare writes to ({self.holds}, written there by this prepare, "
                f"is missing): {_SHARED_ADVICE}"
            )
        return storage
