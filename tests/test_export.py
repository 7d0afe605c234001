"""The exported SavedModel runs in plain TensorFlow, with organtrain unimportable, and
gives the probabilities `organtrain predict` gives, for the three kinds of model whose
`.keras` file needs organtrain: none (simple_cnn), ApplicationPreprocess (mobilenet_v2)
and in-model augmentation layers."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from organtrain.augment import build_augmentation
from organtrain.config import AugmentConfig, ModelConfig
from organtrain.data.pipeline import crop_and_resize
from organtrain.export import next_version_number, write_saved_model
from organtrain.models import build_model
from organtrain.predict import ModelSpec, model_pixels
from organtrain.storage import LocalStorage

CLASSES = ["adenocarcinoma", "benign", "squamous"]
SPEC = ModelSpec(
    organ="lung",
    version="v1",
    classes=CLASSES,
    model_key="unused",
    image_size=32,
    max_image_side=48,
    encoding="png",
)

# Loads every SavedModel given, with organtrain made unimportable, and writes what its two
# signatures answer. -I: no user site, no PYTHONPATH, no current folder on sys.path.
PLAIN_TF = """
import sys
sys.modules["organtrain"] = None  # any `import organtrain...` now fails
import json
import numpy as np
import tensorflow as tf
request = json.load(open(sys.argv[1]))
answers = {}
for name, folder in request["models"].items():
    model = tf.saved_model.load(folder)
    encoded = [open(p, "rb").read() for p in request["files"]]
    out = model.signatures["serving_default"](image_bytes=tf.constant(encoded))
    pixels = np.load(request["pixels"])
    raw = model.signatures["classify_pixels"](images=tf.constant(pixels))
    answers[name] = {
        "bytes": out["probabilities"].numpy().tolist(),
        "classes": [[c.decode() for c in row] for row in out["class_names"].numpy()],
        "predicted": [c.decode() for c in out["predicted_class"].numpy()],
        "pixels": raw["probabilities"].numpy().tolist(),
    }
json.dump(answers, open(sys.argv[2], "w"))
"""


def _models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(3)
    small = ModelConfig(filters=[4, 8], dense_units=8)
    augment = build_augmentation(AugmentConfig(placement="model"), seed=1)
    return {
        "simple_cnn": build_model(small, num_classes=3, image_size=32),
        "mobilenet_v2": build_model(
            ModelConfig(name="mobilenet_v2", weights=None), num_classes=3, image_size=32
        ),
        "augment_in_model": build_model(small, num_classes=3, image_size=32, augmentation=augment),
    }


def _images(folder) -> dict[str, bytes]:
    """Files of the kinds the README lists, at most max_image_side (48) on a side, plus
    one larger, which is shrunk to max_image_side inside the graph."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 46, 3), dtype=np.uint8)
    rgba = np.dstack([base, rng.integers(0, 256, (40, 46), dtype=np.uint8)])
    kinds = {
        "rgb.png": (Image.fromarray(base), "PNG"),
        "grey.png": (Image.fromarray(base[..., 0]), "PNG"),
        "rgb.jpg": (Image.fromarray(base), "JPEG"),
        "rgb.bmp": (Image.fromarray(base), "BMP"),
        "palette.gif": (Image.fromarray(base).quantize(64), "GIF"),
        "rgba.png": (Image.fromarray(rgba, "RGBA"), "PNG"),
        "large.png": (Image.fromarray(base).resize((92, 80), Image.Resampling.BILINEAR), "PNG"),
    }
    files = {}
    for name, (image, fmt) in kinds.items():
        out = io.BytesIO()
        image.save(out, format=fmt)
        files[name] = out.getvalue()
        (folder / name).write_bytes(files[name])
    return files


def _predict_path(model, files: dict[str, bytes]) -> np.ndarray:
    """What `organtrain predict` feeds the Keras model for each file."""
    images = [crop_and_resize(model_pixels(data, SPEC), SPEC.image_size) for data in files.values()]
    return np.asarray(model.predict_on_batch(np.stack(images)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every model exported, and the plain-TF subprocess's answers (one process for all)."""
    tmp = tmp_path_factory.mktemp("export")
    models = _models()
    folders = {}
    for name, model in models.items():
        folders[name] = tmp / name / "1"
        write_saved_model(model, SPEC, folders[name], {"MODEL_CARD.md": b"# card"})
    files = _images(tmp)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 36, 30, 3), dtype=np.uint8)
    np.save(tmp / "pixels.npy", pixels)
    request = {
        "models": {n: str(f) for n, f in folders.items()},
        "files": [str(tmp / n) for n in files],
        "pixels": str(tmp / "pixels.npy"),
    }
    (tmp / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_TF, str(tmp / "request.json"), str(tmp / "out.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads((tmp / "out.json").read_text())
    return models, folders, files, pixels, answers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simple_cnn", "mobilenet_v2", "augment_in_model"])
def test_plain_tensorflow_gives_predicts_probabilities(exported, name):
    models, folders, files, pixels, answers = exported
    answer = answers[name]
    assert (folders[name] / "saved_model.pb").is_file()
    assert (folders[name] / "assets.extra" / "MODEL_CARD.md").read_bytes() == b"# card"
    expected = _predict_path(models[name], files)
    got = np.asarray(answer["bytes"])
    exact = [i for i, n in enumerate(files) if n not in ("rgba.png", "large.png")]
    np.testing.assert_allclose(got[exact], expected[exact], atol=1e-5)
    # Alpha on white, and Pillow's LANCZOS thumbnail, are redone in TensorFlow ops, which
    # round a pixel here and there by a grey level: close, not identical (see README).
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert answer["classes"] == [CLASSES] * len(files)
    assert answer["predicted"] == [CLASSES[i] for i in expected.argmax(axis=1)]
    direct = [crop_and_resize(p, SPEC.image_size) for p in pixels]
    want = np.asarray(models[name].predict_on_batch(np.stack(direct)))
    np.testing.assert_allclose(answer["pixels"], want, atol=1e-5)


@pytest.mark.slow
def test_organtrain_really_was_unimportable_there(exported):
    """The subprocess's guard works: the same import there fails."""
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            'import sys; sys.modules["organtrain"] = None; import organtrain.models',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "organtrain" in done.stderr


def test_next_version_number_follows_the_highest(tmp_path):
    out = LocalStorage(tmp_path)
    assert next_version_number(out) == 1
    for key in ("1/saved_model.pb", "7/saved_model.pb", "notes/x.txt"):
        out.put_bytes(key, b"x")
    assert next_version_number(out) == 8
