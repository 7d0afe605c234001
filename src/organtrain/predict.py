"""`organtrain predict`: classify new images with an organ's model.

    source (folder, s3:// prefix, or a list of keys in one)
       │  plan: each key → its organ's model (champion, a registry version, or a run's);
       │        keys in fixed-size chunks; written once to <out>/parts/plan.json
       ▼
    chunks, in this process or on Ray actors (GPU actors when the cluster has GPUs)
       │  read → decode_rgb (prepare's checks and downscale) → crop_and_resize (the
       │  training pipeline's) → model → <out>/parts/chunk-NNNNN.parquet, one per chunk
       ▼
    <out>/predictions.parquet   key, organ, model_version, predicted_class, confidence,
                                p_<diagnosis> per diagnosis (null for other organs')
    <out>/rejected.parquet      key, organ, reason, detail: files that could not be read
    <out>/summary.json          written last: the prediction is complete

Resumable: a run killed anywhere is continued by running the same command again; chunks
whose part is there are not redone, and the plan pins the model versions it started
with, so a champion promoted in between does not mix two models into one table.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from organtrain.data.images import SUPPORTED_EXTENSIONS, ImageRejected, decode_rgb
from organtrain.errors import ConfigError, DataError, ObjectNotFoundError, OrgantrainError
from organtrain.storage import Storage, join_key, open_storage, reopen_args
from organtrain.storage.lock import LockHeld, StorageLock

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.parquet"
REJECTED = "rejected.parquet"
SUMMARY = "summary.json"
PARTS = "parts"
PLAN = "parts/plan.json"
LOCK = "parts/predict.lock"
CHUNK_IMAGES = 256  # images per chunk: the unit of resumption and of work on a Ray actor
BATCH_IMAGES = 64  # images per model call
READ_THREADS = 8  # reading and decoding overlap with the model (Pillow releases the GIL)
RAY_ABOVE = 5000  # with no --address or --workers, more images than this go to a local Ray

PART_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("organ", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("predicted_class", pa.string()),  # null: rejected
        pa.field("confidence", pa.float64()),
        pa.field("probabilities", pa.list_(pa.float64())),  # in the model's class order
        pa.field("reason", pa.string()),  # null: classified
        pa.field("detail", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("organ", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)


class PredictionInProgress(LockHeld):
    """Another `organtrain predict` is writing to the same --out."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model classifies an organ's images, and how its training images were made."""

    organ: str
    version: str  # a registry version, or "run:<run_id>" for a run's model
    classes: list[str]  # label i is classes[i]
    model_key: str  # model.keras, in the models storage
    image_size: int  # model input, square
    max_image_side: int  # prepare's downscale of the training images (0: none)
    encoding: str  # png or jpeg: the shards' encoding, which the model saw
    jpeg_quality: int = 95


@dataclass(frozen=True)
class Chunk:
    index: int
    organ: str
    keys: list[str]

    @property
    def part_key(self) -> str:
        return join_key(PARTS, f"chunk-{self.index:05d}.parquet")


@dataclass
class PredictOutcome:
    out: str  # where the tables are
    images: int
    classified: int
    rejected: int
    models: dict[str, str]  # organ -> model version
    predicted: dict[str, dict[str, int]]  # organ -> predicted class -> images
    rejected_reasons: dict[str, int]
    chunks: int
    chunks_reused: int  # finished by an earlier, interrupted run: not redone
    seconds: float
    images_per_s: float
    workers: int  # Ray actors; 0: in this process
    already_done: bool = False
    notes: list[str] = field(default_factory=list)


# --- Choosing the model ----------------------------------------------------------------


