"""Training-time augmentation: ImageDataGenerator's knobs as in-graph Keras 3 layers.

The classic recipe used `ImageDataGenerator` (rotation, shifts, flips, brightness, zoom,
rescale, fill mode), which Keras 3 no longer has. Its knobs, by their familiar names
(`AugmentConfig`), map onto two Keras layers defined here, so augmentation runs in the
graph: in a `tf.data` map on the CPU, or as the first layers of the model (on the GPU when
there is one). Every random layer passes images through unchanged at inference
(`training=False`).

- `RandomAffine` does rotation, shifts, zoom and flips. Like ImageDataGenerator it composes
  them, per image, into one matrix about the image centre and resamples once (bilinear),
  with ImageDataGenerator's parametrisation: the output pixel p reads the input at
  `C + R·Z·F·(p - C) + R·t` (C the centre, R the rotation, t the shift, Z the per-axis
  zoom, F the flips).
- `RandomBrightnessScale` multiplies by a random factor, as ImageDataGenerator did.

Where this does not mean exactly what ImageDataGenerator meant:

- Brightness: `keras.layers.RandomBrightness` *adds* a delta; ImageDataGenerator
  *multiplies* by a factor, and so does `RandomBrightnessScale` (not Keras' layer).
- Resampling: TensorFlow's bilinear `ImageProjectiveTransformV3` where ImageDataGenerator
  used scipy's order-1 spline (also bilinear). For one set of parameters on a square image
  the two agree to float rounding with fill modes "nearest" and "reflect" (checked against
  `apply_transform` in the tests). "constant" differs in the pixels that read within a pixel of
  the edge (the two libraries blend the image and cval there differently), and scipy's
  "wrap" is its legacy variant, unlike TensorFlow's (a b c d | a b c d).
- Non-square images: ImageDataGenerator's centre uses the height for both axes, and it
  draws its column shift from `height_shift_range` × rows (and the row shift from
  `width_shift_range` × columns). Here the centre is the true one and each knob means its
  name. On square images with equal shift ranges (the defaults) this changes nothing.
- Flips are folded into the one matrix (exact: a flip alone maps pixel centres onto pixel
  centres). ImageDataGenerator flips after the affine transform; flipping before it gives
  the same distribution, since every drawn range is symmetric about zero.
- Random numbers: one uniform draw per parameter per image, as ImageDataGenerator, but from
  TensorFlow's stateless generators, so the streams differ from numpy's.
- No uint8 rounding: ImageDataGenerator's brightness goes through an 8-bit PIL image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from organtrain.config import AugmentConfig

# Each random layer gets its own seed, `seed * _SEEDS_PER_PIPELINE + position`, so that two
# layers never share a random stream and the streams of seed 0 and seed 1 never overlap.
_SEEDS_PER_PIPELINE = 16
FILL_MODES = ("constant", "nearest", "reflect", "wrap")  # what affine_transform supports on TF
# The columns of RandomAffine's per-image parameters (see `affine_matrices`).
AFFINE_PARAMETERS = (
    "angle",  # radians; the output pixel reads the input rotated by this about the centre
    "shift_rows",  # pixels (ImageDataGenerator's ty)
    "shift_cols",  # pixels (ImageDataGenerator's tx)
    "zoom_rows",  # (its zy) the input is read at zoom × the distance from the centre
    "zoom_cols",  # (its zx)
    "flip_rows",  # -1 turns the image upside down (vertical flip), +1 leaves it
    "flip_cols",  # -1 mirrors left-right (horizontal flip), +1 leaves it
)


def _uniform(shape: Any, generator: keras.random.SeedGenerator, seed: Any = None) -> Any:
    """Uniform [0, 1) float32: stateless from `seed` (shape (2,) ints) if given, else from
    the layer's SeedGenerator (which advances)."""
    if seed is not None:
        return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)
    return keras.random.uniform(shape, dtype="float32", seed=generator)


def affine_matrices(parameters: Any, height: Any, width: Any) -> Any:
    """(B, 8) projective transforms for `ops.image.affine_transform` from (B, 7) parameters.

    Each row maps an output pixel (x, y) = (column, row) to the input point it reads, as
    ImageDataGenerator's `rotation @ shift @ zoom` about the centre `((W-1)/2, (H-1)/2)`,
    then its flips: input = C + R·Z·F·(p - C) + R·t.
    """
    angle, shift_r, shift_c, zoom_r, zoom_c, flip_r, flip_c = tf.unstack(
        tf.cast(parameters, tf.float32), axis=-1
    )
    cos, sin = tf.cos(angle), tf.sin(angle)
    # ImageDataGenerator's rotation [[cos, -sin], [sin, cos]] in (x, y), then zoom and flips.
    a00, a01 = cos * zoom_c * flip_c, -sin * zoom_r * flip_r
    a10, a11 = sin * zoom_c * flip_c, cos * zoom_r * flip_r
    centre_x = (tf.cast(width, tf.float32) - 1.0) / 2.0
    centre_y = (tf.cast(height, tf.float32) - 1.0) / 2.0
    b0 = centre_x + cos * shift_c - sin * shift_r - (a00 * centre_x + a01 * centre_y)
    b1 = centre_y + sin * shift_c + cos * shift_r - (a10 * centre_x + a11 * centre_y)
    zeros = tf.zeros_like(angle)
    return tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=-1)


