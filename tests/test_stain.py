"""Stain augmentation (HED jitter) and stain normalisation (Reinhard, Macenko).

The colour transform is checked against scikit-image's `rgb2hed` / `hed2rgb`, the
reference implementation of the HED space; the layers in both placements (the tf.data
map, fused and compiled, and the model); and a saved model's normalisation after reload.
"""

from __future__ import annotations

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from skimage.color import colorconv, hed2rgb, rgb2hed

from organtrain import stain
from organtrain.augment import RandomHEDJitter, augment_in_dataset, build_augmentation
from organtrain.config import AugmentConfig, ModelConfig, load_config
from organtrain.errors import ConfigError
from organtrain.models import build_model
from organtrain.train import compiled_model

# Stated tolerances against scikit-image (float64) for our float32 transform: HED amounts
# within 1e-5 (typical tissue: 0.01..0.2), light within 1e-5 of 1, and jittered pixels
# within 0.01 of a grey level.
HED_ATOL, LIGHT_ATOL, PIXEL_ATOL = 1e-5, 1e-5, 0.01
ALL_OFF = dict(
    rotation_range=0.0, width_shift_range=0.0, height_shift_range=0.0, horizontal_flip=False,
    vertical_flip=False, brightness_range=None, zoom_range=0.0,
)  # fmt: skip


def stained(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """H&E-like float32 images in 0..255: random haematoxylin and eosin amounts (a little
    DAB), through scikit-image's hed2rgb, so every pixel is a mix of the three stains."""
    rng = np.random.default_rng(seed)
    amounts = rng.uniform(0, 0.1, (n, size, size, 3)) * np.array([1.0, 1.0, 0.1])
    return (hed2rgb(amounts) * 255).astype("float32")


def test_stain_matrix_is_scikit_images():
    np.testing.assert_array_equal(stain.RGB_FROM_HED, colorconv.rgb_from_hed)
    np.testing.assert_allclose(stain.HED_FROM_RGB, colorconv.hed_from_rgb, rtol=1e-12)


def test_hed_transform_matches_scikit_image():
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0, 255, (4096, 3)).astype("float32")
    pixels[:3] = [[0, 0, 0], [255, 255, 255], [0, 255, 0]]  # the floor, white, off the cone
    ours = stain.rgb_to_hed(pixels).numpy()
    # rgb2hed clamps negative amounts (colours outside the stains' cone) to 0; ours keeps
    # them so the round trip is exact: compare after the same clamp.
    np.testing.assert_allclose(np.maximum(ours, 0), rgb2hed(pixels / 255.0), atol=HED_ATOL)
    assert (ours < 0).any()  # such colours were in the sample
    hed = rng.uniform(-0.05, 0.3, (4096, 3))
    light = stain.hed_to_rgb(hed.astype("float32")).numpy() / 255
    np.testing.assert_allclose(light, hed2rgb(hed), atol=LIGHT_ATOL)
    # The round trip, negatives kept, is the identity (rgb2hed -> hed2rgb is not).
    round_trip = stain.hed_to_rgb(stain.rgb_to_hed(pixels)).numpy()
    np.testing.assert_allclose(round_trip, pixels, atol=PIXEL_ATOL)


def test_fast_log2_is_as_close_as_the_float32_log():
    values = np.random.default_rng(10).uniform(1e-6, 1, 100_000)
    values = np.concatenate([values, np.geomspace(1e-6, 1, 100_000)]).astype("float32")
    exact = np.log2(values.astype("float64"))
    np.testing.assert_allclose(stain.fast_log2(values), exact, rtol=0, atol=1.5e-6)


def test_fast_exp2_is_within_2e_7_relative():
    exponents = np.random.default_rng(11).uniform(-30, 0, 100_000)
    exponents = np.concatenate([exponents, np.linspace(-125, 0, 100_000)]).astype("float32")
    exact = np.exp2(exponents.astype("float64"))
    np.testing.assert_allclose(stain.fast_exp2(exponents), exact, rtol=2e-7, atol=0)
    assert float(stain.fast_exp2(np.float32(3.0))) == pytest.approx(1.0, rel=2e-7)  # capped at 0


