"""The model zoo: Keras classifiers built by name.

Every model takes raw float32 pixels in 0..255 and does its own input scaling as its
first layers, so a saved `.keras` file classifies images with no extra code: Rescaling
for the small CNN; for a pretrained backbone, the application's `preprocess_input` as a
layer, or nothing in front where the application scales raw pixels itself
(EfficientNetV2, ConvNeXt, MobileNetV3: `include_preprocessing`). Optional augmentation
and stain normalisation layers go in front of that.

Mixed precision (`precision`): the network's layers are built under a Keras dtype policy
(`mixed_float16`, `mixed_bfloat16`) that is set for the construction only; weights stay
float32 and so does the classifier, so the probabilities are float32.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from organtrain.config import ModelConfig
from organtrain.errors import ConfigError
from organtrain.storage import open_storage

Builder = Callable[..., keras.KerasTensor]  # (inputs, cfg, image_size, *, rescale) -> features
MODELS: dict[str, Builder] = {}


def register(name: str):
    def add(builder: Builder) -> Builder:
        MODELS[name] = builder
        return builder

    return add


def build_model(
    cfg: ModelConfig,
    *,
    num_classes: int,
    image_size: int,
    rescale: float = 1.0 / 255,
    augmentation: keras.layers.Layer | None = None,
    stain_normalization: keras.layers.Layer | None = None,
    precision: str | None = None,
) -> keras.Model:
    """The classifier `cfg.name`, with softmax outputs over `num_classes`.

    `stain_normalization` (organtrain.stain) goes after the augmentation, so the network
    sees normalised pixels whichever `augment.placement` augmented them. Both are built by
    the caller, outside `precision` (a Keras mixed policy, see `precision_policy`; None:
    float32), so they keep computing in float32."""
    if cfg.name not in MODELS:
        raise ConfigError(
            f"model.name {cfg.name!r} is not a known model; valid: {', '.join(sorted(MODELS))}"
        )
    _check_image_size(cfg, image_size)
    with _dtype_policy(precision):
        inputs = keras.Input((image_size, image_size, 3), name="pixels")
        x = augmentation(inputs) if augmentation is not None else inputs
        x = stain_normalization(x) if stain_normalization is not None else x
        features = MODELS[cfg.name](x, cfg, image_size, rescale=rescale)
        # float32 whatever the policy: a softmax rounded to bfloat16 (3 significant digits)
        # feeds the loss and the ROC curves coarse probabilities.
        outputs = keras.layers.Dense(
            num_classes, activation="softmax", name="diagnosis", dtype="float32"
        )(features)
        return keras.Model(inputs, outputs, name=cfg.name)


# train.mixed_precision values that are Keras policy names, used as they are.
MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


def precision_policy(setting: str) -> str | None:
    """`train.mixed_precision` as the Keras dtype policy to build with; None: float32.

    "on" means float16 on a GPU (the tensor cores of every CUDA GPU since Volta; the loss
    is scaled, see `loss_scaled`) and bfloat16 without one (CPUs with AVX512-BF16 or AMX
    compute in it; float16 has no fast CPU kernels). "auto" is "on" when a GPU is visible.
    """
    if setting in MIXED_POLICIES:
        return setting
    if setting not in ("off", "on", "auto"):
        raise ConfigError(
            f"train.mixed_precision {setting!r}: use off, on, auto, {', '.join(MIXED_POLICIES)}"
        )
    gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "on" or (setting == "auto" and gpu):
        return "mixed_float16" if gpu else "mixed_bfloat16"
    return None


def loss_scaled(optimizer: keras.optimizers.Optimizer, precision: str | None):
    """`optimizer`, with dynamic loss scaling under float16, whose small range would round
    small gradients to zero. compile() wraps it too, but records the bare optimizer: a
    reloaded checkpoint came back with a plain Adam and dropped the saved optimizer state."""
    if precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@contextlib.contextmanager
def _dtype_policy(policy: str | None) -> Iterator[None]:
    """Keras' dtype policy for the layers built inside only. It is global to the process
    (per thread) and Ray runs the next trial in the same worker, which must not inherit it."""
    if policy is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


_POOLING = {
    "flatten": keras.layers.Flatten,
    "max": keras.layers.GlobalMaxPooling2D,
    "avg": keras.layers.GlobalAveragePooling2D,
}


@register("simple_cnn")
def _simple_cnn(x, cfg: ModelConfig, image_size: int, *, rescale: float):
    """The classic small CNN: Conv2D/MaxPooling blocks, pooling, Dropout, Dense."""
    # Rescale as configured, then centre on zero: with 0..1 inputs of pale, pink tissue
    # this network stayed near chance; centred, it learnt (lung test accuracy 0.71 -> 1.0).
    x = keras.layers.Rescaling(rescale, offset=-127.5 * rescale)(x)
    for filters in cfg.filters:
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not cfg.batch_norm)(x)
        if cfg.batch_norm:
            x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = _POOLING[cfg.pooling]()(x)
    x = keras.layers.Dropout(cfg.dropout)(x)
    if cfg.dense_units:
        x = keras.layers.Dense(cfg.dense_units, activation="relu")(x)
        x = keras.layers.Dropout(cfg.dropout)(x)
    return x


@dataclass(frozen=True)
class Backbone:
    """A pretrained base from keras.applications, and how it wants its pixels."""

    application: str  # the keras.applications constructor, e.g. "ResNet50"
    # The keras.applications module whose preprocess_input goes in front as a layer; None:
    # the application scales raw 0..255 pixels itself (include_preprocessing), and scaling
    # them again in front would feed it near-black images.
    preprocess: str | None
    min_size: int = 32  # pixels; Keras refuses a smaller input (tests check it does)


# What each preprocess_input does to 0..255 RGB: caffe = to BGR, ImageNet means subtracted;
# tf = to -1..1.
BACKBONES = {
    "vgg16": Backbone("VGG16", "vgg16"),  # caffe
    "mobilenet_v2": Backbone("MobileNetV2", "mobilenet_v2"),  # tf
    "mobilenet_v3_small": Backbone("MobileNetV3Small", None),  # to -1..1 inside
    "efficientnet_v2_b0": Backbone("EfficientNetV2B0", None),  # to 0..1, mean/std inside
    "resnet50": Backbone("ResNet50", "resnet"),  # caffe
    "convnext_tiny": Backbone("ConvNeXtTiny", None),  # to 0..1, mean/std inside
}


def _transfer(x, cfg: ModelConfig, image_size: int, *, rescale: float, name: str):
    """A frozen pretrained base with a new head; optionally its top layers unfrozen."""
    backbone = BACKBONES[name]
    if backbone.preprocess is not None:
        x = ApplicationPreprocess(backbone.preprocess)(x)
    base = _pretrained_base(name, backbone, cfg.weights, image_size)
    base.trainable = cfg.fine_tune_layers > 0
    # More layers than the base has means all of them (a plain slice would count from the
    # end again and freeze the bottom ones).
    for layer in base.layers[: max(len(base.layers) - cfg.fine_tune_layers, 0)]:
        layer.trainable = False
    # training=False keeps BatchNormalization in inference mode even when fine-tuning,
    # the usual Keras transfer-learning recipe: its statistics are ImageNet's.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.layers.Dropout(cfg.dropout)(x)


MODELS.update({name: functools.partial(_transfer, name=name) for name in BACKBONES})


def _pretrained_base(name: str, backbone: Backbone, weights: str | None, image_size: int):
    application = getattr(keras.applications, backbone.application)
    options = {"include_preprocessing": True} if backbone.preprocess is None else {}
    local_weights = _weights(weights)
    try:
        return application(
            include_top=False,
            weights=local_weights,
            input_shape=(image_size, image_size, 3),
            **options,
        )
    except Exception as error:
        url = _failed_download(error) if local_weights == "imagenet" else None
        if url is None:
            raise
        raise ConfigError(_offline_message(name, backbone, url, error)) from None


def _failed_download(error: Exception) -> str | None:
    """The URL Keras' get_file could not fetch (it raises a bare Exception), else None."""
    match = re.match(r"URL fetch failure on (\S+): ", str(error))
    return match.group(1) if match else None