@keras.saving.register_keras_serializable(package="organtrain")
class RandomAffine(keras.layers.Layer):
    """ImageDataGenerator's rotation, shifts, zoom and flips, composed and resampled once.

    Per image: an angle uniform in ±`rotation_range` degrees; shifts uniform in
    ±`width_shift_range` × width and ±`height_shift_range` × height; zoom factors, one per
    axis and independent, uniform in [1 - `zoom_range`, 1 + `zoom_range`] (the input is read
    at zoom × the distance from the centre, so a factor above 1 shrinks the content); and
    one coin per flip axis. One bilinear resample (`keras.ops.image.affine_transform`)
    fills pixels from outside the image by `fill_mode` ("constant" with `fill_value`,
    "nearest", "reflect" or "wrap").

    Random numbers come from the layer's SeedGenerator (seeded by `seed`, saved with the
    model), unless `call` gets a `seed` tensor: then they are a pure function of it
    (stateless), which is what lets `augment_in_dataset` map batches in parallel and still
    repeat. With `training=False` the images pass through unchanged.
    """

    def __init__(
        self,
        rotation_range: float = 0.0,
        width_shift_range: float = 0.0,
        height_shift_range: float = 0.0,
        zoom_range: float = 0.0,
        horizontal_flip: bool = False,
        vertical_flip: bool = False,
        fill_mode: str = "nearest",
        fill_value: float = 0.0,
        interpolation: str = "bilinear",
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {FILL_MODES}: {fill_mode!r}")
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be bilinear or nearest: {interpolation!r}")
        if not 0.0 <= zoom_range < 1.0:
            raise ValueError(f"zoom_range must be in [0, 1): {zoom_range}")
        self.rotation_range = float(rotation_range)
        self.width_shift_range = float(width_shift_range)
        self.height_shift_range = float(height_shift_range)
        self.zoom_range = float(zoom_range)
        self.horizontal_flip = bool(horizontal_flip)
        self.vertical_flip = bool(vertical_flip)
        self.fill_mode = fill_mode
        self.fill_value = float(fill_value)
        self.interpolation = interpolation
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def random_parameters(self, images: Any, seed: Any = None) -> Any:
        """(B, 7) parameters (`AFFINE_PARAMETERS`) for a batch (B, H, W, C)."""
        shape = ops.shape(images)
        height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        unit = _uniform((shape[0], len(AFFINE_PARAMETERS)), self.seed_generator, seed)
        signed = 2.0 * unit - 1.0  # uniform in [-1, 1)
        # A range of zero gives exactly 0 (shift, angle) or 1 (zoom): an exact identity.
        angle = signed[:, 0] * math.radians(self.rotation_range)
        shift_rows = signed[:, 1] * (self.height_shift_range * height)
        shift_cols = signed[:, 2] * (self.width_shift_range * width)
        zoom_rows = 1.0 + signed[:, 3] * self.zoom_range
        zoom_cols = 1.0 + signed[:, 4] * self.zoom_range
        flip_rows = _coin(unit[:, 5], self.vertical_flip)
        flip_cols = _coin(unit[:, 6], self.horizontal_flip)
        columns = [angle, shift_rows, shift_cols, zoom_rows, zoom_cols, flip_rows, flip_cols]
        return tf.stack(columns, axis=-1)

    def call(self, images: Any, training: bool = True, seed: Any = None) -> Any:
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        batch = images if len(images.shape) == 4 else images[None]
        shape = ops.shape(batch)
        transforms = affine_matrices(self.random_parameters(batch, seed), shape[1], shape[2])
        out = ops.image.affine_transform(
            batch,
            transforms,
            interpolation=self.interpolation,
            fill_mode=self.fill_mode,
            fill_value=self.fill_value,
            data_format="channels_last",
        )
        return out if len(images.shape) == 4 else out[0]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "rotation_range": self.rotation_range,
            "width_shift_range": self.width_shift_range,
            "height_shift_range": self.height_shift_range,
            "zoom_range": self.zoom_range,
            "horizontal_flip": self.horizontal_flip,
            "vertical_flip": self.vertical_flip,
            "fill_mode": self.fill_mode,
            "fill_value": self.fill_value,
            "interpolation": self.interpolation,
            "seed": self.seed,
        }


