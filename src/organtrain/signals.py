"""Stop signals that end a command the way Ctrl-C does.

Every long command (prepare, train, sweep, nightly, predict) is resumable and holds its
locks in context managers: a KeyboardInterrupt releases them and the command exits 130,
so running it again continues at once. SIGTERM's default action (SLURM's preemption and
`scancel`, Kubernetes, systemd) would instead kill the process with its locks held, and a
requeued job on another node would find them taken for the lock's stale time.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def interrupt_on(*signums: signal.Signals) -> Iterator[None]:
    """While inside, each of `signums` raises KeyboardInterrupt in the main thread."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {}
    for signum in signums:
        # Outside the main thread (a notebook worker) signals cannot be caught: leave them.
        with contextlib.suppress(ValueError):
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
