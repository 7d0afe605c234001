"""prepare's per-batch work (data/work.py) and its thread executor (data/executors.py);
the Ray executor runs the same functions in tests/test_prepare_cluster.py."""

from __future__ import annotations

import threading

import pytest

from organtrain.data import work
from organtrain.data.executors import Reachable, Threads
from organtrain.errors import DataError
from organtrain.storage import LocalStorage


def test_batches_keep_order_and_size_to_the_workers():
    items = list(range(100))
    made = work.batches(items, workers=2)
    assert [x for batch in made for x in batch] == items
    assert len(made) == 8  # 4 per worker: the progress bar moves, the last ones are shared
    assert max(len(b) for b in work.batches(list(range(10_000)), 2)) == work.MAX_BATCH
    assert work.batches([], 4) == []


def _fails_on_three(storage: LocalStorage, started: threading.Event, batch: list[int]):
    assert isinstance(storage, LocalStorage)  # a Reachable arrives as its storage
    if batch == [3]:
        started.wait(5)  # the others have begun: they finish and are delivered
        raise DataError("batch 3 names its file")
    started.set()
    return sum(batch)


def test_a_failed_batch_raises_its_error_after_the_running_ones_are_delivered(tmp_path):
    delivered = {}
    shared = (Reachable(LocalStorage(tmp_path), "source"), threading.Event())
    batches = [[0], [1], [2], [3]]
    with pytest.raises(DataError, match="batch 3 names its file"):
        Threads(4).run(_fails_on_three, shared, batches, delivered.__setitem__)
    assert delivered == {0: 0, 1: 1, 2: 2}  # by batch index, whatever order they finished
