"""The evaluation job: Ray workers run task inference on the assembled bank, per task group.

Each worker loads the bank itself (from the registry, or from a bank file a model version
carries), rebuilds the base network from its seed, and evaluates its tasks: GG accuracy, and GN
task-inference accuracy and accuracy with the inferred task. The driver gathers the per-task
results and the curve of GN accuracy against the number of tasks learned (the bank restricted to
its first k tasks, as it stood when k tasks were learned). The curve's points are the rows of the
sampled accuracy matrix (`pipeline.accuracy_matrix`): a fixed sample of tasks is measured at
every point where it had been learned, for GG and GN, which gives forgetting and backward transfer.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.accuracy_matrix import AccuracyMatrix, continual_metrics
from pipeline.bank_source import BankSource
from pipeline.builders import (
    build_net,
    build_spec,
    build_tasks,
    task_groups,
    worker_net,
    worker_tasks,
)
from pipeline.cluster import alive_nodes, check_shared, ray_session, remote_options, worker_threads
from pipeline.config import ExperimentConfig
from pipeline.jobs.devices import worker_device
from pipeline.jobs.fanout import fan_out
from pipeline.registry import check_matches, load_bank, read_manifest
from pipeline.registry.manifest import build_manifest
from pipeline.registry.store import probe, probe_seen
from supsup.bank import describe_ids

if TYPE_CHECKING:  # annotations only: workers import torch and the engine when they run
    import torch

    from supsup.bank import MaskBank
    from supsup.engine import InferenceEngine
    from supsup.networks import NetworkSpec

log = logging.getLogger(__name__)

# report.json: 2 adds schema_version, created, snapshot_sha256, run_id, model_version, int counts;
# 3 adds summary.inferences (how many task inferences were made) and the engine's settings;
# 4 adds accuracy_matrix (GG and GN at sampled rows x columns) and continual (average accuracy,
# forgetting, backward transfer), and the curve's points now average that fixed sample of tasks
REPORT_SCHEMA_VERSION = 4
_COUNTS = ("tasks", "examples", "inferences")


@dataclass
class EvalReport:
    """Per-task results, the summary over tasks, the tasks-learned curve, and the accuracy
    matrices ("gg", "gn") with their continual-learning summaries."""

    bank: str
    source: dict[str, Any]
    tasks: list[dict[str, Any]]
    summary: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))
    run_id: str | None = None  # the MLflow run that logged this evaluation
    model_version: int | None = None  # the registered version evaluated, when there is one
    matrices: dict[str, AccuracyMatrix] = field(default_factory=dict)
    continual: dict[str, float | None] = field(default_factory=dict)

    def continual_metrics(self) -> dict[str, float]:
        """The continual-learning summaries that are defined (as MLflow metrics)."""
        return {k: float(v) for k, v in self.continual.items() if v is not None}

    def confusions(self, top: int = 20) -> list[tuple[int, int, int]]:
        """(true task, inferred task, count) for wrong inferences, most frequent first."""
        out = []
        for r in self.tasks:
            for inferred, count in (r.get("inferred") or {}).items():
                if int(inferred) != r["task_id"]:
                    out.append((r["task_id"], int(inferred), int(count)))
        return sorted(out, key=lambda c: (-c[2], c[0], c[1]))[:top]

    def to_dict(self) -> dict[str, Any]:
        """report.json: versioned, saying where it came from (bank snapshot, MLflow run, model
        version, time), counts as ints."""
        summary = {k: int(v) if k in _COUNTS else v for k, v in self.summary.items()}
        curve = [{k: int(v) if k in _COUNTS or k == "tasks_learned" else v for k, v in c.items()}
                 for c in self.curve]
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "created": self.created, "bank": self.bank,
            "snapshot_sha256": self.source.get("snapshot_sha256"),
            "run_id": self.run_id, "model_version": self.model_version,
            "source": self.source, "settings": self.settings,
            "summary": summary, "curve": curve, "seconds": self.seconds,
            "continual": self.continual,
            "accuracy_matrix": {k: m.to_dict() for k, m in self.matrices.items()},
            "confusions": [list(c) for c in self.confusions()], "tasks": self.tasks,
        }


def evaluate_group_worker(
    config_data: dict[str, Any],
    source: BankSource,
    task_ids: list[int],
    candidates: list[int] | None,
    bank_file: bytes | None = None,
) -> list[dict[str, Any]]:
    """Runs inside a Ray worker: evaluate `task_ids`, inferring among `candidates`.

    The worker loads the source itself (verified against its hashes), once per process. On a
    multi-node cluster a bank file that lives on the driver arrives as `bank_file` bytes."""
    import torch

    from pipeline.config import ExperimentConfig
    from supsup.evaluate import evaluate_group

    config = ExperimentConfig.model_validate(config_data)
    torch.set_num_threads(worker_threads(config.cluster))
    if bank_file is not None:
        source = source.with_location(export=_local_copy(source, bank_file))
    device = worker_device(config.cluster)  # the GPU the worker holds, if it was given one
    bank, spec = load_bank(source, device, cache=True)
    tasks = worker_tasks(config, device)
    e = config.evaluate
    start = time.perf_counter()
    engine = _worker_engine(bank, spec, device, config, candidates)
    net = engine.net if engine is not None else worker_net(spec, device)
    # Every test batch of the group's tasks is queued, and the engine answers their queries
    # `queries_per_pass` at a time with one pass over the bank each.
    results = evaluate_group(
        net, bank, tasks, task_ids, gn=e.gn, batch_size=e.batch_size, method=e.method,
        objective=e.objective, mode=e.mode, candidates=candidates, max_batches=e.max_batches,
        digits=e.digits, queries_per_pass=e.queries_per_pass, engine=engine,
    )
    seconds = (time.perf_counter() - start) / max(1, len(results))
    out = []
    for result in results:
        row = result.to_dict()
        row["inferred"] = {str(k): v for k, v in (row.get("inferred") or {}).items()}
        row["seconds"] = seconds  # the group's time, shared evenly: its passes serve every task
        out.append(row)
    return out


# (bank, settings, engine) of this worker process
_ENGINE: list[tuple[MaskBank, tuple[object, ...], InferenceEngine]] = []


def _worker_engine(bank: MaskBank, spec: NetworkSpec, device: torch.device,
                   config: ExperimentConfig, candidates: list[int] | None
                   ) -> InferenceEngine | None:
    """The worker process's engine over its cached bank, made once and kept for the groups that
    follow (its mixture and resident masks cost seconds at thousands of tasks); None where
    `evaluate_group` answers without one (batch mode, GG alone, candidate subsets)."""
    from supsup.engine import InferenceEngine

    e = config.evaluate
    if not e.gn or e.mode == "batch" or candidates is not None:
        return None
    settings = (e.objective, e.digits, e.queries_per_pass, e.resident_mib, str(device))
    if _ENGINE and _ENGINE[0][0] is bank and _ENGINE[0][1] == settings:
        return _ENGINE[0][2]
    _ENGINE.clear()  # another bank or settings: the previous engine's buffers go first
    engine = InferenceEngine(worker_net(spec, device), bank, objective=e.objective,
                             digits=e.digits, block_queries=e.queries_per_pass,
                             resident_bytes=e.resident_mib << 20)
    _ENGINE.append((bank, settings, engine))
    return engine


def _evaluate_sharded(config: ExperimentConfig, source: BankSource,
                      jobs: list[tuple[str, int, list[int], list[int] | None]],
                      on_result: Callable[[Any, list[dict[str, Any]]], None]) -> None:
    """Evaluate the jobs' tasks on the driver, the bank held by `evaluate.shards` Ray actors
    (each a task range, none the whole bank): every query is answered by all shards and one
    argmin, and each task's own mask classifies on the shard that holds it."""
    from pipeline.serve.shards import ShardedBank
    from supsup.evaluate import evaluate_group

    e = config.evaluate
    tasks = build_tasks(config)
    with ShardedBank.from_source(source, e.shards, objective=e.objective, digits=e.digits,
                                 block_queries=e.queries_per_pass,
                                 threads=worker_threads(config.cluster)) as sharded:
        for job in jobs:
            start = time.perf_counter()
            results = evaluate_group(
                sharded.net, None, tasks, job[2], gn=True, batch_size=e.batch_size,
                method=e.method, objective=e.objective, mode=e.mode,
                max_batches=e.max_batches, engine=sharded)
            seconds = (time.perf_counter() - start) / max(1, len(results))
            rows = []
            for result in results:
                row = result.to_dict()
                row["inferred"] = {str(k): v for k, v in (row.get("inferred") or {}).items()}
                row["seconds"] = seconds
                rows.append(row)
            on_result(job, rows)


