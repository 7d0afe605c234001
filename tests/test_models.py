"""The model zoo: names, preprocessing, frozen bases, weights from a file, minimum sizes,
mixed precision."""

import dataclasses
import os
import socket
import urllib.request
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from organtrain.config import (
    PRETRAINED_MODEL_NAMES,
    FieldError,
    ModelConfig,
    TrainConfig,
    load_config,
)
from organtrain.errors import ConfigError
from organtrain.models import BACKBONES, MODELS, build_model, precision_policy
from organtrain.train import compiled_model

SIZE = 32  # the smallest input every keras.applications backbone here accepts
PIXELS = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
LABELS = np.array([0, 0])  # one class: at uniform outputs, [0, 1] cancels the bias gradient

# The backbones added for #12, each with the keras.applications module whose
# `preprocess_input` is Keras' documented recipe for raw 0..255 pixels (a no-op for the
# applications that scale pixels themselves, include_preprocessing=True).
NEW_BACKBONES = {
    "efficientnet_v2_b0": "efficientnet_v2",
    "resnet50": "resnet",
    "convnext_tiny": "convnext",
    "mobilenet_v3_small": "mobilenet_v3",
}
SELF_SCALING = {"efficientnet_v2_b0", "convnext_tiny", "mobilenet_v3_small"}


def _base(model: keras.Model) -> keras.Model:
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def test_unknown_name_lists_the_valid_ones():
    # Rejected when the config is built (tests/test_config.py: at load, naming the file).
    with pytest.raises(
        FieldError,
        match=r"'transformer' is not a known model; known models: simple_cnn, vgg16, mobilenet_v2, "
        r"mobilenet_v3_small, efficientnet_v2_b0, resnet50, convnext_tiny$",
    ):
        ModelConfig(name="transformer")
    assert {"simple_cnn", "vgg16", "mobilenet_v2", *NEW_BACKBONES} <= set(MODELS)
    assert set(BACKBONES) == set(PRETRAINED_MODEL_NAMES)  # the names model.weights applies to


@pytest.mark.parametrize(
    ("batch_norm", "pooling", "pool_layer"),
    [
        (False, "flatten", "Flatten"),
        (True, "max", "GlobalMaxPooling2D"),
        (False, "avg", "GlobalAveragePooling2D"),
    ],
)
def test_simple_cnn_shape_and_options(batch_norm, pooling, pool_layer):
    cfg = ModelConfig(filters=[8, 16], dense_units=16, batch_norm=batch_norm, pooling=pooling)
    model = build_model(cfg, num_classes=3, image_size=SIZE)
    probs = model.predict(
        np.random.uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32"), verbose=0
    )
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 2 and kinds.count("MaxPooling2D") == 2
    assert ("BatchNormalization" in kinds) == batch_norm
    assert "Rescaling" in kinds and pool_layer in kinds and "Dropout" in kinds
    assert kinds.count("Dense") == 2  # the hidden layer and the classifier


def test_simple_cnn_centres_its_input():
    model = build_model(ModelConfig(), num_classes=2, image_size=SIZE)
    rescale = model.get_layer(index=1)
    np.testing.assert_allclose(
        np.asarray(rescale(np.array([[0.0, 127.5, 255.0]]))), [[-0.5, 0, 0.5]]
    )


@pytest.mark.parametrize(
    ("name", "application"), [("vgg16", "vgg16"), ("mobilenet_v2", "mobilenet_v2")]
)
def test_transfer_models_apply_their_own_preprocess_input(name, application):
    model = build_model(ModelConfig(name=name, weights=None), num_classes=2, image_size=SIZE)
    pixels = np.random.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    preprocess = model.get_layer(index=1)
    expected = getattr(keras.applications, application).preprocess_input(pixels.copy())
    np.testing.assert_allclose(np.asarray(preprocess(pixels)), expected, rtol=1e-5, atol=1e-4)


def test_transfer_base_is_frozen_unless_fine_tuned():
    frozen = build_model(ModelConfig(name="vgg16", weights=None), num_classes=2, image_size=SIZE)
    head_only = {w.path for w in frozen.trainable_weights}
    assert all("diagnosis" in path for path in head_only)  # only the new head trains
    tuned = build_model(
        ModelConfig(name="vgg16", weights=None, fine_tune_layers=2), num_classes=2, image_size=SIZE
    )
    base = next(layer for layer in tuned.layers if isinstance(layer, keras.Model))
    trainable = [layer.name for layer in base.layers if layer.trainable and layer.weights]
    assert trainable == ["block5_conv3"]  # the top 2 layers are block5_conv3 and block5_pool