def resolve_model(
    storage: Storage, organ: str, *, version: str | None = None, run: str | None = None
) -> ModelSpec:
    """The model for `organ`: a run's (`run`), a registry version, else the champion."""
    from organtrain import registry

    if run is not None and version is not None:
        raise ConfigError("give a model version or a run, not both")
    if run is not None:
        return _run_model(storage, organ, run)
    if version is None:
        champion = registry.champion(storage, organ)
        if champion is None:
            known = ", ".join(registry.organs(storage)) or "none"
            raise ConfigError(
                f"{organ!r} has no champion model in {storage.uri} (organs with models: "
                f"{known}); register and promote one (`organtrain models register RUN "
                f"{organ}`, `organtrain models promote {organ} VERSION`), or give --run RUN"
            )
        version = champion.version
    entry = registry.get_version(storage, organ, version)
    pre = entry.preprocessing or _dataset_preprocessing(
        storage, entry.dataset, entry.dataset_version, f"model {organ} {version}"
    )
    return ModelSpec(
        organ=organ,
        version=version,
        classes=list(entry.classes),
        model_key=registry.model_key(organ, version),
        image_size=int(entry.settings["input"]["image_size"]),
        **pre,
    )


def _run_model(storage: Storage, organ: str, run: str) -> ModelSpec:
    prefix = join_key("runs", run, organ)
    try:
        result = json.loads(storage.get_bytes(join_key(prefix, "result.json")))
    except ObjectNotFoundError:
        raise ConfigError(
            f"{storage.url(prefix)} has no finished model (no result.json): is {run!r} a "
            f"finished run that trained {organ!r}? `organtrain status {run}` shows it"
        ) from None
    pre = _dataset_preprocessing(
        storage, result["dataset"], result["dataset_version"], f"run {run} {organ}"
    )
    return ModelSpec(
        organ=organ,
        version=f"run:{run}",
        classes=list(result["classes"]),
        model_key=join_key(prefix, "model.keras"),
        image_size=int(result["settings"]["input"]["image_size"]),
        **pre,
    )


def _dataset_preprocessing(storage: Storage, dataset: str, version: str, what: str) -> dict:
    """How `prepare` made the training images: the same must be done to new ones."""
    from organtrain.data.dataset import load_dataset

    try:
        settings = load_dataset(storage, dataset, version).settings
    except DataError as err:
        raise DataError(
            f"{what} was trained on dataset {dataset} version {version}, whose settings say "
            f"how to prepare new images, but it cannot be read: {err}"
        ) from None
    return preprocessing(settings)


def preprocessing(dataset_settings: dict) -> dict:
    """The fields of a dataset's settings that decide what a training image looks like."""
    return {
        "max_image_side": int(dataset_settings["max_image_side"]),
        "encoding": dataset_settings["encoding"],
        "jpeg_quality": int(dataset_settings.get("jpeg_quality", 95)),
    }


# --- Images → model input ----------------------------------------------------------------


def model_pixels(data: bytes, spec: ModelSpec) -> np.ndarray:
    """uint8 (H, W, 3): what the training shards decode to for the same file, so the
    model sees new images as it saw its training images. Raises ImageRejected."""
    rgb, _ = decode_rgb(data, max_side=spec.max_image_side)
    if spec.encoding == "png":
        return np.asarray(rgb)  # PNG is lossless: decoding the shard gives these pixels
    import tensorflow as tf

    # JPEG shards: the model saw the compression artefacts, decoded by TensorFlow.
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=spec.jpeg_quality)
    return tf.io.decode_image(out.getvalue(), channels=3, expand_animations=False).numpy()


def load_keras_model(storage: Storage, spec: ModelSpec):
    """The Keras model of `spec`, from the models storage (organtrain's layers registered)."""
    import keras

    # Imported for their side effect: they register organtrain's layers with Keras.
    import organtrain.augment  # RandomAffine, RandomBrightnessScale
    import organtrain.models  # noqa: F401  ApplicationPreprocess

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.keras")
        storage.download(spec.model_key, path)
        return keras.saving.load_model(path, compile=False)


