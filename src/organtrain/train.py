"""`organtrain train`: one model for one organ, under MirroredStrategy, resumable.

Everything a trial writes lives under `runs/<run_id>/<organ>/` in the run's storage:

    checkpoint/state.json, checkpoint/epoch-NNNN.keras   while training (see checkpoint.py)
    tensorboard/{train,validation}/                      every epoch (see tensorboard.py)
    model.keras                                           the best epoch's model
    metrics/{metrics,confusion,history,predictions}.parquet   tidy tables (see evaluate.py)
    plots/{learning_curves,confusion_matrix,roc}.png
    result.json                                           written last: the trial is done

The test split is opened once, after training, to evaluate the chosen model.

One writer per run: `train` holds `locks/runs/<run_id>/<organ>.json` while it trains an
organ (one SLURM job per organ of one run is fine); a sweep holds `locks/runs/<run_id>.json`
and the lock of each of its organs. A second writer exits 3 naming the holder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from organtrain import evaluate, plots
from organtrain.augment import augment_in_dataset, build_augmentation, resolve_placement
from organtrain.checkpoint import DurableCheckpoint, TrainingState, load_checkpoint
from organtrain.config import RunConfig
from organtrain.console import notice
from organtrain.data.cache import shard_read_errors
from organtrain.data.dataset import DatasetIndex, load_dataset
from organtrain.data.manifest import parquet_bytes
from organtrain.data.pipeline import (
    InputPlan,
    build_dataset,
    disk_cache_folder,
    node_budget_bytes,
    plan_input,
    return_freed_images_to_the_system,
    shard_files,
)
from organtrain.errors import ConfigError, DataError
from organtrain.metrics import BalancedAccuracy
from organtrain.models import build_model, loss_scaled, precision_policy
from organtrain.runlocks import organ_lock
from organtrain.search.job import trial_prefix
from organtrain.stain import normalization_layer, training_reference
from organtrain.storage import Storage, join_key
from organtrain.strategy import make_strategy
from organtrain.tensorboard import EpochLog, train_log_prefix

log = logging.getLogger(__name__)
RESULT = "result.json"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    organ: str
    model: str
    dataset: str
    dataset_version: str
    classes: list[str]
    replicas: int  # num_replicas_in_sync
    global_batch: int  # per-replica batch × replicas
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    test_accuracy: float
    test_macro_f1: float
    test_images: int
    seconds: float  # wall time of the last (possibly resumed) invocation
    uri: str
    settings: dict  # the configuration that trained it (see trial_settings)
    search: dict | None = None  # for a sweep's chosen trial: which trial, among how many
    test_balanced_accuracy: float = float("nan")  # mean per-class recall (NaN: older runs)
    test_recall: dict[str, float] | None = None  # diagnosis -> its recall on the test split
    class_weights: dict[str, float] | None = None  # diagnosis -> loss weight (class_weight)
    # Where the training images were cached, the shuffle buffer and the memory budget
    # (data.pipeline.InputPlan); a sweep's trials report theirs to Tune (input_cache, ...).
    input_plan: dict | None = None


# Fields that may change between a run and its resumption without changing what is trained:
# more epochs, another machine's replica count, another node's cache folder, where images
# are cached and the memory budget (which changes the batches only where it shrinks the
# shuffle buffer, as the trial's log line says).
_RESUMABLE_CHANGES = {
    ("train", "epochs"), ("train", "cpu_replicas"), ("input", "cache_dir"), ("input", "cache"),
    ("input", "memory_budget_mb"),
}  # fmt: skip


def trial_settings(cfg: RunConfig) -> dict:
    """The configuration a trial's results depend on, recorded with its checkpoints."""
    sections = {"dataset": {"name": cfg.prepare.dataset}}
    for name in ("input", "augment", "model", "train"):
        values = asdict(getattr(cfg, name))
        sections[name] = {k: v for k, v in values.items() if (name, k) not in _RESUMABLE_CHANGES}
    return sections


