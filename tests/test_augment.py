"""In-graph augmentation: each ImageDataGenerator knob does what its name said.

Every check runs twice, eagerly and inside a tf.data pipeline (`augment_in_dataset`), since
Keras layers take a different code path in a traced tf.data function. Images are small and
carry structure (gradients, a marker, a line, a dot) so that each transform is measurable.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from organtrain import augment
from organtrain.augment import (
    RandomAffine,
    RandomBrightnessScale,
    affine_matrices,
    augment_in_dataset,
    build_augmentation,
    resolve_placement,
)
from organtrain.config import AugmentConfig, ModelConfig
from organtrain.models import build_model

MODES = ["eager", "dataset"]
ALL_OFF = {
    "rotation_range": 0.0,
    "width_shift_range": 0.0,
    "height_shift_range": 0.0,
    "horizontal_flip": False,
    "vertical_flip": False,
    "brightness_range": None,
    "zoom_range": 0.0,
}


def only(**knobs) -> AugmentConfig:
    """A config with every knob off except `knobs`."""
    return AugmentConfig(**{**ALL_OFF, **knobs})


def augmented(images: np.ndarray, cfg: AugmentConfig, mode: str, seed: int | None = 0):
    """Augment `images` eagerly, or through augment_in_dataset in batches of 16."""
    if mode == "eager":
        return keras.ops.convert_to_numpy(build_augmentation(cfg, seed=seed)(images))
    labels = np.arange(len(images))
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    batches = list(augment_in_dataset(ds, cfg, seed=seed).as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)
    return np.concatenate([b[0] for b in batches])


def run_layer(layer, images: np.ndarray, mode: str, *, training: bool) -> np.ndarray:
    """Call a layer eagerly or inside a tf.data map, with an explicit training flag."""
    if mode == "eager":
        return keras.ops.convert_to_numpy(layer(images, training=training))
    ds = tf.data.Dataset.from_tensor_slices(images).batch(16)
    ds = ds.map(lambda batch: layer(batch, training=training))
    return np.concatenate(list(ds.as_numpy_iterator()))


def pattern(n: int, size: int = 16) -> np.ndarray:
    """Asymmetric images: a column gradient (R), a row gradient (G), a top-left marker (B)."""
    rows, cols = np.mgrid[0:size, 0:size].astype("float32")
    image = np.stack([10 + 200 * cols / size, 10 + 200 * rows / size, np.zeros_like(rows)], -1)
    image[1:4, 1:3, 2] = 250
    return np.repeat(image[None], n, axis=0)


def centroid(images: np.ndarray) -> np.ndarray:
    """Intensity-weighted (row, col) centre of each image, shape (N, 2)."""
    mass = images.sum(axis=-1)
    rows, cols = np.mgrid[0 : mass.shape[1], 0 : mass.shape[2]]
    total = mass.sum(axis=(1, 2))
    return np.stack([(mass * rows).sum((1, 2)) / total, (mass * cols).sum((1, 2)) / total], 1)


@pytest.mark.parametrize("mode", MODES)
def test_all_knobs_off_is_the_identity(mode):
    cfg = only()
    assert all(isinstance(layer, keras.layers.Identity) for layer in build_augmentation(cfg).layers)
    images = pattern(4)
    np.testing.assert_allclose(augmented(images, cfg, mode), images)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("knob", "mirror"), [("horizontal_flip", np.fliplr), ("vertical_flip", np.flipud)]
)
def test_a_flip_gives_the_image_or_its_mirror(mode, knob, mirror):
    images = pattern(32)
    out = augmented(images, only(**{knob: True}), mode)
    same = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    mirrored = [np.array_equal(o, mirror(i)) for o, i in zip(out, images, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


@pytest.mark.parametrize("mode", MODES)
def test_both_flips_are_independent_as_in_image_data_generator(mode):
    # RandomFlip("horizontal_and_vertical") would flip both axes on one coin: only two
    # outcomes. ImageDataGenerator has four.
    images = pattern(64)
    out = augmented(images, only(horizontal_flip=True, vertical_flip=True), mode)
    flips = {
        "none": lambda i: i,
        "h": np.fliplr,
        "v": np.flipud,
        "hv": lambda i: np.flipud(np.fliplr(i)),
    }
    seen = {
        name
        for o, i in zip(out, images, strict=True)
        for name, f in flips.items()
        if np.array_equal(o, f(i))
    }
    assert seen == set(flips)


@pytest.mark.parametrize("mode", MODES)
def test_brightness_multiplies_and_clips(mode):
    images = pattern(4)
    np.testing.assert_allclose(
        augmented(images, only(brightness_range=[0.5, 0.5]), mode), 0.5 * images, rtol=1e-6
    )
    grey = np.full((4, 8, 8, 3), 128.0, "float32")
    np.testing.assert_array_equal(augmented(grey, only(brightness_range=[2.0, 2.0]), mode), 255.0)


@pytest.mark.parametrize("mode", MODES)
def test_brightness_draws_one_factor_per_image_in_the_range(mode):
    images = np.random.default_rng(0).uniform(10, 170, (32, 8, 8, 3)).astype("float32")
    out = augmented(images, only(brightness_range=[0.5, 1.5]), mode)
    ratio = out / images  # no clipping: 170 * 1.5 = 255
    per_image = ratio.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(ratio, per_image[:, None, None, None] * np.ones_like(ratio), 1e-5)
    assert per_image.min() >= 0.5 and per_image.max() <= 1.5
    assert per_image.std() > 0.15  # uniform on [0.5, 1.5] has std 0.29


def test_brightness_layer_identity_at_inference_single_image_and_config():
    layer = RandomBrightnessScale([0.5, 1.5], seed=1)
    image = np.random.default_rng(0).uniform(10, 170, (8, 8, 3)).astype("float32")  # no clip
    np.testing.assert_array_equal(layer(image, training=False), image)
    ratio = keras.ops.convert_to_numpy(layer(image)) / image  # one unbatched image
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-5)
    clone = RandomBrightnessScale.from_config(layer.get_config())
    assert clone.factor_range == (0.5, 1.5) and clone.seed == 1
    with pytest.raises(ValueError, match="factor_range"):
        RandomBrightnessScale([1.5, 0.5])


def line_images(n: int, size: int, *, vertical: bool) -> np.ndarray:
    """A bright line through the middle, on black."""
    images = np.zeros((n, size, size, 3), "float32")
    if vertical:
        images[:, :, size // 2] = 200
    else:
        images[:, size // 2, :] = 200
    return images


@pytest.mark.parametrize("mode", MODES)
def test_width_shift_moves_content_horizontally_only(mode):
    size = 32
    images = line_images(32, size, vertical=True)
    cfg = only(width_shift_range=0.15, fill_mode="constant", cval=0.0)
    out = augmented(images, cfg, mode)
    shift = centroid(out)[:, 1] - size // 2
    assert np.abs(shift).max() <= 0.15 * size + 0.01
    assert shift.min() < -1 and shift.max() > 1  # both directions occur
    # A vertical line moved sideways: every row still holds the line's whole mass.
    np.testing.assert_allclose(out.sum(axis=(2, 3)), images.sum(axis=(2, 3)), rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_height_shift_moves_content_vertically_only(mode):
    size = 32
    images = line_images(32, size, vertical=False)
    cfg = only(height_shift_range=0.15, fill_mode="constant", cval=0.0)
    out = augmented(images, cfg, mode)
    shift = centroid(out)[:, 0] - size // 2
    assert np.abs(shift).max() <= 0.15 * size + 0.01
    assert shift.min() < -1 and shift.max() > 1
    np.testing.assert_allclose(out.sum(axis=(1, 3)), images.sum(axis=(1, 3)), rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_rotation_keeps_the_distance_to_the_centre_and_changes_the_angle(mode):
    size, centre = 33, 16
    images = np.zeros((32, size, size, 3), "float32")
    images[:, centre - 1 : centre + 2, centre + 9 : centre + 12] = 200  # a dot 10 px right
    out = augmented(images, only(rotation_range=90.0, fill_mode="constant"), mode)
    offset = centroid(out) - centre
    np.testing.assert_allclose(np.hypot(*offset.T), 10.0, atol=1.5)
    angle = np.degrees(np.arctan2(offset[:, 0], offset[:, 1]))
    assert np.abs(angle).max() <= 90 + 3
    assert angle.std() > 20  # uniform on [-90, 90] has std 52


@pytest.mark.parametrize("mode", MODES)
def test_zoom_scales_content_per_axis_within_the_range(mode):
    size, centre, z = 33, 16, 0.3
    images = np.zeros((32, size, size, 3), "float32")
    images[:, centre - 6 : centre + 7, centre - 6 : centre + 7] = 200  # a centred square
    out = augmented(images, only(zoom_range=z, fill_mode="constant"), mode)
    # ImageDataGenerator's scale s in [1 - z, 1 + z] reads the input at s * output, so the
    # content is scaled by 1 / s per axis and its area by 1 / (sx * sy).
    area = out.sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))
    assert area.min() >= 1 / (1 + z) ** 2 - 0.05 and area.max() <= 1 / (1 - z) ** 2 + 0.05
    assert area.min() < 0.9 and area.max() > 1.1  # both zoom in and zoom out occur
    rows, cols = _extents(out)
    assert np.abs(rows - cols).max() >= 2  # the two axes are drawn independently


def _extents(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Number of rows and of columns holding at least half a bright pixel, per image."""
    mass = images[..., 0]
    return (mass.max(axis=2) > 100).sum(axis=1), (mass.max(axis=1) > 100).sum(axis=1)


