"""Stain colour: the HED colour space for stain augmentation, and stain normalisation.

Pixels are float32 in 0..`white` (255 in the pipeline), as everywhere in organtrain.

**HED** (Ruifrok & Johnston 2001, "Quantification of histochemical staining by color
deconvolution"): each pixel's optical density (OD, -ln of the transmitted light) is a sum
of three stains, haematoxylin, eosin and DAB, each with a fixed OD colour. The stain
matrix and the scaling are scikit-image's (`skimage.color.rgb_from_hed`, and `rgb2hed` /
`hed2rgb` since scikit-image 0.19): light is floored at 1e-6 before the log and OD is
divided by ln(1e6), so HED values are OD / 13.8 (tested against scikit-image). One
deliberate difference: `rgb2hed` clamps negative stain amounts to 0, which makes
rgb2hed -> hed2rgb lossy for colours outside the three stains' cone; `rgb_to_hed` keeps
them, so the round trip (and jitter with scale 1, shift 0) is the identity.

**HED jitter** (Tellez et al. 2018, "H&E stain augmentation improves generalization of
convolutional networks for histopathological mitosis detection"; 2019, "Quantifying the
effects of data augmentation and stain color normalization in convolutional neural
networks for computational pathology"): per image and stain, HED' = HED × scale + shift.
In log-light that is one affine map per image, ln(rgb') = ln(rgb) · A + c with
A = HED_FROM_RGB · diag(scale) · RGB_FROM_HED, which is how `hed_jitter` applies it:
per pixel and channel a log, three multiply-adds and an exp (in the tf.data path, compiled
by XLA with the rest of the augmentation: see `log2_light`).

**Stain normalisation** maps each image's colours onto a reference's, at training and at
inference alike, so it is a layer of the saved model (`StainNormalization`) whose reference
lives in the layer's config:

- Reinhard et al. 2001 ("Color transfer between images"): per image, shift and scale each
  channel of Ruderman's l-alpha-beta space to the reference's mean and standard deviation.
- Macenko et al. 2009 ("A method for normalizing histology slides for quantitative
  analysis"): per image, find its two stain vectors (the extreme angles, 1st and 99th
  percentile, of its tissue OD in the plane of the two largest principal components;
  tissue: every channel's OD >= 0.15, Io = 240, as in Macenko's reference code), unmix,
  scale each stain's 99th-percentile amount to the reference's, and remix with the
  reference's stain vectors.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from organtrain.errors import ConfigError, OrgantrainError

# scikit-image's `rgb_from_hed` (skimage/color/colorconv.py, from Ruifrok & Johnston 2001):
# row i is stain i's OD colour (R, G, B): haematoxylin, eosin, DAB.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)  # as scikit-image computes `hed_from_rgb`
LIGHT_FLOOR = 1e-6  # scikit-image's floor on light before the log
HED_UNIT = -math.log(LIGHT_FLOOR)  # OD per HED unit: scikit-image divides OD by ln(1e6)

METHODS = ("none", "reinhard", "macenko")
# Reinhard: RGB -> LMS cone space, log10, then l-alpha-beta (Reinhard et al. 2001, eq. 4, 6).
_RGB_TO_LMS = np.array(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
)
_LOG_LMS_TO_LAB = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
# Macenko's reference code: background light, tissue OD threshold, angle percentile.
MACENKO_IO = 240.0
MACENKO_BETA = 0.15
MACENKO_ALPHA = 1.0  # percent: the stain vectors are the 1st and 99th percentile angles
MACENKO_MAX_PERCENTILE = 99.0  # a stain's "maximum" amount, robust to a few dark pixels
# Fewer tissue pixels than this (in an image, or the reference) gives no stain plane: such
# an image (a blank field) passes through unchanged.
MIN_TISSUE_PIXELS = 16
# The training images a reference is fitted on: the first ones of the train split, which
# `prepare` orders by content hash, so a fixed sample that mixes the diagnoses.
REFERENCE_IMAGES = 64
_MAX_REFERENCE_PIXELS = 1 << 20  # Macenko sorts every tissue pixel's angle: keep it small


def _const(matrix: np.ndarray) -> tf.Tensor:
    return tf.constant(matrix, tf.float32)


def _mix(pixels: tf.Tensor, matrix: Any) -> tf.Tensor:
    """Row vectors (..., 3) times a 3x3 matrix, constant (3, 3) or one per image (B, 3, 3).

    Per image, three broadcast multiply-adds (channel i times row i): elementwise, so XLA
    fuses them with the exp that follows. Each output channel reads all three input
    channels, so XLA computes whatever produced `pixels` three times when it is fused in
    (see `log2_light` for how the jitter avoids that).
    """
    if len(matrix.shape) == 2:
        return tf.tensordot(pixels, matrix, axes=[[-1], [0]])
    matrix = tf.reshape(matrix, [-1] + [1] * (len(pixels.shape) - 2) + [3, 3])
    return sum(pixels[..., i : i + 1] * matrix[..., i, :] for i in range(3))


# --- HED ------------------------------------------------------------------------------------


def rgb_to_hed(pixels: Any, white: float = 255.0) -> tf.Tensor:
    """Pixels (..., 3) in 0..white -> haematoxylin, eosin, DAB amounts (..., 3), in
    scikit-image's units (`rgb2hed` of pixels / white, without its clamp at 0)."""
    light = tf.maximum(tf.cast(pixels, tf.float32) / white, LIGHT_FLOOR)
    return _mix(-tf.math.log(light) / HED_UNIT, _const(HED_FROM_RGB))


