"""From a validated config to the supsup objects a job needs: tasks, network spec, network.

Drivers and Ray workers both call these, so a worker rebuilds exactly what the driver described
from the config alone (data from its source, base weights from the seed) and nothing heavy ever
travels through Ray's object store.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from pipeline.config import ExperimentConfig, dump_config
from pipeline.datasets import load_dataset
from supsup.networks import NetworkSpec, SupermaskNet, build_network
from supsup.tasks import TaskSet, TensorData, make_tasks


@functools.lru_cache(maxsize=4)
def _base_data(name: str, root: str | None, download: bool, image_size: int | None,
               test_fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    # One copy per process: a Ray worker that runs several groups loads its data once.
    return load_dataset(name, root, download=download, image_size=image_size,
                        test_fraction=test_fraction, seed=seed)


def build_tasks(config: ExperimentConfig,
                data: tuple[TensorData, TensorData] | None = None) -> TaskSet:
    """The task family of `config` over its base data set (or over `data`, a (train, test)
    pair such as a validation split carved from the training data)."""
    d, t = config.data, config.tasks
    train, test = data or _base_data(d.dataset, d.root, d.download, d.image_size,
                                     d.test_fraction, config.seed)
    options: dict[str, float | int] = {}
    if t.family == "rotated":
        options["degrees"] = t.degrees
    if t.family == "split":
        options["classes_per_task"] = t.classes_per_task
    return make_tasks(t.family, train, test, t.num_tasks, config.seed, **options)


def build_spec(config: ExperimentConfig, tasks: TaskSet) -> NetworkSpec:
    """The base network's spec for `tasks` (input shape and labels come from the data)."""
    spec = config.network_spec(tasks.num_classes, tasks.input_shape)
    if spec.num_classes < tasks.num_classes:
        raise ValueError(f"network.num_classes ({spec.num_classes}) is below the "
                         f"{tasks.num_classes} labels of each task")
    return spec


def build_net(spec: NetworkSpec) -> SupermaskNet:
    """Rebuild the fixed random network from its spec and seed."""
    return build_network(spec)


def data_identity(config: ExperimentConfig) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(name, digest, source, profile) of the config's base data, as loaded: the digest is a
    sha256 of the train and test tensors, so it changes exactly when the data does."""
    import hashlib

    d = config.data
    train, test = _base_data(d.dataset, d.root, d.download, d.image_size, d.test_fraction,
                             config.seed)
    h = hashlib.sha256()
    for part in (train.x, train.y, test.x, test.y):
        h.update(part.contiguous().cpu().numpy().tobytes())
    source = {"dataset": d.dataset, "root": d.root, "image_size": d.image_size,
              "test_fraction": d.test_fraction, "seed": config.seed}
    profile = {"train_examples": len(train), "test_examples": len(test),
               "input_shape": list(train.x.shape[1:]), "labels": train.num_labels}
    return d.dataset, h.hexdigest(), source, profile


@contextlib.contextmanager
def tracked_run(tracker: Any, name: str, tags: dict[str, str],
                config: ExperimentConfig) -> Iterator[str | None]:
    """An MLflow run (via a pipeline.tracking.Tracker) holding the resolved config, or nothing
    when no tracker is given; yields the run id or None."""
    if tracker is None:
        yield None
        return
    with tracker.run(name, tags=tags) as run_id:
        tracker.log_params(config.flat_params())
        tracker.log_text(dump_config(config), "config.yaml")
        dataset, digest, source, profile = data_identity(config)
        tracker.log_dataset(dataset, digest, source, profile, context=name)
        yield run_id


@functools.lru_cache(maxsize=2)
def _worker_tasks(config_json: str, device: str) -> TaskSet:
    return build_tasks(ExperimentConfig.model_validate_json(config_json)).to(device)


@functools.lru_cache(maxsize=2)
def worker_net(spec: NetworkSpec, device: str) -> SupermaskNet:
    """The base network of `spec` on `device`, built once per worker process.

    A network holds no task state (bindings are scoped to a `with` block), so a Ray worker that
    runs many groups reuses one, as it reuses its data and, for evaluation, its bank."""
    return build_net(spec).to(device)


def worker_tasks(config: ExperimentConfig, device: str) -> TaskSet:
    """The config's tasks with their base data on `device`, built once per worker process:
    batches are then gathered and transformed on the device, with no host copy per step."""
    key = config.model_dump_json(include={"seed", "data", "tasks"})
    return _worker_tasks(key, device)


def task_groups(task_ids: list[int], group_size: int) -> list[list[int]]:
    """Fixed consecutive groups: the same split on every run, so a resumed job trains each
    unfinished group exactly as an uninterrupted job would."""
    return [task_ids[i:i + group_size] for i in range(0, len(task_ids), group_size)]