def transformed(images: np.ndarray, parameters, fill_mode: str = "constant") -> np.ndarray:
    """Resample `images` with explicit RandomAffine parameters (one row per image)."""
    parameters = np.asarray(parameters, "float32").reshape(len(images), -1)
    matrices = affine_matrices(parameters, images.shape[1], images.shape[2])
    out = keras.ops.image.affine_transform(
        images, matrices, fill_mode=fill_mode, data_format="channels_last"
    )
    return keras.ops.convert_to_numpy(out)


def test_zoom_above_one_shrinks_and_below_one_enlarges():
    # ImageDataGenerator reads the input at zoom × the distance from the centre.
    images = np.zeros((2, 33, 33, 3), "float32")
    images[:, 10:23, 10:23] = 200
    identity = [0, 0, 0, 1, 1, 1, 1]
    zoom_in, zoom_out = [0, 0, 0, 0.7, 0.7, 1, 1], [0, 0, 0, 1.3, 1.3, 1, 1]
    out = transformed(images, [zoom_in, zoom_out])
    area = out.sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(area, [1 / 0.49, 1 / 1.69], rtol=0.05)
    np.testing.assert_array_equal(transformed(images, [identity, identity]), images)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # tf_keras' scipy import
@pytest.mark.parametrize("fill_mode", ["nearest", "reflect"])
def test_one_resample_matches_image_data_generator(fill_mode):
    # The same parameters give ImageDataGenerator's image: one composed matrix, one resample.
    image_module = pytest.importorskip("tf_keras.preprocessing.image")
    pytest.importorskip("scipy")
    size = 40
    rows, cols = np.mgrid[0:size, 0:size].astype("float32")
    image = np.stack([np.sin(rows / 5) * 100 + 120, np.cos(cols / 7) * 100 + 120, rows + cols], -1)
    generator = image_module.ImageDataGenerator(fill_mode=fill_mode)
    cases = [  # theta (degrees), tx (columns), ty (rows), zx (columns), zy (rows), flips
        (20.0, 3.0, -5.0, 1.1, 0.9, False, False),
        (-30.0, 0.0, 0.0, 1.0, 1.0, True, False),
        (10.0, -4.0, 2.0, 0.8, 1.2, True, True),
        (0.0, 6.0, 0.0, 1.0, 1.15, False, True),
    ]
    for theta, tx, ty, zx, zy, flip_h, flip_v in cases:
        expected = generator.apply_transform(
            image,
            {"theta": theta, "tx": tx, "ty": ty, "zx": zx, "zy": zy,
             "flip_horizontal": flip_h, "flip_vertical": flip_v},
        )  # fmt: skip
        ours = [np.radians(theta), ty, tx, zy, zx, -1 if flip_v else 1, -1 if flip_h else 1]
        out = transformed(image[None].astype("float32"), [ours], fill_mode)[0]
        np.testing.assert_allclose(out, expected, atol=0.01)
        # The dataset path's compiled resample (`augment_in_dataset`) too.
        matrices = affine_matrices(np.asarray([ours], "float32"), size, size)
        geometry = (fill_mode, 0.0, "bilinear")
        fused = augment._augment_batch(
            image[None].astype("float32"), matrices, None, geometry, None
        )
        np.testing.assert_allclose(fused[0], expected, atol=0.01)