def require_same_settings(saved: dict, current: dict, where: str) -> None:
    """Re-running a run id with another configuration would silently mix two experiments.

    A setting missing from the saved record was added to organtrain after the run started:
    the run had its default (a new setting's default is the behaviour before it), so a run
    started by an older version resumes unless the new setting is changed."""
    defaults = trial_settings(RunConfig())

    def recorded(section: str, key: str):
        values = saved.get(section, {})
        return values[key] if key in values else defaults.get(section, {}).get(key)

    changed = [
        f"{section}.{key}: {recorded(section, key)!r} -> {value!r}"
        for section, values in current.items()
        for key, value in values.items()
        if recorded(section, key) != value
    ]
    if changed:
        raise ConfigError(
            f"{where} was trained with another configuration ({'; '.join(changed)}); "
            "use a new --run-id, or delete that folder to start it again"
        )


def train_organ(
    cfg: RunConfig,
    storage: Storage,
    organ: str,
    *,
    run_id: str,
    expected_replicas: int | None = None,
    verbose: int = 2,
) -> TrainResult:
    """Train, or resume training, `organ`'s model; evaluate it once on the test split.
    Raises RunLocked while another process writes this organ of this run."""
    with organ_lock(storage, run_id, organ):
        return _train_organ(
            cfg, storage, organ, run_id=run_id, expected_replicas=expected_replicas,
            verbose=verbose,
        )  # fmt: skip


def _train_organ(
    cfg: RunConfig,
    storage: Storage,
    organ: str,
    *,
    run_id: str,
    expected_replicas: int | None,
    verbose: int,
) -> TrainResult:
    started = time.monotonic()
    prefix = trial_prefix(run_id, organ)
    settings = trial_settings(cfg)
    if storage.exists(join_key(prefix, RESULT)):
        result = TrainResult(**json.loads(storage.get_bytes(join_key(prefix, RESULT))))
        require_same_settings(result.settings, settings, storage.url(prefix))
        log.info("%s: already finished in run %s; nothing to do", organ, run_id)
        return result
    state = TrainingState.load(storage, prefix)
    if state is not None:
        require_same_settings(state.settings, settings, storage.url(prefix))
    index = load_dataset(storage, cfg.prepare.dataset, state.dataset_version if state else None)
    classes = index.diagnoses(organ)
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = make_strategy(cfg.train.cpu_replicas, expected_replicas)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.input.batch_size * replicas
    first_epoch = state.epoch if state is not None else 0
    with training_data(cfg, storage, index, organ, global_batch, first_epoch) as data:
        train_ds, val_ds, plan = data
        if state is None:
            monitor = "val_loss" if val_ds is not None else "loss"
            state = TrainingState(index.version, monitor=monitor, settings=settings)
        # A notice, shown without -v: where training starts or resumes is what a user of
        # `train` (and SLURM's requeued jobs, whose logs the preemption tests read) needs.
        notice(
            log,
            "%s: %s on %d replica(s), global batch %d, from epoch %d of %d",
            organ, cfg.model.name, replicas, global_batch, state.epoch + 1, cfg.train.epochs,
        )  # fmt: skip
        # Fitted on the training split for a fresh model; a checkpoint carries its own.
        reference = None if state.latest else training_reference(cfg, storage, index, organ)
        with strategy.scope():
            model = _model(cfg, storage, prefix, state, len(classes), reference)
        if state.epoch < cfg.train.epochs and not state.stopped_early:
            callbacks = [
                DurableCheckpoint(storage, prefix, state, cfg.train.early_stopping_patience),
                # After the checkpoint: an epoch shows in TensorBoard once it is committed.
                EpochLog(storage, train_log_prefix(prefix), state.history),
            ]
            fit(model, cfg, index, organ, global_batch, train_ds, val_ds, state.epoch,
                callbacks, verbose=verbose)  # fmt: skip
    best = load_checkpoint(storage, prefix, state.best)
    return finish(cfg, storage, prefix, run_id, organ, index, classes, best, state,
                   replicas, global_batch, started, input_plan=plan.record())  # fmt: skip


