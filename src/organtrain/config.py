"""Typed run configuration, loaded from YAML files in `jobs/`.

A run configuration is plain data: nested dataclasses with commented defaults. Loading is
strict, because a typo in a nightly job should fail at once rather than silently train
with a default: unknown keys, wrong types and impossible values are errors that name the
field and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from organtrain.errors import ConfigError


class FieldError(ValueError):
    """Raised by `__post_init__` checks; the loader adds the field path and the file."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name} {message}")
        self.field_name = field_name
        self.message = message


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise FieldError(field_name, message)


@dataclass(frozen=True)
class StorageConfig:
    """Where datasets, runs and models live."""

    uri: str = "demo-output/store"  # a local folder, or s3://bucket/prefix
    # S3-compatible endpoint (SeaweedFS, MinIO, Ceph, ...). None: the standard
    # AWS_ENDPOINT_URL variable, else AWS itself. Credentials never go here: they come
    # from the standard AWS chain (environment, ~/.aws, instance or pod identity).
    endpoint_url: str | None = None
    region: str | None = None

    def __post_init__(self):
        _require(bool(self.uri.strip()), "uri", "must name a folder or an s3://bucket/prefix")


@dataclass(frozen=True)
class SynthConfig:
    """The synthetic histology-like image tree used by the demo and the tests."""

    out: str = "demo-output/source"  # a local folder; written as <organ>/<diagnosis>/*.png
    # organ -> diagnoses; None: every organ the generator knows (lung, colon, blood)
    organs: dict[str, list[str]] | None = None
    images_per_diagnosis: int = 60
    image_size: int = 64  # pixels, square
    seed: int = 0

    def __post_init__(self):
        _require(self.images_per_diagnosis >= 1, "images_per_diagnosis", "must be at least 1")
        _require(self.image_size >= 16, "image_size", "must be at least 16 pixels")