FILL_MODES = ["nearest", "reflect", "wrap", "constant"]


def far_reaching_matrices(n: int, height: int, width: int) -> tf.Tensor:
    """Affine matrices that read well outside the image, so every fill mode shows."""
    rng = np.random.default_rng(5)
    parameters = np.stack(
        [
            rng.uniform(-np.pi, np.pi, n),  # angle
            rng.uniform(-1.5, 1.5, n) * height,  # shift_rows
            rng.uniform(-1.5, 1.5, n) * width,  # shift_cols
            rng.uniform(0.4, 2.5, n),  # zoom_rows
            rng.uniform(0.4, 2.5, n),  # zoom_cols
            rng.choice([-1.0, 1.0], n),
            rng.choice([-1.0, 1.0], n),
        ],
        axis=1,
    ).astype("float32")
    return affine_matrices(parameters, height, width)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_affine_resample_is_the_transform_op_bit_for_bit(interpolation):
    # Run as plain TF ops, the function the dataset path compiles computes exactly what
    # ImageProjectiveTransformV3 (keras' affine_transform) computes: same points, fills,
    # weights. Non-square, so rows and columns cannot be swapped unnoticed.
    images = np.random.default_rng(3).uniform(0, 255, (12, 20, 27, 3)).astype("float32")
    matrices = far_reaching_matrices(len(images), 20, 27)
    for fill_mode in FILL_MODES:
        settings = {"fill_mode": fill_mode, "fill_value": 7.0, "interpolation": interpolation}
        expected = keras.ops.image.affine_transform(images, matrices, **settings)
        ours = augment.affine_resample(tf.constant(images), matrices, **settings)
        np.testing.assert_array_equal(ours, keras.ops.convert_to_numpy(expected), fill_mode)