@contextlib.contextmanager
def training_data(
    cfg: RunConfig,
    storage: Storage,
    index: DatasetIndex,
    organ: str,
    global_batch: int,
    first_epoch: int = 0,
    *,
    trials_per_node: int = 1,
) -> Iterator[tuple[Any, Any, InputPlan]]:
    """(train, val, plan) as `datasets` makes them, with a node-local folder for the disk
    cache that is removed when the block ends."""
    return_freed_images_to_the_system()  # else the shuffle buffer's churn grows the heap
    with disk_cache_folder(cfg.input.cache_dir) as folder:
        yield datasets(
            cfg, storage, index, organ, global_batch, first_epoch,
            trials_per_node=trials_per_node, cache_folder=folder, with_plan=True,
        )  # fmt: skip


def input_plan(cfg: RunConfig, index: DatasetIndex, organ: str, trials_per_node: int = 1):
    """Where this trial caches its images and how large its shuffle buffer is, within its
    share of input.memory_budget_mb (see data.pipeline.plan_input)."""
    inp = cfg.input
    return plan_input(
        inp.cache, image_size=inp.image_size, train_images=index.split_size(organ, "train"),
        val_images=index.split_size(organ, "val"), shuffle_buffer=inp.shuffle_buffer,
        budget_bytes=node_budget_bytes(inp.memory_budget_mb), trials_per_node=trials_per_node,
    )  # fmt: skip


def datasets(
    cfg: RunConfig,
    storage: Storage,
    index: DatasetIndex,
    organ: str,
    global_batch: int,
    first_epoch: int = 0,
    *,
    trials_per_node: int = 1,
    cache_folder: Path | None = None,
    with_plan: bool = False,
):
    """(train, val): train streams the batches of epochs first_epoch+1..train.epochs (fit it
    with steps_per_epoch); val is one pass, repeated by Keras after each epoch. With
    `with_plan`, also the InputPlan they follow. The disk cache (input.cache disk, or auto
    over budget) needs `cache_folder`: without one, images are decoded every epoch."""
    inp = cfg.input
    plan = input_plan(cfg, index, organ, trials_per_node)
    if plan.cache == "disk" and cache_folder is None:
        plan = dataclasses.replace(plan, cache="none")
    # A shrunk shuffle buffer is not what the config asked: shown without -v.
    (log.warning if plan.shuffle_shrunk else log.info)("%s: %s", organ, plan.describe())
    augment = None
    if resolve_placement(cfg.augment) == "dataset":
        seed = cfg.train.seed
        first_step = first_epoch * steps_per_epoch(index, organ, global_batch)

        def augment(ds):
            return augment_in_dataset(ds, cfg.augment, seed=seed, first_step=first_step)

    common = dict(image_size=inp.image_size, batch_size=global_batch, cache=plan.cache)
    n = index.split_size(organ, "train")
    if n < global_batch:
        raise DataError(
            f"{organ}: {n} training images cannot fill one global batch of {global_batch}; "
            "lower input.batch_size or add images"
        )
    train = build_dataset(
        shard_files(storage, index, organ, "train", inp.cache_dir), num_images=n, training=True,
        seed=cfg.train.seed, shuffle_buffer=plan.shuffle_buffer, augment=augment,
        first_epoch=first_epoch, epochs=max(cfg.train.epochs - first_epoch, 0),
        cache_file=_cache_file(cache_folder, "train"), **common,
    )  # fmt: skip
    val_files = shard_files(storage, index, organ, "val", inp.cache_dir)
    n = index.split_size(organ, "val")
    val = None
    if val_files:
        val = build_dataset(val_files, num_images=n, training=False,
                            cache_file=_cache_file(cache_folder, "val"), **common)  # fmt: skip
    return (train, val, plan) if with_plan else (train, val)


def _cache_file(folder: Path | None, split: str) -> str | None:
    return str(folder / split) if folder is not None else None


