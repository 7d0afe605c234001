"""The model registry: immutable model versions per organ, and a champion pointer.

    models/<organ>/versions/<version>/model.keras
    models/<organ>/versions/<version>/MODEL_CARD.md  what it is for, data, metrics, limits
    models/<organ>/versions/<version>/entry.json   written last: the version exists
    models/<organ>/champion.json                   which version serves; one object, so
                                                   promotion and rollback are atomic

A version is never changed after it is written. It records what a person needs to trust or
reproduce it: the configuration that trained it, its test metrics, the dataset version and
the fingerprint of the organ's images it saw, the organtrain version, when, and the run.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from organtrain.errors import ConfigError, ObjectNotFoundError
from organtrain.storage import Storage, join_key, key_part_problem

ENTRY = "entry.json"
CARD = "MODEL_CARD.md"
CHAMPION = "champion.json"


@dataclass(frozen=True)
class ModelVersion:
    organ: str
    version: str
    created: str  # ISO 8601, UTC
    run_id: str  # the run that trained it
    source: str  # where that run's results are
    model: str  # registry name, e.g. simple_cnn
    classes: list[str]  # label i is classes[i]
    settings: dict  # the configuration that trained it (train.trial_settings)
    test_metrics: dict[str, float]  # accuracy, macro_f1, macro_roc_auc on its test split
    test_images: int
    dataset: str
    dataset_version: str
    fingerprint: str  # of the organ's images in that dataset version (nightly.fingerprints)
    code_version: str  # organtrain's version
    model_sha256: str | None = None
    search: dict | None = None  # the chosen trial, for sweeps
    # How `prepare` made its training images (max_image_side, encoding, jpeg_quality): new
    # images must be made the same way (predict, export). None: read the dataset version.
    preprocessing: dict | None = None


@dataclass(frozen=True)
class Champion:
    organ: str
    version: str
    since: str  # ISO 8601
    reason: str
    previous: list[str] = field(default_factory=list)  # earlier champions, newest last
    # Why, for programs (nightly.Decision.reason_code): first_model, challenger_better,
    # new_diagnosis (the nightly), forced, rolled_back (by hand). None: written before.
    reason_code: str | None = None


def _prefix(organ: str) -> str:
    problem = key_part_problem(organ)
    if problem:
        raise ConfigError(f"organ {organ!r}: {problem}")
    return join_key("models", organ)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def code_version() -> str:
    try:
        return metadata.version("organtrain")
    except metadata.PackageNotFoundError:
        return "unknown"


def version_prefix(organ: str, version: str) -> str:
    return join_key(_prefix(organ), "versions", version)


def register(
    storage: Storage,
    entry: ModelVersion,
    model_path: str | Path,
    *,
    card: Callable[[ModelVersion], str] | None = None,
) -> ModelVersion:
    """Add a version (the model file and its card first, the entry last). Registering the
    same version again returns the stored one: a re-run nightly does not duplicate or
    alter it. `card` renders MODEL_CARD.md from the final entry."""
    existing = get_version(storage, entry.organ, entry.version, missing_ok=True)
    if existing is not None:
        return existing
    base = version_prefix(entry.organ, entry.version)
    info = storage.put_file(join_key(base, "model.keras"), model_path)
    entry = ModelVersion(**{**asdict(entry), "model_sha256": info.sha256})
    if card is not None:
        storage.put_bytes(join_key(base, CARD), card(entry).encode())
    storage.put_bytes(join_key(base, ENTRY), json.dumps(asdict(entry), indent=2).encode())
    return entry


def register_run_result(
    storage: Storage, result: dict, *, fingerprint: str, test_metrics: dict[str, float]
) -> ModelVersion:
    """Register the model a `train` or `sweep` run published for one organ, with its card."""
    from organtrain.data.dataset import load_dataset
    from organtrain.model_card import render_card, run_predictions
    from organtrain.predict import preprocessing

    run_prefix = join_key("runs", result["run_id"], result["organ"])
    index = load_dataset(storage, result["dataset"], result["dataset_version"])
    predictions = run_predictions(storage, result["run_id"], result["organ"])
    entry = ModelVersion(
        organ=result["organ"], version=result["run_id"], created=_now(),
        run_id=result["run_id"], source=result["uri"], model=result["model"],
        classes=list(result["classes"]), settings=result["settings"],
        test_metrics=test_metrics, test_images=result["test_images"],
        dataset=result["dataset"], dataset_version=result["dataset_version"],
        fingerprint=fingerprint, code_version=code_version(), search=result.get("search"),
        preprocessing=preprocessing(index.settings),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.keras")
        storage.download(join_key(run_prefix, "model.keras"), path)
        return register(
            storage, entry, path,
            card=lambda e: render_card(e, index=index, predictions=predictions),
        )  # fmt: skip


def register_run(storage: Storage, run_id: str, organ: str) -> ModelVersion:
    """`organtrain models register RUN ORGAN`: the model a finished `train` run or a
    sweep's chosen trial published, with the same entry the nightly writes."""
    from organtrain.data.dataset import load_dataset
    from organtrain.data.manifest import read_parquet
    from organtrain.nightly import fingerprints

    prefix = join_key("runs", run_id, organ)
    try:
        result = json.loads(storage.get_bytes(join_key(prefix, "result.json")))
        rows = read_parquet(storage.get_bytes(join_key(prefix, "metrics", "metrics.parquet")))
    except ObjectNotFoundError:
        raise ConfigError(
            f"{storage.url(prefix)} holds no finished model (result.json and "
            f"metrics/metrics.parquet): is {run_id!r} a finished `train` or `sweep` run that "
            f"trained {organ!r}? `organtrain status {run_id}` shows where it stands"
        ) from None
    whole_split = {r["metric"]: r["value"] for r in rows.to_pylist() if r["class_name"] is None}
    metrics = {m: whole_split[m] for m in ("accuracy", "macro_f1", "macro_roc_auc")}
    index = load_dataset(storage, result["dataset"], result["dataset_version"])
    fingerprint = fingerprints(storage, index)[organ]
    return register_run_result(storage, result, fingerprint=fingerprint, test_metrics=metrics)