@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_dataset_path_draws_and_samples_as_the_layers_do(fill_mode):
    # The fused, compiled dataset path against the layers' own ops, batch for batch: the
    # same draws from the same seeds and the same pixels, up to float rounding of the
    # sampled point (XLA may fuse a multiply-add) times the brightness factor.
    images = np.random.default_rng(4).uniform(0, 255, (24, 32, 32, 3)).astype("float32")
    cfg = AugmentConfig(fill_mode=fill_mode, cval=5.0)

    def run(fused: bool) -> np.ndarray:
        ds = tf.data.Dataset.from_tensor_slices((images, np.arange(24))).batch(8)
        ds = augment_in_dataset(ds, cfg, seed=2, first_step=0, fused=fused)
        return np.concatenate([batch[0] for batch in ds.as_numpy_iterator()])

    fused, layer_ops = run(fused=True), run(fused=False)
    np.testing.assert_allclose(fused, layer_ops, atol=0.05)
    assert not np.allclose(fused, images)


def test_dataset_path_is_one_compiled_function_without_the_transform_op():
    # What makes the CPU path cheap (bench/RESULTS.md): the map calls one XLA-compiled
    # function, gathers and all, instead of ImageProjectiveTransformV3, which costs ~3x
    # the CPU per 224-px image. A TensorFlow that cannot compile would silently take the
    # slow path: this build must not.
    assert augment._xla_compiles()
    ds = tf.data.Dataset.from_tensor_slices((pattern(8, 16), np.arange(8))).batch(4)
    mapped = augment_in_dataset(ds, AugmentConfig(), seed=0)
    graph = mapped._map_func.function.graph  # the map's traced function (private API)
    assert "ImageProjectiveTransformV3" not in {op.type for op in graph.get_operations()}
    compiled = [
        function
        for function in graph.as_graph_def().library.function
        if function.attr["_XlaMustCompile"].b
    ]
    assert len(compiled) == 1
    assert "GatherV2" in {node.op for node in compiled[0].node_def}


