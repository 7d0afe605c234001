"""`organtrain models export`: a TensorFlow SavedModel that needs no organtrain.

    OUT/<n>/saved_model.pb, variables/      TF Serving's layout: <n> is the next integer
    OUT/<n>/assets.extra/MODEL_CARD.md      the registry version's card
    OUT/<n>/assets.extra/organtrain.json    its registry entry (classes, metrics, settings)

Signatures (both return `probabilities` (N, k) float32, `predicted_class` (N,) string and
`class_names` (N, k) string, so the class names travel with every answer):

    serving_default(image_bytes: string (N,))      encoded PNG, JPEG, BMP or GIF files
    classify_pixels(images: uint8 (N, H, W, 3))     decoded RGB images of any one size

Inside the graph, each image goes the way a training image went: to RGB (alpha on white,
grey to RGB), shrunk to the dataset's max_image_side, then the training pipeline's own
`crop_and_resize`, then the model with training=False (augmentation layers are inert).
Only TensorFlow ops are saved: plain `tf.saved_model.load` runs it; organtrain's Python
layers are not needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from organtrain.errors import ConfigError
from organtrain.predict import ModelSpec, load_keras_model, resolve_model
from organtrain.storage import LocalStorage, Storage, join_key

SIGNATURE_BYTES = "serving_default"
SIGNATURE_PIXELS = "classify_pixels"
EXTRA = "assets.extra"


def export_version(storage: Storage, organ: str, version: str | None, out: Storage) -> str:
    """Export `organ`'s registry version (default: the champion) under `out`; its URL."""
    from organtrain import registry
    from organtrain.model_card import card_text

    spec = resolve_model(storage, organ, version=version)
    model = load_keras_model(storage, spec)
    entry = registry.get_version(storage, organ, spec.version)
    extras = {
        "MODEL_CARD.md": card_text(storage, organ, spec.version).encode(),
        "organtrain.json": json.dumps({**asdict(entry), "export": asdict(spec)}, indent=2).encode(),
    }
    n = next_version_number(out)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, str(n))
        write_saved_model(model, spec, folder, extras)
        return _publish(folder, out, n)


def next_version_number(out: Storage) -> int:
    """TF Serving serves the highest numbered folder: a new export gets the next one."""
    numbers = [int(p) for p in {info.key.split("/")[0] for info in out.list("")} if p.isdigit()]
    return max(numbers, default=0) + 1


def write_saved_model(model, spec: ModelSpec, folder: Path, extras: dict[str, bytes]) -> None:
    """The SavedModel of `model` with its preprocessing inside, written to `folder`."""
    import keras
    import tensorflow as tf

    classes = tf.constant(spec.classes)

    def answer(images):  # float32 (N, S, S, 3) -> the signature's outputs
        probabilities = model(images, training=False)
        n = tf.shape(probabilities)[0]
        return {
            "probabilities": probabilities,
            "predicted_class": tf.gather(classes, tf.argmax(probabilities, axis=1)),
            "class_names": tf.tile(classes[tf.newaxis], [n, 1]),
        }

    def from_bytes(image_bytes):
        return answer(_map(lambda b: model_input(_decode(b), spec), image_bytes, spec))

    def from_pixels(images):
        return answer(_map(lambda i: model_input(i, spec), images, spec))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SIGNATURE_BYTES, from_bytes, [tf.TensorSpec((None,), tf.string, name="image_bytes")]
    )
    archive.add_endpoint(
        SIGNATURE_PIXELS,
        from_pixels,
        [tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")],
    )
    archive.write_out(str(folder), verbose=False)
    (folder / EXTRA).mkdir(exist_ok=True)
    for name, data in extras.items():
        (folder / EXTRA / name).write_bytes(data)


def _map(fn, batch, spec: ModelSpec):
    import tensorflow as tf

    size = spec.image_size
    return tf.map_fn(fn, batch, fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))


def _decode(data):
    """Encoded bytes -> uint8 RGB (H, W, 3); alpha composited on white, as prepare does."""
    import tensorflow as tf

    # JPEG: the accurate integer IDCT, as Pillow (which decoded the training images) uses;
    # TensorFlow's default, the fast one, moves pixels by a grey level or two.
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=0, expand_animations=False),
    )
    image.set_shape((None, None, None))
    pixels = tf.cast(image, tf.float32)
    channels = tf.shape(pixels)[-1]
    colour = tf.cond(
        channels >= 3, lambda: pixels[..., :3], lambda: tf.tile(pixels[..., :1], [1, 1, 3])
    )
    has_alpha = tf.logical_or(tf.equal(channels, 2), tf.equal(channels, 4))
    alpha = tf.cond(
        has_alpha, lambda: pixels[..., -1:] / 255.0, lambda: tf.ones_like(pixels[..., :1])
    )
    rgb = colour * alpha + 255.0 * (1.0 - alpha)
    return tf.cast(tf.clip_by_value(tf.round(rgb), 0, 255), tf.uint8)


def model_input(image, spec: ModelSpec):
    """uint8 RGB (H, W, 3) of any size -> the model's float32 (S, S, 3) input."""

    from organtrain.data.pipeline import crop_and_resize

    if spec.max_image_side:
        image = _shrink(image, spec.max_image_side)
    return crop_and_resize(image, spec.image_size)


def _shrink(image, max_side: int):
    """prepare's downscale of images longer than max_side (Pillow's LANCZOS thumbnail),
    in TensorFlow: lanczos3 with antialiasing, rounded to uint8 as Pillow stores it. The
    pixels can differ from Pillow's by a grey level or so: see the README."""
    import tensorflow as tf

    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    longest = tf.maximum(height, width)

    def shrink():
        scale = max_side / tf.cast(longest, tf.float64)
        size = tf.cast(
            tf.maximum(tf.round(tf.cast(tf.stack([height, width]), tf.float64) * scale), 1),
            tf.int32,
        )
        smaller = tf.image.resize(image, size, method="lanczos3", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(smaller), 0, 255), tf.uint8)

    return tf.cond(longest > max_side, shrink, lambda: image)


def _publish(folder: Path, out: Storage, n: int) -> str:
    """Make OUT/<n> appear whole: a rename on a local folder; on object storage,
    saved_model.pb goes last, since TF Serving loads a version only once it is there."""
    if isinstance(out, LocalStorage):
        target = out.path(str(n))
        if target.exists():
            raise ConfigError(f"{target} exists already; export again to get the next number")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{n}.{os.getpid()}.tmp")
        shutil.copytree(folder, staging)
        os.rename(staging, target)
        return str(target)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "saved_model.pb")
    for path in files:
        out.put_file(join_key(str(n), path.relative_to(folder).as_posix()), path)
    return out.url(str(n))
