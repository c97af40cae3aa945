"""The jobs on a GPU: training (fp32 and bf16 fused), evaluation and Ray Train with NCCL.

Collected everywhere, skipped without CUDA (with the reason). On a GPU machine they run the real
path: a local Ray whose GPU is real, workers that hold it, batches built on it, banks loaded
onto it, and masks compared with the CPU's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ExperimentConfig, parse_config
from pipeline.jobs.distributed import train_task_distributed
from pipeline.jobs.evaluate import run_evaluation
from pipeline.jobs.train import prepare_bank, run_training
from pipeline.registry import MaskRegistry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def make_config(tmp_path: Path, name: str, gpus: float, **train: object) -> ExperimentConfig:
    return parse_config({
        "name": name, "output_dir": str(tmp_path / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": 4},
        "train": {"steps": 60, "group_size": 2, "log_every": 30, **train},
        "evaluate": {"group_size": 2, "max_batches": 2, "curve_points": 2},
        "cluster": {"cpus_per_worker": 1, "gpus_per_worker": gpus},
        "registry": {"root": str(tmp_path / name)},
    })


def unpacked(registry: MaskRegistry, bank: str, task: int) -> dict[str, np.ndarray]:
    record = registry.read_task(bank, task)
    return {k: np.unpackbits(np.asarray(v)) for k, v in record.packed.items()}


@pytest.mark.parametrize("train", [{}, {"precision": "bf16", "fused": True}])
def test_gpu_training_and_evaluation_match_the_cpu(ray_local: None, tmp_path: Path,
                                                   train: dict) -> None:
    cpu, gpu = (make_config(tmp_path, n, g, **train) for n, g in (("cpu", 0), ("gpu", 1)))
    for config in (cpu, gpu):
        summary = run_training(config)
        assert sorted(summary.trained) == [0, 1, 2, 3]
    a, b = MaskRegistry(cpu.registry.root), MaskRegistry(gpu.registry.root)
    for t in range(4):
        for key, bits in unpacked(a, cpu.bank, t).items():
            # cuBLAS and the CPU round differently; masks agree almost everywhere
            assert (unpacked(b, gpu.bank, t)[key] == bits).mean() > 0.99, (t, key)
    reports = [run_evaluation(c, MaskRegistry(c.registry.root).source(c.bank))
               for c in (cpu, gpu)]
    assert reports[1].summary["task_inference_accuracy"] == pytest.approx(
        reports[0].summary["task_inference_accuracy"], abs=0.1)
    assert reports[1].summary["accuracy_gg"] == pytest.approx(
        reports[0].summary["accuracy_gg"], abs=0.02)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across ranks needs two GPUs")
def test_ray_train_with_nccl_stores_the_task(ray_local: None, tmp_path: Path) -> None:
    config = make_config(tmp_path, "nccl", 1, data_parallel_workers=2, backend="nccl")
    prepare_bank(config)
    result = train_task_distributed(config, 0)
    assert result["status"] == "written" and result["workers"] == 2
    assert MaskRegistry(config.registry.root).tasks(config.bank) == [0]
