"""The sections of an experiment config, one pydantic model each (extra keys are errors)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.fields import (
    Float,
    Int,
    PositiveInt,
    Section,
    TaskId,
    check_bank,
    check_name,
    field_error,
)
from pipeline.datasets import DATASETS
from pipeline.paths import resolve_root
from pipeline.promotion_rule import parse_rule
from supsup.networks import NETWORKS

# MLflow's rule for registered model aliases (mlflow.utils.validation): word characters and '-',
# at most 255 of them; `latest` and version-like `v<digits>` are reserved for MLflow itself.
_ALIAS = re.compile(r"[\w-]{1,255}")
_RESERVED_ALIAS = re.compile(r"(?i:latest|v\d+)")


class NetworkSection(Section):
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
            raise field_error("num_classes", f"{self.num_classes} is above network.num_outputs "
                               f"({self.num_outputs}): the labels are the first outputs")
        return self


class DataSection(Section):
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


class TasksSection(Section):
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
            raise field_error("degrees", (
                f"turning {self.degrees:g} degrees per task, task {period} is task 0 again, so "
                f"{self.num_tasks} rotated tasks would not all differ; use tasks.num_tasks <= "
                f"{period} or a step such as {360 / self.num_tasks:g}"))
        return self


class TrainSection(Section):
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
            raise field_error("density", "rule 'topk' needs train.density in (0, 1] or "
                               "train.erdos_renyi_scale")
        if self.fused and self.rule != "threshold":
            raise field_error("fused", "train.fused builds masks by the threshold rule; set "
                               "train.fused: false for rule 'topk'")
        if self.fused and self.data_parallel_workers > 1:
            # The ranks average the gradients of the score parameters; the fused step puts its
            # gradients on effective weights of its own, so no rank would see the others'.
            raise field_error("fused", (
                f"cannot be true with train.data_parallel_workers="
                f"{self.data_parallel_workers}: the data-parallel ranks average score gradients, "
                "which the fused step never forms, so each rank would train alone; set "
                "train.fused: false, or train.data_parallel_workers: 1"))
        return self


class EvaluateSection(Section):
    gn: bool = True
    method: Literal["one_shot", "binary"] = "one_shot"
    objective: Literal["entropy", "g"] = "entropy"
    mode: Literal["one_image", "batch", "per_example"] = "one_image"
    batch_size: Int = Field(128, ge=1)
    group_size: Int = Field(25, ge=1)  # tasks evaluated by one worker
    max_batches: Int | None = Field(None, ge=1)  # test batches per task; None: the whole split
    # The batched engine: queries answered per pass over the bank (one_image and per_example
    # modes), and int8 digits of the fixed-point layer factors (2: 2**-14, 3: 2**-22 precision).
    queries_per_pass: Int = Field(256, ge=1)
    digits: Literal[2, 3] = 2
    # per worker: the bank's masks unpacked to int8 once (8x the packed bytes) when they fit in
    # this many MiB, instead of unpacking the bits on every pass, and a second copy by input
    # unit when it fits too (passes then skip the inputs at rest: 2,500 LeNet-500 masks take
    # 1.5 GiB, and answer in 0.6x the time); 0 keeps only the packed bank
    resident_mib: Int = Field(2048, ge=0)
    curve_points: Int = Field(6, ge=0)  # points on the accuracy-vs-tasks-learned curve
    curve_tasks: Int = Field(10, ge=1)  # tasks sampled at each curve point
    # > 1: the bank is split into task ranges held by this many Ray actors (a bank larger than
    # one process's memory); the driver answers every task's queries through them
    shards: Int = Field(1, ge=1)

    @model_validator(mode="after")
    def _shards_answer_one_shot_per_query(self) -> EvaluateSection:
        if self.shards > 1 and (not self.gn or self.mode == "batch" or self.method != "one_shot"):
            raise field_error("shards", (
                f"{self.shards} shards answer one-shot inference of single queries "
                f"(mode one_image or per_example, gn true), not method {self.method!r}, mode "
                f"{self.mode!r}, gn {self.gn}; set evaluate.shards: 1 to load the bank whole"))
        return self


class ClusterSection(Section):
    address: str | None = None  # None: start a local Ray; "auto" or ray://host:port: join one
    num_cpus: Int | None = Field(None, ge=1)  # a local Ray's CPUs; default: this machine's
    num_gpus: Float | None = Field(None, ge=0)  # a local Ray's GPUs, whole; default: detected
    cpus_per_worker: Float = Field(1, gt=0)  # Ray resources per worker (fractions allowed)
    gpus_per_worker: Float = Field(0, ge=0)
    threads_per_worker: Int | None = Field(None, ge=1)
    # Ray Train's storage for train.data_parallel_workers > 1 (a folder every node sees, or a
    # URI such as s3://bucket/ray-train); default: registry.root/.ray_train
    storage: str | None = None

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("cluster.storage is empty: remove it (Ray Train then writes under "
                             "registry.root) or give a folder every node sees, or a URI")
        return v if v is None else resolve_root(v)

    @field_validator("num_gpus")
    @classmethod
    def _whole_gpus(cls, v: float | None) -> float | None:
        if v is not None and not v.is_integer():
            raise ValueError(f"a node has a whole number of GPUs, got {v}; share GPUs between "
                             "workers with cluster.gpus_per_worker (e.g. 0.25) instead")
        return v


class RegistrySection(Section):
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
        return v if v is None else check_bank(v)


class TrackingSection(Section):
    uri: str | None = None  # default: sqlite under the run folder
    experiment: str | None = None  # default: the experiment name
    model_name: str | None = None  # default: the experiment name
    alias: str = "champion"  # moved only by promotion (`supsup promote`, --promote-if)
    latest_alias: str = "latest"  # on each new version; "latest": MLflow's models:/NAME/latest
    promote_if: str | None = None  # `supsup run` promotes when its evaluation meets this rule
    register_model: bool = True
    embed_masks_max_bytes: Int = Field(64 * 2**20, ge=0)  # smaller banks travel inside the model

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str | None) -> str | None:
        # MLflow allows 500 characters; the rest keeps the name usable as a folder and in URIs.
        return v if v is None else check_name(v, "an MLflow experiment name", max_bytes=500)

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        # '@' would end the name inside models:/NAME@ALIAS.
        return v if v is None else check_name(v, "an MLflow model name", forbidden="@")

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not _ALIAS.fullmatch(v) or _RESERVED_ALIAS.fullmatch(v):
            raise ValueError(f"{v!r} cannot be an MLflow model alias: use 1 to 255 letters, "
                             "digits, '_' and '-'; 'latest' and v<digits> (e.g. v2) are "
                             "reserved for versions")
        return v

    @field_validator("latest_alias")
    @classmethod
    def _latest_alias(cls, v: str) -> str:
        # "latest" is MLflow's own name for the newest version: nothing needs to be set.
        return v if v.lower() == "latest" else cls._alias(v)

    @field_validator("promote_if")
    @classmethod
    def _promote_if(cls, v: str | None) -> str | None:
        return v if v is None else str(parse_rule(v))


class DiscoverySection(Section):
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


class HopfieldSection(Section):
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


class BaselineSection(Section):
    """What only the baselines (model: dense | batchensemble | psp) have; they otherwise train
    with the train section's optimiser, schedule, steps and batches, like SupSup's masks."""

    # BatchEnsemble's rank-one fast weights learn at a rate of their own; None: train.lr.
    fast_lr: Float | None = Field(1e-2, gt=0)


class ServeSection(Section):
    """`supsup serve`: where the application listens, how concurrent requests are batched into
    one pass over the bank, and the replicas that hold the bank (each loads it once)."""

    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: Int = Field(8000, ge=1, le=65535)
    replicas: Int = Field(1, ge=1)  # bank replicas; each answers batches on its own
    num_cpus: Float = Field(1, ge=0)  # Ray resources of one bank replica
    num_gpus: Float = Field(0, ge=0)  # > 0: the replica answers on its GPU
    threads: Int | None = Field(None, ge=1)  # threads per replica; None: from num_cpus
    max_batch_size: Int = Field(64, ge=1)  # requests answered in one pass
    # at most this long a pass waits for its share of the requests lately seen at once (under
    # load the answered clients are sending their next; at low load nothing waits)
    batch_wait_timeout_s: Float = Field(0.25, ge=0)
    max_rows_per_request: Int = Field(256, ge=1)  # a larger request is a 400 naming this key
    # per replica: the masks unpacked to int8 once (8x the packed bytes) when they fit in this
    # many MiB, instead of unpacking the bits on every pass; 0 keeps only the packed bank
    resident_mib: Int = Field(1024, ge=0)
    # > 1: each replica splits the bank into this many task ranges held by Ray actors (for banks
    # larger than one process's memory); rows are answered per example, one-shot
    shards: Int = Field(1, ge=1)