class ChunkClassifier:
    """Classifies chunks; keeps each organ's model loaded between chunks."""

    def __init__(self, models: Storage, source: Storage, batch_images: int = BATCH_IMAGES):
        self.models, self.source, self.batch_images = models, source, batch_images
        self._loaded: dict[tuple[str, str], object] = {}

    def classify(self, chunk: Chunk, spec: ModelSpec) -> pa.Table:
        """PART_SCHEMA rows for every key of the chunk, classified or rejected."""
        model = self._model(spec)
        rejected: list[dict] = []
        good_keys: list[str] = []
        pixels = self._decoded(chunk.keys, spec, good_keys, rejected)
        probs = _run_model_on(model, pixels, spec.image_size, self.batch_images)
        rows = [
            {
                "key": k,
                "organ": spec.organ,
                "model_version": spec.version,
                "predicted_class": spec.classes[int(p.argmax())],
                "confidence": float(p.max()),
                "probabilities": [float(v) for v in p],
                "reason": None,
                "detail": None,
            }
            for k, p in zip(good_keys, probs, strict=True)
        ]
        rows += [
            {
                "key": k,
                "organ": spec.organ,
                "model_version": spec.version,
                "predicted_class": None,
                "confidence": None,
                "probabilities": None,
                "reason": reason,
                "detail": detail,
            }
            for k, reason, detail in rejected
        ]
        return pa.Table.from_pylist(rows, schema=PART_SCHEMA)

    def _model(self, spec: ModelSpec):
        which = (spec.organ, spec.version)  # versions are per organ: "tiny" of lung and colon
        if which not in self._loaded:
            self._loaded[which] = load_keras_model(self.models, spec)
        return self._loaded[which]

    def _decoded(self, keys, spec, good_keys: list, rejected: list) -> Iterable[np.ndarray]:
        """Decoded images (H, W, 3) in key order, read and decoded in parallel threads while
        the model runs; the keys that decoded are appended to `good_keys` as they are
        yielded, the others to `rejected`."""

        def load(key: str):
            if not key.lower().endswith(SUPPORTED_EXTENSIONS):
                return key, ImageRejected(
                    "unsupported_extension",
                    f"not one of {', '.join(SUPPORTED_EXTENSIONS)}; convert it or leave it out",
                )
            try:
                pixels = model_pixels(self.source.get_bytes(key), spec)
            except ImageRejected as err:
                return key, err
            except OrgantrainError as err:  # vanished, or storage refused it
                return key, ImageRejected("unreadable", str(err))
            return key, pixels

        with ThreadPoolExecutor(READ_THREADS) as pool:
            for key, outcome in pool.map(load, keys):
                if isinstance(outcome, ImageRejected):
                    rejected.append((key, outcome.reason, outcome.detail))
                else:
                    good_keys.append(key)
                    yield outcome


_traced: dict[int, Callable] = {}
_tracing = threading.Lock()


def _model_inputs(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) of one size -> float32 (N, S, S, 3): the training pipeline's
    crop_and_resize on each image, in one call per batch (a call per image cost more than
    the decoding). Traced once per image_size, under a lock: the first batches of several
    threads would otherwise each trace it."""
    import tensorflow as tf

    from organtrain.data.pipeline import crop_and_resize

    with _tracing:
        if image_size not in _traced:
            one = functools.partial(crop_and_resize, image_size=image_size)
            spec = tf.TensorSpec((image_size, image_size, 3), tf.float32)

            def each(batch):
                return tf.map_fn(one, batch, fn_output_signature=spec)

            traced = tf.function(each, autograph=False)
            _traced[image_size] = traced.get_concrete_function(
                tf.TensorSpec((None, None, None, 3), tf.uint8)
            )
    return _traced[image_size](tf.constant(images)).numpy()


def _run_model_on(model, images: Iterable[np.ndarray], image_size: int, batch: int) -> np.ndarray:
    """Softmax outputs (n, k) of decoded images of any sizes, up to `batch` at a time:
    consecutive images of one size go through crop/resize and the model together."""
    out, pending = [], []

    def flush():
        inputs = _model_inputs(np.stack(pending), image_size)
        out.append(_predict_full_batch(model, inputs, batch))
        pending.clear()

    for image in images:
        if pending and (len(pending) == batch or image.shape != pending[0].shape):
            flush()
        pending.append(image)
    if pending:
        flush()
    k = int(model.output_shape[-1])
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


def _predict_full_batch(model, images: np.ndarray, batch: int) -> np.ndarray:
    """Softmax outputs of a batch, padded to `batch` rows: one shape, so Keras traces its
    predict function once rather than again for every chunk's ragged last batch."""
    n = images.shape[0]
    if n < batch:
        images = np.concatenate([images, np.zeros((batch - n, *images.shape[1:]), images.dtype)])
    return np.asarray(model.predict_on_batch(images))[:n]


