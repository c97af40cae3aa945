"""Experiment configuration: YAML -> a validated, frozen config.

Every section is a pydantic model with extra="forbid", so an unknown key or a bad value is an
error that names the key path and the file. `fields` holds the strict value types and name
checks, `sections` the sections, `experiment` the whole config and what jobs derive from it,
`loading` the YAML, the dotted overrides and the error messages, `strict_yaml` the YAML reader
that refuses duplicate keys and runaway aliases.
"""

from pipeline.config.experiment import (
    ExperimentConfig,
    SweepDomain,
    SweepScheduler,
    SweepSection,
    flatten,
)
from pipeline.config.fields import ConfigError, Float, Int, PositiveInt, TaskId, shown
from pipeline.config.loading import (
    apply_overrides,
    dump_config,
    get_dotted,
    load_config,
    parse_config,
    set_dotted,
)
from pipeline.config.sections import (
    BaselineSection,
    ClusterSection,
    DataSection,
    DiscoverySection,
    EvaluateSection,
    HopfieldSection,
    NetworkSection,
    RegistrySection,
    TasksSection,
    TrackingSection,
    TrainSection,
)

__all__ = [
    "BaselineSection", "ClusterSection", "ConfigError", "DataSection", "DiscoverySection",
    "EvaluateSection", "ExperimentConfig", "Float", "HopfieldSection", "Int", "NetworkSection",
    "PositiveInt", "RegistrySection", "SweepDomain", "SweepScheduler", "SweepSection", "TaskId",
    "TasksSection", "TrackingSection", "TrainSection", "apply_overrides", "dump_config",
    "flatten", "get_dotted", "load_config", "parse_config", "set_dotted", "shown",
]