def get_version(
    storage: Storage, organ: str, version: str, *, missing_ok: bool = False
) -> ModelVersion | None:
    problem = key_part_problem(version)
    if problem:
        raise ConfigError(f"model version {version!r}: {problem}")
    key = join_key(_prefix(organ), "versions", version, ENTRY)
    try:
        return ModelVersion(**json.loads(storage.get_bytes(key)))
    except ObjectNotFoundError:
        if missing_ok:
            return None
        known = ", ".join(v.version for v in versions(storage, organ)) or "none"
        raise ConfigError(
            f"{organ} has no model version {version!r} in {storage.uri} (versions: {known})"
        ) from None


def versions(storage: Storage, organ: str) -> list[ModelVersion]:
    """The organ's versions, oldest first."""
    found = [
        ModelVersion(**json.loads(storage.get_bytes(info.key)))
        for info in storage.list(join_key(_prefix(organ), "versions"))
        if info.key.endswith("/" + ENTRY)
    ]
    return sorted(found, key=lambda v: (v.created, v.version))


def organs(storage: Storage) -> list[str]:
    names = {info.key.split("/")[1] for info in storage.list("models")}
    return sorted(names)


def champion(storage: Storage, organ: str) -> Champion | None:
    try:
        return Champion(**json.loads(storage.get_bytes(join_key(_prefix(organ), CHAMPION))))
    except ObjectNotFoundError:
        return None


def model_key(organ: str, version: str) -> str:
    return join_key(_prefix(organ), "versions", version, "model.keras")


def promote(
    storage: Storage, organ: str, version: str, *, reason: str, reason_code: str = "forced"
) -> Champion:
    """Make `version` the organ's champion (the old one is remembered for rollback)."""
    get_version(storage, organ, version)  # exists, or a clear error
    current = champion(storage, organ)
    if current is not None and current.version == version:
        return current  # already so: promoting twice changes nothing
    previous = [*current.previous, current.version] if current else []
    new = Champion(
        organ=organ, version=version, since=_now(), reason=reason, previous=previous,
        reason_code=reason_code,
    )  # fmt: skip
    _write_champion(storage, new)
    return new


def rollback(storage: Storage, organ: str, *, reason: str = "rolled back by hand") -> Champion:
    """Make the previous champion the champion again."""
    current = champion(storage, organ)
    if current is None or not current.previous:
        raise ConfigError(
            f"{organ} has {'no champion' if current is None else 'no earlier champion'} "
            "to roll back to; `organtrain models promote ORGAN VERSION` picks any version"
        )
    new = Champion(
        organ=organ, version=current.previous[-1], since=_now(), reason=reason,
        previous=current.previous[:-1], reason_code="rolled_back",
    )  # fmt: skip
    _write_champion(storage, new)
    return new


def _write_champion(storage: Storage, value: Champion) -> None:
    key = join_key(_prefix(value.organ), CHAMPION)
    storage.put_bytes(key, json.dumps(asdict(value), indent=2).encode())
