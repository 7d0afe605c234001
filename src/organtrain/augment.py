"""Training-time augmentation: ImageDataGenerator's knobs as in-graph Keras 3 layers.

The classic recipe used `ImageDataGenerator` (rotation, shifts, flips, brightness, zoom,
rescale, fill mode), which Keras 3 no longer has. Its knobs, by their familiar names
(`AugmentConfig`), map onto two Keras layers defined here, so augmentation runs in the
graph: in a `tf.data` map on the CPU (`augment_in_dataset`: the layers draw, one
XLA-compiled function applies the draws, ~3x cheaper per image), or as the first layers of
the model (on the GPU when there is one). Every random layer passes images through
unchanged at inference (`training=False`).

- `RandomAffine` does rotation, shifts, zoom and flips. Like ImageDataGenerator it composes
  them, per image, into one matrix about the image centre and resamples once (bilinear),
  with ImageDataGenerator's parametrisation: the output pixel p reads the input at
  `C + R·Z·F·(p - C) + R·t` (C the centre, R the rotation, t the shift, Z the per-axis
  zoom, F the flips).
- `RandomBrightnessScale` multiplies by a random factor, as ImageDataGenerator did.
- `RandomHEDJitter` (not an ImageDataGenerator knob) scales and shifts each image's
  haematoxylin, eosin and DAB amounts (Tellez et al. 2019); the colour maths is in
  `organtrain.stain`, which also holds stain normalisation (not random: a model layer).

Where this does not mean exactly what ImageDataGenerator meant:

- Brightness: `keras.layers.RandomBrightness` *adds* a delta; ImageDataGenerator
  *multiplies* by a factor, and so does `RandomBrightnessScale` (not Keras' layer).
- Resampling: TensorFlow's bilinear `ImageProjectiveTransformV3` (in the model; its
  compiled equivalent `affine_resample` in tf.data) where ImageDataGenerator used scipy's
  order-1 spline (also bilinear). For one set of parameters on a square image
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

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from organtrain import stain
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


def affine_resample(
    images: tf.Tensor,
    transforms: tf.Tensor,
    *,
    fill_mode: str = "nearest",
    fill_value: float = 0.0,
    interpolation: str = "bilinear",
) -> tf.Tensor:
    """`ImageProjectiveTransformV3` for affine `transforms` (B, 8), in plain gathers.

    What `keras.ops.image.affine_transform` computes for the matrices of `affine_matrices`
    (whose last two entries are 0): the same input point per output pixel, the same fill
    modes and the same bilinear weights, op for op, so that run as TF ops the two agree bit
    for bit (tested). Its point is to be compiled by XLA (`_augment_batch`): the op computes
    the point and its fill mode again for each channel, with no fusion, and costs ~3x
    more CPU per 224-px image than this function compiled (bench/RESULTS.md). Compiled,
    XLA may fuse a multiply-add, which moves the sampled point by float rounding (~1e-5 px).
    """
    shape = tf.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    rows, cols = tf.meshgrid(
        tf.range(tf.cast(height, tf.float32)), tf.range(tf.cast(width, tf.float32)), indexing="ij"
    )
    cols, rows = tf.reshape(cols, [1, -1]), tf.reshape(rows, [1, -1])  # (1, H*W) each
    a0, a1, a2, b0, b1, b2 = (transforms[:, i : i + 1] for i in range(6))
    # The op's order of operations (its projection is 1 for an affine matrix).
    x = a0 * cols + a1 * rows + a2  # (B, H*W): the input column each output pixel reads
    y = b0 * cols + b1 * rows + b2
    pixels = tf.reshape(images, [-1, channels])  # (B*H*W, C): one gather reads all channels
    first = (tf.range(batch) * height * width)[:, None]  # each image's first pixel

    if fill_mode == "constant":

        def read(row: tf.Tensor, col: tf.Tensor) -> tf.Tensor:
            inside = (row >= 0) & (row < tf.cast(height, tf.float32))
            inside &= (col >= 0) & (col < tf.cast(width, tf.float32))
            row = tf.cast(tf.clip_by_value(row, 0.0, tf.cast(height - 1, tf.float32)), tf.int32)
            col = tf.cast(tf.clip_by_value(col, 0.0, tf.cast(width - 1, tf.float32)), tf.int32)
            values = tf.gather(pixels, tf.reshape(first + row * width + col, [-1]))
            return tf.where(tf.reshape(inside, [-1, 1]), values, fill_value)

    else:
        x, y = _map_coordinate(x, width, fill_mode), _map_coordinate(y, height, fill_mode)

        def read(row: tf.Tensor, col: tf.Tensor) -> tf.Tensor:
            # Mapped points lie in [0, len - 1], so only a neighbour at len falls outside,
            # and its weight is 0: reading the edge instead adds the same 0.
            row = tf.minimum(tf.cast(row, tf.int32), height - 1)
            col = tf.minimum(tf.cast(col, tf.int32), width - 1)
            return tf.gather(pixels, tf.reshape(first + row * width + col, [-1]))

    def per_pixel(weight: tf.Tensor) -> tf.Tensor:
        return tf.reshape(weight, [-1, 1])  # (B*H*W, 1): one weight for every channel

    if interpolation == "nearest":
        out = read(_round_half_away(y), _round_half_away(x))
    else:
        y0, x0 = tf.floor(y), tf.floor(x)
        y1, x1 = y0 + 1.0, x0 + 1.0
        top = per_pixel(x1 - x) * read(y0, x0) + per_pixel(x - x0) * read(y0, x1)
        bottom = per_pixel(x1 - x) * read(y1, x0) + per_pixel(x - x0) * read(y1, x1)
        out = per_pixel(y1 - y) * top + per_pixel(y - y0) * bottom
    return tf.reshape(out, shape)


def _map_coordinate(coord: tf.Tensor, length: tf.Tensor, fill_mode: str) -> tf.Tensor:
    """A point outside [0, length - 1] brought inside as the op's fill modes do (TensorFlow's
    `MapCoordinate`, image_ops.h, including its "wrap" period of length - 1 steps)."""
    size = tf.cast(length, tf.float32)
    if fill_mode == "reflect":  # (d c b a | a b c d | d c b a)
        period = 2.0 * size
        below = period * tf.floor(-coord / period) + coord
        below = tf.where(below < -size, below + period, -below - 1.0)
        above = coord - period * tf.floor(coord / period)
        above = tf.where(above >= size, period - above - 1.0, above)
        coord = tf.where(coord < 0, below, tf.where(coord > size - 1.0, above, coord))
    elif fill_mode == "wrap":  # (a b c d | a b c d | a b c d)
        steps = tf.maximum(size - 1.0, 1.0)
        below = coord + size * (tf.floor(-coord / steps) + 1.0)
        above = coord - size * tf.floor(coord / steps)
        coord = tf.where(coord < 0, below, tf.where(coord > size - 1.0, above, coord))
    return tf.clip_by_value(coord, 0.0, size - 1.0)  # "nearest": the edge pixel


def _round_half_away(value: tf.Tensor) -> tf.Tensor:
    """std::round, as the op rounds for nearest interpolation (tf.round rounds half to even)."""
    down, up = tf.floor(value), tf.math.ceil(value)
    return tf.where(
        value >= 0,
        down + tf.cast(value - down >= 0.5, tf.float32),
        up - tf.cast(up - value >= 0.5, tf.float32),
    )


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

    def transforms(self, images: Any, seed: Any = None) -> Any:
        """(B, 8) matrices for a batch (B, H, W, C): this call's random draw, composed."""
        shape = ops.shape(images)
        return affine_matrices(self.random_parameters(images, seed), shape[1], shape[2])

    def call(self, images: Any, training: bool = True, seed: Any = None) -> Any:
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        batch = images if len(images.shape) == 4 else images[None]
        transforms = self.transforms(batch, seed)
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

    def factors(self, images: Any, seed: Any = None) -> Any:
        """One factor per image, (B, 1, 1, 1) for a batch: this call's random draw."""
        low, high = self.factor_range
        return low + (high - low) * _uniform(_per_image_shape(images), self.seed_generator, seed)

    def call(self, images: Any, training: bool = True, seed: Any = None) -> Any:
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        scaled = images * ops.cast(self.factors(images, seed), images.dtype)
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


