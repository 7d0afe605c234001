"""Durable training state: a checkpoint every epoch, in storage, and early stopping.

After each epoch the model (with its optimizer state) is published as
`checkpoint/epoch-NNNN.keras`, then `checkpoint/state.json` — the one commit point —
names it, the best epoch so far and the history. A trainer killed at any moment restarts
from the last state.json: at most the epoch in flight is redone, never the whole run.

Early stopping lives here rather than in keras.callbacks.EarlyStopping because its
patience counter and best value must survive a restart, and Keras resets them on every
`fit`.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras

from organtrain.storage import Storage, join_key

STATE = "checkpoint/state.json"


@dataclass
class TrainingState:
    dataset_version: str
    monitor: str  # val_loss, or loss when there is no validation split
    epoch: int = 0  # epochs finished
    history: dict[str, list[float]] = field(default_factory=dict)  # Keras logs per epoch
    latest: str | None = None  # checkpoint key of the last finished epoch
    best: str | None = None  # checkpoint key of the epoch with the lowest monitored value
    best_epoch: int = 0
    best_value: float = math.inf
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    settings: dict = field(default_factory=dict)  # train.trial_settings of the run
    started: float | None = None  # wall-clock time training first started (time.time())
    starts: list[int] = field(default_factory=list)  # epochs done at each (re)start

    def end_epoch(self, epoch: int, logs: dict, checkpoint_key: str, patience: int) -> set[str]:
        """Record a finished epoch saved as `checkpoint_key`; returns the checkpoint keys
        no longer needed (neither latest nor best). Sets stopped_early on patience."""
        self.epoch = epoch + 1
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        stale = {self.latest, self.best}
        self.latest = checkpoint_key
        value = float(logs.get(self.monitor, math.inf))
        if value < self.best_value:
            self.best, self.best_epoch, self.best_value = checkpoint_key, self.epoch, value
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if patience and self.epochs_without_improvement >= patience:
            self.stopped_early = True
        return stale - {self.latest, self.best, None}

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def load(cls, storage: Storage, prefix: str) -> TrainingState | None:
        key = join_key(prefix, STATE)
        return cls(**json.loads(storage.get_bytes(key))) if storage.exists(key) else None


class DurableCheckpoint(keras.callbacks.Callback):
    """Publishes a checkpoint and the state after every epoch; stops early on patience."""

    def __init__(self, storage: Storage, prefix: str, state: TrainingState, patience: int):
        super().__init__()
        self.storage, self.prefix, self.state, self.patience = storage, prefix, state, patience

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        key = join_key("checkpoint", f"epoch-{epoch + 1:04d}.keras")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "model.keras")
            self.model.save(path)
            self.storage.sub(self.prefix).put_file(key, path)
        stale = self.state.end_epoch(epoch, logs or {}, key, self.patience)
        self.model.stop_training = self.state.stopped_early
        self.storage.put_bytes(join_key(self.prefix, STATE), self.state.to_json())  # the commit
        for old in stale:
            self.storage.delete(join_key(self.prefix, old))


def load_checkpoint(storage: Storage, prefix: str, key: str) -> keras.Model:
    """A model saved by DurableCheckpoint, optimizer state included."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.keras")
        storage.download(join_key(prefix, key), path)
        return keras.models.load_model(path)
