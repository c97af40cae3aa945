"""Supermasks in Superposition (SupSup): pure compute over PyTorch, no I/O.

A fixed random base network rebuilt from its seed (`build_network`), one binary supermask per
task learned from real-valued scores (`train_group`), many tasks' masks kept at one bit per weight
(`MaskBank`), and task inference from the gradient of the output entropy, or of G with
superfluous neurons, with respect to the superposition coefficients (`infer_task`).
"""

from supsup.bank import MaskBank
from supsup.binding import use_alphas, use_scores, use_task, use_tasks
from supsup.convert import convert
from supsup.discovery import DiscoveryConfig, DiscoveryResult, MaskDiscovery, discover
from supsup.engine import InferenceEngine
from supsup.evaluate import (
    TaskEvaluation,
    evaluate_group,
    evaluate_task,
    evaluate_tasks,
    summarize,
)
from supsup.gates import GatedNet, train_gates
from supsup.hopfield import HopfieldReservoir
from supsup.inference import InferenceResult, alpha_gradients, infer_task
from supsup.masks import erdos_renyi_densities, pack_bits, threshold_mask, topk_mask, unpack_bits
from supsup.networks import NETWORKS, NetworkSpec, SupermaskNet, build_network
from supsup.scores import TaskScores
from supsup.tasks import PermutedTasks, RotatedTasks, SplitTasks, TaskSet, TensorData, make_tasks
from supsup.train import (
    TrainConfig,
    TrainProgress,
    TrainResult,
    add_to_bank,
    train_group,
    train_task,
)

__all__ = [
    "DiscoveryConfig",
    "DiscoveryResult",
    "GatedNet",
    "HopfieldReservoir",
    "MaskDiscovery",
    "discover",
    "train_gates",
    "NETWORKS",
    "InferenceEngine",
    "InferenceResult",
    "MaskBank",
    "NetworkSpec",
    "PermutedTasks",
    "RotatedTasks",
    "SplitTasks",
    "SupermaskNet",
    "TaskEvaluation",
    "TaskScores",
    "TaskSet",
    "TensorData",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "add_to_bank",
    "alpha_gradients",
    "build_network",
    "convert",
    "erdos_renyi_densities",
    "evaluate_group",
    "evaluate_task",
    "evaluate_tasks",
    "infer_task",
    "make_tasks",
    "pack_bits",
    "summarize",
    "threshold_mask",
    "topk_mask",
    "train_group",
    "train_task",
    "unpack_bits",
    "use_alphas",
    "use_scores",
    "use_task",
    "use_tasks",
]