@pytest.mark.parametrize("mode", MODES)
def test_constant_fill_uses_cval(mode):
    size = 16
    images = np.full((32, size, size, 3), 100.0, "float32")
    out = augmented(images, only(width_shift_range=0.9, fill_mode="constant", cval=7.0), mode)
    assert out.min() >= 7 - 1e-3 and out.max() <= 100 + 1e-3
    revealed = np.all(np.isclose(out, 7.0), axis=(1, 3))  # (image, column) entirely cval
    assert revealed.any(axis=1).mean() > 0.5
    # Revealed columns are at the edge the content moved away from.
    assert all(not r.any() or r[0] or r[-1] for r in revealed)


@pytest.mark.parametrize("mode", MODES)
def test_nearest_fill_repeats_the_edge(mode):
    size = 16
    images = np.repeat(pattern(32, size)[..., :1], 3, axis=-1)  # column gradient 10..197.5
    left, right = images[0, 0, 0, 0], images[0, 0, -1, 0]
    out = augmented(images, only(width_shift_range=0.9, fill_mode="nearest", cval=7.0), mode)
    assert out.min() >= left - 1e-3 and out.max() <= right + 1e-3  # never cval
    left_edge = np.all(np.isclose(out[:, :, :2], left), axis=(1, 2, 3))
    right_edge = np.all(np.isclose(out[:, :, -2:], right), axis=(1, 2, 3))
    assert (left_edge | right_edge).mean() > 0.5
    assert left_edge.any() and right_edge.any()


@pytest.mark.parametrize("mode", MODES)
def test_defaults_keep_shape_dtype_and_range(mode):
    images = np.random.default_rng(0).uniform(0, 255, (32, 64, 64, 3)).astype("float32")
    cfg = AugmentConfig()
    out = augmented(images, cfg, mode, seed=None)  # unseeded: the parallel tf.data path
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images)
    inference = run_layer(build_augmentation(cfg), images, mode, training=False)
    np.testing.assert_array_equal(inference, images)


def test_default_layers_in_image_data_generator_order():
    names = [type(layer).__name__ for layer in build_augmentation(AugmentConfig()).layers]
    assert names == ["RandomAffine", "RandomBrightnessScale"]


def test_default_affine_layer_carries_every_geometric_knob():
    cfg = AugmentConfig()
    affine = build_augmentation(cfg).layers[0]
    assert isinstance(affine, RandomAffine)
    assert (affine.rotation_range, affine.zoom_range) == (cfg.rotation_range, cfg.zoom_range)
    assert affine.width_shift_range == cfg.width_shift_range
    assert affine.height_shift_range == cfg.height_shift_range
    assert affine.horizontal_flip and affine.vertical_flip
    assert (affine.fill_mode, affine.fill_value) == ("nearest", cfg.cval)
    # Only the knobs that are on make a layer.
    names = [type(layer).__name__ for layer in build_augmentation(only(zoom_range=0.1)).layers]
    assert names == ["RandomAffine"]


