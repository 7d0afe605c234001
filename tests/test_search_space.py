"""The search space and the sweep's plan: checked when the job loads, before any trial."""

import json
import subprocess
import sys

import pytest

from organtrain.config import load_config
from organtrain.data.prepare import prepare
from organtrain.data.synth import write_synthetic_tree
from organtrain.errors import ConfigError
from organtrain.search.space import organ_space, parse_dimension, pbt_mutations, trial_config
from organtrain.search.sweep import _plan
from organtrain.storage import LocalStorage


def space(entries: dict, organ_entries: dict | None = None) -> list[str]:
    overrides = [f"search.space={json.dumps(entries)}"]
    if organ_entries is not None:
        overrides.append(f"search.organ_space={json.dumps(organ_entries)}")
    return overrides


def test_space_entries_become_tune_distributions_and_trial_configs():
    cfg = load_config(
        None,
        space(
            {"train.learning_rate": {"loguniform": ["1e-4", 1e-2]},
             "model.filters": {"choice": [[8], [16, 32]]},
             "augment.zoom_range": {"grid": [0.0, 0.1]},
             "train.epochs": {"randint": [2, 6]},
             "model.dropout": 0.1},
            {"blood": {"augment.zoom_range": 0.0}},
        ),
    )  # fmt: skip
    dims = organ_space(cfg, "lung")
    assert dims["train.learning_rate"].values == (1e-4, 1e-2)
    assert dims["model.dropout"].kind == "fixed"
    assert dims["train.epochs"].extremes() == (2, 5)  # randint excludes high
    # An organ's own entries replace the shared ones.
    assert organ_space(cfg, "blood")["augment.zoom_range"].kind == "fixed"
    lr = dims["train.learning_rate"].to_tune()
    assert 1e-4 <= lr.sample() <= 1e-2
    assert dims["augment.zoom_range"].to_tune() == {"grid_search": [0.0, 0.1]}

    trial = trial_config(cfg, {"model.filters": [16, 32], "train.learning_rate": 0.003})
    assert trial.model.filters == [16, 32] and trial.train.learning_rate == 0.003
    assert trial.storage == cfg.storage and cfg.model.filters == [32, 64, 64]
    assert list(pbt_mutations(dims)) == ["train.learning_rate"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"model.filterz": {"choice": [[8]]}},
         "model has no field 'filterz'; did you mean model.filters"),
        ({"storage.uri": "x"}, "section one of input, augment, model, train"),
        ({"learning_rate": 0.1}, "names a field as section.field"),
        ({"train.epochs": {"choise": [1, 2]}}, "did you mean 'choice'"),
        ({"train.learning_rate": {"loguniform": [0, 1]}}, "0 < low < high"),
        ({"train.learning_rate": {"uniform": [0.1]}}, "expected [low, high] with low < high"),
        ({"train.epochs": {"randint": [1.5, 4]}}, "integers"),
        ({"train.epochs": {"choice": []}}, "non-empty list"),
        ({"train.epochs": {"choice": [3, 0]}},
         "search.space.train.epochs = 0: train.epochs must be at least 1"),
        ({"model.pooling": {"grid": ["max", "median"]}}, "pooling must be flatten, max or avg"),
        ({"train.learning_rate": {"uniform": [-1, 1]}}, "learning_rate must be positive"),
        ({"model.name": {"choice": ["simple_cnn", "resnet9000"]}},
         "search.space.model.name = 'resnet9000': model.name 'resnet9000' is not a known model"),
        ({"model.name": "mobilenet"}, "is not a known model; did you mean 'mobilenet_v2'?"),
        # uniform draws fractions: 1 and 5 are fine bounds, but a trial would get epochs=2.7
        ({"train.epochs": {"uniform": [1, 5]}},
         "search.space.train.epochs.uniform: train.epochs is an integer; use randint"),
        ({"input.batch_size": {"loguniform": [8, 64]}}, "input.batch_size is an integer"),
    ],
)  # fmt: skip
def test_bad_space_entries_fail_at_load_naming_the_field(entries, message, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"search:\n  space: {json.dumps(entries)}\n")
    with pytest.raises(ConfigError) as err:
        load_config(job)
    assert message in str(err.value)
    assert str(job) in str(err.value)


def test_organ_space_entries_are_checked_too():
    with pytest.raises(
        ConfigError, match=r"organ_space\.blood\.model\.dropout = 1\.5: model\.dropout must be in"
    ):
        load_config(None, space({}, {"blood": {"model.dropout": {"choice": [0.1, 1.5]}}}))