def test_hed_jitter_is_scikit_images_scale_and_shift():
    images = stained(6)
    rng = np.random.default_rng(2)
    scale, shift = rng.uniform(0.8, 1.2, (6, 3)), rng.uniform(-0.02, 0.02, (6, 3))
    ours = stain.hed_jitter(images, scale, shift).numpy()
    expected = [
        hed2rgb(rgb2hed(im / 255.0) * s + b) * 255
        for im, s, b in zip(images, scale, shift, strict=True)
    ]
    np.testing.assert_allclose(ours, np.stack(expected), atol=PIXEL_ATOL)
    assert np.abs(ours - images).mean() > 1  # the jitter did something


def test_zero_jitter_is_the_identity_and_inference_is_untouched():
    images = np.random.default_rng(3).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    images[0, 0, 0] = [0, 0, 0]
    zero = RandomHEDJitter(sigma=0.0, bias=0.0, seed=1)
    np.testing.assert_allclose(zero(images, training=True), images, atol=PIXEL_ATOL)
    strong = RandomHEDJitter(sigma=0.2, bias=0.02, seed=1)
    np.testing.assert_array_equal(strong(images, training=False), images)
    assert not np.allclose(strong(images, training=True), images, atol=1)
    assert keras.ops.convert_to_numpy(strong(images[0])).shape == images[0].shape  # unbatched
    assert RandomHEDJitter.from_config(strong.get_config()).get_config() == strong.get_config()
    # Off in the config (the default): no layer at all, so nothing changes for old jobs.
    names = [type(layer).__name__ for layer in build_augmentation(AugmentConfig()).layers]
    assert names == ["RandomAffine", "RandomBrightnessScale"]


def test_jitter_scales_each_stain_by_one_factor_per_image_within_sigma():
    images = stained(32, size=8)
    jitter = RandomHEDJitter(sigma=0.2, bias=0.0, seed=4)
    out = keras.ops.convert_to_numpy(jitter(images, training=True))
    before = stain.rgb_to_hed(images).numpy()[..., :2]  # H and E (DAB is near 0 here)
    after = stain.rgb_to_hed(out).numpy()[..., :2]
    per_image = np.median((after / before).reshape(32, -1, 2), axis=1)
    # Every pixel's amount times its image's factor (to float rounding: amounts <= 0.1).
    np.testing.assert_allclose(after, before * per_image[:, None, None, :], atol=HED_ATOL)
    assert per_image.min() >= 0.8 - 1e-3 and per_image.max() <= 1.2 + 1e-3
    assert per_image.std() > 0.05  # drawn per image and stain, not once


def run_dataset(images, cfg, seed, *, fused=True):
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(len(images)))).batch(8)
    ds = augment_in_dataset(ds, cfg, seed=seed, first_step=0, fused=fused)
    return np.concatenate([batch[0] for batch in ds.as_numpy_iterator()])


def run_model(images, cfg, seed):
    model = build_model(
        ModelConfig(filters=[4], dense_units=0), num_classes=2,
        image_size=images.shape[1], augmentation=build_augmentation(cfg, seed=seed),
    )  # fmt: skip
    augmentation = model.get_layer("augmentation")
    np.testing.assert_array_equal(augmentation(images, training=False), images)
    return keras.ops.convert_to_numpy(augmentation(images, training=True))


@pytest.mark.parametrize("placement", ["dataset", "model"])
def test_jitter_is_seeded_repeatable_in_both_placements(placement):
    images = stained(16, size=16, seed=5)
    cfg = AugmentConfig(**ALL_OFF, hed_jitter=0.2, hed_bias=0.02, placement=placement)
    run = run_dataset if placement == "dataset" else run_model
    first, again, other = run(images, cfg, 3), run(images, cfg, 3), run(images, cfg, 4)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other, atol=1)
    assert not np.allclose(first, images, atol=1)
    assert first.min() >= 0 and first.max() <= 255


def test_fused_dataset_path_jitters_as_the_layers_do():
    # The default geometry and brightness plus the jitter: the XLA-fused function against
    # the layers' own ops, same draws.
    images = stained(16, size=16, seed=6)
    cfg = AugmentConfig(hed_jitter=0.2, hed_bias=0.02)
    fused, layer_ops = run_dataset(images, cfg, 2), run_dataset(images, cfg, 2, fused=False)
    np.testing.assert_allclose(fused, layer_ops, atol=0.05)
    names = [type(layer).__name__ for layer in build_augmentation(cfg).layers]
    assert names == ["RandomAffine", "RandomBrightnessScale", "RandomHEDJitter"]