def test_pretrained_weights_from_a_file(tmp_path):
    # Nodes without internet get weights as a file; here the test makes that file itself.
    source = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    )
    path = tmp_path / "mobilenet_v2_notop.weights.h5"
    source.save_weights(path)
    model = build_model(
        ModelConfig(name="mobilenet_v2", weights=str(path)), num_classes=2, image_size=SIZE
    )
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    for mine, theirs in zip(base.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.weights .*no such file"):
        build_model(
            ModelConfig(name="vgg16", weights=str(tmp_path / "nope.h5")),
            num_classes=2,
            image_size=SIZE,
        )


def test_saved_model_round_trips_with_its_preprocessing(tmp_path):
    model = build_model(
        ModelConfig(name="mobilenet_v2", weights=None), num_classes=2, image_size=SIZE
    )
    pixels = np.random.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    # Called, not predict(): tracing two predict functions cost 30 s on 2 busy cores.
    np.testing.assert_allclose(np.asarray(loaded(pixels)), np.asarray(model(pixels)), rtol=1e-5)


def test_config_dataclass_rejects_bad_values():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        dataclasses.replace(ModelConfig(), dropout=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_backbone_preprocesses_trains_one_step_and_reloads(name, tmp_path):
    model = build_model(ModelConfig(name=name, weights=None), num_classes=2, image_size=SIZE)
    base = _base(model)
    # What reaches the base must be Keras' recipe for raw pixels, nothing missing, nothing
    # done twice: EfficientNetV2, ConvNeXt and MobileNetV3 scale them inside the base.
    x = PIXELS
    for layer in model.layers[1 : model.layers.index(base)]:
        x = layer(x)
    recipe = getattr(keras.applications, NEW_BACKBONES[name]).preprocess_input(PIXELS.copy())
    np.testing.assert_allclose(np.asarray(x), np.asarray(recipe), rtol=1e-6, atol=1e-5)
    scaling = {type(layer).__name__ for layer in base.layers[:3]} & {"Rescaling", "Normalization"}
    assert bool(scaling) == (name in SELF_SCALING)

    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", run_eagerly=True)
    assert all("diagnosis" in w.path for w in model.trainable_weights)  # the base is frozen
    # The bias: randomly initialised MobileNetV3 features are ~1e-10, too small to move
    # the kernel in one step.
    bias = model.get_layer("diagnosis").bias.numpy().copy()
    assert np.isfinite(model.train_on_batch(PIXELS, LABELS))
    assert not np.array_equal(model.get_layer("diagnosis").bias.numpy(), bias)

    path = tmp_path / "model.keras"
    model.save(path)
    expected = np.asarray(model(PIXELS))
    assert expected.dtype == np.float32 and np.isfinite(expected).all()
    np.testing.assert_array_equal(np.asarray(keras.models.load_model(path)(PIXELS)), expected)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_image_size_below_a_backbones_minimum_is_a_config_error(name):
    minimum = BACKBONES[name].min_size
    with pytest.raises(
        ConfigError,
        match=rf"input.image_size {minimum - 1} is too small for model.name {name}: "
        rf"it takes at least {minimum} pixels",
    ):
        build_model(ModelConfig(name=name, weights=None), num_classes=2, image_size=minimum - 1)
    # The minimum is Keras' own: the application itself refuses one pixel less.
    application = getattr(keras.applications, BACKBONES[name].application)
    with pytest.raises(ValueError, match=f"at least {minimum}"):
        application(include_top=False, weights=None, input_shape=(minimum - 1, minimum - 1, 3))


def test_simple_cnn_too_deep_for_the_image_size_is_a_config_error():
    # Four 2x poolings leave nothing of an 8-pixel image.
    with pytest.raises(
        ConfigError, match=r"input.image_size 8 is too small for 4 model.filters blocks.*16"
    ):
        build_model(ModelConfig(filters=[4, 4, 4, 4]), num_classes=2, image_size=8)
    build_model(ModelConfig(filters=[4, 4, 4, 4]), num_classes=2, image_size=16)


def test_fine_tune_layers_beyond_the_base_unfreezes_all_of_it():
    # VGG16's base has 19 layers: 25 means all of them, not the top 6.
    model = build_model(
        ModelConfig(name="vgg16", weights=None, fine_tune_layers=25), num_classes=2, image_size=SIZE
    )
    assert all(layer.trainable for layer in _base(model).layers)


@pytest.fixture
def no_internet(monkeypatch):
    """Downloads fail as on a node without internet: every HTTPS request goes through a
    proxy port nothing listens on (a real refused connection, whatever this machine has)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, closed)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen reads the proxies anew


def test_imagenet_weights_without_internet_say_to_give_a_weights_file(no_internet):
    weights_file = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cache = Path(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models")
    if (cache / weights_file).exists():
        pytest.skip(f"{cache / weights_file} is cached: Keras would not download it")
    with pytest.raises(ConfigError) as raised:
        build_model(ModelConfig(name="vgg16"), num_classes=2, image_size=SIZE)
    message = str(raised.value)
    assert message.startswith("model.weights 'imagenet': Keras could not download")
    assert weights_file in message and "set model.weights to its path" in message


def test_mixed_precision_setting_resolves_to_a_keras_policy():
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert precision_policy("off") is None
    assert precision_policy("on") == ("mixed_float16" if gpu else "mixed_bfloat16")
    assert precision_policy("auto") == ("mixed_float16" if gpu else None)
    assert precision_policy("mixed_bfloat16") == "mixed_bfloat16"
    with pytest.raises(ValueError, match=r"mixed_precision must be .*off, on, auto"):
        TrainConfig(mixed_precision="fp16")


def _tiny_config(*overrides: str):
    return load_config(
        None,
        ["input.image_size=32", "augment.placement=dataset", "model.weights=null", *overrides],
    )


def test_mixed_bfloat16_trains_a_step_outputs_float32_and_does_not_leak():
    cfg = _tiny_config("model.name=mobilenet_v2", "train.mixed_precision=mixed_bfloat16")
    model = compiled_model(cfg, 2)
    model.run_eagerly = True  # one step: tracing the graph would cost more than running it
    convs = [layer for layer in _base(model).layers if isinstance(layer, keras.layers.Conv2D)]
    assert {layer.compute_dtype for layer in convs} == {"bfloat16"}
    assert {layer.kernel.dtype for layer in convs} == {"float32"}  # weights stay float32
    assert model.get_layer("diagnosis").compute_dtype == "float32"
    assert np.isfinite(model.train_on_batch(PIXELS, LABELS)[0])
    probabilities = model.predict(PIXELS, verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    # Keras' policy is process-global and Ray reuses a worker for the next trial.
    assert keras.config.dtype_policy().name == "float32"
    after = compiled_model(_tiny_config(), 2)
    assert {layer.dtype_policy.name for layer in after.layers} == {"float32"}


def test_mixed_float16_scales_the_loss_and_a_checkpoint_keeps_it(tmp_path):
    # Keras wraps the optimizer in compile() on its own, but a reloaded model (a resumed
    # checkpoint) came back with a bare Adam and dropped the saved optimizer state.
    cfg = _tiny_config(
        "model.filters=[4]", "model.dense_units=0", "train.mixed_precision=mixed_float16"
    )
    model = compiled_model(cfg, 2)
    model.run_eagerly = True
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(model.train_on_batch(PIXELS, LABELS)[0])
    path = tmp_path / "checkpoint.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer)
    for mine, saved in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(saved))
    probabilities = loaded.predict(PIXELS, verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_array_equal(probabilities, model.predict(PIXELS, verbose=0))


def test_the_h5_file_keras_downloads_loads_from_a_path(tmp_path):
    # The file `weights="imagenet"` caches in ~/.keras/models is in Keras' legacy h5 layout
    # (weights by layer name); here the test writes one in that layout itself.
    from keras.src.legacy.saving import legacy_h5_format

    source = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    )
    path = tmp_path / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, source)
    model = build_model(
        ModelConfig(name="mobilenet_v3_small", weights=str(path)), num_classes=2, image_size=SIZE
    )
    for mine, theirs in zip(_base(model).get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