def fit(
    model: keras.Model,
    cfg: RunConfig,
    index: DatasetIndex,
    organ: str,
    global_batch: int,
    train_ds,
    val_ds,
    first_epoch: int,
    callbacks: list,
    *,
    verbose: int,
) -> None:
    """Train from `first_epoch` to cfg.train.epochs, as `train` and a sweep's trial both do:
    one stream of epochs (the pipeline shuffles), dropout reseeded each epoch, and a damaged
    shard named (CorruptShardError), not a bare DataLossError."""
    weights = class_weights(cfg, index, organ)
    if weights:
        shown = ", ".join(f"{name} {weight:.3f}" for name, weight in weights.items())
        log.info("%s: class weights (train.class_weight balanced): %s", organ, shown)
    with shard_read_errors():
        model.fit(
            train_ds,
            validation_data=val_ds,
            class_weight=dict(enumerate(weights.values())) if weights else None,
            epochs=cfg.train.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps_per_epoch(index, organ, global_batch),
            callbacks=[ReseedEachEpoch(cfg.train.seed), *callbacks],
            shuffle=False,
            verbose=verbose,
        )


def class_weights(cfg: RunConfig, index: DatasetIndex, organ: str) -> dict[str, float] | None:
    """Loss weight per diagnosis, in label order; None for `train.class_weight: none`.

    balanced: scikit-learn's n / (k * n_c), n_c the diagnosis's images in the organ's
    training split, n their sum and k the diagnoses that have any: each diagnosis then
    carries the same total weight, and the mean weight per image is 1, so the loss keeps
    its scale. A diagnosis without training images (prepare leaves those out) gets 1.
    """
    if cfg.train.class_weight == "none":
        return None
    counts = index.organs[organ].counts.get("train", {})
    diagnoses = index.diagnoses(organ)
    seen = [counts.get(d, 0) for d in diagnoses if counts.get(d, 0) > 0]
    total, present = sum(seen), len(seen)
    return {d: total / (present * counts[d]) if counts.get(d, 0) else 1.0 for d in diagnoses}


def steps_per_epoch(index: DatasetIndex, organ: str, global_batch: int) -> int:
    """Training batches per epoch: the ragged last batch is dropped."""
    return index.split_size(organ, "train") // global_batch