def _offline_message(name: str, backbone: Backbone, url: str, error: Exception) -> str:
    file = url.rsplit("/", 1)[-1]
    reason = str(error).rpartition(" -- ")[2]
    return (
        f"model.weights 'imagenet': Keras could not download the ImageNet weights of {name} "
        f"({file}: {reason}); nodes without internet need a weights file. Where there is "
        f'internet, `python -c "import keras; keras.applications.{backbone.application}'
        f"(include_top=False, weights='imagenet')\"` saves {file} in ~/.keras/models/; copy it "
        "to the nodes or to object storage and set model.weights to its path (or s3:// URI), "
        "or set model.weights: null to train from random weights"
    )


def _check_image_size(cfg: ModelConfig, image_size: int) -> None:
    """A clear error instead of Keras' own (a ValueError deep in a trial's traceback)."""
    if cfg.name in BACKBONES:
        minimum = BACKBONES[cfg.name].min_size
        if image_size < minimum:
            raise ConfigError(
                f"input.image_size {image_size} is too small for model.name {cfg.name}: it "
                f"takes at least {minimum} pixels; raise input.image_size"
            )
    elif image_size < 2 ** len(cfg.filters):  # each block's pooling halves the image
        blocks = len(cfg.filters)
        raise ConfigError(
            f"input.image_size {image_size} is too small for {blocks} model.filters blocks: "
            f"each halves the image, so they take at least {2**blocks} pixels; raise "
            "input.image_size or list fewer model.filters"
        )


def _weights(weights: str | None) -> str | None:
    """'imagenet' and None pass to Keras; a path is fetched to a local file first."""
    if weights in (None, "imagenet"):
        return weights
    if weights.startswith("s3://"):
        parent, _, name = weights.rpartition("/")
        local = Path(tempfile.gettempdir(), "organtrain-weights", name)
        open_storage(parent).download(name, local)
        return str(local)
    if not os.path.isfile(weights):
        raise ConfigError(
            f"model.weights {weights!r}: no such file; give the path of a no-top weights file "
            "(.h5 or .weights.h5, local or s3://), 'imagenet' or null"
        )
    return weights


@keras.saving.register_keras_serializable(package="organtrain")
class ApplicationPreprocess(keras.layers.Layer):
    """`keras.applications.<module>.preprocess_input` as a layer, so it is saved with the model."""

    def __init__(self, module: str, **kwargs):
        super().__init__(**kwargs)
        self.module = module

    def call(self, inputs):
        return getattr(keras.applications, self.module).preprocess_input(inputs)

    def get_config(self):
        return {**super().get_config(), "module": self.module}
