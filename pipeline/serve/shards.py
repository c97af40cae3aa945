"""A mask bank split into task ranges held by Ray actors: every shard answers every query.

One-shot task inference splits by task exactly (METHOD.md, "Task inference for many queries, and
over sharded banks"): the uniform mixture is the sum of the shards' per-weight counts, made once;
each block of queries gets its small per-layer factors from one forward/backward on the driver
(`supsup.engine.query_factors`), every shard turns them into its own (B, k_shard) slice of
dObjective/dalpha over its rows (`factor_gradients`), and the answer is the argmin over the
slices in task order: exactly what `InferenceEngine` gives over the whole bank.

No process holds the whole bank. Each `BankShard` loads only its range through the one loader
(`load_bank`), as a source restricted to that range whose snapshot hash comes from the range's
task checksums; the driver then checks that the ranges' checksums together hash to the whole
source's snapshot, so a sharded bank means exactly the masks its source names.

Binary inference re-mixes over each query's survivors, round after round; it is refused here
(`ShardedInferenceError`) rather than answered by another path than the unsharded engine's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import RayTaskError

from pipeline.bank_source import BankSource, snapshot_hash
from pipeline.builders import worker_net
from pipeline.registry import (
    BankMismatchError,
    MaskRegistry,
    check_snapshot,
    load_bank,
    read_manifest,
)
from pipeline.registry.transfer import iter_export
from supsup.bank import MaskBank, describe_ids
from supsup.engine import Factor, Mixture, classify, factor_gradients, query_factors
from supsup.inference import InferenceResult, _confidence
from supsup.networks import NetworkSpec
from supsup.objectives import get_objective


class ShardedInferenceError(ValueError):
    """A request a sharded bank does not answer (e.g. binary inference); names what to use."""


def split_ranges(task_ids: Sequence[int], shards: int) -> list[tuple[int, ...]]:
    """`task_ids` in order, cut into `shards` consecutive ranges whose sizes differ by at most 1."""
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= len(task_ids):
        raise ValueError(f"shards must be an integer from 1 to the bank's {len(task_ids)} tasks, "
                         f"got {shards!r}")
    base, extra = divmod(len(task_ids), shards)
    out, start = [], 0
    for i in range(shards):
        size = base + (1 if i < extra else 0)
        out.append(tuple(task_ids[start:start + size]))
        start += size
    return out


def range_checksums(source: BankSource, task_ids: Sequence[int]) -> dict[int, str]:
    """{task_id: task_sha256} of `task_ids` of the source: from the task files' footers in a
    registry, or read (and verified) from a bank file. BankMismatchError when one is missing."""
    if source.root is not None:
        try:
            return MaskRegistry(source.root).checksums(source.bank, task_ids)
        except KeyError as exc:
            raise BankMismatchError(f"{source.describe()}: {exc.args[0]}; the registry no longer "
                                    "holds this content") from None
    wanted = set(task_ids)
    _, records = iter_export(source.export)  # type: ignore[arg-type]
    found = {r.task_id: r.task_sha256 for r in records if r.task_id in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise BankMismatchError(f"{source.describe()}: the bank file lacks "
                                f"{describe_ids(missing)}")
    return dict(sorted(found.items()))


def _memory_kib() -> dict[str, int]:
    """This process's resident memory now (VmRSS) and at its peak (VmHWM), in KiB."""
    out = {"rss_kib": -1, "peak_rss_kib": -1}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kib"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["peak_rss_kib"] = int(line.split()[1])
    except OSError:
        pass
    return out