# --- Planning --------------------------------------------------------------------------


def list_images(source: Storage) -> list[str]:
    """Every file under the source (hidden files left out), sorted."""
    return [
        info.key
        for info in source.list("")
        if not any(part.startswith(".") for part in info.key.split("/"))
    ]


def _organ_of(keys: Sequence[str], organ: str | None) -> dict[str, list[str]]:
    if organ is not None:
        return {organ: list(keys)}
    by_organ: dict[str, list[str]] = {}
    for key in keys:
        first, sep, _ = key.partition("/")
        if not sep:
            raise ConfigError(
                f"{key!r} is not under an <organ>/ folder: give --organ ORGAN to classify a "
                "folder of one organ's images, or point at a tree of <organ>/... folders"
            )
        by_organ.setdefault(first, []).append(key)
    return by_organ


def _chunks(by_organ: dict[str, list[str]], chunk_images: int) -> list[Chunk]:
    chunks = []
    for organ, keys in sorted(by_organ.items()):
        for start in range(0, len(keys), chunk_images):
            chunks.append(Chunk(len(chunks), organ, keys[start : start + chunk_images]))
    return chunks


def _plan(out: Storage, request: dict, make) -> dict:
    """The plan stored by an earlier, interrupted run of the same request, or a new one."""
    try:
        stored = json.loads(out.get_bytes(PLAN))
    except ObjectNotFoundError:
        plan = make()
        out.put_bytes(PLAN, json.dumps(plan).encode())
        return plan
    if stored["request"] != request:
        raise ConfigError(
            f"{out.uri} holds an unfinished prediction of another request "
            f"({stored['request']}); use another --out, or delete {out.url(PARTS)} to drop it"
        )
    return stored


# --- The whole prediction ----------------------------------------------------------------


