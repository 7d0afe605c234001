"""The model zoo: names, preprocessing, frozen bases, weights from a file."""

import dataclasses

import keras
import numpy as np
import pytest

from organtrain.config import FieldError, ModelConfig
from organtrain.errors import ConfigError
from organtrain.models import MODELS, build_model

SIZE = 32


def test_unknown_name_lists_the_valid_ones():
    # Rejected when the config is built (tests/test_config.py: at load, naming the file).
    with pytest.raises(
        FieldError,
        match=r"'resnet9000' is not a known model; known models: simple_cnn, vgg16, mobilenet_v2",
    ):
        ModelConfig(name="resnet9000")
    assert {"simple_cnn", "vgg16", "mobilenet_v2"} <= set(MODELS)


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
    np.testing.assert_allclose(
        loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0), rtol=1e-5
    )


def test_config_dataclass_rejects_bad_values():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        dataclasses.replace(ModelConfig(), dropout=1.5)
