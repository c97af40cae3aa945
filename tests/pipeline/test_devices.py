"""pipeline.jobs.devices: one device per job, refused GPUs without CUDA, deterministic CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.config import ClusterSection
from pipeline.jobs.devices import deterministic_gpu, worker_device


def test_cpu_unless_gpus_were_given() -> None:
    assert worker_device(ClusterSection()) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_gpus_without_cuda_are_refused_not_silently_cpu() -> None:
    with pytest.raises(RuntimeError, match=r"gpus_per_worker is 0.5 but this worker sees no CUDA"):
        worker_device(ClusterSection(gpus_per_worker=0.5))


def test_gpu_workers_turn_on_deterministic_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        deterministic_gpu()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_worker_gets_cuda_deterministically() -> None:
    assert worker_device(ClusterSection(gpus_per_worker=1)) == "cuda"
    assert torch.are_deterministic_algorithms_enabled()