def hed_to_rgb(hed: Any, white: float = 255.0) -> tf.Tensor:
    """HED amounts (..., 3) -> pixels in 0..white (`hed2rgb` × white)."""
    light = tf.exp(-HED_UNIT * _mix(tf.cast(hed, tf.float32), _const(RGB_FROM_HED)))
    return tf.clip_by_value(light, 0.0, 1.0) * white


def hed_log_affine(scale: Any, shift: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image (A (B, 3, 3), c (B, 3)) with ln(rgb') = ln(rgb) · A + c for HED' = HED ×
    scale + shift, from scale and shift of shape (B, 3) (H, E, D)."""
    scale, shift = tf.cast(scale, tf.float32), tf.cast(shift, tf.float32)
    to_hed, from_hed = _const(HED_FROM_RGB), _const(RGB_FROM_HED)
    matrices = tf.einsum("ij,bj,jk->bik", to_hed, scale, from_hed)
    offsets = -HED_UNIT * tf.matmul(shift, from_hed)
    return matrices, offsets


def apply_log_affine(
    images: tf.Tensor, matrices: tf.Tensor, offsets: tf.Tensor, value_range: tuple[float, float]
) -> tf.Tensor:
    """Images (B, H, W, 3) in value_range, through ln(rgb') = ln(rgb) · A + c per image."""
    log2_rgb = log2_light(images, value_range[1])
    return light_from_log2(log2_rgb, matrices, offsets, value_range)


def hed_jitter(
    images: Any, scale: Any, shift: Any, value_range: tuple[float, float] = (0.0, 255.0)
) -> tf.Tensor:
    """Tellez's HED jitter of a batch (B, H, W, 3): HED × scale + shift, scale and shift
    (B, 3) per image and stain, back to pixels clipped to value_range."""
    matrices, offsets = hed_log_affine(scale, shift)
    return apply_log_affine(tf.cast(images, tf.float32), matrices, offsets, value_range)


def log2_light(images: tf.Tensor, white: float) -> tf.Tensor:
    """The first half of `apply_log_affine`: log2 of the light, per channel.

    The dataset path (`augment._augment_batch`) compiles the two halves as two functions,
    on purpose: this half fuses with the resample before it and is written to memory once;
    the other reads it. Compiled as one function, XLA fused the resample into each output
    channel's loop of the mix (each reads all three channels) and resampled three times:
    at 224 px, +1.7 CPU ms per image instead of +0.14 (bench/RESULTS.md, "HED jitter").
    """
    return fast_log2(tf.maximum(images / white, LIGHT_FLOOR))


def light_from_log2(
    log2_rgb: tf.Tensor, matrices: tf.Tensor, offsets: tf.Tensor, value_range: tuple[float, float]
) -> tf.Tensor:
    """The second half of `apply_log_affine`: mix, exp, back to pixels in value_range.

    In base 2: log2(rgb') = log2(rgb) · A + c / ln 2 (A has no unit). The exponent is
    capped at 0 (light above white), which is the clip at `white`."""
    low, white = value_range
    exponent = _mix(log2_rgb, tf.cast(matrices, tf.float32))
    exponent += offsets[:, None, None, :] / math.log(2.0)
    return tf.maximum(fast_exp2(tf.minimum(exponent, 0.0)) * white, low)


# log2(1 + t) for t in [0, 1), and 2^t: degree-7 and degree-5 Chebyshev interpolants, in
# powers of t (numpy computes them once, here).
_LOG2_MANTISSA = (
    np.polynomial.chebyshev.Chebyshev.interpolate(lambda t: np.log2(1.0 + t), 7, domain=[0, 1])
    .convert(kind=np.polynomial.Polynomial, domain=[0, 1], window=[0, 1])
    .coef
)
_EXP2_FRACTION = (
    np.polynomial.chebyshev.Chebyshev.interpolate(np.exp2, 5, domain=[0, 1])
    .convert(kind=np.polynomial.Polynomial, domain=[0, 1], window=[0, 1])
    .coef
)


def _polynomial(coefficients: np.ndarray, t: tf.Tensor) -> tf.Tensor:
    value = float(coefficients[-1])
    for coefficient in coefficients[-2::-1]:  # Horner
        value = value * t + float(coefficient)
    return value


def fast_log2(values: tf.Tensor) -> tf.Tensor:
    """log2 of positive, normal float32 values: the exponent bits plus a polynomial in the
    mantissa. Why not tf.math.log: compiled by XLA for the CPU, it costs 0.26 CPU ms per
    224-px image where a mere pass over the pixels costs 0.10 and this function 0.09
    (bench/RESULTS.md, "HED jitter"). Within 1.3e-6 of log2 for 1e-6 <= x <= 1 (float32
    tf.math.log: within 1.5e-6); tested."""
    bits = tf.bitcast(tf.cast(values, tf.float32), tf.int32)
    exponent = tf.cast(tf.bitwise.right_shift(bits, 23) - 127, tf.float32)
    mantissa_bits = tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(bits, 0x007FFFFF), 0x3F800000)
    fraction = tf.bitcast(mantissa_bits, tf.float32) - 1.0  # the mantissa minus 1: [0, 1)
    return exponent + _polynomial(_LOG2_MANTISSA, fraction)


def fast_exp2(exponents: tf.Tensor) -> tf.Tensor:
    """2^y for -125 <= y <= 0 (clamped to that): 2^floor(y) built in the exponent bits,
    times a polynomial in y - floor(y). For the same reason as `fast_log2`: compiled by
    XLA for the CPU, tf.exp costs 0.22 CPU ms per 224-px image, a pass 0.10
    (bench/RESULTS.md, "HED jitter"). Within 2e-7 relative of 2^y; tested."""
    # Above -126, so the result stays a normal float (the CPU flushes subnormals to 0).
    exponents = tf.clip_by_value(tf.cast(exponents, tf.float32), -125.0, 0.0)
    whole = tf.floor(exponents)
    power = tf.bitcast(tf.bitwise.left_shift(tf.cast(whole, tf.int32) + 127, 23), tf.float32)
    return power * _polynomial(_EXP2_FRACTION, exponents - whole)


# --- Reinhard -------------------------------------------------------------------------------


def _to_lab(pixels: tf.Tensor) -> tf.Tensor:
    # (p + 1) / 256 keeps black away from log(0) and maps back exactly.
    lms = _mix((pixels + 1.0) / 256.0, _const(_RGB_TO_LMS.T))
    return _mix(tf.math.log(lms) / math.log(10.0), _const(_LOG_LMS_TO_LAB.T))


def _from_lab(lab: tf.Tensor) -> tf.Tensor:
    log_lms = _mix(lab, _const(np.linalg.inv(_LOG_LMS_TO_LAB).T))
    rgb = _mix(tf.pow(10.0, log_lms), _const(np.linalg.inv(_RGB_TO_LMS).T))
    return tf.clip_by_value(rgb * 256.0 - 1.0, 0.0, 255.0)


def reinhard_statistics(images: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Each image's l-alpha-beta mean and standard deviation, (B, 3) each."""
    lab = _to_lab(tf.cast(images, tf.float32))
    mean, variance = tf.nn.moments(lab, axes=[1, 2])
    return mean, tf.sqrt(variance)


def reinhard_normalize(images: Any, mean: Any, std: Any) -> tf.Tensor:
    """Each image's l-alpha-beta channels shifted and scaled to `mean` and `std` (3,)."""
    lab = _to_lab(tf.cast(images, tf.float32))
    own_mean, variance = tf.nn.moments(lab, axes=[1, 2], keepdims=True)
    own_std = tf.maximum(tf.sqrt(variance), 1e-6)  # a flat image: shifted only
    return _from_lab((lab - own_mean) / own_std * std + mean)


# --- Macenko --------------------------------------------------------------------------------


def _optical_density(pixels: tf.Tensor) -> tf.Tensor:
    return -tf.math.log((pixels + 1.0) / MACENKO_IO)


def _percentile(values: tf.Tensor, q: float, mask: tf.Tensor | None = None) -> tf.Tensor:
    """numpy's linear-interpolation percentile along the last axis of (B, N), over the
    entries where `mask` is True (every entry when None); (B,)."""
    if mask is None:
        mask = tf.ones_like(values, tf.bool)
    ordered = tf.sort(tf.where(mask, values, np.inf), axis=-1)
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=-1)
    position = q / 100.0 * tf.cast(tf.maximum(count - 1, 0), tf.float32)
    below = tf.floor(position)
    above = tf.minimum(below + 1.0, tf.cast(tf.maximum(count - 1, 0), tf.float32))
    low = tf.gather(ordered, tf.cast(below, tf.int32)[:, None], batch_dims=1)[:, 0]
    high = tf.gather(ordered, tf.cast(above, tf.int32)[:, None], batch_dims=1)[:, 0]
    return low + (position - below) * (high - low)


def macenko_fit(pixels: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Stain vectors (B, 3, 2) (columns H, E: unit OD colours), each stain's 99th-percentile
    amount (B, 2), and whether the image had tissue enough to fit them (B,), for pixels
    (B, N, 3) in 0..255."""
    od = _optical_density(tf.cast(pixels, tf.float32))
    tissue = tf.reduce_all(od >= MACENKO_BETA, axis=-1)  # (B, N)
    weight = tf.cast(tissue, tf.float32)[..., None]
    count = tf.reduce_sum(weight, axis=1)  # (B, 1)
    mean = tf.reduce_sum(od * weight, axis=1) / tf.maximum(count, 1.0)
    centred = (od - mean[:, None, :]) * weight
    covariance = (
        tf.matmul(centred, centred, transpose_a=True) / tf.maximum(count - 1.0, 1.0)[:, :, None]
    )
    _, vectors = tf.linalg.eigh(covariance)  # ascending eigenvalues
    second, first = vectors[..., 1], vectors[..., 2]  # (B, 3) each
    # eigh's signs are arbitrary: point the principal axis along the OD (positive), so
    # every tissue pixel's angle lies in (0, pi) and the percentiles do not wrap around.
    first *= tf.where(tf.reduce_sum(first, -1, keepdims=True) < 0, -1.0, 1.0)
    angle = tf.atan2(
        tf.reduce_sum(od * first[:, None, :], -1), tf.reduce_sum(od * second[:, None, :], -1)
    )
    low = _percentile(angle, MACENKO_ALPHA, tissue)[:, None]
    high = _percentile(angle, 100.0 - MACENKO_ALPHA, tissue)[:, None]
    v_low = second * tf.cos(low) + first * tf.sin(low)
    v_high = second * tf.cos(high) + first * tf.sin(high)
    # Haematoxylin (blue-purple) absorbs more red than eosin (pink) does: it goes first.
    h_first = (v_low[:, 0] > v_high[:, 0])[:, None]
    stains = tf.stack([tf.where(h_first, v_low, v_high), tf.where(h_first, v_high, v_low)], axis=-1)
    amounts = _unmix(od, stains)
    max_amounts = tf.stack(
        [_percentile(amounts[:, i], MACENKO_MAX_PERCENTILE) for i in range(2)], axis=-1
    )
    fitted = count[:, 0] >= MIN_TISSUE_PIXELS
    return stains, max_amounts, fitted


def _unmix(od: tf.Tensor, stains: tf.Tensor) -> tf.Tensor:
    """Least-squares stain amounts (B, 2, N) of OD (B, N, 3) for stain vectors (B, 3, 2)."""
    return tf.matmul(tf.linalg.pinv(stains), od, transpose_b=True)


def macenko_normalize(images: Any, stain_matrix: Any, max_amounts: Any) -> tf.Tensor:
    """Each image (B, H, W, 3) unmixed with its own stain vectors, each stain's amounts
    scaled to the reference's 99th percentile, remixed with the reference's vectors."""
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    pixels = tf.reshape(images, [shape[0], -1, 3])
    stains, own_max, fitted = macenko_fit(pixels)
    amounts = _unmix(_optical_density(pixels), stains)
    amounts *= (max_amounts / tf.maximum(own_max, 1e-6))[:, :, None]
    od = tf.einsum("ij,bjn->bni", tf.cast(stain_matrix, tf.float32), amounts)
    out = tf.clip_by_value(MACENKO_IO * tf.exp(-od) - 1.0, 0.0, 255.0)
    out = tf.where(fitted[:, None, None], out, pixels)  # a blank field passes unchanged
    return tf.reshape(out, shape)


# --- references and the layer ---------------------------------------------------------------


def fit_reference(method: str, images: Any) -> dict[str, Any]:
    """The reference `StainNormalization` stores, fitted on images (B, H, W, 3) in 0..255:
    Reinhard, the images' mean l-alpha-beta mean and standard deviation; Macenko, the
    stain vectors and maximum amounts of all their pixels taken together."""
    images = tf.cast(images, tf.float32)
    if method == "reinhard":
        means, stds = reinhard_statistics(images)
        return {
            "mean": [float(v) for v in tf.reduce_mean(means, 0)],
            "std": [float(v) for v in tf.reduce_mean(stds, 0)],
        }
    if method == "macenko":
        pixels = tf.reshape(images, [1, -1, 3])
        stride = max(1, int(pixels.shape[1]) // _MAX_REFERENCE_PIXELS)
        stains, max_amounts, fitted = macenko_fit(pixels[:, ::stride])
        if not bool(fitted[0]):
            raise StainReferenceError(
                f"the reference images have fewer than {MIN_TISSUE_PIXELS} stained pixels "
                f"(optical density >= {MACENKO_BETA} in every channel): Macenko cannot find "
                "stain vectors in them; give a reference image with tissue "
                "(augment.stain_reference) or use augment.stain_normalization: reinhard"
            )
        return {
            "stain_matrix": stains[0].numpy().tolist(),
            "max_amounts": [float(v) for v in max_amounts[0]],
        }
    raise ValueError(f"unknown stain normalisation method {method!r}; known: {METHODS[1:]}")


class StainReferenceError(ConfigError):
    """The stain normalisation reference cannot be fitted or read."""


@keras.saving.register_keras_serializable(package="organtrain")
class StainNormalization(keras.layers.Layer):
    """Reinhard or Macenko stain normalisation against a fixed reference, in the model.

    The reference (`fit_reference`: Reinhard {"mean", "std"}; Macenko {"stain_matrix",
    "max_amounts"}) is plain numbers in the layer's config, so a saved `.keras` model
    normalises new raw images exactly as in training, with no extra file. The same at
    training and inference (not random). Inputs: pixels 0..255, (B, H, W, 3).
    """

    def __init__(self, method: str, reference: dict[str, Any], **kwargs: Any):
        # Logs, exps and an eigen-decomposition: float32 even under a mixed policy.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if method not in METHODS[1:]:
            raise ValueError(f"method must be one of {METHODS[1:]}: {method!r}")
        self.method = method
        self.reference = {key: np.asarray(value).tolist() for key, value in reference.items()}

    def call(self, images: Any) -> Any:
        images = tf.cast(images, tf.float32)
        batch = images if len(images.shape) == 4 else images[None]
        ref = {key: tf.constant(value, tf.float32) for key, value in self.reference.items()}
        if self.method == "reinhard":
            out = reinhard_normalize(batch, ref["mean"], ref["std"])
        else:
            out = macenko_normalize(batch, ref["stain_matrix"], ref["max_amounts"])
        return out if len(images.shape) == 4 else out[0]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "method": self.method, "reference": self.reference}


def normalization_layer(method: str, reference: dict[str, Any] | None) -> StainNormalization | None:
    """The model's normalisation layer for `augment.stain_normalization` (None: "none")."""
    if method == "none":
        return None
    if reference is None:
        raise ValueError(f"stain normalisation {method!r} needs a reference (fit_reference)")
    return StainNormalization(method, reference, name="stain_normalization")


def training_reference(cfg: Any, storage: Any, index: Any, organ: str) -> dict[str, Any] | None:
    """The reference for `cfg.augment.stain_normalization` (None when it is "none"): fitted
    on `augment.stain_reference` when it names an image, else on the first
    REFERENCE_IMAGES images of the organ's train split as the model sees them."""
    augment = cfg.augment
    if augment.stain_normalization == "none":
        return None
    if augment.stain_reference:
        images = read_reference_image(augment.stain_reference, cfg.storage)
    else:
        from organtrain.data.pipeline import build_dataset, shard_files

        files = shard_files(storage, index, organ, "train", cfg.input.cache_dir)
        batches = build_dataset(
            files, image_size=cfg.input.image_size, batch_size=REFERENCE_IMAGES,
            training=False, cache_images=False,
        )  # fmt: skip
        images = next(iter(batches))[0]
    return fit_reference(augment.stain_normalization, images)


def read_reference_image(uri: str, storage_cfg: Any = None) -> tf.Tensor:
    """A reference image (PNG, JPEG, BMP or GIF; local path or s3:// URI) as (1, H, W, 3)."""
    from organtrain.storage import open_storage

    parent, name = str(PurePosixPath(uri).parent), PurePosixPath(uri).name
    if "://" in uri:  # s3://bucket/key, file:///path: split the URI itself
        parent, _, name = uri.rpartition("/")
    what = "give the path or s3:// URI of a PNG or JPEG reference image, or leave it empty "
    what += "to fit the reference on the training split"
    try:
        storage = open_storage(
            parent, endpoint_url=getattr(storage_cfg, "endpoint_url", None),
            region=getattr(storage_cfg, "region", None), setting="augment.stain_reference",
        )  # fmt: skip
        data = storage.get_bytes(name)
    except OrgantrainError as err:
        raise StainReferenceError(f"augment.stain_reference {uri!r}: {err}; {what}") from None
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        raise StainReferenceError(
            f"augment.stain_reference {uri!r}: not an image TensorFlow can decode; {what}"
        ) from None
    return tf.cast(image, tf.float32)[None]
