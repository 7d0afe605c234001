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


# --- Validation at load (issue #16 item 9) -------------------------------------------------


def test_unknown_model_name_names_file_field_and_known_names(tmp_path):
    path = write(tmp_path, "model:\n  name: simple_cn\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: model.name 'simple_cn' is not a known model")
    assert "did you mean 'simple_cnn'?" in message
    assert "known models: simple_cnn, vgg16, mobilenet_v2" in message


def test_known_model_names_are_the_registry():
    from organtrain.config import MODEL_NAMES
    from organtrain.models import MODELS  # imports Keras: only here

    assert set(MODEL_NAMES) == set(MODELS)


def test_duplicate_keys_name_the_file_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  seed: 1\n  epochs: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: duplicate key 'epochs' (lines 2 and 4)")
    path = write(tmp_path, "train:\n  epochs: 3\nmodel: {}\ntrain: {seed: 2}\n")
    with pytest.raises(ConfigError, match=r"job.yaml: duplicate key 'train' \(lines 1 and 4\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"duplicate key 'train.epochs' \(line 1, columns 2 and"):
        load_config(None, ["search.space={train.epochs: 2, train.epochs: 3}"])


def test_a_yaml_merge_key_may_override_what_it_merges(tmp_path):
    """`<<: *anchor` then the same key again is YAML's way to override: not a duplicate."""
    text = (
        "search:\n  space: &shared {model.dropout: 0.1, train.epochs: 2}\n"
        "  organ_space:\n    blood:\n      <<: *shared\n      model.dropout: 0.2\n"
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.search.organ_space["blood"] == {"model.dropout": 0.2, "train.epochs": 2}


@pytest.mark.parametrize(
    "override",
    ["model.filters=[8, 16", "search.space={model.name: {choice: [simple_cnn, vgg16]}"],
)
def test_malformed_set_value_names_the_argument_and_how_to_quote(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"--set {override!r}: the value is not valid YAML")
    assert "quote the whole argument" in message


def test_malformed_set_value_is_a_clear_cli_error_not_a_traceback(capsys):
    from organtrain.cli import main

    assert main(["status", "r", "--set", "model.filters=[8, 16"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("organtrain: error: --set 'model.filters=[8, 16'") and "Traceback" not in err
    )


def test_a_bad_set_value_is_blamed_on_the_set_not_the_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.epochs=0"])
    assert str(err.value).startswith(f"{path} with --set train.epochs=0: train.epochs must be")


def test_model_settings_shown_are_the_ones_the_model_uses():
    """A simple_cnn run showed weights=imagenet in the report, though it has no
    pretrained weights; a pretrained base ignores the small CNN's fields."""
    from dataclasses import asdict

    from organtrain.config import ModelConfig, applied_model_settings

    cnn = applied_model_settings(asdict(ModelConfig(name="simple_cnn")))
    assert "weights" not in cnn and "fine_tune_layers" not in cnn and cnn["filters"]
    base = applied_model_settings(asdict(ModelConfig(name="resnet50", weights=None)))
    assert base["weights"] is None and "filters" not in base and "dropout" in base
