import pytest
from conftest import REPO

from organtrain.config import RunConfig, load_config
from organtrain.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_and_demo_job_load():
    assert load_config() == RunConfig()
    demo = load_config(REPO / "jobs" / "demo.yaml")
    assert demo.prepare.test_fraction == 0.15
    assert demo.storage.uri == "demo-output/store"


def test_values_from_yaml_reach_the_dataclasses(tmp_path):
    cfg = load_config(write(tmp_path, "prepare:\n  test_fraction: 0.2\n  workers: 3\n"))
    assert cfg.prepare.test_fraction == 0.2
    assert cfg.prepare.workers == 3
    assert cfg.prepare.val_fraction == 0.15  # untouched fields keep their defaults


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; people write learning rates that way.
    cfg = load_config(write(tmp_path, "train:\n  learning_rate: 1e-3\n"))
    assert cfg.train.learning_rate == 0.001
    with pytest.raises(ConfigError, match=r"train\.learning_rate must be a number, got 'fast'"):
        load_config(write(tmp_path, "train:\n  learning_rate: fast\n"))


def test_an_integer_is_accepted_for_a_float_field(tmp_path):
    cfg = load_config(write(tmp_path, "prepare:\n  val_fraction: 0\n"))
    assert cfg.prepare.val_fraction == 0.0
    assert isinstance(cfg.prepare.val_fraction, float)


def test_misspelled_key_names_file_field_and_suggests(tmp_path):
    path = write(tmp_path, "prepare:\n  test_fractoin: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "prepare.test_fractoin" in message
    assert "did you mean 'prepare.test_fraction'" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'storgae'; did you mean 'storage'"):
        load_config(write(tmp_path, "storgae:\n  uri: x\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "prepare:\n  test_fraction: lots\n",
            r"prepare.test_fraction must be a number, got 'lots'",
        ),
        ("prepare:\n  workers: 2.5\n", r"prepare.workers must be an integer"),
        ("prepare:\n  workers: true\n", r"prepare.workers must be an integer, got True"),
        ("synth:\n  organs: [lung]\n", r"synth.organs must be a mapping"),
        ("synth:\n  organs:\n    lung: benign\n", r"synth.organs.lung must be a list"),
        ("prepare: 3\n", r"prepare must be a mapping"),
        ("- a\n- b\n", r"top level must be a mapping"),
    ],
)
def test_wrong_types_name_the_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prepare:\n  test_fraction: 1.5\n", r"prepare.test_fraction must be between 0 and 1"),
        (
            "prepare:\n  test_fraction: 0.5\n  val_fraction: 0.6\n",
            r"prepare.val_fraction .*leaves no training images",
        ),
        ("prepare:\n  images_per_shard: -4\n", r"prepare.images_per_shard must be at least 1"),
        ("prepare:\n  encoding: webp\n", r"prepare.encoding must be 'png' or 'jpeg'"),
        ("synth:\n  images_per_diagnosis: -1\n", r"synth.images_per_diagnosis must be at least 1"),
        ("storage:\n  uri: ' '\n", r"storage.uri must name a folder"),
    ],
)
def test_impossible_values_name_the_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "prepare:\n  test_fraction: 0.2\n")
    cfg = load_config(path, ["prepare.test_fraction=0.1", "storage.uri=s3://bucket/x"])
    assert cfg.prepare.test_fraction == 0.1
    assert cfg.storage.uri == "s3://bucket/x"


def test_bad_overrides_are_errors():
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        load_config(None, ["prepare.test_fraction"])
    with pytest.raises(ConfigError, match=r"unknown key 'prepare.nope'"):
        load_config(None, ["prepare.nope=1"])


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")
    path = write(tmp_path, "prepare: [unclosed\n")
    with pytest.raises(ConfigError, match=r"job.yaml: not valid YAML"):
        load_config(path)