def test_turning_the_jitter_on_keeps_the_other_layers_draws():
    # The jitter comes last, so the geometry and brightness draws stay those of the same
    # seed without it: each jittered image is the unjittered one with its stain amounts
    # scaled by one factor per stain (bias 0 here), pixel for pixel.
    images = stained(16, size=16, seed=6)
    jittered = run_dataset(images, AugmentConfig(hed_jitter=0.2), 2)
    plain = run_dataset(images, AugmentConfig(), 2)
    amounts = stain.rgb_to_hed(plain).numpy()[..., :2].reshape(16, -1, 2)  # H and E
    with np.errstate(invalid="ignore", divide="ignore"):  # white pixels: no stain at all
        ratio = stain.rgb_to_hed(jittered).numpy()[..., :2].reshape(16, -1, 2) / amounts
    per_image = np.nanmedian(ratio, axis=1)
    # Only pixels where the ratio is a measurement: not clipped at 0 or 255 by the jitter
    # (their amounts cannot follow the factor), and stained (both amounts above 0.01 OD
    # units: near-white pixels divide rounding noise by ~0; in CI, 7 % of all pixels
    # missed 1 %, here 2 %).
    inside = lambda x: ((x > 0.5) & (x < 254.5)).all(axis=-1).reshape(16, -1)  # noqa: E731
    measured = inside(np.asarray(jittered)) & inside(np.asarray(plain))
    measured &= (amounts > 0.01).all(axis=-1)
    assert measured.mean() > 0.5
    close = np.isclose(ratio, per_image[:, None, :], rtol=1e-2).all(axis=-1)
    assert close[measured].mean() > 0.95
    assert np.abs(per_image - 1).max() > 0.05  # and the jitter did scale them


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_normalization_brings_differently_stained_images_together(method):
    # One "slide" stained lighter and darker (every stain scaled 0.7x and 1.4x): normalised
    # against one reference, the two versions' mean colours come close together. Measured:
    # Reinhard leaves 1 % of the difference, Macenko 24 % (it fits each version's stain
    # vectors on its own tissue pixels, which the lighter version has fewer of).
    slide = stained(4, size=32, seed=7)
    light = stain.hed_jitter(slide, np.full((4, 3), 0.7), np.zeros((4, 3))).numpy()
    dark = stain.hed_jitter(slide, np.full((4, 3), 1.4), np.zeros((4, 3))).numpy()
    layer = stain.StainNormalization(method, stain.fit_reference(method, slide))
    before = np.abs(light.mean((1, 2)) - dark.mean((1, 2))).mean()
    after = np.abs(layer(light).numpy().mean((1, 2)) - layer(dark).numpy().mean((1, 2))).mean()
    assert before > 20
    assert after < 0.35 * before, (before, after)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_saved_model_normalises_new_raw_images_the_same_after_reload(method, tmp_path):
    images = stained(8, size=32, seed=8)
    cfg = load_config(
        None,
        [f"augment.stain_normalization={method}", "input.image_size=32",
         "model.filters=[4]", "model.dense_units=0"],
    )  # fmt: skip
    reference = stain.fit_reference(method, images[:4])
    model = compiled_model(cfg, 3, reference)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    new_raw = stain.hed_jitter(images[4:], np.full((4, 3), 1.3), np.full((4, 3), 0.01)).numpy()
    np.testing.assert_array_equal(
        loaded.predict(new_raw, verbose=0), model.predict(new_raw, verbose=0)
    )
    layer = loaded.get_layer("stain_normalization")
    assert (layer.method, layer.reference) == (method, reference)
    assert not np.allclose(layer(new_raw), new_raw, atol=1)  # it does normalise


