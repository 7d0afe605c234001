"""Tests for the synthetic H&E-like data set: reproducible, laid out as the pipeline expects,
and honest, i.e. learnable from cell morphology but not from an image's mean colour."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from organtrain.data.synth import DEFAULT_ORGANS, render_image, write_synthetic_tree

SMALL = {"images_per_diagnosis": 3, "image_size": 32, "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_default_organs_have_two_to_four_diagnoses():
    assert {"lung", "colon", "blood"} <= set(DEFAULT_ORGANS)
    assert set(DEFAULT_ORGANS["lung"]) >= {"adenocarcinoma", "benign", "squamous_cell_carcinoma"}
    assert set(DEFAULT_ORGANS["colon"]) >= {"adenocarcinoma", "benign"}
    assert set(DEFAULT_ORGANS["blood"]) >= {"malaria_parasitized", "uninfected"}
    assert all(2 <= len(diagnoses) <= 4 for diagnoses in DEFAULT_ORGANS.values())


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_synthetic_tree(first, seed=7, **SMALL)
    write_synthetic_tree(again, seed=7, **SMALL)
    write_synthetic_tree(other, seed=8, **SMALL)
    a, b, c = _files(first), _files(again), _files(other)
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[key] != c[key] for key in a)


def test_subset_of_organs_and_fewer_images_give_the_same_bytes(tmp_path):
    """Each image depends only on (seed, organ, diagnosis, index), not on what else is asked."""
    write_synthetic_tree(tmp_path / "all", seed=3, **SMALL)
    subset = {"colon": ["benign"], "lung": ["squamous_cell_carcinoma", "adenocarcinoma"]}
    count = write_synthetic_tree(
        tmp_path / "some",
        organs=subset,
        seed=3,
        images_per_diagnosis=2,
        image_size=32,
        progress=False,
    )
    assert count == 6
    full, part = _files(tmp_path / "all"), _files(tmp_path / "some")
    assert len(part) == 6
    assert all(full[key] == data for key, data in part.items())


def test_tree_layout_and_count(tmp_path):
    count = write_synthetic_tree(tmp_path, images_per_diagnosis=2, image_size=16, progress=True)
    expected = {
        f"{organ}/{diagnosis}/{organ}_{diagnosis}_{index:05d}.png"
        for organ, diagnoses in DEFAULT_ORGANS.items()
        for diagnosis in diagnoses
        for index in range(2)
    }
    assert count == len(expected)
    assert set(_files(tmp_path)) == expected  # and no temporary files left behind
    with Image.open(tmp_path / "lung" / "benign" / "lung_benign_00001.png") as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (16, 16))
    # Writing again over an existing tree replaces the files in place.
    assert write_synthetic_tree(tmp_path, images_per_diagnosis=2, image_size=16, progress=False)
    assert set(_files(tmp_path)) == expected


@pytest.mark.parametrize("size", [16, 33, 64])
def test_render_image_is_pink_tissue_of_the_asked_size(size):
    for organ, diagnoses in DEFAULT_ORGANS.items():
        for diagnosis in diagnoses:
            rgb = render_image(organ, diagnosis, np.random.default_rng(1), size)
            assert rgb.shape == (size, size, 3) and rgb.dtype == np.uint8
            red, green, blue = rgb.reshape(-1, 3).mean(axis=0)
            # Both stains absorb green most: H&E slides are pink/purple, never green.
            assert red > green and blue > green, (organ, diagnosis)
            assert rgb.std() > 5  # structure, not a flat colour


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"organs": {"liver": ["benign"]}}, r"'liver'.*blood, colon, lung"),
        ({"organs": {"lung": ["benign", "sarcoma"]}}, r"'sarcoma'.*'lung'.*adenocarcinoma"),
        ({"organs": {"lung": "benign"}}, r"list of diagnoses"),
        ({"organs": {"lung": []}}, r"no diagnoses"),
        ({"images_per_diagnosis": 0}, r"images_per_diagnosis"),
        ({"image_size": 15}, r"image_size.*16"),
        ({"seed": -1}, r"seed"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_tree(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_render_image_rejects_unknown_names_and_tiny_sizes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"'kidney'.*blood, colon, lung"):
        render_image("kidney", "benign", rng, 64)
    with pytest.raises(ValueError, match=r"'malaria_parasitized'.*'lung'"):
        render_image("lung", "malaria_parasitized", rng, 64)
    with pytest.raises(ValueError, match="image_size"):
        render_image("lung", "benign", rng, 8)


# --- the data set is learnable from morphology, not from colour --------------------------


def _load_tree(root: Path, organ: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, class labels and file indices of one organ, read back from the PNGs."""
    images, labels, indices = [], [], []
    for label, diagnosis in enumerate(DEFAULT_ORGANS[organ]):
        for path in sorted((root / organ / diagnosis).glob("*.png")):
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
            labels.append(label)
            indices.append(int(path.stem.rsplit("_", 1)[1]))
    return np.stack(images), np.array(labels), np.array(indices)


def _gaussian_classifier_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray
) -> float:
    """Quadratic discriminant analysis: one full-covariance Gaussian per class.

    With only three features (mean R, G, B) this is about the strongest simple classifier,
    so if it is near chance, mean colour really carries little about the diagnosis.
    """
    scores = []
    for label in np.unique(y_train):
        features = train[y_train == label]
        mean = features.mean(axis=0)
        cov = np.cov(features, rowvar=False) + 1e-6 * np.eye(features.shape[1])
        diff = test - mean
        mahalanobis = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        prior = np.log(len(features) / len(train))
        scores.append(-0.5 * mahalanobis - 0.5 * np.linalg.slogdet(cov)[1] + prior)
    return float((np.argmax(np.stack(scores, axis=1), axis=1) == y_test).mean())


def _small_cnn_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, classes: int
) -> float:
    """A deliberately small CNN, a stand-in for the per-organ models the project trains."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(train.shape[1:]),
            layers.Rescaling(1 / 127.5, offset=-1.0),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.GlobalMaxPooling2D(),  # "is there such a structure anywhere?"
            layers.Dropout(0.3),
            layers.Dense(classes, activation="softmax"),
        ]
    )
    epochs, batch = 20, 32
    steps = epochs * -(-len(train) // batch)
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(train, y_train, epochs=epochs, batch_size=batch, verbose=0)
    predicted = model.predict(test, batch_size=256, verbose=0).argmax(axis=1)
    return float((predicted == y_test).mean())


def test_lung_classes_are_learnable_from_morphology_not_mean_colour(tmp_path):
    """The generator's main promise, checked on its three-class organ.

    Mean RGB must stay far from perfect (classes differ in shapes, stain varies per image),
    while a small CNN on the same split must do clearly better.
    """
    write_synthetic_tree(
        tmp_path, organs={"lung": DEFAULT_ORGANS["lung"]}, images_per_diagnosis=120, progress=False
    )
    images, labels, indices = _load_tree(tmp_path, "lung")
    is_test = indices % 4 == 0  # one fixed split for both classifiers
    mean_rgb = images.reshape(len(images), -1, 3).mean(axis=1)
    colour = _gaussian_classifier_accuracy(
        mean_rgb[~is_test], labels[~is_test], mean_rgb[is_test], labels[is_test]
    )
    cnn = _small_cnn_accuracy(
        images[~is_test], labels[~is_test], images[is_test], labels[is_test], classes=3
    )
    print(f"lung test accuracy: mean-RGB Gaussian {colour:.3f}, small CNN {cnn:.3f}")
    assert colour <= 0.65
    assert cnn >= 0.8
    assert cnn - colour >= 0.25
