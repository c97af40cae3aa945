"""One sweep trial: train the sample tasks with the trial's values, report at every log point."""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Any

from pipeline.jobs.sweep.space import _sweep, trial_task_ids, with_values

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig
    from supsup.scores import TaskScores
    from supsup.tasks import TaskSet

REPORTED = ("val_accuracy", "train_accuracy", "train_loss", "density", "stored_bytes_per_task",
            "compressed_bytes_per_task")


def _log_points(config: ExperimentConfig, train_size: int) -> int:
    steps = config.train_config().num_steps(train_size)
    return max(1, math.ceil(steps / config.train.log_every))


def validation_tasks(config: ExperimentConfig) -> TaskSet:
    """The config's tasks with `sweep.val_fraction` of the train data held out as their "test"
    split: trials select on it, and the real test data is never seen."""
    from pipeline.builders import build_tasks
    from supsup.tasks import split_data

    sweep = _sweep(config)
    tasks = build_tasks(config)
    return build_tasks(config, split_data(tasks.data["train"], sweep.val_fraction, config.seed))


def mask_bytes(scores: TaskScores) -> dict[str, float]:
    """Bytes per task of the current masks: bit-packed (num_weights / 8, rounded up per layer)
    and zlib-compressed (mean over the group's tasks)."""
    from supsup.masks import pack_bits

    packed = [pack_bits(scores.hard_mask(k).cpu(), group_dims=1) for k in scores.keys]  # (G, B)
    stored = sum(p.shape[1] for p in packed)
    compressed = [
        len(zlib.compress(b"".join(p[i].numpy().tobytes() for p in packed), 9))
        for i in range(scores.group)
    ]
    return {"stored_bytes_per_task": float(stored),
            "compressed_bytes_per_task": sum(compressed) / len(compressed)}


def sweep_trial(params: dict[str, Any], config_data: dict[str, Any]) -> None:
    """One Tune trial: train the sample tasks with `params` and report at every log point."""
    import torch
    from ray import tune

    from pipeline.builders import build_net, build_spec
    from pipeline.cluster import worker_threads
    from pipeline.config import ExperimentConfig
    from pipeline.jobs.devices import worker_device
    from supsup.evaluate import scores_accuracy
    from supsup.train import TrainProgress, train_group

    config = with_values(ExperimentConfig.model_validate(config_data), params, "sweep trial")
    torch.set_num_threads(worker_threads(config.cluster))
    device = worker_device(config.cluster)
    tasks = validation_tasks(config)
    net = build_net(build_spec(config, tasks))
    latest: dict[str, float] = {}

    def validate(scores: TaskScores) -> list[float]:
        densities = scores.densities_per_task()
        latest.update(density=sum(densities) / len(densities), **mask_bytes(scores))
        return scores_accuracy(net, scores, tasks, split="test")  # the held-out train rows

    def report(p: TrainProgress) -> None:
        assert p.val_accuracy is not None
        tune.report({
            "val_accuracy": sum(p.val_accuracy) / len(p.val_accuracy),
            "train_accuracy": sum(p.accuracy) / len(p.accuracy),
            "train_loss": sum(p.loss) / len(p.loss),
            "train_step": p.step, "steps": p.steps, **latest,
        })

    train_group(net, tasks, trial_task_ids(config), config.train_config(), device=device,
                callback=report, validate=validate)