@keras.saving.register_keras_serializable(package="organtrain")
class RandomHEDJitter(keras.layers.Layer):
    """Tellez et al.'s HED stain jitter: per image and per stain (haematoxylin, eosin,
    DAB), amount × U[1 - sigma, 1 + sigma] + U[-bias, bias] in scikit-image's HED space
    (`stain.rgb_to_hed`), back to pixels clipped to `value_range`.

    Staining varies between labs, scanners and days; this varies it the way stains vary
    (more or less of each dye) rather than hue or brightness at large. sigma 0 and bias 0
    is the identity (to float rounding). Seeded, stateless with a `seed` tensor, and the
    identity at inference, as `RandomBrightnessScale`.
    """

    def __init__(
        self,
        sigma: float = 0.0,
        bias: float = 0.0,
        value_range: Sequence[float] = (0.0, 255.0),
        seed: int | None = None,
        **kwargs: Any,
    ):
        # Logs and exps of light: float32 even under a mixed-precision policy.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not 0.0 <= sigma < 1.0:
            raise ValueError(f"sigma must be in [0, 1) (a stain's scale stays positive): {sigma}")
        if bias < 0.0:
            raise ValueError(f"bias must be >= 0: {bias}")
        self.sigma = float(sigma)
        self.bias = float(bias)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def draw(self, images: Any, seed: Any = None) -> Any:
        """This call's random draw, (B, 6) uniform in [0, 1): see `hed_scales_and_shifts`.
        Raw, so the dataset path spends one op per batch on it and the rest compiled."""
        return _uniform((ops.shape(images)[0], 6), self.seed_generator, seed)

    def call(self, images: Any, training: bool = True, seed: Any = None) -> Any:
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        batch = images if len(images.shape) == 4 else images[None]
        scale, shift = hed_scales_and_shifts(self.draw(batch, seed), self.sigma, self.bias)
        out = stain.hed_jitter(batch, scale, shift, self.value_range)
        return out if len(images.shape) == 4 else out[0]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "sigma": self.sigma,
            "bias": self.bias,
            "value_range": list(self.value_range),
            "seed": self.seed,
        }


