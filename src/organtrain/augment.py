"""Training-time augmentation: ImageDataGenerator's knobs as in-graph Keras 3 layers.

The classic recipe used `ImageDataGenerator` (rotation, shifts, flips, brightness, zoom,
rescale, fill mode), which Keras 3 no longer has. Its knobs, by their familiar names
(`AugmentConfig`), map onto Keras preprocessing layers, so augmentation runs in the graph:
in a `tf.data` map on the CPU, or as the first layers of the model (on the GPU when there is
one). Every random layer passes images through unchanged at inference (`training=False`).

Where Keras' layers do not mean what ImageDataGenerator meant:

- Brightness: `keras.layers.RandomBrightness` *adds* a delta; ImageDataGenerator *multiplies*
  by a factor. `RandomBrightnessScale` below implements the factor.
- Flips: `RandomFlip("horizontal_and_vertical")` draws one coin per image for both axes
  (so an image is either unchanged or turned 180°); ImageDataGenerator flips each axis
  independently. Two layers, one per axis, restore the four outcomes.
- ImageDataGenerator composes rotation, shift and zoom into one affine matrix and resamples
  once. Here each geometric layer resamples (bilinear) and fills on its own: the same
  geometry, slightly softer images, and pixels rotated out of frame are not brought back by
  a later shift or zoom.
- No uint8 rounding: ImageDataGenerator's brightness goes through an 8-bit PIL image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from organtrain.config import AugmentConfig

# Each random layer gets its own seed, `seed * _SEEDS_PER_PIPELINE + position`, so that two
# layers never share a random stream (two flips with one seed would flip together) and the
# streams of seed 0 and seed 1 never overlap.
_SEEDS_PER_PIPELINE = 16


@keras.saving.register_keras_serializable(package="organtrain")
class RandomBrightnessScale(keras.layers.Layer):
    """Multiply each image by a random factor uniform in `factor_range`, then clip.

    This is ImageDataGenerator's `brightness_range`: PIL's `ImageEnhance.Brightness` blends
    the image with black, i.e. `pixel * factor`, clipped to 0..255. Keras'
    `RandomBrightness` is a different knob: it *adds* `delta * 255` to every pixel, which
    turns black into grey and keeps the absolute contrast, where a factor keeps black black
    and scales contrast with the light. A brighter or dimmer microscope lamp scales the
    transmitted light, i.e. behaves like the factor, so this layer keeps ImageDataGenerator's
    meaning.

    One factor per image (the whole image, all channels). Inputs are pixel values in
    `value_range` (0..255: apply before rescaling). With `training=False` the images pass
    through unchanged. Like Keras' preprocessing layers, a bare call (`layer(images)`)
    augments; inside `model.predict`/`evaluate` Keras passes `training=False`.
    """

    def __init__(
        self,
        factor_range: Sequence[float],
        value_range: Sequence[float] = (0.0, 255.0),
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        low, high = (float(value) for value in factor_range)
        if not 0.0 <= low <= high:
            raise ValueError(f"factor_range must be [low, high] with 0 <= low <= high: {low, high}")
        self.factor_range = (low, high)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.seed = seed
        # A SeedGenerator is a variable the layer tracks: it advances on every call, is
        # saved with the model, and works in eager code, tf.function and tf.data alike.
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool = True) -> Any:
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        factor = keras.random.uniform(
            _per_image_shape(images),
            minval=self.factor_range[0],
            maxval=self.factor_range[1],
            seed=self.seed_generator,
        )
        scaled = images * ops.cast(factor, images.dtype)
        return ops.clip(scaled, self.value_range[0], self.value_range[1])

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "factor_range": list(self.factor_range),
            "value_range": list(self.value_range),
            "seed": self.seed,
        }


def _per_image_shape(images: Any) -> tuple:
    """(B, 1, 1, 1) for a batch, (1, 1, 1) for one image: one random draw per image."""
    if len(images.shape) == 3:
        return (1, 1, 1)
    return (ops.shape(images)[0], 1, 1, 1)


def _layer_seed(seed: int | None, position: int) -> int | None:
    return None if seed is None else seed * _SEEDS_PER_PIPELINE + position


def _random_layers(cfg: AugmentConfig) -> list[tuple[type, dict[str, Any]]]:
    """The random layers (class, arguments), in ImageDataGenerator's order of effect.

    ImageDataGenerator maps each output pixel to the input through rotation @ shift @ zoom,
    which is the same as rotating first, then shifting, then zooming the image. Flips come
    after the geometric transform, brightness last (still before rescaling).
    """
    fill = {"fill_mode": cfg.fill_mode, "fill_value": cfg.cval, "interpolation": "bilinear"}
    layers: list[tuple[type, dict[str, Any]]] = []
    if cfg.rotation_range > 0:
        # Keras' factor is a fraction of a full turn: angle uniform in ±factor * 360°.
        layers.append((keras.layers.RandomRotation, {"factor": cfg.rotation_range / 360.0, **fill}))
    if cfg.width_shift_range > 0 or cfg.height_shift_range > 0:
        shift = {"height_factor": cfg.height_shift_range, "width_factor": cfg.width_shift_range}
        layers.append((keras.layers.RandomTranslation, {**shift, **fill}))
    if cfg.zoom_range > 0:
        # Keras samples the scale 1 + f with f uniform in the factor range, per axis and
        # independently, and reads the input at (scale * output) around the centre, exactly
        # as ImageDataGenerator's zx, zy in [1 - z, 1 + z]. So a positive factor zooms OUT
        # (content shrinks) and a negative one zooms IN; (-z, z) is the same distribution.
        zoom = {"height_factor": (-cfg.zoom_range, cfg.zoom_range)}
        zoom["width_factor"] = zoom["height_factor"]
        layers.append((keras.layers.RandomZoom, {**zoom, **fill}))
    # One layer per axis: RandomFlip("horizontal_and_vertical") flips both axes on the same
    # coin, where ImageDataGenerator tosses one coin per axis.
    if cfg.horizontal_flip:
        layers.append((keras.layers.RandomFlip, {"mode": "horizontal"}))
    if cfg.vertical_flip:
        layers.append((keras.layers.RandomFlip, {"mode": "vertical"}))
    if cfg.brightness_range is not None and tuple(cfg.brightness_range) != (1.0, 1.0):
        layers.append((RandomBrightnessScale, {"factor_range": tuple(cfg.brightness_range)}))
    return layers


def build_augmentation(cfg: AugmentConfig, *, seed: int | None = None) -> keras.Sequential:
    """Random training-time transforms (no rescale), in ImageDataGenerator's order of effect.

    Layers for knobs that are off or zero are left out; with every knob off the model is
    one `Identity` layer (Keras cannot call an empty Sequential). Input: float32 batches
    (B, H, W, 3) with pixel values in 0..255; output: the same shape and dtype. `seed` makes
    the random stream reproducible (each layer gets its own seed derived from it).
    """
    layers = [
        layer_class(seed=_layer_seed(seed, position), **arguments)
        for position, (layer_class, arguments) in enumerate(_random_layers(cfg))
    ]
    return keras.Sequential(layers or [keras.layers.Identity()], name="augmentation")


def augment_in_dataset(
    ds: tf.data.Dataset, cfg: AugmentConfig, *, seed: int | None = None
) -> tf.data.Dataset:
    """Map a dataset of (images, labels) BATCHES through build_augmentation (training=True).

    Unseeded, the map runs with num_parallel_calls=AUTOTUNE. Seeded, it runs one batch at a
    time (each batch's ops still use every core): Keras' random layers draw their seeds from
    a shared state variable that each call reads and advances, so parallel calls take the
    draws in a racy order and a seeded pipeline would not repeat (measured: not one of ten
    identical parallel runs matched). `deterministic=True` only fixes the output order.
    """
    augmentation = build_augmentation(cfg, seed=seed)
    parallel_calls = tf.data.AUTOTUNE if seed is None else None

    def augment(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return augmentation(images, training=True), labels

    return ds.map(augment, num_parallel_calls=parallel_calls)


def resolve_placement(cfg: AugmentConfig) -> str:
    """'dataset' or 'model': cfg.placement, where 'auto' means 'model' when a GPU is visible.

    On a GPU the augmentation is cheap inside the model and keeps the CPU free to decode
    images; without one, tf.data on the CPU overlaps augmentation with the training step.
    """
    if cfg.placement != "auto":
        return cfg.placement
    return "model" if tf.config.list_physical_devices("GPU") else "dataset"
