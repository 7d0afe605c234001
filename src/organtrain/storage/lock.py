"""One writer at a time: a lock object in storage, created exclusively, with a heartbeat.

Used by the nightly (one night), `prepare` (one dataset) and `sweep`/`train` (one run id).
The lock is an object created with `put_if_absent` (a conditional PUT on S3, `link(2)` on
a local folder), so exactly one of any number of racing processes gets it, on one machine
or many. While held it is rewritten every `HEARTBEAT_S` seconds.

A lock left by a holder that died is taken over: on the same host as soon as its process
is gone, from anywhere once it has not been refreshed for `stale_after` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

from organtrain.errors import ObjectNotFoundError, OrgantrainError
from organtrain.storage.base import Storage

log = logging.getLogger(__name__)

HEARTBEAT_S = 30


class LockHeld(OrgantrainError):
    """Another live process holds the lock; exit code 3 tells a scheduler "not now"."""

    exit_code = 3


class StorageLock:
    """Hold `key` in `storage` for the duration of a `with` block.

    `what` names the thing locked in messages ("the nightly for nightly-2026-03-05",
    "dataset lab-cells"); `error` is the `LockHeld` subclass raised when it is taken.
    """

    def __init__(
        self,
        storage: Storage,
        key: str,
        *,
        what: str,
        stale_after: float,
        error: type[LockHeld] = LockHeld,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        self.storage, self.key, self.what = storage, key, what
        self.stale_after, self.error, self.heartbeat_s = stale_after, error, heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({
            "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
            "heartbeat": time.time(),
        }).encode()  # fmt: skip

    def __enter__(self):
        if not self.storage.put_if_absent(self.key, self._record()):
            holder = self.holder()
            if holder is not None and not self._stale(holder):
                raise self.error(
                    f"{self.what} is locked by another process (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, lock {self.storage.url(self.key)}); this one "
                    "exits. If that process is gone, the lock is taken over after "
                    f"{self.stale_after:g} s without a heartbeat"
                )
            log.warning("taking over the lock on %s: its holder stopped (%s)", self.what, holder)
            self.storage.delete(self.key)
            if not self.storage.put_if_absent(self.key, self._record()):
                raise self.error(
                    f"another process took the lock on {self.what} just now "
                    f"({self.storage.url(self.key)}); this one exits"
                )
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lock-heartbeat")
        self._thread.start()
        return self

    def holder(self) -> dict | None:
        """The record of whoever holds the lock, or None when it is free or unreadable."""
        try:
            return json.loads(self.storage.get_bytes(self.key))
        except (ObjectNotFoundError, ValueError):
            return None

    def live_holder(self) -> dict | None:
        """The holder's record while a live process holds the lock; None when it is free,
        unreadable, or left by a holder that stopped (it would be taken over)."""
        holder = self.holder()
        return holder if holder is not None and not self._stale(holder) else None

    def _stale(self, holder: dict) -> bool:
        if time.time() - holder.get("heartbeat", 0) > self.stale_after:
            return True
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, someone else's
                return False
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OrgantrainError):
                self.storage.put_bytes(self.key, self._record())

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OrgantrainError):
            self.storage.delete(self.key)