def test_affine_layer_config_inference_single_image_and_validation():
    layer = RandomAffine(30, 0.1, 0.2, 0.2, True, False, "reflect", 3.0, seed=5)
    clone = RandomAffine.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    image = pattern(1, 16)[0]
    np.testing.assert_array_equal(layer(image, training=False), image)
    assert keras.ops.convert_to_numpy(layer(image)).shape == image.shape  # unbatched
    with pytest.raises(ValueError, match="fill_mode"):
        RandomAffine(fill_mode="mirror")


def test_a_seed_tensor_makes_the_draw_stateless():
    layer = RandomAffine(rotation_range=45, zoom_range=0.2, seed=1)
    brightness = RandomBrightnessScale([0.5, 1.5], seed=1)
    images = pattern(8, 16)
    for rand in (layer, brightness):
        first = rand(images, seed=tf.constant([7, 0]))
        again = rand(images, seed=tf.constant([7, 0]))
        other = rand(images, seed=tf.constant([8, 0]))
        np.testing.assert_array_equal(first, again)
        assert not np.allclose(first, other)
        # Without a seed tensor the layer's SeedGenerator advances: new draws every call.
        assert not np.allclose(rand(images), rand(images))


def test_seeded_runs_repeat():
    images = pattern(48, 32)
    cfg = AugmentConfig(fill_mode="constant")

    def run(seed: int) -> list[np.ndarray]:
        ds = tf.data.Dataset.from_tensor_slices((images, np.arange(48))).batch(8)
        ds = augment_in_dataset(ds, cfg, seed=seed)
        return [np.concatenate([b[0] for b in ds.as_numpy_iterator()]) for _epoch in range(2)]

    first, again, other = run(seed=3), run(seed=3), run(seed=4)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.allclose(first[0], first[1])  # each epoch draws new transforms
    assert not np.allclose(first[0], other[0])
    eager = [build_augmentation(cfg, seed=3)(images[:8]) for _ in range(2)]
    np.testing.assert_array_equal(eager[0], eager[1])


def test_seeded_parallel_dataset_path_repeats():
    # The trainer's path: seeded and mapped with num_parallel_calls=AUTOTUNE. Many small
    # batches, so that parallel calls overlap; two runs must still agree bit for bit.
    images = np.random.default_rng(1).uniform(0, 255, (320, 24, 24, 3)).astype("float32")
    cfg = AugmentConfig()

    def run() -> np.ndarray:
        ds = tf.data.Dataset.from_tensor_slices((images, np.arange(320))).batch(4)
        ds = augment_in_dataset(ds, cfg, seed=0)
        assert "ParallelMap" in type(ds).__name__  # not a sequential map
        batches = list(ds.as_numpy_iterator())
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(320))
        return np.concatenate([b[0] for b in batches])

    first, again = run(), run()
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, images)


def test_resolve_placement(monkeypatch):
    for placement in ("dataset", "model"):
        assert resolve_placement(AugmentConfig(placement=placement)) == placement
    if not tf.config.list_physical_devices("GPU"):
        assert resolve_placement(AugmentConfig()) == "dataset"
    monkeypatch.setattr(augment.tf.config, "list_physical_devices", lambda kind: ["gpu:0"])
    assert resolve_placement(AugmentConfig(placement="auto")) == "model"
    assert resolve_placement(AugmentConfig(placement="dataset")) == "dataset"


def test_model_with_augmentation_saves_and_loads(tmp_path):
    # As the trainer builds it when augmentation runs on the device: the augmentation
    # layers first, then the model's own rescaling (`augment.rescale`), then the network.
    cfg = AugmentConfig()
    model = build_model(
        ModelConfig(filters=[4], dense_units=0), num_classes=2, image_size=32,
        rescale=cfg.rescale, augmentation=build_augmentation(cfg, seed=1),
    )  # fmt: skip
    images = pattern(4, 32)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    brightness = loaded.get_layer("augmentation").layers[-1]
    assert isinstance(brightness, RandomBrightnessScale)
    assert brightness.factor_range == (0.5, 1.5)
    assert not np.allclose(loaded.get_layer("augmentation")(images, training=True), images)
