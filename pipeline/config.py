"""Experiment configuration: YAML -> a validated, frozen config.

Every section is a pydantic model with extra="forbid", so an unknown key or a bad value is an
error that names the key path and the file. Dotted overrides (`--set train.lr=0.01`) are applied to
the raw YAML before validation, so they are checked exactly like the file.

Values that would be silently wrong are refused here, before any job runs: every float is finite
and inside the range its meaning allows (a rate > 0, a momentum in [0, 1), a fraction in (0, 1)),
integers are whole numbers and never booleans (YAML's `true` is not 1 step), and names that become
folders or MLflow names cannot climb out of their folder or break a `models:/NAME@ALIAS` URI.
"""

from __future__ import annotations

import os
import re
import unicodedata
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.datasets import DATASETS
from pipeline.paths import resolve_root
from supsup.networks import NETWORKS, NetworkSpec
from supsup.train import TrainConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


def _whole_number(value: Any) -> Any:
    """YAML spells some whole numbers as floats (`2.0`, `1.0e+3`): those count as integers. A
    boolean never does (YAML's `true` would otherwise become 1); strings and fractions are left
    to the strict int check, which refuses them."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number, not a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _not_boolean(value: Any) -> Any:
    """Floats stay lax (PyYAML reads `1e-3` as the string '1e-3'), but `true` is not 1.0."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


Int = Annotated[int, Strict(), BeforeValidator(_whole_number)]
Float = Annotated[float, BeforeValidator(_not_boolean)]  # finite: allow_inf_nan=False below
PositiveInt = Annotated[Int, Field(ge=1)]
TaskId = Annotated[Int, Field(ge=0)]

# The mask registry's rule for bank names (check_bank_name in pipeline/registry/mask_registry.py
# enforces it again when a bank is opened); repeated here so a bad name fails at load time without
# importing the registry (and pyarrow) into the config.
BANK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# MLflow's rule for registered model aliases (mlflow.utils.validation): word characters and '-',
# at most 255 of them; `latest` and version-like `v<digits>` are reserved for MLflow itself.
_ALIAS = re.compile(r"[\w-]{1,255}")
_RESERVED_ALIAS = re.compile(r"(?i:latest|v\d+)")


def _check_name(value: str, role: str, forbidden: str = "", max_bytes: int = 255) -> str:
    """`value` if it can serve as `role` (a folder name or an MLflow name), else ValueError.

    Refused: empty, '.', '..' or any leading '.' (a path step or a hidden folder), path
    separators and ':' (a drive or a URI scheme), the characters in `forbidden`, whitespace and
    control or format characters (invisible in logs and listings), more than `max_bytes` bytes.
    """
    if not value:
        raise ValueError(f"{role} must not be empty")
    if value.startswith("."):
        raise ValueError(f"{value!r} cannot be {role}: it starts with '.' (a path step or a "
                         "hidden folder)")
    bad = sorted({c for c in value if c in "/\\:" + forbidden or c.isspace()
                  or unicodedata.category(c).startswith("C")})
    if bad:
        raise ValueError(f"{value!r} cannot be {role}: it contains {', '.join(map(repr, bad))}; "
                         "use letters, digits, '.', '_' and '-'")
    if len(value.encode()) > max_bytes:
        raise ValueError(f"{role} {value[:20]!r}... is longer than {max_bytes} bytes")
    return value


def _check_bank(value: str, role: str = "a bank name") -> str:
    """`value` if the mask registry accepts it as a bank (a folder under registry.root)."""
    if not BANK_NAME.fullmatch(value):
        raise ValueError(f"{value!r} cannot be {role}: use 1 to 128 letters, digits, '.', '_' "
                         "and '-', starting with a letter or digit (it becomes a folder name)")
    return value


def _field_error(field: str, detail: str) -> PydanticCustomError:
    """The error of a check across fields, named by the field to change: `_format_error` puts
    `field` after the section's key path (a model validator's own location is the section)."""
    return PydanticCustomError("config_field", "{detail}", {"field": field, "detail": detail})


