"""The search space of a sweep: values applied to the config, checked before any trial runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig, SweepDomain, SweepSection


def _plain(value: Any) -> Any:
    """Numpy scalars and tuples as plain Python, for YAML, JSON and MLflow."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def with_values(config: ExperimentConfig, values: dict[str, Any],
                source: str = "sweep") -> ExperimentConfig:
    """`config` with dotted keys set to `values`, validated like a config file."""
    from pipeline.config import parse_config, set_dotted

    raw = config.model_dump()
    for key, value in values.items():
        raw = set_dotted(raw, key.split("."), _plain(value), source)
    return parse_config(raw, source)


def _sweep(config: ExperimentConfig) -> SweepSection:
    if config.sweep is None:
        raise ValueError(f"config {config.name!r} has no sweep section: add `sweep: {{space: "
                         "{train.density: {grid: [0.05, 0.1]}}}` (see configs/sweep_density.yaml)")
    return config.sweep


def _probe_values(domain: SweepDomain) -> list[Any]:
    """The values that decide whether a domain is valid: every listed value, both bounds."""
    return list(domain.grid or domain.choice or domain.uniform or domain.loguniform or [])


def validate_space(config: ExperimentConfig) -> list[ExperimentConfig]:
    """Check every value of the search space against the config; returns the probed configs.

    Each key's values are applied on top of a reference setting (every other key at its first
    value, so a rule and its density are checked together). ConfigError names the key.
    """
    from pipeline.config import ConfigError, get_dotted

    sweep = _sweep(config)

    def probe(values: dict[str, Any], key: str, value: Any) -> ExperimentConfig:
        try:
            return with_values(config, values, "the config with it")
        except ConfigError as err:
            raise ConfigError(f"sweep.space: {key} = {value!r} is not a valid value for {key} "
                              f"({err}); fix the search space") from None

    reference = {k: _probe_values(d)[0] for k, d in sweep.space.items()}
    try:
        probes = [with_values(config, reference, "the first swept values")]
    except ConfigError as err:
        for key, value in reference.items():  # name the key whose value fails on its own
            probe({key: value}, key, value)
        raise ConfigError(f"sweep.space: the first value of every key together is not a valid "
                          f"config: {err}") from None
    for key, domain in sweep.space.items():
        for value in _probe_values(domain):
            probes.append(probe({**reference, key: value}, key, value))
            ranged = domain.uniform is not None or domain.loguniform is not None
            if ranged and isinstance(get_dotted(probes[-1], key), int):
                raise ConfigError(f"sweep.space: {key} is an integer field; a uniform or "
                                  "loguniform range draws fractions: use grid or choice")
    for checked in probes:
        trial_task_ids(checked)
        if checked.train.epochs is None and checked.train.steps < 1:
            raise ConfigError("a sweep trial needs train.steps >= 1 (or train.epochs): it is "
                              "scored at its log points")
    return probes


def trial_task_ids(config: ExperimentConfig) -> list[int]:
    """The tasks each trial trains: `sweep.tasks`, else the first `sweep.sample_tasks` ids."""
    sweep = _sweep(config)
    n = config.tasks.num_tasks
    if sweep.tasks is not None:
        outside = [t for t in sweep.tasks if t >= n]
        if outside:
            raise ValueError(f"sweep.tasks: tasks {outside} are outside the {n} tasks of "
                             f"tasks.num_tasks (ids 0..{n - 1})")
        return list(sweep.tasks)
    if sweep.sample_tasks > n:
        raise ValueError(f"sweep.sample_tasks ({sweep.sample_tasks}) exceeds tasks.num_tasks "
                         f"({n}); lower it or list sweep.tasks")
    return list(range(sweep.sample_tasks))


def param_space(sweep: SweepSection) -> dict[str, Any]:
    """The Tune search space of a sweep section."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, d in sweep.space.items():
        if d.grid is not None:
            space[key] = tune.grid_search(list(d.grid))
        elif d.choice is not None:
            space[key] = tune.choice(list(d.choice))
        elif d.uniform is not None:
            space[key] = tune.uniform(*d.uniform)
        else:
            assert d.loguniform is not None
            space[key] = tune.loguniform(*d.loguniform)
    return space