def predict(
    source: str | Storage,
    out: str | Storage,
    *,
    models: str | Storage,
    organ: str | None = None,
    version: str | None = None,
    run: str | None = None,
    keys: Sequence[str] | None = None,
    chunk_images: int = CHUNK_IMAGES,
    batch_images: int = BATCH_IMAGES,
    workers: int | None = None,
    address: str | None = None,
    ray_cfg=None,
    progress: bool = False,
    on_chunk: Callable[[Chunk], None] | None = None,
) -> PredictOutcome:
    """Classify every image under `source` (or its `keys`) into `out`; see the module doc.

    `models` is the storage holding the registry and runs. `organ` classifies every key
    with that organ's model; without it each key's first folder names its organ. Ray is
    used when `address` or `workers` is given, or for more than RAY_ABOVE images.
    `on_chunk` is called after each chunk's part is written.
    """
    started = time.monotonic()
    source, out, models = (_open(s) for s in (source, out, models))
    if version is not None and organ is None:
        raise ConfigError("a model version belongs to one organ: give --organ with --version")
    request = {
        "source": source.uri,
        # a digest, not the list: a million keys need not be copied into every summary
        "keys": _digest(list(keys)) if keys is not None else None,
        "organ": organ,
        "version": version,
        "run": run,
        "chunk_images": chunk_images,
    }
    with StorageLock(
        out,
        LOCK,
        what=f"the prediction into {out.uri}",
        stale_after=600,  # as every lock: a holder on another host silent for 10 minutes
        error=PredictionInProgress,
    ):
        if out.exists(SUMMARY):
            summary = json.loads(out.get_bytes(SUMMARY))
            if summary.get("request") == request:
                return dataclasses.replace(_outcome(summary), already_done=True)
            raise ConfigError(
                f"{out.uri} already holds the predictions of another request; use another --out"
            )

        def make_plan() -> dict:
            wanted = list(keys) if keys is not None else list_images(source)
            if not wanted:
                raise DataError(f"no files to classify under {source.uri}")
            by_organ = _organ_of(wanted, organ)
            specs = {o: resolve_model(models, o, version=version, run=run) for o in by_organ}
            return {
                "request": request,
                "specs": {o: asdict(s) for o, s in specs.items()},
                "chunks": [asdict(c) for c in _chunks(by_organ, chunk_images)],
            }

        plan = _plan(out, request, make_plan)
        specs = {o: ModelSpec(**s) for o, s in plan["specs"].items()}
        chunks = [Chunk(**c) for c in plan["chunks"]]
        done = {info.key for info in out.list(PARTS)}
        todo = [c for c in chunks if c.part_key not in done]
        reused = len(chunks) - len(todo)
        if reused:
            log.info(
                "%d of %d chunk(s) finished by an earlier run: not redone", reused, len(chunks)
            )
        images = sum(len(c.keys) for c in todo)
        use_ray = bool(address or workers) or images > RAY_ABOVE
        n_workers = 0
        if todo:
            if use_ray:
                n_workers = _classify_on_ray(
                    todo,
                    specs,
                    models,
                    source,
                    out,
                    batch_images,
                    workers,
                    address,
                    ray_cfg,
                    progress,
                    on_chunk,
                )
            else:
                _classify_here(todo, specs, models, source, out, batch_images, progress, on_chunk)
        summary = _merge(out, chunks, specs)
        summary.update(
            request=request,
            chunks=len(chunks),
            chunks_reused=reused,
            seconds=time.monotonic() - started,
            workers=n_workers,
        )
        summary["images_per_s"] = sum(len(c.keys) for c in todo) / max(summary["seconds"], 1e-9)
        out.put_bytes(SUMMARY, json.dumps(summary, indent=2).encode())  # last: it is complete
        for c in chunks:
            out.delete(c.part_key)
        out.delete(PLAN)
    return _outcome(summary)


def _digest(keys: list[str]) -> str:
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


def _open(where: str | Storage) -> Storage:
    return where if isinstance(where, Storage) else open_storage(where)


def _outcome(summary: dict) -> PredictOutcome:
    names = {f.name for f in dataclasses.fields(PredictOutcome)}
    return PredictOutcome(**{k: v for k, v in summary.items() if k in names})


def _classify_here(todo, specs, models, source, out, batch_images, progress, on_chunk) -> None:
    from tqdm import tqdm

    classifier = ChunkClassifier(models, source, batch_images)
    for chunk in tqdm(todo, desc="classifying", unit="chunk", disable=not progress):
        _write_part(out, chunk, classifier.classify(chunk, specs[chunk.organ]), on_chunk)