def hed_scales_and_shifts(unit: Any, sigma: float, bias: float) -> tuple[Any, Any]:
    """RandomHEDJitter's (B, 3) scales and (B, 3) shifts (H, E, D) from its (B, 6) draw."""
    signed = 2.0 * unit - 1.0  # uniform in [-1, 1)
    return 1.0 + sigma * signed[:, :3], bias * signed[:, 3:]


def _per_image_shape(images: Any) -> tuple:
    """(B, 1, 1, 1) for a batch, (1, 1, 1) for one image: one random draw per image."""
    if len(images.shape) == 3:
        return (1, 1, 1)
    return (ops.shape(images)[0], 1, 1, 1)


def _layer_seed(seed: int | None, position: int) -> int | None:
    return None if seed is None else seed * _SEEDS_PER_PIPELINE + position


def _random_layers(cfg: AugmentConfig) -> list[tuple[type, dict[str, Any]]]:
    """The random layers (class, arguments): the geometry first, then brightness, then
    the stain jitter.

    ImageDataGenerator's order of effect: the affine transform, then flips (both in
    `RandomAffine`), then brightness (still before rescaling). The HED jitter, which
    ImageDataGenerator did not have, comes last so that turning it on leaves the other
    layers' positions, hence their seeds and draws, as they were: a search comparing
    jitter on and off compares the same geometry and brightness.
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
    if cfg.hed_jitter or cfg.hed_bias:
        layers.append((RandomHEDJitter, {"sigma": cfg.hed_jitter, "bias": cfg.hed_bias}))
    return layers


def build_augmentation(cfg: AugmentConfig, *, seed: int | None = None) -> keras.Sequential:
    """Random training-time transforms (no rescale), in ImageDataGenerator's order of effect.

    At most three layers, `RandomAffine`, `RandomBrightnessScale` and `RandomHEDJitter`
    (stain normalisation is not random, so not here: see `organtrain.stain`); a layer whose
    knobs are all off is left out, and with every knob off the model is one `Identity`
    layer (Keras cannot call an empty Sequential). Input: float32 batches (B, H, W, 3) with
    pixel values in 0..255; output: the same shape and dtype. `seed` makes the random stream
    reproducible (each layer gets its own seed derived from it).
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
    fused: bool = True,
) -> tf.data.Dataset:
    """Map a dataset of (images, labels) BATCHES through the augmentation (training=True).

    The layers of `build_augmentation` draw each batch's parameters; one XLA-compiled
    function (`_augment_batch`) then applies them all: the affine resample and the
    brightness factor in one pass over the pixels, ~3x less CPU than the layers' own ops
    at 224 px (see `affine_resample`); the HED jitter's mix, when on, in a second pass
    (`_hed_from_log2`). Same knobs, same draws, same sampling; the pixels agree with the
    layers' to float rounding of the sampled point (tested).

    The map runs with num_parallel_calls=AUTOTUNE, seeded or not (in `build_dataset`,
    whose tf.data autotuning is off, that is as many calls as TensorFlow has inter-op
    threads: see `data.pipeline._static_parallelism`). Each batch gets its own
    stateless seed, a value of `tf.data.Dataset.random(seed)` zipped with the batches, and
    the layers draw from that seed instead of their SeedGenerators (whose shared state
    parallel calls would advance in a racy order). `deterministic=True` keeps the batches
    in order. So a seeded pipeline repeats exactly, in parallel, whatever the thread count:

    - `first_step=None`: a batch's transforms depend on (seed, iteration, batch position):
      each new iterator (each epoch of a one-epoch dataset) draws new transforms, the way
      `shuffle(seed=..., reshuffle_each_iteration=True)` does.
    - `first_step=k` (the trainer's multi-epoch stream): the i-th batch gets the (k + i)-th
      seed of one fixed stream, a pure function of (seed, training step), so a run resumed
      at step k draws what an uninterrupted one draws there.

    `fused=False` runs the layers' own ops instead, one after the other (what
    `placement: model` runs, there on the accelerator): for comparison, and the fallback
    where this TensorFlow cannot compile XLA.
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
    apply = _fused_augmentation(layers) if fused and _xla_compiles() else _layer_by_layer(layers)

    def augment(
        batch_seed: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]
    ) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = batch
        seeds = tf.random.experimental.stateless_split(
            tf.stack([batch_seed, stream]), num=len(layers)
        )
        return apply(tf.cast(images, tf.float32), seeds), labels

    return tf.data.Dataset.zip(batch_seeds, ds).map(
        augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


Augmentation = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (images, seeds per layer)


def _fused_augmentation(layers: list[keras.layers.Layer]) -> Augmentation:
    """The layers' draws, applied by `_augment_batch` in one compiled pass (and, for the
    HED jitter, a second one: `_hed_from_log2`)."""
    affine = next((layer for layer in layers if isinstance(layer, RandomAffine)), None)
    brightness = next((layer for layer in layers if isinstance(layer, RandomBrightnessScale)), None)
    hed = next((layer for layer in layers if isinstance(layer, RandomHEDJitter)), None)
    geometry = None
    if affine is not None:
        geometry = (affine.fill_mode, affine.fill_value, affine.interpolation)
    value_range = None if brightness is None else brightness.value_range
    hed_range = None if hed is None else hed.value_range

    def apply(images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
        # Each layer draws from its own seed, by its position (as `_layer_by_layer`).
        transforms = factors = None
        if affine is not None:
            transforms = affine.transforms(images, seeds[layers.index(affine)])
        if brightness is not None:
            factors = brightness.factors(images, seeds[layers.index(brightness)])
        out = _augment_batch(images, transforms, factors, geometry, value_range, hed_range)
        if hed is None:
            return out
        # `out` is the log2 light here; the jitter's mix and exp are a second compiled
        # function, so XLA resamples each pixel once (see `stain.log2_light`).
        unit = hed.draw(images, seeds[layers.index(hed)])
        return _hed_from_log2(out, unit, hed.sigma, hed.bias, hed_range)

    return apply


def _layer_by_layer(layers: list[keras.layers.Layer]) -> Augmentation:
    """Each layer's own call, one after the other: where XLA cannot compile."""

    def apply(images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
        for position, layer in enumerate(layers):
            images = layer(images, training=True, seed=seeds[position])
        return images

    return apply


@tf.function(jit_compile=True)
def _augment_batch(
    images: tf.Tensor,
    transforms: tf.Tensor | None,
    factors: tf.Tensor | None,
    geometry: tuple[str, float, str] | None,
    value_range: tuple[float, float] | None,
    hed_range: tuple[float, float] | None = None,
) -> tf.Tensor:
    """RandomAffine's resample, then RandomBrightnessScale's factor and clip, in one pass;
    with `hed_range`, then the log2 light RandomHEDJitter mixes (`stain.log2_light`),
    which is then what it returns (`_hed_from_log2` finishes the jitter).

    Compiled, XLA fuses the point arithmetic, the four gathers, the blend, the brightness
    and the log into one loop over the output pixels, with no intermediate images.
    `geometry` (fill mode, fill value, interpolation), `value_range` and `hed_range` are
    Python values, part of the trace; None leaves that step out.
    """
    if transforms is not None:
        fill_mode, fill_value, interpolation = geometry
        images = affine_resample(
            images, transforms, fill_mode=fill_mode, fill_value=fill_value,
            interpolation=interpolation,
        )  # fmt: skip
    if factors is not None:
        images = tf.clip_by_value(images * factors, value_range[0], value_range[1])
    if hed_range is not None:
        images = stain.log2_light(images, hed_range[1])
    return images


@tf.function(jit_compile=True)
def _hed_from_log2(
    log2_light: tf.Tensor,
    unit: tf.Tensor,
    sigma: float,
    bias: float,
    value_range: tuple[float, float],
) -> tf.Tensor:
    """RandomHEDJitter from its draw `unit`, on the log2 light `_augment_batch` returned:
    the per-image matrices (tiny), the mix and the exp, compiled; `sigma`, `bias` and
    `value_range` are Python values, part of the trace."""
    scale, shift = hed_scales_and_shifts(unit, sigma, bias)
    matrices, offsets = stain.hed_log_affine(scale, shift)
    return stain.light_from_log2(log2_light, matrices, offsets, value_range)


@functools.cache
def _xla_compiles() -> bool:
    """Whether this TensorFlow build compiles `_augment_batch` for the CPU (the official
    wheels do; a build without XLA falls back to the layers' own ops, ~3x slower)."""
    try:
        with tf.device("/cpu:0"):
            identity = tf.constant([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
            _augment_batch(
                tf.zeros((1, 2, 2, 3)), identity, None, ("nearest", 0.0, "bilinear"), None
            )
        return True
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.NotFoundError):
        return False


def resolve_placement(cfg: AugmentConfig) -> str:
    """'dataset' or 'model': cfg.placement, where 'auto' means 'model' when a GPU is visible.

    On a GPU the augmentation is cheap inside the model and keeps the CPU free to decode
    images; without one, tf.data on the CPU overlaps augmentation with the training step.
    """
    if cfg.placement != "auto":
        return cfg.placement
    return "model" if tf.config.list_physical_devices("GPU") else "dataset"
