"""The search space: config fields → what each trial tries, checked before any trial runs.

A space is plain YAML (see config.SearchConfig): `model.filters: {choice: [[16, 32], [32,
64, 64]]}`. Every value a trial could get is applied to the job's configuration when the
job is loaded, so a typo or an impossible value fails at once, naming the field, instead
of failing trials an hour into a sweep. Ray Tune is imported only to build its own
distributions (`to_tune`), so loading a config does not need Ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import typing
from dataclasses import dataclass
from typing import Any

from organtrain.config import RunConfig, from_dict
from organtrain.errors import ConfigError

# The sections a trial may vary; the others say where data comes from and where results
# go, which must be the same for every trial of a sweep.
SEARCHABLE_SECTIONS = ("input", "augment", "model", "train")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# What population based training may change in a running trial: values the next epoch
# can take up without rebuilding the model. Everything else is fixed when a trial starts.
PBT_MUTABLE = ("train.learning_rate",)


@dataclass(frozen=True)
class Dimension:
    """One entry of the space: a fixed value, or a distribution over values."""

    field: str  # section.field
    kind: str  # "fixed" or one of DISTRIBUTIONS
    values: tuple  # fixed: (value,); choice/grid: the values; ranges: (low, high)

    def extremes(self) -> tuple:
        """Values that, if valid, make every value the dimension can take valid."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        if self.kind in ("uniform", "loguniform"):
            return tuple(float(v) for v in self.values)  # Tune draws floats, even from [1, 5]
        return self.values

    def to_tune(self):
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return getattr(tune, self.kind)(*self.values)


def organ_space(cfg: RunConfig, organ: str) -> dict[str, Dimension]:
    """The space of one organ: `search.space`, with `search.organ_space[organ]` on top."""
    entries = {**cfg.search.space, **cfg.search.organ_space.get(organ, {})}
    where = "search.organ_space." + organ if organ in cfg.search.organ_space else "search.space"
    return {key: parse_dimension(key, spec, where=where) for key, spec in entries.items()}


def parse_dimension(key: str, spec: Any, *, where: str = "search.space") -> Dimension:
    section, _, name = key.partition(".")
    if section not in SEARCHABLE_SECTIONS or not name:
        raise ConfigError(
            f"{where}.{key}: a space entry names a field as section.field, with section one of "
            f"{', '.join(SEARCHABLE_SECTIONS)} (e.g. train.learning_rate)"
        )
    if not isinstance(spec, dict):
        return Dimension(key, "fixed", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        first = str(next(iter(spec), ""))
        guess = difflib.get_close_matches(first, DISTRIBUTIONS, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise ConfigError(
            f"{where}.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}}}: values, "
            f"got {spec!r}{hint}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{key}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numbers = [_number(v, kind) for v in values]
        ok = len(values) == 2 and None not in numbers and numbers[0] < numbers[1]
        ok = ok and (kind != "loguniform" or numbers[0] > 0)
        ok = ok and (kind != "randint" or all(isinstance(v, int) for v in numbers))
        if not ok:
            wanted = {
                "uniform": "[low, high] with low < high",
                "loguniform": "[low, high] with 0 < low < high",
                "randint": "[low, high] integers with low < high (high is excluded)",
            }[kind]
            raise ConfigError(f"{where}.{key}.{kind}: expected {wanted}, got {values!r}")
        values = numbers
    return Dimension(key, kind, tuple(values))


def _number(value: Any, kind: str) -> float | int | None:
    """A range bound; YAML 1.1 reads `1e-3` as a string, so accept that spelling too."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def trial_config(cfg: RunConfig, values: dict[str, Any], *, source: str = "trial") -> RunConfig:
    """`cfg` with one trial's values applied, validated like a config file."""
    data = dataclasses.asdict(cfg)
    for key, value in values.items():
        section, _, name = key.partition(".")
        data[section][name] = value
    return from_dict(RunConfig, data, source=source)


def check_space(cfg: RunConfig, *, source: str) -> None:
    """Fail now on any value a trial of any organ could be given that is not valid."""
    _check_entries(cfg, source)
    if cfg.search.scheduler == "pbt":
        for organ in ["", *cfg.search.organ_space]:
            if not pbt_mutations(organ_space(cfg, organ)):
                raise ConfigError(
                    f"{source}: search.scheduler pbt needs search.space"
                    f"{' (with organ_space.' + organ + ')' if organ else ''} to vary "
                    f"{' or '.join(PBT_MUTABLE)} with choice, uniform or loguniform: population "
                    "based training perturbs only what a running model can take up"
                )


def _check_entries(cfg: RunConfig, source: str) -> None:
    for organ in [None, *cfg.search.organ_space]:
        where = f"search.organ_space.{organ}" if organ else "search.space"
        entries = cfg.search.organ_space[organ] if organ else cfg.search.space
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: {where} must map section.field to values")
        for key, spec in entries.items():
            try:
                dim = parse_dimension(str(key), spec, where=where)
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
            section, _, name = dim.field.partition(".")
            fields = [f.name for f in dataclasses.fields(getattr(cfg, section))]
            if name not in fields:
                guess = difflib.get_close_matches(name, fields, n=1)
                hint = f"did you mean {section}.{guess[0]}? " if guess else ""
                raise ConfigError(
                    f"{source}: {where}.{key}: {section} has no field {name!r}; {hint}"
                    f"its fields: {', '.join(fields)}"
                )
            _check_draws_fit_the_type(cfg, dim, f"{source}: {where}.{key}.{dim.kind}")
            for value in dim.extremes():
                try:
                    trial_config(cfg, {dim.field: value}, source=f"{where}.{key} = {value!r}")
                except ConfigError as err:
                    raise ConfigError(f"{source}: {err}") from None


def _check_draws_fit_the_type(cfg: RunConfig, dim: Dimension, where: str) -> None:
    """uniform and loguniform draw fractions: an integer field would fail in each trial."""
    section, _, name = dim.field.partition(".")
    hint = typing.get_type_hints(type(getattr(cfg, section)))[name]
    if dim.kind in ("uniform", "loguniform") and int in (hint, *typing.get_args(hint)):
        low, high = int(dim.values[0]), int(dim.values[1])
        raise ConfigError(
            f"{where}: {dim.field} is an integer; use randint (e.g. randint: [{low}, {high + 1}] "
            f"for {low}..{high}: high is excluded) or choice ({dim.kind} draws fractions)"
        )


def sampling_seed(seed: int, organ: str) -> int:
    """The seed of one organ's draws from the space: `search.seed` and the organ's name.

    With one seed for every organ, every organ tried the same configurations in the same
    order (and, with ASHA favouring the trial that reaches each rung first, often chose
    the same one); each organ now explores its own. Stable across processes and runs,
    unlike hash()."""
    digest = hashlib.sha256(f"{seed}:{organ}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def pbt_mutations(space: dict[str, Dimension]) -> dict[str, Any]:
    """The entries population based training may perturb, as Tune distributions."""
    return {
        key: dim.to_tune()
        for key, dim in space.items()
        if key in PBT_MUTABLE and dim.kind not in ("fixed", "grid")
    }