def _local_copy(source: BankSource, data: bytes) -> str:
    """The bank file's bytes as a file on this node (once per snapshot); load_bank checks them."""
    path = Path(tempfile.gettempdir()) / f"supsup-bank-{source.snapshot_sha256}.parquet"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def check_config_against_bank(config: ExperimentConfig, source: BankSource) -> None:
    """BankMismatchError naming each value where `config` differs from the bank's manifest."""
    manifest = read_manifest(source)
    tasks = build_tasks(config)
    net = build_net(build_spec(config, tasks))
    wanted = build_manifest(source.bank, net.spec, net.layer_shapes(), net.bn_features(),
                            config.mask_info())
    check_matches(manifest, wanted, source.describe())


def curve_points(task_ids: list[int], points: int) -> list[int]:
    """Numbers of tasks learned at which to measure (always ending at all of them)."""
    n = len(task_ids)
    if points <= 1 or n <= 1:
        return [n]
    ks = {max(1, round(n * (i + 1) / points)) for i in range(points)}
    return sorted(ks)


def matrix_columns(task_ids: list[int], points: list[int], sample: int) -> list[int]:
    """Tasks measured at every point where they had been learned: `sample` tasks spread evenly
    over those learned by the first point (so every point averages at least that many, and each
    has a value in every row), and each point's newest task (so its own row is right after it was
    learned)."""
    first = task_ids[: points[0]]
    step = max(1, len(first) // sample)
    return sorted(set(first[::step][:sample]) | {task_ids[k - 1] for k in points if k > 0})


def _matrices(points: list[int], columns: list[int],
              rows_at: dict[int, list[dict[str, Any]]]) -> dict[str, AccuracyMatrix]:
    wanted = set(columns)
    return {name: AccuracyMatrix.from_cells(points, columns, {
        (k, r["task_id"]): r[f"accuracy_{name}"] for k, rows in rows_at.items() for r in rows
        if r["task_id"] in wanted and r.get(f"accuracy_{name}") is not None})
        for name in ("gg", "gn")}


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    from supsup.evaluate import TaskEvaluation, summarize

    fields = TaskEvaluation.__dataclass_fields__
    return summarize([TaskEvaluation(**{k: v for k, v in r.items() if k in fields})
                      for r in rows])


def run_evaluation(
    config: ExperimentConfig,
    source: BankSource,
    *,
    task_ids: list[int] | None = None,
    progress: Callable[[float, int], None] | None = None,
    address: str | None = None,
) -> EvalReport:
    """Evaluate exactly the bank content `source` names on the tasks of `config`.

    The config must describe the bank (seed, network, task family, data set, mask rule):
    BankMismatchError naming both values otherwise, before any worker starts.
    """
    start = time.perf_counter()
    check_config_against_bank(config, source)
    ids = list(source.task_ids) if task_ids is None else list(task_ids)
    missing = [t for t in ids if t not in set(source.task_ids)]
    if missing:
        raise KeyError(f"{describe_ids(missing)} are not in {source.describe()}")
    ids_sorted = list(source.task_ids)
    n = len(ids_sorted)
    jobs: list[tuple[str, int, list[int], list[int] | None]] = [
        ("final", n, g, None) for g in task_groups(ids, config.evaluate.group_size)
    ]
    points = curve_points(ids_sorted, config.evaluate.curve_points)
    columns = matrix_columns(ids_sorted, points, config.evaluate.curve_tasks)
    position = {t: i for i, t in enumerate(ids_sorted)}
    if config.evaluate.gn:
        for k in points[:-1]:
            jobs.append(("curve", k, [c for c in columns if position[c] < k], ids_sorted[:k]))
        last = [c for c in columns if c not in set(ids)]  # the final row beyond `task_ids`
        if last:
            jobs.append(("curve", n, last, None))
    if config.evaluate.shards > 1 and len(jobs) > len(ids) and jobs[-1][0] == "curve":
        # the curve infers among the first k tasks, which shards of the whole bank do not
        log.warning("evaluate.shards=%d: the tasks-learned curve and the accuracy matrix's "
                    "earlier rows are left out (they infer among fewer tasks than the shards "
                    "hold)", config.evaluate.shards)
    if config.evaluate.shards > 1:
        jobs = [j for j in jobs if j[0] == "final"]
        points = points[-1:]
    config_data = config.model_dump()
    rows: list[dict[str, Any]] = []
    curve_rows: dict[int, list[dict[str, Any]]] = {}
    # The bar counts the bank's tasks; the curve's evaluations of earlier subsets are spread
    # over it by their share of the work, so it ends at len(ids) when everything has.
    work = sum(len(g) for _, _, g, _ in jobs)
    done = [0]

    def on_result(job: tuple[str, int, list[int], list[int] | None], result: Any) -> None:
        kind, k, group, _ = job
        (rows if kind == "final" else curve_rows.setdefault(k, [])).extend(result)
        done[0] += len(group)
        if progress:
            progress(len(ids) * done[0] / work, len(ids))

    with ray_session(config.cluster, address):
        import ray

        if config.evaluate.shards > 1:
            _evaluate_sharded(config, source, jobs, on_result)
            jobs = []
        blob = None
        if source.root is not None:
            with probe(source.root) as name:
                check_shared(source.root, name, probe_seen)
        elif len(alive_nodes()) > 1:  # the bank file is on the driver: ship it once
            blob = ray.put(Path(source.export).read_bytes())  # type: ignore[arg-type]
        if jobs:
            fan_out(evaluate_group_worker, jobs,
                    lambda j: (config_data, source, j[2], j[3], blob),
                    options=remote_options(config.cluster, config.train.max_retries),
                    on_result=on_result,
                    describe=lambda j: f"evaluating tasks {describe_ids(j[2])} of "
                                       f"{source.bank!r}")
    rows.sort(key=lambda r: r["task_id"])
    summary = _summary(rows)
    curve = []
    for k in sorted(curve_rows):
        if k < n:
            curve.append({"tasks_learned": k, **_summary(curve_rows[k])})
    matrices: dict[str, AccuracyMatrix] = {}
    continual: dict[str, float | None] = {}
    if config.evaluate.gn:
        curve.append({"tasks_learned": n, **summary})
        matrices = _matrices(points, columns, {**curve_rows, n: rows + curve_rows.get(n, [])})
        continual = continual_metrics(matrices, {
            name: [r[f"accuracy_{name}"] for r in rows] for name in ("gg", "gn")})
    e = config.evaluate
    settings = {"method": e.method, "objective": e.objective, "mode": e.mode,
                "batch_size": e.batch_size, "max_batches": e.max_batches, "gn": e.gn,
                "digits": e.digits, "queries_per_pass": e.queries_per_pass}
    return EvalReport(source.bank, source.to_dict(), rows, summary, curve, settings,
                      time.perf_counter() - start, matrices=matrices, continual=continual)
