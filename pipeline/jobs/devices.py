"""The one place a job chooses its device: the GPU when the config asks for GPUs, else the CPU.

A worker that was given GPUs (cluster.gpus_per_worker > 0) but finds no CUDA refuses with a named
error instead of silently computing on the CPU while holding the GPUs.
"""

from __future__ import annotations

from pipeline.config import ClusterSection


def worker_device(cluster: ClusterSection) -> str:
    """"cuda" when the worker was given GPUs, else "cpu"; RuntimeError when CUDA is missing."""
    if cluster.gpus_per_worker <= 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"cluster.gpus_per_worker is {cluster.gpus_per_worker} but this worker sees no CUDA "
            "device (torch.cuda.is_available() is False): install a CUDA build of torch on the "
            "GPU nodes, or set cluster.gpus_per_worker: 0 to train on CPUs")
    deterministic_gpu()
    return "cuda"


def deterministic_gpu() -> None:
    """Deterministic algorithms wherever CUDA has them, so a group trained twice on the same
    device type and group size gives the same masks: cuBLAS needs a fixed workspace (set before
    its first use), and ops with no deterministic kernel warn instead of failing. The networks
    avoid the atomics-based ones (`supsup.networks.GlobalAvgPool`)."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