def _coin(unit: Any, enabled: bool) -> Any:
    """-1 (flip) or +1 per image, each with probability 1/2; always +1 when not enabled."""
    if not enabled:
        return tf.ones_like(unit)
    return tf.where(unit < 0.5, -1.0, 1.0)


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
    augments; inside `model.predict`/`evaluate` Keras passes `training=False`. As with
    `RandomAffine`, a `seed` tensor given to `call` replaces the SeedGenerator (stateless).
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

    def call(self, images: Any, training: bool = True, seed: Any = None) -> Any:
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        low, high = self.factor_range
        factor = low + (high - low) * _uniform(_per_image_shape(images), self.seed_generator, seed)
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
    """The random layers (class, arguments): the geometry first, brightness last.

    ImageDataGenerator's order of effect: the affine transform, then flips (both in
    `RandomAffine`), then brightness (still before rescaling).
    """
    layers: list[tuple[type, dict[str, Any]]] = []
    geometry = {
        "rotation_range": cfg.rotation_range,
        "width_shift_range": cfg.width_shift_range,
        "height_shift_range": cfg.height_shift_range,
        "zoom_range": cfg.zoom_range,
        "horizontal_flip": cfg.horizontal_flip,
        "vertical_flip": cfg.vertical_flip,
    }
    if any(geometry.values()):
        fill = {"fill_mode": cfg.fill_mode, "fill_value": cfg.cval, "interpolation": "bilinear"}
        layers.append((RandomAffine, {**geometry, **fill}))
    if cfg.brightness_range is not None and tuple(cfg.brightness_range) != (1.0, 1.0):
        layers.append((RandomBrightnessScale, {"factor_range": tuple(cfg.brightness_range)}))
    return layers


def build_augmentation(cfg: AugmentConfig, *, seed: int | None = None) -> keras.Sequential:
    """Random training-time transforms (no rescale), in ImageDataGenerator's order of effect.

    At most two layers, `RandomAffine` and `RandomBrightnessScale`; a layer whose knobs are
    all off is left out, and with every knob off the model is one `Identity` layer (Keras
    cannot call an empty Sequential). Input: float32 batches (B, H, W, 3) with pixel values
    in 0..255; output: the same shape and dtype. `seed` makes the random stream reproducible
    (each layer gets its own seed derived from it).
    """
    layers = [
        layer_class(seed=_layer_seed(seed, position), **arguments)
        for position, (layer_class, arguments) in enumerate(_random_layers(cfg))
    ]
    return keras.Sequential(layers or [keras.layers.Identity()], name="augmentation")


def augment_in_dataset(
    ds: tf.data.Dataset,
    cfg: AugmentConfig,
    *,
    seed: int | None = None,
    first_step: int | None = None,
) -> tf.data.Dataset:
    """Map a dataset of (images, labels) BATCHES through the augmentation (training=True).

    The map runs with num_parallel_calls=AUTOTUNE, seeded or not. Each batch gets its own
    stateless seed, a value of `tf.data.Dataset.random(seed)` zipped with the batches, and
    the layers draw from that seed instead of their SeedGenerators (whose shared state
    parallel calls would advance in a racy order). `deterministic=True` keeps the batches
    in order. So a seeded pipeline repeats exactly, in parallel:

    - `first_step=None`: a batch's transforms depend on (seed, iteration, batch position):
      each new iterator (each epoch of a one-epoch dataset) draws new transforms, the way
      `shuffle(seed=..., reshuffle_each_iteration=True)` does.
    - `first_step=k` (the trainer's multi-epoch stream): the i-th batch gets the (k + i)-th
      seed of one fixed stream, a pure function of (seed, training step), so a run resumed
      at step k draws what an uninterrupted one draws there.
    """
    layers = [
        layer
        for layer in build_augmentation(cfg, seed=seed).layers
        if not isinstance(layer, keras.layers.Identity)
    ]
    if not layers:
        return ds
    batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=first_step is None)
    batch_seeds = batch_seeds.skip(first_step or 0)
    stream = tf.constant(0 if seed is None else seed, tf.int64)

    def augment(
        batch_seed: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]
    ) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = batch
        seeds = tf.random.experimental.stateless_split(
            tf.stack([batch_seed, stream]), num=len(layers)
        )
        for position, layer in enumerate(layers):
            images = layer(images, training=True, seed=seeds[position])
        return images, labels

    return tf.data.Dataset.zip(batch_seeds, ds).map(
        augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


def resolve_placement(cfg: AugmentConfig) -> str:
    """'dataset' or 'model': cfg.placement, where 'auto' means 'model' when a GPU is visible.

    On a GPU the augmentation is cheap inside the model and keeps the CPU free to decode
    images; without one, tf.data on the CPU overlaps augmentation with the training step.
    """
    if cfg.placement != "auto":
        return cfg.placement
    return "model" if tf.config.list_physical_devices("GPU") else "dataset"
