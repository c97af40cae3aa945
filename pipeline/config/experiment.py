"""The whole experiment config, its sweep section (whose keys are paths into it), and what the
jobs derive from it (run folder, bank, tracking URI, TrainConfig, MLflow params)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from pipeline.config.fields import Float, Int, Section, TaskId, check_bank, check_name, field_error
from pipeline.config.sections import (
    BaselineSection,
    ClusterSection,
    DataSection,
    DiscoverySection,
    EvaluateSection,
    HopfieldSection,
    NetworkSection,
    RegistrySection,
    ServeSection,
    TasksSection,
    TrackingSection,
    TrainSection,
)
from supsup.networks import NetworkSpec
from supsup.train import TrainConfig

# Train fields other jobs than the supermask job (model supsup, scenario gg_gn) never read, with
# why: (fields, reason). Set to anything but their default there, they are refused by name.
_FP32_ONE_PROCESS = (("precision", "fused", "data_parallel_workers"),
                     "it trains in float32, unfused, in one process")
_IGNORED_TRAIN_FIELDS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "baseline": (_FP32_ONE_PROCESS, (("rule", "density", "erdos_renyi_scale"),
                                     "a baseline learns weights, not masks")),
    "nns": (_FP32_ONE_PROCESS, (("steps", "epochs"), "the stream feeds "
                                "discovery.batches_per_task batches of each task")),
    "hopfield": (_FP32_ONE_PROCESS,),
}


def _as_yaml(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


class SweepDomain(Section):
    """Where one swept config field takes its values: exactly one of the four kinds."""

    grid: list[Any] | None = Field(None, min_length=1)  # every value, in every combination
    choice: list[Any] | None = Field(None, min_length=1)  # one value drawn per sample
    uniform: tuple[Float, Float] | None = None  # [low, high]
    loguniform: tuple[Float, Float] | None = None  # [low, high], both > 0

    @model_validator(mode="after")
    def _one_kind(self) -> SweepDomain:
        kinds = [k for k in ("grid", "choice", "uniform", "loguniform")
                 if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of grid: [..], choice: [..], uniform: [low, high] "
                             f"or loguniform: [low, high], got {kinds or 'none'}")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"a range needs low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform bounds must be > 0, got {list(self.loguniform)}")
        return self


class SweepScheduler(Section):
    """Early stopping of trials; time is counted in log points (train.log_every steps)."""

    type: Literal["none", "asha"] = "none"
    grace_period: Int = Field(1, ge=1)  # log points every trial runs before it can be stopped
    reduction_factor: Float = Field(2.0, gt=1)  # ASHA keeps 1/reduction_factor at each rung

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if data is None:
            return {"type": "none"}
        return {"type": data} if isinstance(data, str) else data


class SweepSection(Section):
    """A hyper-parameter search (`supsup sweep`): the space is data, keyed by dotted config paths.

    Every key must name a field of the config (checked here, at load time); every value is checked
    against the config by pipeline.jobs.sweep before any trial starts.
    """

    space: dict[str, SweepDomain]
    num_samples: Int = Field(1, ge=1)  # draws of the space (a grid is repeated this many times)
    metric: Literal["val_accuracy", "train_accuracy", "train_loss", "density",
                    "compressed_bytes_per_task"] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    sample_tasks: Int = Field(2, ge=1)  # tasks trained per trial: task ids 0..sample_tasks-1
    tasks: list[TaskId] | None = Field(None, min_length=1)  # explicit task ids instead
    val_fraction: Float = Field(0.1, gt=0, lt=1)  # of the train data, held out for selection
    scheduler: SweepScheduler = SweepScheduler()
    max_concurrent: Int | None = Field(None, ge=1)  # trials at once; default: what fits

    @field_validator("space")
    @classmethod
    def _paths(cls, v: dict[str, SweepDomain]) -> dict[str, SweepDomain]:
        if not v:
            raise ValueError("the search space is empty: add a dotted config key, e.g. "
                             "train.density: {grid: [0.05, 0.1]}")
        for path in v:
            _check_config_path(path)
        return v

    @field_validator("tasks")
    @classmethod
    def _task_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"tasks must be distinct non-negative task ids, got {v}")
        return v


def _check_config_path(path: str) -> None:
    """ValueError unless `path` (e.g. "train.density") names a value field of ExperimentConfig."""
    parts = path.split(".")
    if parts[0] == "sweep":
        raise ValueError(f"{path!r}: the sweep section cannot sweep itself")
    model: type[BaseModel] = ExperimentConfig
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the top level"
        fields = model.model_fields
        if part not in fields:
            raise ValueError(f"unknown config field {path!r}: {where} has no field {part!r} "
                             f"(fields: {', '.join(sorted(fields))})")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1 and not is_section:
            raise ValueError(f"unknown config field {path!r}: "
                             f"{'.'.join(parts[:i + 1])} is a value, not a section")
        if i == len(parts) - 1 and is_section:
            raise ValueError(f"{path!r} is a whole section: sweep one of its fields, "
                             f"e.g. {path}.{next(iter(annotation.model_fields))}")
        if is_section:
            model = annotation


class ExperimentConfig(Section):
    name: str = "supsup"  # the run folder output_dir/name; default bank, experiment and model
    # Every draw is seeded from (seed, purpose); torch generators take seeds below 2**64, and
    # permuted task i uses seed + i.
    seed: Int = Field(0, ge=0, lt=2**63)
    output_dir: str = "runs"
    # `scale: reduced` applies the `reduced` overrides (dotted keys, as with --set): the same
    # experiment at a size that runs on the bundled data in minutes.
    scale: Literal["full", "reduced"] = "full"
    reduced: dict[str, Any] = Field(default_factory=dict)
    # What is trained on the tasks: "supsup" (one supermask per task over the fixed random
    # network); or a baseline of supsup.baselines, fc-family networks only: "dense" (a separate
    # network trained per task, the upper bound), "batchensemble" (shared weights learned on the
    # first task, then per-task rank-one fast weights), "psp" (one shared network trained on every
    # task in turn, each task's layer inputs multiplied by its own random +-1 context).
    model: Literal["supsup", "dense", "batchensemble", "psp"] = "supsup"
    baseline: BaselineSection = BaselineSection()
    network: NetworkSection = NetworkSection()
    data: DataSection = DataSection()
    tasks: TasksSection = TasksSection()
    train: TrainSection = TrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    cluster: ClusterSection = ClusterSection()
    # made per config: its relative root is resolved against the working directory of the load,
    # not of the import
    registry: RegistrySection = Field(default_factory=RegistrySection)
    tracking: TrackingSection = TrackingSection()
    sweep: SweepSection | None = None
    # What `supsup train` runs: masks per task with ids given ("gg_gn"), training without task
    # identity ("nns", the discovery section) or the Hopfield reservoir ("hopfield").
    scenario: Literal["gg_gn", "nns", "hopfield"] = "gg_gn"
    discovery: DiscoverySection = DiscoverySection()
    hopfield: HopfieldSection = HopfieldSection()
    serve: ServeSection = ServeSection()  # `supsup serve` only: never a run's param

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # A folder name, and the default MLflow model name ('@' would end it in NAME@ALIAS).
        return check_name(v, "the experiment name", forbidden="@")

    @model_validator(mode="after")
    def _name_as_bank(self) -> ExperimentConfig:
        if self.registry.bank is None:
            try:
                check_bank(self.name, "the bank name (the experiment name while "
                            "registry.bank is unset)")
            except ValueError as err:
                raise field_error("name", str(err)) from None
        return self

    @model_validator(mode="after")
    def _no_ignored_training_fields(self) -> ExperimentConfig:
        """The baselines, discovery and the Hopfield reservoir read only part of the train
        section (they train in float32 with torch.optim in one process; a baseline has no masks;
        a stream has no step count): a field they never read, set anyway, would be ignored
        without a word and the run would not be the one asked for."""
        if self.model != "supsup":
            job, kind = f"model {self.model!r} (a baseline)", "baseline"
        elif self.scenario != "gg_gn":
            job, kind = f"scenario {self.scenario!r}", self.scenario
        else:
            return self
        for names, reason in _IGNORED_TRAIN_FIELDS[kind]:
            for name in names:
                value, default = getattr(self.train, name), TrainSection.model_fields[name].default
                if value != default:
                    raise field_error(f"train.{name}", (
                        f"{job} ignores train.{name} ({reason}), but it is set to "
                        f"{_as_yaml(value)}; set train.{name}: {_as_yaml(default)} or remove it, "
                        "or train supermasks with model: supsup and scenario: gg_gn"))
        return self

    # ------------------------------------------------------------------ derived settings
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def bank(self) -> str:
        return self.registry.bank or self.name

    @property
    def tracking_uri(self) -> str:
        """tracking.uri, else MLflow's standard MLFLOW_TRACKING_URI, else SQLite in the run
        folder."""
        return (self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}")

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def model_name(self) -> str:
        return self.tracking.model_name or self.name

    def network_spec(self, num_classes: int, input_shape: tuple[int, ...]) -> NetworkSpec:
        net = self.network
        return NetworkSpec(
            name=net.name, num_outputs=net.num_outputs,
            num_classes=net.num_classes or num_classes, seed=self.seed,
            input_shape=tuple(input_shape), hidden=tuple(net.hidden), width=net.width,
        )

    def train_config(self) -> TrainConfig:
        t = self.train
        return TrainConfig(
            steps=t.steps, epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer,
            lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, schedule=t.schedule,
            warmup_steps=t.warmup_steps, rule=t.rule, density=t.density,
            erdos_renyi_scale=t.erdos_renyi_scale, seed=self.seed, log_every=t.log_every,
            precision=t.precision, fused=t.fused,
        )

    def train_recipe(self) -> dict[str, Any]:
        """How this config trains a mask, as the bank's manifest records it: every train setting
        that changes the trained bits, and none that does not (log points, retries, group sizes
        and workers in flight; a task's mask never depends on its group, see supsup.train).

        `steps` is left out when `epochs` decides the step count, `momentum` unless the optimiser
        is SGD (RMSprop and Adam do not read it), and data-parallel workers enter because they
        multiply the effective batch (pipeline.jobs.distributed)."""
        t = self.train
        recipe: dict[str, Any] = {"steps": t.steps} if t.epochs is None else {"epochs": t.epochs}
        recipe.update(optimizer=t.optimizer, lr=t.lr, schedule=t.schedule,
                      warmup_steps=t.warmup_steps, batch_size=t.batch_size)
        if t.optimizer == "sgd":
            recipe["momentum"] = t.momentum
        recipe.update(weight_decay=t.weight_decay, precision=t.precision, fused=t.fused,
                      data_parallel_workers=t.data_parallel_workers)
        return recipe

    def mask_info(self) -> dict[str, Any]:
        """What decides the masks besides the network: the mask rule, the task family and the
        data set. Stored in the bank's manifest and compared with the config by every job, so a
        bank never mixes rules, task families or data sets."""
        t, tasks, d = self.train, self.tasks, self.data
        info: dict[str, Any] = {
            "rule": t.rule, "density": t.density, "erdos_renyi_scale": t.erdos_renyi_scale,
            "family": tasks.family, "dataset": d.dataset, "image_size": d.image_size,
            "test_fraction": d.test_fraction,
        }
        if tasks.family == "rotated":
            info["degrees"] = tasks.degrees
        if tasks.family == "split":
            info["classes_per_task"] = tasks.classes_per_task
        return info

    def flat_params(self) -> dict[str, str]:
        """Dotted key -> value strings for MLflow params, of the sections this config uses: the
        scenario's own section only, no empty sweep, no `reduced` table (already applied; the
        whole config is the run's config.yaml artifact)."""
        unused = {"reduced", "serve"} | {k for k, scenario in (("discovery", "nns"),
                                                       ("hopfield", "hopfield"))
                                if self.scenario != scenario}
        if self.sweep is None:
            unused.add("sweep")
        if self.model != "batchensemble":
            unused.add("baseline")
        # Keys the chosen task family, optimiser or mask rule never reads (train_recipe's rule).
        t, tr = self.tasks, self.train
        unused_keys = {"tasks.degrees"} if t.family != "rotated" else set()
        if t.family != "split":
            unused_keys.add("tasks.classes_per_task")
        if tr.optimizer != "sgd":
            unused_keys.add("train.momentum")
        if tr.epochs is not None:
            unused_keys.add("train.steps")
        if tr.rule != "topk":
            unused_keys |= {"train.density", "train.erdos_renyi_scale"}
        return {k: str(v) for k, v in flatten(self.model_dump(exclude=unused)).items()
                if k not in unused_keys}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