@dataclass(frozen=True)
class PrepareConfig:
    """Scan → manifest → split → TFRecord shards."""

    source: str = (
        "demo-output/source"  # a local folder or s3://bucket/prefix of <organ>/<diagnosis>/
    )
    dataset: str = "demo"  # written to <storage>/datasets/<dataset>/<version>/
    # Fractions of each diagnosis's split units (patient/slide groups, near-duplicate
    # clusters, single images), decided by hashing each unit's key (data/split.py). Changing
    # val_fraction moves images only between train and validation.
    test_fraction: float = 0.15
    val_fraction: float = 0.15
    # A diagnosis with fewer images (or with an empty split) is left out and reported.
    min_images_per_diagnosis: int = 10
    # Larger images are downscaled (aspect kept) before sharding; 0 keeps full size.
    max_image_side: int = 256
    images_per_shard: int = 1024  # ~100 MB per shard for 256 px PNGs
    encoding: str = "png"  # png (lossless) or jpeg (smaller, faster to decode)
    jpeg_quality: int = 95
    workers: int = 8  # threads reading, checking and re-encoding images
    # Optional CSV/Parquet (local path or s3:// URI) with columns key,group: the patient,
    # slide or specimen of each image, for trees without <organ>/<diagnosis>/<group>/ folders.
    groups_table: str = ""
    # Join rotated/flipped/re-compressed/resized copies of one image into one split unit.
    near_duplicates: bool = True
    # Read every source file again. Off: a file whose key, size and modification time (S3:
    # ETag) are unchanged since the latest version reuses its manifest row unread, and an
    # unchanged listing reuses the version (data/incremental.py). `prepare --rehash` sets it.
    rehash: bool = False

    def __post_init__(self):
        _require(0.0 < self.test_fraction < 1.0, "test_fraction", "must be between 0 and 1")
        _require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be between 0 and 1")
        _require(
            self.test_fraction + self.val_fraction < 1.0,
            "val_fraction",
            f"test_fraction + val_fraction = {self.test_fraction + self.val_fraction:g} "
            "leaves no training images; keep the sum below 1",
        )
        _require(self.min_images_per_diagnosis >= 2, "min_images_per_diagnosis", "must be >= 2")
        _require(self.max_image_side >= 0, "max_image_side", "must be >= 0 (0 keeps full size)")
        _require(self.images_per_shard >= 1, "images_per_shard", "must be at least 1")
        _require(self.encoding in ("png", "jpeg"), "encoding", "must be 'png' or 'jpeg'")
        _require(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be between 1 and 100")
        _require(self.workers >= 1, "workers", "must be at least 1")


CACHE_MODES = ("auto", "memory", "disk", "none")


@dataclass(frozen=True)
class InputConfig:
    """The tf.data input pipeline of one trial."""

    image_size: int = 64  # model input, square pixels; shard images are cropped/resized to it
    batch_size: int = 32  # per replica: the global batch is batch_size × replicas
    shuffle_buffer: int = 2048  # images; shrunk (and logged) when the budget cannot hold it
    # Where decoded, resized images (uint8) are kept after the first epoch: memory, disk
    # (a node-local file under cache_dir, removed after the trial), none (decoded every
    # epoch), or auto: memory when the organ's train and validation images fit in the
    # trial's share of memory_budget_mb beside the shuffle buffer, else disk.
    cache: str = "auto"
    # RAM per node for the cache and the shuffle buffer, divided between the trials that
    # share the node (its CPUs / resources.cpus_per_trial; GPUs likewise). None: a
    # quarter of the node's memory (its cgroup limit when lower).
    memory_budget_mb: int | None = None
    cache_dir: str | None = None  # node-local shard cache; None: ~/.cache/organtrain/shards

    # Keys this section no longer has, with what replaces them (see from_dict).
    REMOVED_KEYS: typing.ClassVar[dict[str, str]] = {
        "cache_images": "was replaced by input.cache: write `cache: auto` (or memory) for "
        "`cache_images: true`, `cache: none` for `cache_images: false`",
    }

    def __post_init__(self):
        _require(self.image_size >= 8, "image_size", "must be at least 8 pixels")
        _require(self.batch_size >= 1, "batch_size", "must be at least 1")
        _require(self.shuffle_buffer >= 1, "shuffle_buffer", "must be at least 1")
        _require(
            self.cache in CACHE_MODES,
            "cache",
            f"must be one of {', '.join(CACHE_MODES)}, got {self.cache!r} (auto: memory when "
            "the images fit in input.memory_budget_mb, else disk)",
        )
        _require(
            self.memory_budget_mb is None or self.memory_budget_mb >= 1,
            "memory_budget_mb",
            "must be at least 1 (MB of RAM per node for cached images and the shuffle "
            "buffer), or null for a quarter of the node's memory",
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Keras' classic ImageDataGenerator knobs, by their familiar names and defaults.

    Applied in-graph to training batches only (validation and test images are only
    rescaled). Defaults are the values of the classic two-script recipe.
    """

    rescale: float = 1.0 / 255  # multiply pixel values (0..255) by this
    rotation_range: float = 30.0  # degrees, uniform in [-r, r]
    width_shift_range: float = 0.15  # fraction of the width, uniform in [-w, w]
    height_shift_range: float = 0.15  # fraction of the height
    horizontal_flip: bool = True
    vertical_flip: bool = True  # microscope images have no "up"
    brightness_range: list[float] | None = field(default_factory=lambda: [0.5, 1.5])  # factor
    zoom_range: float = 0.2  # scale uniform in [1 - z, 1 + z], per axis
    fill_mode: str = "nearest"  # constant, nearest, reflect or wrap: pixels moved in from outside
    cval: float = 0.0  # the fill value when fill_mode is constant
    # Where augmentation runs: "dataset" (tf.data on the CPU), "model" (the first layers of
    # the training graph, so on the GPU), or "auto" (model when a GPU is visible).
    placement: str = "auto"
    # HED stain jitter (Tellez et al. 2019), per image and stain (haematoxylin, eosin, DAB):
    # amount × U[1 - hed_jitter, 1 + hed_jitter] + U[-hed_bias, hed_bias], in scikit-image's
    # HED units (optical density / 13.8). 0 and 0: off. Light 0.05/0.001, strong 0.2/0.005.
    hed_jitter: float = 0.0
    hed_bias: float = 0.0
    # Not random, and in the saved model, so applied at inference too: none, reinhard or
    # macenko, against `stain_reference` (a PNG/JPEG path or s3:// URI), or when that is
    # empty, against the first 64 images of the organ's train split.
    stain_normalization: str = "none"
    stain_reference: str = ""

    def __post_init__(self):
        _require(self.rescale > 0, "rescale", "must be positive (1/255 maps pixels to 0..1)")
        _require(0 <= self.rotation_range <= 180, "rotation_range", "must be 0..180 degrees")
        for name in ("width_shift_range", "height_shift_range"):
            _require(0 <= getattr(self, name) < 1, name, "must be a fraction in [0, 1)")
        _require(0 <= self.zoom_range < 1, "zoom_range", "must be in [0, 1)")
        if self.brightness_range is not None:
            low_high = self.brightness_range
            _require(
                len(low_high) == 2 and 0 < low_high[0] <= low_high[1],
                "brightness_range",
                "must be [low, high] with 0 < low <= high, or null for none",
            )
        _require(
            self.fill_mode in ("constant", "nearest", "reflect", "wrap"),
            "fill_mode",
            "must be one of constant, nearest, reflect, wrap",
        )
        _require(
            self.placement in ("auto", "dataset", "model"),
            "placement",
            "must be auto, dataset or model",
        )
        _require(
            0 <= self.hed_jitter < 1,
            "hed_jitter",
            "must be in [0, 1): the stain scale is drawn from [1 - hed_jitter, 1 + hed_jitter] "
            "(0.05 light, 0.2 strong; 0 for none)",
        )
        _require(
            0 <= self.hed_bias < 1,
            "hed_bias",
            "must be in [0, 1): the stain shift in HED units (OD / 13.8), 0.001 light, "
            "0.005 strong, 0 for none",
        )
        _require(
            self.stain_normalization in ("none", "reinhard", "macenko"),
            "stain_normalization",
            f"must be none, reinhard or macenko, not {self.stain_normalization!r}",
        )
        _require(
            not self.stain_reference or self.stain_normalization != "none",
            "stain_reference",
            "is set but stain_normalization is none: choose reinhard or macenko, "
            "or remove stain_reference",
        )


# The names organtrain.models builds (a test checks they match its registry). Listed here
# so that loading a config can reject a typo without importing Keras. All but simple_cnn
# are keras.applications bases pretrained on ImageNet (model.weights applies to them only).
PRETRAINED_MODEL_NAMES = (
    "vgg16", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_v2_b0", "resnet50",
    "convnext_tiny",
)  # fmt: skip
MODEL_NAMES = ("simple_cnn", *PRETRAINED_MODEL_NAMES)
# ModelConfig fields that only one kind of model reads: the rest is ignored by the other.
SIMPLE_CNN_FIELDS = ("filters", "pooling", "dense_units", "batch_norm")
PRETRAINED_FIELDS = ("weights", "fine_tune_layers")


def applied_model_settings(model: dict) -> dict:
    """`model` settings (ModelConfig as a dict) without the fields its model ignores: a
    simple_cnn has no pretrained weights, a pretrained base no `filters`."""
    ignored = (
        SIMPLE_CNN_FIELDS if model.get("name") in PRETRAINED_MODEL_NAMES else PRETRAINED_FIELDS
    )
    return {k: v for k, v in model.items() if k not in ignored}


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build, by registry name (see organtrain.models)."""

    # simple_cnn, or a pretrained base: vgg16, mobilenet_v2, mobilenet_v3_small,
    # efficientnet_v2_b0, resnet50, convnext_tiny (all take input.image_size >= 32;
    # README "Models" lists their preprocessing).
    name: str = "simple_cnn"
    # simple_cnn: Conv2D/MaxPooling blocks, pooling, Dropout, Dense
    filters: list[int] = field(default_factory=lambda: [32, 64, 64])  # one block each
    # How the last feature map becomes a vector: "max" / "avg" (global pooling: is there such
    # a structure anywhere / how much of it, which suits tissue, where position means
    # nothing) or "flatten" (the classic recipe; on the synthetic data it stayed at chance).
    pooling: str = "max"
    dense_units: int = 64  # a hidden Dense layer before the classifier; 0 for none
    dropout: float = 0.3
    batch_norm: bool = False
    # Pretrained bases: "imagenet" (Keras downloads it: needs internet, else a clear
    # error), a path to a no-top weights file (the .h5 Keras downloads, or a .weights.h5;
    # local or s3://, for nodes without internet), or null (random weights).
    weights: str | None = "imagenet"
    fine_tune_layers: int = 0  # unfreeze this many layers at the top of the pretrained base

    def __post_init__(self):
        _require(self.name in MODEL_NAMES, "name", _unknown_model_message(self.name))
        _require(
            len(self.filters) >= 1 and min(self.filters) >= 1, "filters", "must list positive ints"
        )
        _require(self.dense_units >= 0, "dense_units", "must be >= 0 (0: no hidden layer)")
        _require(
            self.pooling in ("flatten", "max", "avg"), "pooling", "must be flatten, max or avg"
        )
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _require(self.fine_tune_layers >= 0, "fine_tune_layers", "must be >= 0")


def _unknown_model_message(name: str) -> str:
    guess = difflib.get_close_matches(name, MODEL_NAMES, n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return f"{name!r} is not a known model; {hint}known models: {', '.join(MODEL_NAMES)}"


CLASS_WEIGHTS = ("none", "balanced")
MIXED_PRECISION = ("off", "on", "auto", "mixed_float16", "mixed_bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """One training run of one organ's model."""

    epochs: int = 20
    optimizer: str = "adam"  # adam, sgd or rmsprop
    learning_rate: float = 1e-3
    # Stop when val_loss has not improved for this many epochs (0: never stop early); the
    # weights of the best epoch are the ones evaluated and kept.
    early_stopping_patience: int = 5
    seed: int = 0
    # Replicas when no GPU is visible: MirroredStrategy over this many logical CPU devices
    # (how tests exercise multi-replica training). With GPUs, every visible GPU is used.
    cpu_replicas: int = 1
    # Weights of each image's loss by its diagnosis: "none", or "balanced" (scikit-learn's
    # n_images / (n_classes * n_images_of_class), from the organ's training split), so a
    # rare diagnosis weighs as much in the loss as a common one. Searchable.
    class_weight: str = "none"
    # "off" (float32), "on" (float16 on a GPU, the loss scaled; bfloat16 without one),
    # "auto" (on when a GPU is visible), or a Keras policy: mixed_float16, mixed_bfloat16.
    # Weights and the output softmax stay float32.
    mixed_precision: str = "off"

    def __post_init__(self):
        _require(self.epochs >= 1, "epochs", "must be at least 1")
        _require(
            self.optimizer in ("adam", "sgd", "rmsprop"),
            "optimizer",
            "must be adam, sgd or rmsprop",
        )
        _require(self.learning_rate > 0, "learning_rate", "must be positive")
        _require(self.early_stopping_patience >= 0, "early_stopping_patience", "must be >= 0")
        _require(self.cpu_replicas >= 1, "cpu_replicas", "must be at least 1")
        _require(
            self.class_weight in CLASS_WEIGHTS,
            "class_weight",
            f"must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weight!r} (balanced: "
            "weigh each diagnosis's images inversely to their number in the training split)",
        )
        _require(
            self.mixed_precision in MIXED_PRECISION,
            "mixed_precision",
            f"must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
        )


# What a trial reports each epoch (train.compiled_model's loss and metrics).
SEARCH_METRICS = ("val_loss", "val_accuracy", "val_balanced_accuracy",
                  "loss", "accuracy", "balanced_accuracy")  # fmt: skip


@dataclass(frozen=True)
class SearchConfig:
    """`organtrain sweep`: one Ray Tune search per organ, all organs at once.

    `space` maps config fields (`section.field`) to what to try, one of:
        {choice: [a, b, ...]}    sampled uniformly        {grid: [a, b, ...]}   every value
        {uniform: [low, high]}   {loguniform: [low, high]} {randint: [low, high]} (high excluded)
        a plain value            fixed for every trial
    Grid values are crossed with each other; `samples` trials are drawn for each grid point.
    `organ_space` overrides or adds entries for one organ: {blood: {augment.zoom_range: 0}}.
    """

    organs: list[str] | None = None  # None: every organ of the dataset
    samples: int = 4  # trials per organ (per grid point when the space has grid entries)
    scheduler: str = "asha"  # fifo (run every trial to the end), asha or pbt
    # What selects trials and stops them early: validation only; the test split is read
    # once, by the chosen model's final evaluation.
    # Keras' names: val_loss, val_accuracy, val_balanced_accuracy (mean per-class recall:
    # for imbalanced diagnoses, with mode max), or the same on the training batches.
    metric: str = "val_loss"
    mode: str = "min"  # min or max
    grace_period: int = 3  # asha: epochs every trial runs before it can be stopped
    reduction_factor: int = 3  # asha: about 1 in reduction_factor trials go on at each rung
    perturbation_interval: int = 4  # pbt: epochs between exploiting better trials
    max_concurrent_trials: int = 0  # per organ; 0: as many as the cluster has room for
    max_failures: int = 1  # retries of a failed trial, from its last checkpoint
    seed: int = 0  # of the random sampling of the space (each organ draws its own)
    space: dict[str, Any] = field(default_factory=dict)
    organ_space: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        _require(self.samples >= 1, "samples", "must be at least 1")
        _require(
            self.scheduler in ("fifo", "asha", "pbt"), "scheduler", "must be fifo, asha or pbt"
        )
        _require(
            self.metric in SEARCH_METRICS,
            "metric",
            f"must be {', '.join(SEARCH_METRICS)} (what a trial reports each epoch)",
        )
        _require(self.mode in ("min", "max"), "mode", "must be min or max")
        _require(self.grace_period >= 1, "grace_period", "must be at least 1 epoch")
        _require(self.reduction_factor >= 2, "reduction_factor", "must be at least 2")
        _require(self.perturbation_interval >= 1, "perturbation_interval", "must be >= 1")
        _require(self.max_concurrent_trials >= 0, "max_concurrent_trials", "must be >= 0")
        _require(self.max_failures >= 0, "max_failures", "must be >= 0")


@dataclass(frozen=True)
class ResourcesConfig:
    """The Ray cluster a sweep runs on, and what each trial asks of it."""

    # "auto" (a running cluster on this node), host:port or ray://host:10001. None: the
    # RAY_ADDRESS variable when set, else a Ray started for this command on this machine.
    address: str | None = None
    cpus_per_trial: float = 1.0
    # Each trial's MirroredStrategy spans exactly the GPUs Ray assigns it; without GPUs,
    # train.cpu_replicas logical CPU devices stand in for them.
    gpus_per_trial: float = 0.0
    local_cpus: int | None = None  # a Ray started here: CPUs it may use (None: all)
    # Memory Ray reserves for each organ's search task (its Tune controller: ~250 MiB
    # measured, bench/RESULTS.md "Organs at once"), so Ray starts only the organs' searches
    # a node can hold and queues the rest, instead of the OOM killer choosing. No CPU is
    # reserved: a controller mostly waits, and a CPU fraction would cost a trial slot.
    search_memory_mb: int = 512

    def __post_init__(self):
        _require(self.cpus_per_trial > 0, "cpus_per_trial", "must be positive")
        _require(self.gpus_per_trial >= 0, "gpus_per_trial", "must be >= 0")
        _require(
            self.gpus_per_trial <= 1 or float(self.gpus_per_trial).is_integer(),
            "gpus_per_trial",
            "must be a whole number above 1 (a fraction below 1 shares one GPU)",
        )
        _require(self.local_cpus is None or self.local_cpus >= 1, "local_cpus", "must be >= 1")
        _require(self.search_memory_mb >= 0, "search_memory_mb", "must be >= 0 (0: reserve none)")


# Test-split metrics a challenger and the champion are compared on (stats.METRICS).
PROMOTION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc")


@dataclass(frozen=True)
class NightlyConfig:
    """`organtrain nightly`: what changed, what to retrain, when a challenger wins."""

    retrain_all: bool = False  # retrain every organ, changed or not
    # The challenger replaces the champion when, on the same test images, its metric is at
    # least the champion's minus `margin` (0: not worse).
    metric: str = "accuracy"  # accuracy, balanced_accuracy, macro_f1 or macro_roc_auc
    margin: float = 0.0
    # Also require a significant improvement: exact McNemar test and the paired bootstrap
    # interval of the difference both at `alpha`.
    require_significant: bool = False
    alpha: float = 0.05
    # With require_significant, tonight's paired tests (one per organ compared) are one
    # family: "holm" keeps the chance that any organ gets a not-better model below alpha,
    # "bh" (Benjamini-Hochberg) keeps the expected share of wrong promotions below alpha
    # (more promotions when many organs improve), "none" tests each organ alone.
    correction: str = "holm"
    # A new diagnosis changes the label set: the old champion cannot classify it, so the
    # two cannot be compared like for like. "promote" the challenger, or "keep" the champion
    # until a person decides (`organtrain models promote`).
    on_new_diagnosis: str = "promote"
    # A lock whose holder has not refreshed it for this long is taken over (the holder
    # died); a holder refreshes it every 30 s.
    lock_stale_after_s: int = 600

    def __post_init__(self):
        _require(
            self.metric in PROMOTION_METRICS,
            "metric",
            f"must be one of {', '.join(PROMOTION_METRICS)}",
        )
        _require(0 <= self.margin < 1, "margin", "must be in [0, 1)")
        _require(0 < self.alpha < 1, "alpha", "must be between 0 and 1")
        _require(
            self.correction in ("holm", "bh", "none"), "correction", "must be holm, bh or none"
        )
        _require(
            self.on_new_diagnosis in ("promote", "keep"),
            "on_new_diagnosis",
            "must be promote or keep",
        )
        _require(self.lock_stale_after_s >= 60, "lock_stale_after_s", "must be at least 60")


@dataclass(frozen=True)
class RunConfig:
    """One run of organtrain: what to read, where to write, how to train."""

    name: str = "demo"
    storage: StorageConfig = field(default_factory=StorageConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    input: InputConfig = field(default_factory=InputConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load a RunConfig from a YAML file (None: the built-in defaults).

    `overrides` are `section.field=value` strings (the value parsed as YAML), applied on top
    of the file, as launchers pass them: `prepare.test_fraction=0.2`.
    """
    source = str(path) if path is not None else "<defaults>"
    if overrides:  # a bad value may come from either: name both
        source += " with --set " + " --set ".join(overrides)
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for override in overrides:
        _apply_override(data, override)
    cfg = from_dict(RunConfig, data, source=source)
    from organtrain.search.space import check_space  # needs from_dict: imported late

    check_space(cfg, source=source)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not a list")
    return data


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice; PyYAML would silently keep the last value."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one: with two
    `epochs:` in a section, which one trains is an accident of where each was written."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor`, then a key again, is YAML's way to override
                key = self.construct_object(key_node, deep=True)
                if not _hashable(key):
                    continue  # SafeLoader reports an unhashable key itself
                if key in seen:
                    raise DuplicateKeyError(
                        f"duplicate key {key!r} ({_positions(seen[key], key_node.start_mark)}); "
                        "YAML would silently keep only the last value: remove or merge one"
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _positions(first: yaml.Mark, second: yaml.Mark) -> str:
    if first.line != second.line:
        return f"lines {first.line + 1} and {second.line + 1}"
    return f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _apply_override(data: dict[str, Any], override: str) -> None:
    dotted, sep, raw = override.partition("=")
    if not sep or not dotted.strip():
        raise ConfigError(f"--set {override!r}: write it as section.field=value")
    *parents, leaf = dotted.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part} is not a section")
    node[leaf] = _override_value(override, raw)


def _override_value(override: str, raw: str) -> Any:
    """The value of `--set section.field=value`, parsed as YAML like the config file."""
    try:
        return yaml.load(raw, Loader=_UniqueKeyLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"--set {override!r}: {err}") from None
    except yaml.YAMLError as err:
        parts = [getattr(err, "context", None), getattr(err, "problem", None)]
        problem = ": ".join(str(p) for p in parts if p) or type(err).__name__
        raise ConfigError(
            f"--set {override!r}: the value is not valid YAML ({problem}). The value is read "
            "as YAML, as in a config file: close every [ and {, and quote the whole argument "
            "for your shell, e.g. --set 'search.space={model.name: {choice: [simple_cnn, "
            "vgg16]}}'; a string with ': ' or ' #' in it also needs YAML quotes inside: "
            "--set 'name=\"a: b\"'"
        ) from None


def from_dict(cls: type, data: Any, *, source: str, path: str = ""):
    """Build dataclass `cls` from `data`, checking every key and type against its fields."""
    where = path or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in fields]
    removed = getattr(cls, "REMOVED_KEYS", {})
    if unknown and unknown[0] in removed:
        raise ConfigError(f"{source}: {_join(path, unknown[0])} {removed[unknown[0]]}")
    if unknown:
        raise ConfigError(_unknown_key_message(source, path, unknown[0], list(fields)))
    hints = typing.get_type_hints(cls)
    values = {
        name: _convert(hints[name], value, source=source, path=_join(path, name))
        for name, value in data.items()
    }
    try:
        return cls(**values)
    except FieldError as err:
        raise ConfigError(f"{source}: {_join(path, err.field_name)} {err.message}") from None


def _convert(hint: Any, value: Any, *, source: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value  # checked by the code that reads it (e.g. search.space)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source=source, path=path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(inner, value, source=source, path=path)
    if origin is list:
        _expect(isinstance(value, list), "a list", value, source, path)
        return [
            _convert(args[0], v, source=source, path=f"{path}[{i}]") for i, v in enumerate(value)
        ]
    if origin is dict:
        _expect(isinstance(value, dict), "a mapping", value, source, path)
        return {
            _convert(args[0], k, source=source, path=path): _convert(
                args[1], v, source=source, path=f"{path}.{k}"
            )
            for k, v in value.items()
        }
    if hint is float:
        # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string: accept
        # scientific notation written that way, as people write learning rates.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)
        # YAML reads `1` as an int; a float field accepts it, but never a bool.
        _expect(
            isinstance(value, int | float) and not isinstance(value, bool),
            "a number",
            value,
            source,
            path,
        )
        return float(value)
    if hint is int:
        _expect(
            isinstance(value, int) and not isinstance(value, bool),
            "an integer",
            value,
            source,
            path,
        )
        return value
    if hint is bool:
        _expect(isinstance(value, bool), "true or false", value, source, path)
        return value
    if hint is str:
        _expect(isinstance(value, str), "a string", value, source, path)
        return value
    raise TypeError(f"config field {path}: unsupported type {hint!r}")  # a bug in this module


_SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _expect(ok: bool, wanted: str, value: Any, source: str, path: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {path} must be {wanted}, got {value!r}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unknown_key_message(source: str, path: str, key: str, valid: list[str]) -> str:
    guess = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean {_join(path, guess[0])!r}? " if guess else ""
    return (
        f"{source}: unknown key {_join(path, str(key))!r}; {hint}"
        f"valid keys{' in ' + path if path else ''}: {', '.join(valid)}"
    )