def test_bad_search_and_resources_fields():
    with pytest.raises(ConfigError, match=r"search\.scheduler must be fifo, asha or pbt"):
        load_config(None, ["search.scheduler=hyperband"])
    with pytest.raises(ConfigError, match=r"search\.metric must be val_loss"):
        load_config(None, ["search.metric=val_auc"])
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_trial must be a whole number"):
        load_config(None, ["resources.gpus_per_trial=1.5"])
    with pytest.raises(
        ConfigError, match=r"unknown key 'search\.sample'; did you mean 'search\.samples'"
    ):
        load_config(None, ["search.sample=3"])  # fmt: skip


def test_pbt_needs_a_learning_rate_to_perturb():
    with pytest.raises(ConfigError, match=r"pbt needs search\.space to vary train\.learning_rate"):
        load_config(None, ["search.scheduler=pbt", *space({"model.dropout": {"choice": [0.1]}})])
    cfg = load_config(
        None, ["search.scheduler=pbt", *space({"train.learning_rate": {"uniform": [0.001, 0.01]}})]
    )
    assert cfg.search.scheduler == "pbt"


def test_sweep_with_an_unknown_model_exits_2_before_starting_ray(tmp_path, capsys):
    """It used to start Ray and fail every trial, and the sweep exited 0."""
    from organtrain.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(
        f"storage: {{uri: {tmp_path / 'store'}}}\n"
        "search:\n  space:\n    model.name: {choice: [simple_cnn, resnet9000]}\n"
    )
    assert main(["sweep", "--config", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{job}: search.space.model.name = 'resnet9000'" in err and "known models" in err
    assert not (tmp_path / "store").exists()  # failed before touching storage or Ray


def test_parse_dimension_keeps_lists_as_fixed_values():
    dim = parse_dimension("model.filters", [16, 32])
    assert dim.kind == "fixed" and dim.to_tune() == [16, 32]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    organs = {"lung": ["adenocarcinoma", "benign"], "colon": ["adenocarcinoma", "benign"]}
    write_synthetic_tree(root / "src", organs=organs, images_per_diagnosis=30, image_size=32,
                         progress=False)  # fmt: skip
    cfg = load_config(None, ["prepare.min_images_per_diagnosis=3", "prepare.max_image_side=32"])
    prepare(LocalStorage(root / "src"), LocalStorage(root / "store"), cfg.prepare, progress=False)
    return LocalStorage(root / "store")


def test_plan_pins_the_dataset_and_refuses_other_settings(store):
    cfg = load_config(None, ["train.epochs=3"])
    plan = _plan(cfg, store, "r1")
    assert plan["organs"] == ["colon", "lung"] and plan["dataset"] == "demo"
    assert (
        json.loads(store.get_bytes("runs/r1/sweep.json"))["dataset_version"]
        == plan["dataset_version"]
    )
    # More failures allowed, another cluster: the same sweep.
    same = load_config(
        None, ["train.epochs=3", "search.max_failures=3", "resources.cpus_per_trial=2"]
    )
    assert _plan(same, store, "r1") == plan
    other = load_config(None, ["train.epochs=3", "search.samples=9"])
    with pytest.raises(ConfigError, match=r"another configuration \(search\.samples: 4 -> 9\)"):
        _plan(other, store, "r1")


def test_plan_names_unknown_organs(store):
    with pytest.raises(ConfigError, match=r"organ 'liver' .* its organs: colon, lung"):
        _plan(load_config(None, ['search.organs=["liver"]']), store, "r2")
    with pytest.raises(ConfigError, match="organ 'kidney'"):
        _plan(load_config(None, ['search.organ_space={"kidney": {}}']), store, "r3")


def test_each_organ_draws_its_own_trials_repeatably():
    """One seed for all organs made every organ try the same configurations in the same
    order; the sampling seed now mixes in the organ, and is the same in every process."""
    from organtrain.search.space import sampling_seed

    seeds = {organ: sampling_seed(0, organ) for organ in ("blood", "colon", "lung")}
    assert len(set(seeds.values())) == 3
    assert sampling_seed(0, "lung") == seeds["lung"] != sampling_seed(1, "lung")
    code = "from organtrain.search.space import sampling_seed; print(sampling_seed(0, 'lung'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert int(other.stdout) == seeds["lung"]  # not hash(): no per-process salt
