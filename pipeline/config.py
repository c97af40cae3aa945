"""Experiment configuration: YAML -> a validated, frozen config.

Every section is a pydantic model with extra="forbid", so an unknown key or a bad value is an
error that names the key path and the file. Dotted overrides (`--set train.lr=0.01`) are applied to
the raw YAML before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.paths import resolve_root
from supsup.networks import NETWORKS, NetworkSpec
from supsup.train import TrainConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSection(_Section):
    name: str = "lenet"
    num_outputs: int = Field(100, ge=1)
    num_classes: int | None = Field(None, ge=1)  # default: the task family's labels per task
    hidden: list[int] = Field(default_factory=list)
    width: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in NETWORKS:
            raise ValueError(f"unknown network {v!r}; choose one of {sorted(NETWORKS)}")
        return v


class DataSection(_Section):
    dataset: str = "mnist-bundled"
    root: str | None = None
    download: bool = False
    image_size: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)


class TasksSection(_Section):
    family: Literal["permuted", "rotated", "split"] = "permuted"
    num_tasks: int = Field(10, ge=1)
    degrees: float = 10.0
    classes_per_task: int = Field(2, ge=1)


class TrainSection(_Section):
    steps: int = Field(1000, ge=0)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    lr: float = Field(1e-4, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    rule: Literal["threshold", "topk"] = "threshold"
    density: float | None = None
    erdos_renyi_scale: float | None = Field(None, gt=0)
    log_every: int = Field(100, ge=1)
    group_size: int = Field(10, ge=1)  # tasks trained together by one worker
    max_in_flight: int | None = Field(None, ge=1)  # groups at once; default: worker slots
    max_retries: int = Field(2, ge=0)  # per group, when a worker dies
    # > 1: each task is trained by this many Ray Train workers (data parallel), one task at a time
    data_parallel_workers: int = Field(1, ge=1)
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
            raise ValueError("rule 'topk' needs train.density in (0, 1] or train.erdos_renyi_scale")
        return self


class EvaluateSection(_Section):
    gn: bool = True
    method: Literal["one_shot", "binary"] = "one_shot"
    objective: Literal["entropy", "g"] = "entropy"
    mode: Literal["one_image", "batch", "per_example"] = "one_image"
    batch_size: int = Field(128, ge=1)
    group_size: int = Field(25, ge=1)  # tasks evaluated by one worker
    max_batches: int | None = Field(None, ge=1)  # test batches per task; None: the whole split
    curve_points: int = Field(6, ge=0)  # points on the accuracy-vs-tasks-learned curve
    curve_tasks: int = Field(10, ge=1)  # tasks sampled at each curve point


class ClusterSection(_Section):
    address: str | None = None  # None: start a local Ray; "auto" or ray://host:port: join one
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: float | None = Field(None, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    threads_per_worker: int | None = Field(None, ge=1)


class RegistrySection(_Section):
    # A folder or a pyarrow filesystem URI; a relative folder is made absolute here, once, so
    # every worker that receives this config writes to the same place.
    root: str = Field("runs/registry", validate_default=True)
    bank: str | None = None  # default: the experiment name

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        return resolve_root(v)


class TrackingSection(_Section):
    uri: str | None = None  # default: sqlite under the run folder
    experiment: str | None = None
    model_name: str | None = None
    alias: str = "champion"
    register_model: bool = True
    embed_masks_max_bytes: int = Field(64 * 2**20, ge=0)  # smaller banks travel inside the model


class SweepDomain(_Section):
    """Where one swept config field takes its values: exactly one of the four kinds."""

    grid: list[Any] | None = Field(None, min_length=1)  # every value, in every combination
    choice: list[Any] | None = Field(None, min_length=1)  # one value drawn per sample
    uniform: tuple[float, float] | None = None  # [low, high]
    loguniform: tuple[float, float] | None = None  # [low, high], both > 0

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
    grace_period: int = Field(1, ge=1)  # log points every trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # ASHA keeps 1/reduction_factor at each rung

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
    num_samples: int = Field(1, ge=1)  # draws of the space (a grid is repeated this many times)
    metric: Literal["val_accuracy", "train_accuracy", "train_loss", "density",
                    "compressed_bytes_per_task"] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    sample_tasks: int = Field(2, ge=1)  # tasks trained per trial: task ids 0..sample_tasks-1
    tasks: list[int] | None = Field(None, min_length=1)  # explicit task ids instead
    val_fraction: float = Field(0.1, gt=0, lt=1)  # of the train data, held out for selection
    scheduler: SweepScheduler = SweepScheduler()
    max_concurrent: int | None = Field(None, ge=1)  # trials at once; default: what fits

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

    check_every: int = Field(100, ge=1)  # batches between allocation checks
    budget: int = Field(2500, ge=1)  # most masks ever allocated
    min_candidates: int = Field(5, ge=1)  # n = max(#masks, min_candidates) at a check
    eps: float = Field(2**-3, ge=0, allow_inf_nan=False)  # new task when max(nu) < (1 + eps) / n
    batches_per_task: int = Field(1000, ge=1)  # consecutive batches of each task in the stream
    lr: float | None = Field(None, gt=0)  # None: train.lr
    task_order: list[int] | None = None  # tasks as streamed (may revisit); None: 0..num_tasks-1

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

    d: int = Field(2048, ge=1)  # reservoir width: units per gated layer
    # Learning each task's gates (the paper: SGD lr 0.1, momentum 0.9, wd 1e-4, 1 epoch).
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=2)  # gates normalise with batch statistics
    train_lr: float = Field(0.1, gt=0)
    train_momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    # Recall: SGD on (1 - t/T) H + gamma (t/T) E from the mean stored pattern.
    recall_steps: int = Field(30, ge=1, le=30)
    lr: float = Field(500.0, gt=0)
    momentum: float = Field(0.9, ge=0)
    gamma: float = Field(1.5e-3, ge=0)
    precondition: bool = True  # multiply dH/ds by Psi (see supsup.hopfield)
    recall_batch_size: int = Field(128, ge=2)
    # Capacity curve of random patterns: recall rate against the number stored.
    capacity_d: int | None = Field(None, ge=1)  # None: d
    capacity_counts: list[int] | None = None  # ascending; None: d/64 .. d/2
    capacity_flip: float = Field(0.1, ge=0, lt=0.5)

    @field_validator("capacity_counts")
    @classmethod
    def _counts(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or v != sorted(set(v)) or v[0] < 1):
            raise ValueError(f"capacity_counts must be ascending distinct positive numbers of "
                             f"patterns, got {v}")
        return v


class ExperimentConfig(_Section):
    name: str = "supsup"
    seed: int = 0
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
        if not v or any(c in v for c in "/\\ \t\n"):
            raise ValueError(f"name must be non-empty without slashes or spaces, got {v!r}")
        return v

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
        """Dotted key -> value strings, for MLflow params."""
        return {k: str(v) for k, v in flatten(self.model_dump()).items()}


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
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
        path, _, text = item.partition("=")
        keys = path.strip().split(".")
        node = out
        for i, k in enumerate(keys[:-1]):
            child = node.get(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[:i + 1])} is not a section")
            node[k] = child = dict(child)
            node = child
        node[keys[-1]] = yaml.safe_load(text)
    return out


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
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
    return parse_config(raw, str(path), overrides)


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (logged as an artifact; loads back to the same config)."""
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