class BankShard:
    """One task range of a bank, loaded in its own process with the network rebuilt from its spec.

    Runs as a Ray actor (`ShardedBank` starts them); plain methods, so it also runs in-process."""

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(max(1, int(threads)))

    def load(self, source: BankSource, task_ids: Sequence[int], device: str = "cpu"
             ) -> dict[str, Any]:
        """Load `task_ids` of `source` (and nothing else), verified against their checksums;
        returns `describe()`. A load error is raised here, as itself, not as a dead actor."""
        self.checks = range_checksums(source, task_ids)
        part = source.restricted(self.checks, snapshot_hash(source.manifest_sha256, self.checks))
        self.bank, self.spec = load_bank(part, device)
        self.net = worker_net(self.spec, device)
        self.rows = self.bank.rows(None)
        return self.describe()

    def describe(self) -> dict[str, Any]:
        """What this shard holds: its tasks and their checksums, packed bytes, its process."""
        return {"task_ids": list(self.bank.task_ids), "num_tasks": self.bank.num_tasks,
                "checks": self.checks, "spec": self.spec.to_dict(),
                "nbytes": self.bank.nbytes(), "packed_bytes": packed_bytes(self.bank),
                "pid": os.getpid(), "node": ray_node()}

    def memory(self) -> dict[str, int]:
        """This shard's process id and resident memory (KiB), to size shards by measurement."""
        return {"pid": os.getpid(), **_memory_kib()}

    def mixture(self) -> Mixture:
        """This range's share of the uniform mixture (per-weight counts and BN sums)."""
        return Mixture.of(self.bank, self.rows)

    def gradients(self, factors: dict[str, Factor], digits: int = 2,
                  budget_bytes: int = 16 << 20) -> torch.Tensor:
        """(B, k_shard) dObjective_b/dalpha_i over this range's tasks, in task order."""
        return factor_gradients(self.bank, self.rows, self.net, factors, digits=digits,
                                budget_bytes=budget_bytes).cpu()

    def classify(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """(B,) class of each query under its own task's mask; every task must be this range's."""
        return classify(self.net, self.bank, x, task_ids)


def packed_bytes(bank: MaskBank) -> int:
    """Bytes of the bank's packed masks alone (what grows with the number of tasks)."""
    return sum(bank.packed(k).nbytes for k in bank.layer_shapes)


def ray_node() -> str:
    """The node this process runs on ("" outside Ray; asking would start one)."""
    return ray.get_runtime_context().get_node_id() or "" if ray.is_initialized() else ""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the driver knows it: its actor, its tasks in order, and its packed bytes."""

    actor: Any
    task_ids: tuple[int, ...]
    nbytes: int
    pid: int
    node: str


class ShardedBank:
    """One-shot task inference over a bank split across Ray actors, with the unsharded answers.

    The driver holds the network and the combined mixture (weight-sized, whatever the number of
    tasks), never masks: per block of `block_queries` queries it sends the factors to every shard
    once and concatenates their gradient slices. Use as a context manager, or `close()`."""

    def __init__(self, source: BankSource, shards: list[ShardInfo], spec: NetworkSpec, *,
                 objective: str, device: str, digits: int, block_queries: int,
                 budget_bytes: int) -> None:
        self.source, self.shards, self.objective = source, shards, objective
        self.digits, self.block_queries, self.budget_bytes = digits, block_queries, budget_bytes
        self.net = worker_net(spec, device)
        self.candidates = torch.tensor([t for s in shards for t in s.task_ids])
        self._owner = {t: i for i, s in enumerate(shards) for t in s.task_ids}
        parts = ray.get([s.actor.mixture.remote() for s in shards])
        self.mixture = Mixture.combine(parts)

    @classmethod
    def from_source(cls, source: BankSource, shards: int, *, objective: str = "entropy",
                    device: str = "cpu", threads: int = 1, num_cpus: float = 0,
                    num_gpus: float = 0, digits: int = 2, block_queries: int = 256,
                    budget_bytes: int = 16 << 20) -> ShardedBank:
        """Start `shards` actors over consecutive task ranges of `source` (Ray must be up) and
        check that together they hold exactly the source's snapshot.

        `num_cpus`/`num_gpus` are each actor's Ray resources and `threads` its torch threads.
        BankMismatchError naming the source when the ranges' content differs from its hash."""
        if digits not in (2, 3):
            raise ValueError(f"digits must be 2 or 3 (fixed-point precision), got {digits}")
        if block_queries < 1:
            raise ValueError(f"block_queries must be at least 1, got {block_queries}")
        ranges = split_ranges(list(source.task_ids), shards)
        manifest = read_manifest(source)
        spec = NetworkSpec.from_dict(manifest["network"])
        get_objective(objective, spec.num_classes)  # names a bad objective before any actor
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(BankShard)
        actors = [remote.remote(threads) for _ in ranges]
        try:
            try:
                described = ray.get([a.load.remote(source, ids, device)
                                     for a, ids in zip(actors, ranges)])
            except RayTaskError as exc:  # the shard's own error, not Ray's wrapper of it
                raise exc.cause from None
            checks: dict[int, str] = {}
            for d in described:
                checks.update({int(t): c for t, c in d["checks"].items()})
            check_snapshot(source, checks, "its shards' masks")
            infos = [ShardInfo(a, tuple(d["task_ids"]), int(d["nbytes"]), int(d["pid"]),
                               str(d["node"])) for a, d in zip(actors, described)]
            return cls(source, infos, spec, objective=objective, device=device, digits=digits,
                       block_queries=block_queries, budget_bytes=budget_bytes)
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise

    def __enter__(self) -> ShardedBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the shard actors (their masks go with them)."""
        for s in self.shards:
            ray.kill(s.actor)

    @property
    def num_tasks(self) -> int:
        return int(self.candidates.numel())

    def memory(self) -> list[dict[str, int]]:
        """Per shard, in task order: its process id, resident memory now and at its peak (KiB)."""
        return ray.get([s.actor.memory.remote() for s in self.shards])

    def gradients(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k) dObjective_b/dalpha at the uniform mixture, for each query of `x` alone, with
        the tasks in the source's order."""
        self.net.check_input(x)
        out = []
        for start in range(0, x.shape[0], self.block_queries):
            factors = query_factors(self.net, self.mixture, x[start:start + self.block_queries],
                                    self.objective)
            ref = ray.put({k: f.to("cpu") for k, f in factors.items()})
            parts = ray.get([s.actor.gradients.remote(ref, self.digits, self.budget_bytes)
                             for s in self.shards])
            out.append(torch.cat(parts, 1))
        return torch.cat(out) if out else torch.zeros(0, self.num_tasks)

    def infer(self, x: torch.Tensor, method: str = "one_shot") -> InferenceResult:
        """Each query's task, as `InferenceEngine.infer` gives it over the whole bank."""
        if method == "binary":
            raise ShardedInferenceError(
                "binary inference is not answered by a sharded bank (its rounds re-mix over each "
                "query's survivors); use method='one_shot', or load the bank whole for binary")
        if method != "one_shot":
            raise ValueError(f"unknown inference method {method!r}; choose one_shot")
        if x.shape[0] == 0:
            raise ValueError("cannot infer a task from an empty batch")
        grads = self.gradients(x)
        best = grads.argmin(-1)
        return InferenceResult(self.candidates[best], self.candidates, grads, _confidence(grads),
                               1, method, "per_example")

    def classify(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """(B,) class of each query under its own task's mask: each shard classifies the queries
        of the tasks it holds. KeyError naming a task no shard holds."""
        task_ids = torch.as_tensor(task_ids, dtype=torch.long)
        if task_ids.shape != (x.shape[0],):
            raise ValueError(f"task_ids must have one id per query, shape ({x.shape[0]},), got "
                             f"{tuple(task_ids.shape)}")
        self.net.check_input(x)
        unknown = sorted(set(task_ids.tolist()) - set(self._owner))
        if unknown:
            raise KeyError(f"no shard holds {describe_ids(unknown)}: {self.source.describe()} "
                           f"does not list them")
        owner = torch.tensor([self._owner[t] for t in task_ids.tolist()], dtype=torch.long)
        out = torch.empty(x.shape[0], dtype=torch.long)
        asked = {}
        for i in owner.unique().tolist():
            sel = owner == i
            asked[i] = (sel, self.shards[i].actor.classify.remote(x[sel], task_ids[sel]))
        for sel, ref in asked.values():
            out[sel] = ray.get(ref)
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Per shard: its first and last task, number of tasks, packed bytes and process."""
        return [{"first_task": s.task_ids[0], "last_task": s.task_ids[-1],
                 "num_tasks": len(s.task_ids), "nbytes": s.nbytes, "pid": s.pid}
                for s in self.shards]