class ReseedEachEpoch(keras.callbacks.Callback):
    """At each epoch's start, reseed the model's random layers (Dropout; augmentation
    placed in the model) from (seed, epoch, layer position).

    Keras does not save a SeedGenerator's state with the model, so a run resumed from a
    checkpoint would otherwise draw other dropout masks than one that never stopped.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        states = [v for v in self.model.non_trainable_variables if v.name == "seed_generator_state"]
        for position, state in enumerate(states):
            key = np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0]
            state.assign(np.array([key, 0], dtype=state.dtype))


def _model(
    cfg: RunConfig,
    storage: Storage,
    prefix: str,
    state: TrainingState,
    n_classes: int,
    stain_reference: dict | None = None,
):
    """A fresh compiled model, or the last checkpoint (optimizer state included)."""
    if state.latest:
        return load_checkpoint(storage, prefix, state.latest)
    return compiled_model(cfg, n_classes, stain_reference)


def compiled_model(
    cfg: RunConfig, n_classes: int, stain_reference: dict | None = None
) -> keras.Model:
    """A fresh model as `cfg` describes it, compiled with its optimizer. `stain_reference`
    (`stain.training_reference`) is needed when augment.stain_normalization is on."""
    augmentation = None
    if resolve_placement(cfg.augment) == "model":
        augmentation = build_augmentation(cfg.augment, seed=cfg.train.seed)
    precision = precision_policy(cfg.train.mixed_precision)
    model = build_model(
        cfg.model, num_classes=n_classes, image_size=cfg.input.image_size,
        rescale=cfg.augment.rescale, augmentation=augmentation, precision=precision,
        stain_normalization=normalization_layer(
            cfg.augment.stain_normalization, stain_reference),
    )  # fmt: skip
    optimizer = keras.optimizers.get(
        {"class_name": cfg.train.optimizer, "config": {"learning_rate": cfg.train.learning_rate}}
    )
    optimizer = loss_scaled(optimizer, precision)
    # Balanced accuracy each epoch (val_balanced_accuracy): a sweep may select on it.
    metrics = ["accuracy", BalancedAccuracy(n_classes)]
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=metrics)
    return model


def predict_split(
    model: keras.Model,
    storage: Storage,
    index: DatasetIndex,
    organ: str,
    split: str,
    *,
    image_size: int,
    batch_size: int,
    cache_dir: str | None = None,
):
    """(labels, probabilities, sha256s, source keys) of every image of one split."""
    data = build_dataset(
        shard_files(storage, index, organ, split, cache_dir),
        num_images=index.split_size(organ, split), image_size=image_size,
        batch_size=batch_size, training=False, cache="none", with_keys=True,
    )  # fmt: skip
    with shard_read_errors():
        batches = [
            (model.predict_on_batch(images), labels.numpy(), hashes.numpy(), keys.numpy())
            for images, labels, hashes, keys in data
        ]
    y_prob = np.concatenate([b[0] for b in batches])
    y_true = np.concatenate([b[1] for b in batches])
    hashes = [h.decode() for b in batches for h in b[2]]
    keys = [k.decode() for b in batches for k in b[3]]
    return y_true, y_prob, hashes, keys


def finish(
    cfg,
    storage,
    prefix,
    run_id,
    organ,
    index,
    classes,
    model,
    state,
    replicas,
    global_batch,
    started,
    search=None,
    input_plan=None,
):
    """Evaluate the best model on the test split; publish tables, plots, model, result.
    `input_plan` (InputPlan.record()): where the trial cached its images, for result.json."""
    y_true, y_prob, hashes, keys = predict_split(
        model, storage, index, organ, "test", image_size=cfg.input.image_size,
        batch_size=global_batch, cache_dir=cfg.input.cache_dir,
    )  # fmt: skip
    rows = evaluate.evaluate_predictions(y_true, y_prob, classes)
    ident = dict(run_id=run_id, organ=organ, model=cfg.model.name)
    matrix = evaluate.confusion(y_true, y_prob.argmax(axis=1), len(classes))
    out = storage.sub(prefix)
    tables = {
        "metrics": evaluate.metrics_table(rows, split="test", **ident),
        "confusion": evaluate.confusion_table(matrix, classes, split="test", **ident),
        "history": evaluate.history_table(state.history, **ident),
        "predictions": evaluate.predictions_table(
            y_true, y_prob, classes, sha256=hashes, source_keys=keys, split="test", **ident
        ),
    }
    for name, table in tables.items():
        out.put_bytes(f"metrics/{name}.parquet", parquet_bytes(table))
    title = f"{organ} — {cfg.model.name}"
    out.put_bytes(
        "plots/learning_curves.png", plots.learning_curves_png(state.history, title=title)
    )
    out.put_bytes(
        "plots/confusion_matrix.png", plots.confusion_matrix_png(matrix, classes, title=title)
    )
    points = evaluate.roc_points(y_true, y_prob, classes)
    out.put_bytes("plots/roc.png", plots.roc_curves_png(points, title=title))
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp, "model.keras"))
        out.put_file("model.keras", Path(tmp, "model.keras"))
    value = {(r.metric, r.class_name): r.value for r in rows}
    result = TrainResult(
        run_id=run_id, organ=organ, model=cfg.model.name, dataset=index.dataset,
        dataset_version=index.version, classes=list(classes), replicas=replicas,
        global_batch=global_batch, epochs_run=state.epoch, best_epoch=state.best_epoch,
        stopped_early=state.stopped_early, test_accuracy=value[("accuracy", None)],
        test_macro_f1=value[("macro_f1", None)], test_images=len(y_true),
        seconds=time.monotonic() - started, uri=storage.url(prefix), settings=state.settings,
        search=search, test_balanced_accuracy=value[("balanced_accuracy", None)],
        test_recall={c: value[("recall", c)] for c in classes},
        class_weights=class_weights(cfg, index, organ), input_plan=input_plan,
    )  # fmt: skip
    out.put_bytes(RESULT, json.dumps(asdict(result), indent=2).encode())  # the trial is done
    log.info("%s: test accuracy %.3f, macro F1 %.3f (%d images)", organ,
             result.test_accuracy, result.test_macro_f1, result.test_images)  # fmt: skip
    return result