def _write_part(out: Storage, chunk: Chunk, table: pa.Table, on_chunk) -> None:
    out.put_bytes(chunk.part_key, _parquet(table))
    if on_chunk is not None:
        on_chunk(chunk)


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _classify_on_ray(
    todo, specs, models, source, out, batch_images, workers, address, ray_cfg, progress, on_chunk
) -> int:
    """Chunks on Ray actors, each keeping its models loaded; the driver writes the parts
    as results come back, so an interrupted run loses at most the chunks in flight."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from organtrain.config import RunConfig
    from organtrain.search.sweep import _connect

    _connect(address, ray_cfg or RunConfig())
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus:
        options, fit = {"num_gpus": 1, "num_cpus": 1}, gpus
    else:
        options, fit = {"num_cpus": 1}, max(int(total.get("CPU", 1)), 1)
    n = max(1, min(workers or fit, fit, len(todo)))
    actor = ray.remote(**options)(_RayClassifier)
    where = (reopen_args(models), reopen_args(source))
    pool = ActorPool([actor.remote(*where, batch_images) for _ in range(n)])
    log.info(
        "classifying %d chunk(s) on %d Ray actor(s)%s",
        len(todo),
        n,
        " with a GPU each" if gpus else "",
    )
    by_index = {c.index: c for c in todo}
    results = pool.map_unordered(lambda a, c: a.classify.remote(c, specs[c.organ]), todo)
    for index, data in tqdm(
        results, total=len(todo), desc="classifying", unit="chunk", disable=not progress
    ):
        chunk = by_index[index]
        out.put_bytes(chunk.part_key, data)
        if on_chunk is not None:
            on_chunk(chunk)
    return n


class _RayClassifier:
    """A ChunkClassifier in a Ray actor; returns (chunk index, Parquet bytes)."""

    def __init__(self, models: dict, source: dict, batch_images: int):
        self.classifier = ChunkClassifier(
            open_storage(**models), open_storage(**source), batch_images
        )

    def classify(self, chunk: Chunk, spec: ModelSpec) -> tuple[int, bytes]:
        return chunk.index, _parquet(self.classifier.classify(chunk, spec))


# --- Merging the parts --------------------------------------------------------------------


def _merge(out: Storage, chunks: list[Chunk], specs: dict[str, ModelSpec]) -> dict:
    """Write predictions.parquet and rejected.parquet from the parts; the summary's figures."""
    parts = [pq.read_table(io.BytesIO(out.get_bytes(c.part_key))) for c in chunks]
    rows = pa.concat_tables(parts).to_pylist() if parts else []
    classified = [r for r in rows if r["reason"] is None]
    bad = [r for r in rows if r["reason"] is not None]
    out.put_bytes(PREDICTIONS, _parquet(predictions_table(classified, specs)))
    out.put_bytes(
        REJECTED,
        _parquet(
            pa.Table.from_pylist(
                [{k: r[k] for k in REJECTED_SCHEMA.names} for r in bad], schema=REJECTED_SCHEMA
            )
        ),
    )
    predicted: dict[str, dict[str, int]] = {}
    for r in classified:
        counts = predicted.setdefault(r["organ"], {})
        counts[r["predicted_class"]] = counts.get(r["predicted_class"], 0) + 1
    reasons: dict[str, int] = {}
    for r in bad:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "out": out.uri,
        "images": len(rows),
        "classified": len(classified),
        "rejected": len(bad),
        "models": {o: s.version for o, s in specs.items()},
        "predicted": predicted,
        "rejected_reasons": reasons,
    }


def probability_column(diagnosis: str) -> str:
    return f"p_{diagnosis}"


def predictions_table(rows: list[dict], specs: dict[str, ModelSpec]) -> pa.Table:
    """One row per classified image; one probability column per diagnosis of any organ
    (null where the image's organ has no such diagnosis)."""
    diagnoses = sorted({d for s in specs.values() for d in s.classes})
    columns = {
        name: [r[name] for r in rows]
        for name in ("key", "organ", "model_version", "predicted_class", "confidence")
    }
    for d in diagnoses:
        columns[probability_column(d)] = [
            r["probabilities"][specs[r["organ"]].classes.index(d)]
            if d in specs[r["organ"]].classes
            else None
            for r in rows
        ]
    schema = pa.schema(
        [PART_SCHEMA.field(n) for n in ("key", "organ", "model_version")]
        + [
            pa.field("predicted_class", pa.string(), nullable=False),
            pa.field("confidence", pa.float64(), nullable=False),
        ]
        + [pa.field(probability_column(d), pa.float64()) for d in diagnoses]
    )
    return pa.table(columns, schema=schema)