class _Section(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (.inf and .nan are refused).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NetworkSection(_Section):
    name: str = "lenet"
    num_outputs: Int = Field(100, ge=1)
    num_classes: Int | None = Field(None, ge=1)  # default: the task family's labels per task
    hidden: list[PositiveInt] = Field(default_factory=list)  # fc widths; empty: the catalog's
    width: Int = Field(0, ge=0)  # base channels of conv nets; 0: the catalog's

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in NETWORKS:
            raise ValueError(f"unknown network {v!r}; choose one of {sorted(NETWORKS)}")
        return v

    @model_validator(mode="after")
    def _labels_fit(self) -> NetworkSection:
        if self.num_classes is not None and self.num_classes > self.num_outputs:
            raise _field_error("num_classes", f"{self.num_classes} is above network.num_outputs "
                               f"({self.num_outputs}): the labels are the first outputs")
        return self


class DataSection(_Section):
    dataset: str = "mnist-bundled"
    root: str | None = None
    download: bool = False
    image_size: Int | None = Field(None, ge=1)  # pixels of the square images are resized to
    test_fraction: Float = Field(0.2, gt=0, lt=1)  # of the bundled digits, held out for testing

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown data set {v!r}; choose one of {sorted(DATASETS)}")
        return v


class TasksSection(_Section):
    family: Literal["permuted", "rotated", "split"] = "permuted"
    num_tasks: Int = Field(10, ge=1)
    degrees: Float = 10.0  # rotated: task i turns its images by i * degrees (any sign)
    classes_per_task: Int = Field(2, ge=1)

    @model_validator(mode="after")
    def _distinct_rotations(self) -> TasksSection:
        if self.family != "rotated":
            return self
        # Task i turns by i * degrees: the angles repeat after `period` tasks (a whole number
        # of turns), and a repeated angle is the same task under two ids. The decimal as written
        # (str) is the step meant: 0.1 repeats after 3,600 tasks, not after 2**k.
        period = (Fraction(str(self.degrees)) / 360).denominator
        if self.num_tasks > period:
            raise _field_error("degrees", (
                f"turning {self.degrees:g} degrees per task, task {period} is task 0 again, so "
                f"{self.num_tasks} rotated tasks would not all differ; use tasks.num_tasks <= "
                f"{period} or a step such as {360 / self.num_tasks:g}"))
        return self


class TrainSection(_Section):
    steps: Int = Field(1000, ge=0)
    epochs: Float | None = Field(None, gt=0)  # overrides steps: passes over each task's data
    batch_size: Int = Field(128, ge=1)
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    lr: Float = Field(1e-4, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)  # SGD only; >= 1 makes the steps grow forever
    weight_decay: Float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Int = Field(0, ge=0)
    rule: Literal["threshold", "topk"] = "threshold"
    density: Float | None = None  # topk: fraction of weights kept, in (0, 1]
    erdos_renyi_scale: Float | None = Field(None, gt=0)  # topk: per-layer densities
    log_every: Int = Field(100, ge=1)
    # bf16: matmuls in bfloat16 (scores and optimiser state stay float32); masks within 0.5
    # points of fp32's accuracy, several times faster on CPUs with AVX-512 BF16 or AMX and GPUs
    precision: Literal["fp32", "bf16"] = "fp32"
    # one compiled kernel per layer for the elementwise tail of a step (threshold rule only);
    # compiled once per worker process, and run eagerly where compilation is unavailable
    fused: bool = False
    group_size: Int = Field(10, ge=1)  # tasks trained together by one worker
    max_in_flight: Int | None = Field(None, ge=1)  # groups at once; default: worker slots
    max_retries: Int = Field(2, ge=0)  # per group, when a worker dies
    # > 1: each task is trained by this many Ray Train workers (data parallel), one task at a time
    data_parallel_workers: Int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # data-parallel collectives; auto: by device

    @field_validator("density")
    @classmethod
    def _density(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _topk_needs_density(self) -> TrainSection:
        if self.rule == "topk" and self.density is None and self.erdos_renyi_scale is None:
            raise _field_error("density", "rule 'topk' needs train.density in (0, 1] or "
                               "train.erdos_renyi_scale")
        if self.fused and self.rule != "threshold":
            raise _field_error("fused", "train.fused builds masks by the threshold rule; set "
                               "train.fused: false for rule 'topk'")
        return self


class EvaluateSection(_Section):
    gn: bool = True
    method: Literal["one_shot", "binary"] = "one_shot"
    objective: Literal["entropy", "g"] = "entropy"
    mode: Literal["one_image", "batch", "per_example"] = "one_image"
    batch_size: Int = Field(128, ge=1)
    group_size: Int = Field(25, ge=1)  # tasks evaluated by one worker
    max_batches: Int | None = Field(None, ge=1)  # test batches per task; None: the whole split
    curve_points: Int = Field(6, ge=0)  # points on the accuracy-vs-tasks-learned curve
    curve_tasks: Int = Field(10, ge=1)  # tasks sampled at each curve point


class ClusterSection(_Section):
    address: str | None = None  # None: start a local Ray; "auto" or ray://host:port: join one
    num_cpus: Int | None = Field(None, ge=1)  # a local Ray's CPUs; default: this machine's
    num_gpus: Float | None = Field(None, ge=0)  # a local Ray's GPUs, whole; default: detected
    cpus_per_worker: Float = Field(1, gt=0)  # Ray resources per worker (fractions allowed)
    gpus_per_worker: Float = Field(0, ge=0)
    threads_per_worker: Int | None = Field(None, ge=1)

    @field_validator("num_gpus")
    @classmethod
    def _whole_gpus(cls, v: float | None) -> float | None:
        if v is not None and not v.is_integer():
            raise ValueError(f"a node has a whole number of GPUs, got {v}; share GPUs between "
                             "workers with cluster.gpus_per_worker (e.g. 0.25) instead")
        return v


class RegistrySection(_Section):
    # A folder or a pyarrow filesystem URI; a relative folder is made absolute here, once, so
    # every worker that receives this config writes to the same place.
    root: str = Field("runs/registry", validate_default=True)
    bank: str | None = None  # default: the experiment name

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        return resolve_root(v)

    @field_validator("bank")
    @classmethod
    def _bank(cls, v: str | None) -> str | None:
        return v if v is None else _check_bank(v)


class TrackingSection(_Section):
    uri: str | None = None  # default: sqlite under the run folder
    experiment: str | None = None  # default: the experiment name
    model_name: str | None = None  # default: the experiment name
    alias: str = "champion"
    register_model: bool = True
    embed_masks_max_bytes: Int = Field(64 * 2**20, ge=0)  # smaller banks travel inside the model

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str | None) -> str | None:
        # MLflow allows 500 characters; the rest keeps the name usable as a folder and in URIs.
        return v if v is None else _check_name(v, "an MLflow experiment name", max_bytes=500)

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        # '@' would end the name inside models:/NAME@ALIAS.
        return v if v is None else _check_name(v, "an MLflow model name", forbidden="@")

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not _ALIAS.fullmatch(v) or _RESERVED_ALIAS.fullmatch(v):
            raise ValueError(f"{v!r} cannot be an MLflow model alias: use 1 to 255 letters, "
                             "digits, '_' and '-'; 'latest' and v<digits> (e.g. v2) are "
                             "reserved for versions")
        return v


class SweepDomain(_Section):
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


class SweepScheduler(_Section):
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


class SweepSection(_Section):
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


class DiscoverySection(_Section):
    """Training without task identity (scenario "nns", the paper's NNs): the allocation rule and
    the stream of hidden tasks it runs on. Masks train with the train section's optimiser, batch
    size and mask rule; train.schedule must stay constant (the stream has no last step)."""

    check_every: Int = Field(100, ge=1)  # batches between allocation checks
    budget: Int = Field(2500, ge=1)  # most masks ever allocated
    min_candidates: Int = Field(5, ge=1)  # n = max(#masks, min_candidates) at a check
    eps: Float = Field(2**-3, ge=0)  # new task when max(nu) < (1 + eps) / n
    batches_per_task: Int = Field(1000, ge=1)  # consecutive batches of each task in the stream
    lr: Float | None = Field(None, gt=0)  # None: train.lr
    task_order: list[TaskId] | None = None  # tasks as streamed (may revisit); None: 0..num_tasks-1

    @field_validator("task_order")
    @classmethod
    def _order(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0):
            raise ValueError(f"task_order must list non-negative task ids, got {v}")
        return v


class HopfieldSection(_Section):
    """The constant-size Hopfield reservoir (scenario "hopfield"): gated networks whose neuron
    gates are stored in one d x d matrix per gated layer and recalled from test batches alone.

    The gated widths are network.hidden, or [d, d] when it is empty (the paper's 784-2048-2048);
    each must equal d.
    """

    d: Int = Field(2048, ge=1)  # reservoir width: units per gated layer
    # Learning each task's gates (the paper: SGD lr 0.1, momentum 0.9, wd 1e-4, 1 epoch).
    epochs: Float = Field(1.0, gt=0)
    batch_size: Int = Field(128, ge=2)  # gates normalise with batch statistics
    train_lr: Float = Field(0.1, gt=0)
    train_momentum: Float = Field(0.9, ge=0, lt=1)  # SGD momentum: >= 1 never settles
    weight_decay: Float = Field(1e-4, ge=0)
    # Recall: SGD on (1 - t/T) H + gamma (t/T) E from the mean stored pattern.
    recall_steps: Int = Field(30, ge=1, le=30)
    lr: Float = Field(500.0, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    gamma: Float = Field(1.5e-3, ge=0)  # weight of the energy term E against the entropy H
    precondition: bool = True  # multiply dH/ds by Psi (see supsup.hopfield)
    recall_batch_size: Int = Field(128, ge=2)
    # Capacity curve of random patterns: recall rate against the number stored.
    capacity_d: Int | None = Field(None, ge=1)  # None: d
    capacity_counts: list[Int] | None = None  # ascending; None: d/64 .. d/2
    capacity_flip: Float = Field(0.1, ge=0, lt=0.5)  # fraction of bits flipped before recall

    @field_validator("capacity_counts")
    @classmethod
    def _counts(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or v != sorted(set(v)) or v[0] < 1):
            raise ValueError(f"capacity_counts must be ascending distinct positive numbers of "
                             f"patterns, got {v}")
        return v


class BaselineSection(_Section):
    """What only the baselines (model: dense | batchensemble | psp) have; they otherwise train
    with the train section's optimiser, schedule, steps and batches, like SupSup's masks."""

    # BatchEnsemble's rank-one fast weights learn at a rate of their own; None: train.lr.
    fast_lr: Float | None = Field(1e-2, gt=0)


class ExperimentConfig(_Section):
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
    registry: RegistrySection = RegistrySection()
    tracking: TrackingSection = TrackingSection()
    sweep: SweepSection | None = None
    # What `supsup train` runs: masks per task with ids given ("gg_gn"), training without task
    # identity ("nns", the discovery section) or the Hopfield reservoir ("hopfield").
    scenario: Literal["gg_gn", "nns", "hopfield"] = "gg_gn"
    discovery: DiscoverySection = DiscoverySection()
    hopfield: HopfieldSection = HopfieldSection()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # A folder name, and the default MLflow model name ('@' would end it in NAME@ALIAS).
        return _check_name(v, "the experiment name", forbidden="@")

    @model_validator(mode="after")
    def _name_as_bank(self) -> ExperimentConfig:
        if self.registry.bank is None:
            try:
                _check_bank(self.name, "the bank name (the experiment name while "
                            "registry.bank is unset)")
            except ValueError as err:
                raise _field_error("name", str(err)) from None
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
        unused = {"reduced"} | {k for k, scenario in (("discovery", "nns"),
                                                       ("hopfield", "hopfield"))
                                if self.scenario != scenario}
        if self.sweep is None:
            unused.add("sweep")
        if self.model != "batchensemble":
            unused.add("baseline")
        return {k: str(v) for k, v in flatten(self.model_dump(exclude=unused)).items()}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `key.path=value` strings (values parsed as YAML) to a raw config mapping."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r}: expected KEY=VALUE, e.g. "
                              "train.lr=0.01")
        path, _, text = item.partition("=")
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"{source}: override {item!r}: the key {path.strip()!r} has an "
                              "empty part; expected a dotted KEY=VALUE, e.g. train.lr=0.01")
        try:
            # safe_load builds plain data only: a tag such as !!python/object is a YAMLError.
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problem = " ".join(str(err).split())
            raise ConfigError(f"{source}: override {item!r}: the value is not valid YAML "
                              f"({problem}); write a plain value, e.g. train.lr=0.01, and quote "
                              "strings") from None
        out = set_dotted(out, keys, value, f"{source}: override {item!r}")
    return out


