"""The model zoo: Keras classifiers built by name.

Every model takes raw float32 pixels in 0..255 and does its own input scaling as its
first layers (Rescaling for the small CNN, the application's own `preprocess_input` for
transfer learning), so a saved `.keras` file classifies images with no extra code.
Optional augmentation layers go in front of that, when augmentation runs on the device.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import keras

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
) -> keras.Model:
    """The classifier `cfg.name`, with softmax outputs over `num_classes`."""
    if cfg.name not in MODELS:
        raise ConfigError(
            f"model.name {cfg.name!r} is not a known model; valid: {', '.join(sorted(MODELS))}"
        )
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = augmentation(inputs) if augmentation is not None else inputs
    features = MODELS[cfg.name](x, cfg, image_size, rescale=rescale)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="diagnosis")(features)
    return keras.Model(inputs, outputs, name=cfg.name)


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


@register("vgg16")
def _vgg16(x, cfg: ModelConfig, image_size: int, *, rescale: float):
    return _transfer(x, cfg, image_size, keras.applications.VGG16, "vgg16")


@register("mobilenet_v2")
def _mobilenet_v2(x, cfg: ModelConfig, image_size: int, *, rescale: float):
    return _transfer(x, cfg, image_size, keras.applications.MobileNetV2, "mobilenet_v2")


def _transfer(x, cfg: ModelConfig, image_size: int, application, module: str):
    """A frozen pretrained base with a new head; optionally its top layers unfrozen."""
    x = ApplicationPreprocess(module)(x)
    base = application(
        include_top=False, weights=_weights(cfg.weights), input_shape=(image_size, image_size, 3)
    )
    base.trainable = cfg.fine_tune_layers > 0
    for layer in base.layers[: len(base.layers) - cfg.fine_tune_layers]:
        layer.trainable = False
    # training=False keeps BatchNormalization in inference mode even when fine-tuning,
    # the usual Keras transfer-learning recipe: its statistics are ImageNet's.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.layers.Dropout(cfg.dropout)(x)


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
            f"model.weights {weights!r}: no such file; give a .weights.h5 path, 'imagenet' or null"
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