def test_reference_image_from_config_and_bad_values(tmp_path):
    path = tmp_path / "reference.png"
    Image.fromarray(stained(1, size=32, seed=9)[0].round().astype("uint8")).save(path)
    cfg = load_config(None, ["augment.stain_normalization=reinhard",
                             f"augment.stain_reference={path}"])  # fmt: skip
    expected = stain.fit_reference("reinhard", np.asarray(Image.open(path), "float32")[None])
    assert stain.training_reference(cfg, None, None, "lung") == expected
    missing = load_config(None, ["augment.stain_normalization=macenko",
                                 f"augment.stain_reference={tmp_path / 'nope.png'}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"augment\.stain_reference .*nope\.png.*does not exist"):
        stain.training_reference(missing, None, None, "lung")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((16, 16, 3), 250, "uint8")).save(blank)
    no_tissue = load_config(None, ["augment.stain_normalization=macenko",
                                   f"augment.stain_reference={blank}"])  # fmt: skip
    with pytest.raises(ConfigError, match="stain vectors"):
        stain.training_reference(no_tissue, None, None, "lung")
    bad = {
        "augment.stain_normalization=vahadane": r"augment\.stain_normalization must be none, "
        "reinhard or macenko, not 'vahadane'",
        "augment.hed_jitter=1.5": r"augment\.hed_jitter must be in \[0, 1\)",
        "augment.hed_bias=-0.1": r"augment\.hed_bias must be in \[0, 1\)",
        f"augment.stain_reference={path}": r"augment\.stain_reference is set but "
        "stain_normalization is none",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_reference_image_from_s3(s3_uri):
    # The same reference read from object storage (a real S3 server): what a cluster
    # without a shared filesystem would configure.
    from organtrain.storage import open_storage

    image = stained(1, size=32, seed=12)[0].round().astype("uint8")
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    open_storage(s3_uri).put_bytes("reference.png", png.getvalue())
    cfg = load_config(None, ["augment.stain_normalization=macenko",
                             f"augment.stain_reference={s3_uri}/reference.png"])  # fmt: skip
    expected = stain.fit_reference("macenko", image[None].astype("float32"))
    assert stain.training_reference(cfg, None, None, "blood") == expected
    missing = load_config(None, ["augment.stain_normalization=macenko",
                                 f"augment.stain_reference={s3_uri}/other.png"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"augment\.stain_reference 's3://.*/other\.png'"):
        stain.training_reference(missing, None, None, "blood")


@pytest.mark.slow
def test_train_fits_the_reference_on_the_train_split_and_saves_it_in_the_model(tmp_path):
    # The trainer's real path: synthetic images -> prepare -> train one epoch with HED
    # jitter in the tf.data pipeline and Macenko normalisation fitted on the train split;
    # the published model.keras carries that reference and classifies raw test images as
    # the run's own evaluation did.
    import yaml
    from tinyrun import tiny_job

    from organtrain.data.dataset import load_dataset
    from organtrain.data.prepare import prepare
    from organtrain.data.synth import write_synthetic_tree
    from organtrain.storage import LocalStorage
    from organtrain.train import predict_split, train_organ

    organs = {"lung": ["adenocarcinoma", "benign"]}
    job = tiny_job(tmp_path, organs)
    job["augment"] = {"placement": "dataset", "hed_jitter": 0.1, "hed_bias": 0.01,
                      "stain_normalization": "macenko"}  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    cfg = load_config(tmp_path / "job.yaml")
    write_synthetic_tree(cfg.synth.out, organs=organs, images_per_diagnosis=24, image_size=32,
                         progress=False)  # fmt: skip
    storage = LocalStorage(cfg.storage.uri)
    prepare(LocalStorage(cfg.prepare.source), storage, cfg.prepare, progress=False)
    result = train_organ(cfg, storage, "lung", run_id="stain", verbose=0)
    storage.download("runs/stain/lung/model.keras", tmp_path / "model.keras")
    model = keras.saving.load_model(tmp_path / "model.keras")
    index = load_dataset(storage, cfg.prepare.dataset)
    layer = model.get_layer("stain_normalization")
    assert layer.reference == stain.training_reference(cfg, storage, index, "lung")
    assert np.asarray(layer.reference["stain_matrix"]).shape == (3, 2)
    y_true, y_prob, _, _ = predict_split(
        model, storage, index, "lung", "test", image_size=32, batch_size=4
    )
    accuracy = float((y_prob.argmax(1) == y_true).mean())
    assert accuracy == pytest.approx(result.test_accuracy)