def set_dotted(raw: dict[str, Any], keys: list[str], value: Any, where: str) -> dict[str, Any]:
    """A copy of `raw` with the value at the dotted path `keys` set: the one walker of config
    paths for overrides, `reduced` scales and sweeps. Sections on the path are copied, never
    shared with `raw`; ConfigError naming `where` when a value stands where a section should."""
    out = dict(raw)
    node = out
    for i, k in enumerate(keys[:-1]):
        child = node.get(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(keys[:i + 1])} is not a section")
        node[k] = child = dict(child)
        node = child
    node[keys[-1]] = value
    return out


def get_dotted(config: BaseModel, path: str) -> Any:
    """The value of a validated config at a dotted path such as "train.lr"."""
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        field = (e.get("ctx") or {}).get("field")  # a check across fields names its field
        loc = [str(p) for p in e["loc"]] + ([field] if field else [])
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = e.get("input")
            shown = "" if field or isinstance(got, (dict, BaseModel)) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any] | None, source: str = "<config>",
                 overrides: list[str] | None = None) -> ExperimentConfig:
    """Validate a raw mapping (plus overrides) into an ExperimentConfig."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    overrides = overrides or []
    merged = apply_overrides(raw, overrides, source)
    if merged.get("scale") == "reduced":
        reduced = merged.get("reduced") or {}
        if not isinstance(reduced, dict):
            raise ConfigError(f"{source}: reduced: expected a mapping of dotted keys to values")
        # The reduced block first, then the command line again, so --set always wins.
        items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                 for k, v in reduced.items()]
        items = [i[:-4] if i.endswith("\n...") else i for i in items]
        merged = apply_overrides(apply_overrides(raw, items, source), overrides, source)
        merged["reduced"] = {}  # resolved: a dumped config reloads to the same values
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Read and validate a YAML experiment file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file: {err}") from None
    return parse_config(raw, str(path), overrides)


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (logged as an artifact; loads back to the same config)."""
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
