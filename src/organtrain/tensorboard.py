"""TensorBoard logs of every epoch, kept in the run's storage, numbered as the tables.

Where they are, for `organtrain train` and for each trial of a sweep:

    runs/<run_id>/<organ>/tensorboard/{train,validation}/events.out.tfevents.*
    runs/<run_id>/<organ>/tensorboard/<trial_id>/{train,validation}/events.out.tfevents.*

Scalars are tagged as Keras' own TensorBoard callback tags them (`epoch_loss`,
`epoch_accuracy`, ...: training under train/, the `val_` figures under validation/), but
step k is epoch k as `metrics/history.parquet` and a trial's `epoch` number it, counted
from 1 (Keras counts from 0).

TensorFlow 2.21 writes summaries only to local paths (s3:// needs tensorflow-io, which has
no build for it), so the event files are written in a local temporary folder, flushed at
the end of each epoch and published to the storage at once, each upload atomic like every
object. An epoch is published before anything else happens at its end (a sweep's trial
reports to Tune after it: Tune may end the trial's thread inside that report).

A run resumed in a new process (after a kill, on another node) starts a new event file
with the epochs already done written again from the saved training history, and deletes
the earlier process's files once its own is published: one file per folder holds every
epoch once, never an epoch twice. `download_logs` copies a run's logs to a local folder,
for a stock `tensorboard --logdir` when the storage is S3.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import keras

from organtrain.storage import Storage, join_key

FOLDER = "tensorboard"
_VAL = "val_"


def train_log_prefix(organ_prefix: str) -> str:
    """The logs of `organtrain train`: runs/<run_id>/<organ>/tensorboard."""
    return join_key(organ_prefix, FOLDER)


def trial_log_prefix(organ_prefix: str, trial_id: str) -> str:
    """The logs of one trial of a sweep: runs/<run_id>/<organ>/tensorboard/<trial_id>."""
    return join_key(organ_prefix, FOLDER, trial_id)


def split_and_tag(metric: str) -> tuple[str, str]:
    """("validation", "epoch_loss") for val_loss, ("train", "epoch_loss") for loss."""
    if metric.startswith(_VAL):
        return "validation", f"epoch_{metric[len(_VAL) :]}"
    return "train", f"epoch_{metric}"


class EpochLog(keras.callbacks.Callback):
    """Writes every epoch's Keras logs as TensorBoard scalars and publishes them.

    `done`: the training history of the epochs finished before this fit (TrainingState
    .history: metric -> one value per epoch), written again first so that this process's
    event file holds every epoch.
    """

    def __init__(self, storage: Storage, prefix: str, done: Mapping[str, Sequence[float]]):
        super().__init__()
        self.storage, self.prefix = storage.sub(prefix), prefix
        self.done = {name: list(values) for name, values in done.items()}
        self.folder = Path(tempfile.mkdtemp(prefix="organtrain-tensorboard-"))
        # Removed when training ends, or when the callback is dropped (a sweep's trial
        # stopped by Tune never sees on_train_end).
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        self.writers: dict = {}
        self.published: set[str] = set()

    def on_train_begin(self, logs=None) -> None:
        epochs = max((len(v) for v in self.done.values()), default=0)
        if epochs:
            for epoch in range(epochs):
                values = {m: v[epoch] for m, v in self.done.items() if epoch < len(v)}
                self._write(epoch + 1, values)
            self._publish()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self._write(epoch + 1, logs or {})
        self._publish()

    def on_train_end(self, logs=None) -> None:
        for writer in self.writers.values():
            writer.close()
        self._publish()
        self.writers.clear()
        self._cleanup()

    def _write(self, step: int, values: Mapping[str, float]) -> None:
        import tensorflow as tf

        for metric, value in values.items():
            split, tag = split_and_tag(metric)
            if split not in self.writers:
                self.writers[split] = tf.summary.create_file_writer(str(self.folder / split))
            with self.writers[split].as_default():
                tf.summary.scalar(tag, float(value), step=step)

    def _publish(self) -> None:
        """Upload this process's event files; then delete the ones of earlier processes
        (their epochs are in this file too)."""
        for writer in self.writers.values():
            writer.flush()
        ours = set()
        for path in sorted(self.folder.rglob("*tfevents*")):
            key = path.relative_to(self.folder).as_posix()
            self.storage.put_file(key, path)
            ours.add(key)
        if ours - self.published:  # the first publication of a file: older ones go
            for split in {key.split("/")[0] for key in ours}:
                for info in list(self.storage.list(split)):
                    if info.key not in ours and "tfevents" in info.key.rsplit("/", 1)[-1]:
                        self.storage.delete(info.key)
        self.published |= ours


def download_logs(storage: Storage, run_id: str, out: str | Path) -> list[Path]:
    """Copy every TensorBoard event file of run `run_id` to the local folder `out`
    (<out>/<organ>/tensorboard/...); files a resumed run replaced are removed there too.
    Returns the event files now in `out`."""
    prefix = join_key("runs", run_id)
    out = Path(out)
    wanted = {}
    for info in storage.list(prefix):
        relative = info.key[len(prefix) + 1 :]
        parts = relative.split("/")
        if FOLDER in parts[1:-1] and "tfevents" in parts[-1]:
            wanted[relative] = info
    for relative, info in wanted.items():
        target = out / relative
        if not target.exists() or target.stat().st_size != info.size:
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download(info.key, target)
    if out.exists():
        for stale in out.rglob("*tfevents*"):
            if stale.relative_to(out).as_posix() not in wanted:
                stale.unlink()
    return sorted(out / relative for relative in wanted)
