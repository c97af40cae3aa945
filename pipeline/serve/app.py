"""The Ray Serve application of one registered model version: an HTTP front and bank replicas.

- `BankReplica` (config: serve.replicas, num_cpus, num_gpus) loads exactly the version's masks
  through the one bank loader (`load_bank`, snapshot checked) and answers batches of requests:
  rows of the same inference options go through one pass over the bank, each row getting its
  own task (per_example, the default).
- `Front` takes HTTP: POST /invocations (MLflow's scoring body, `{"inputs": rows, "params": {}}`,
  answered as `{"predictions": [{"task_id", "class", "confidence"}, ...]}`) and GET /health (the
  version, its snapshot, the answering replica and how many requests its batches held). It
  checks every input against the contract (pipeline.serve.contract) before any replica sees
  it: a bad one is a 400 naming the field. The front gathers concurrent requests
  (pipeline.serve.batcher: one batch in flight per bank replica, the next one made of what
  queued meanwhile and what arrives within serve.batch_wait_timeout_s, up to
  serve.max_batch_size) and sends each batch to a replica as one call. A batch whose replica
  died (killed, out of memory) is sent again once Ray has restarted it, and its requests are
  answered with a 503 naming the restart if that does not happen in time.

The driver (pipeline.serve.command) resolves the version and checks its snapshot before it
deploys; replicas resolve the same pinned version again where they run (a cluster node may be
another machine), so nothing but the version's name travels to them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.config.sections import ServeSection
from pipeline.serve.answer import Answerer
from pipeline.serve.batcher import Batcher
from pipeline.serve.contract import InputError, as_batch, normalize, read_params

log = logging.getLogger(__name__)

_RETRIES = 4  # sends of one batch while its replica restarts (1 + 2 + 4 s between them)
_HEALTH_TIMEOUT_S = 10.0
_BODY_BYTES_PER_VALUE = 32  # a JSON number of float64 precision and its separator, generously
Rows = list[dict[str, Any]]  # one request's answers: task id, class and confidence per row


@dataclass(frozen=True)
class ServedVersion:
    """What both deployments know of the version: where to load it and what it accepts."""

    model_uri: str  # models:/NAME/VERSION, pinned (never an alias: replicas load the same one)
    tracking_uri: str
    snapshot: str  # the content hash the driver checked; replicas must load the same
    tasks: int
    input_shape: tuple[int, ...]
    input_norm: dict[str, Any] | None  # the training data's mean/std, when recorded
    defaults: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"model_uri": self.model_uri, "snapshot": self.snapshot, "tasks": self.tasks}


class BankReplica:
    """One copy of the bank, answering batches of requests (see the module docstring)."""

    def __init__(self, version: ServedVersion, settings: dict[str, Any]) -> None:
        from pipeline.registry import BankMismatchError, load_bank
        from pipeline.tracking.client import quiet
        from pipeline.tracking.versions import model_source
        from supsup.networks import build_network

        quiet()
        config = ServeSection.model_validate(settings)
        threads = config.threads or max(1, math.ceil(config.num_cpus))
        self.device = torch.device(
            "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        # On a CPU, a pass splits the bank's task blocks among `threads` threads, each running
        # single-threaded kernels (InferenceEngine(workers=)): beside the HTTP front on the same
        # cores, a thread that waits for a core holds back only its own blocks, where kernels
        # of several threads wait for the slowest one at every operation.
        workers = threads if self.device.type == "cpu" else 1
        torch.set_num_threads(threads // workers)
        with tempfile.TemporaryDirectory(prefix="supsup-serve-") as tmp:
            _, source = model_source(version.model_uri, version.tracking_uri, tmp)
            if source.snapshot_sha256 != version.snapshot:
                raise BankMismatchError(
                    f"{version.model_uri} now pins snapshot {source.short}, not the "
                    f"{version.snapshot[:12]} checked when serving started")
            objective = version.defaults.get("objective", "entropy")
            if config.shards > 1:  # task ranges in actors of their own; no copy of the bank here
                from pipeline.serve.shards import ShardedBank

                sharded = ShardedBank.from_source(source, config.shards, objective=objective,
                                                  device=str(self.device),
                                                  threads=threads)
                self.answerer = Answerer(sharded.net, None, sharded)
            else:
                bank, spec = load_bank(source, self.device)
                self.answerer = Answerer(build_network(spec).to(self.device).eval(), bank,
                                         resident_bytes=config.resident_mib << 20,
                                         workers=workers)
        self.version = version
        self.shards = config.shards
        self.answerer.engine(objective)  # the bank's mixture, made now and not on a request
        # One pass at a time: answering installs bindings on the shared network.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bank")
        self.counts = {"requests": 0, "batches": 0, "largest_batch": 0}

    def describe(self) -> dict[str, Any]:
        """The version this replica holds, and which process holds it."""
        return {**self.version.describe(), "replica_pid": os.getpid(),
                "device": str(self.device), "shards": self.shards, **self.counts}

    async def answer(self, requests: list[tuple[np.ndarray, dict[str, str]]]
                     ) -> list[Rows | str]:
        """Answers for a batch of requests, (normalised inputs (n, *input_shape), inference
        options) each: its rows, or the InputError message of options this replica cannot
        answer. The pass runs off the event loop, so health checks are taken while it runs."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._answer_all, requests)

    def _answer_all(self, requests: list[tuple[np.ndarray, dict[str, str]]]
                    ) -> list[Rows | str]:
        """Rows of requests with equal options go through one pass together."""
        self.counts["requests"] += len(requests)
        self.counts["batches"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(requests))
        out: list[Rows | str] = [[] for _ in requests]
        groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for i, (_, options) in enumerate(requests):
            groups.setdefault(tuple(sorted(options.items())), []).append(i)
        for key, members in groups.items():
            options = dict(key)
            try:
                if options["mode"] == "per_example":
                    x = torch.from_numpy(np.concatenate([requests[i][0] for i in members]))
                    answers = self.answerer.predict(x.to(self.device), options)
                    start = 0
                    for i in members:
                        n = requests[i][0].shape[0]
                        out[i] = answers.rows(start, start + n).records()
                        start += n
                else:  # one task per request: each request is its own batch
                    for i in members:
                        x = torch.from_numpy(requests[i][0]).to(self.device)
                        out[i] = self.answerer.predict(x, options).records()
            except InputError as exc:  # these options only; the batch's others are answered
                for i in members:
                    out[i] = str(exc)
        return out


def _error(status: int, code: str, message: str) -> JSONResponse:
    """MLflow's error body: a code and one bounded message."""
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


class Front:
    """The HTTP side: the input contract, then a bank replica (see the module docstring)."""

    def __init__(self, version: ServedVersion, settings: dict[str, Any],
                 bank: DeploymentHandle) -> None:
        self.version = version
        self.config = ServeSection.model_validate(settings)
        self.bank = bank
        flat = math.prod(version.input_shape)
        self.max_body = self.config.max_rows_per_request * flat * _BODY_BYTES_PER_VALUE + 65536
        self.batcher: Batcher[tuple[np.ndarray, dict[str, str]], Rows | JSONResponse] = Batcher(
            self._send, slots=self.config.replicas, max_batch_size=self.config.max_batch_size,
            wait_s=self.config.batch_wait_timeout_s)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path in ("/health", "/ping") and request.method == "GET":
            return await self._health()
        if path in ("/invocations", "/") and request.method == "POST":
            return await self._invocations(request)
        return _error(404, "ENDPOINT_NOT_FOUND",
                      f"no route {request.method} {path[:64]}; use POST /invocations with "
                      '{"inputs": [...], "params": {...}} or GET /health')

    async def _health(self) -> JSONResponse:
        try:
            held = await asyncio.wait_for(self.bank.describe.remote(), _HEALTH_TIMEOUT_S)
        except (RayActorError, asyncio.TimeoutError) as exc:
            return _error(503, "REPLICA_UNAVAILABLE",
                          f"no bank replica of {self.version.model_uri} answered "
                          f"({type(exc).__name__}); Ray restarts dead replicas, retry shortly")
        sizes = self.batcher.sizes
        return JSONResponse({"status": "ok", **held, "front_batches": len(sizes),
                             "front_largest_batch": max(sizes, default=0)})

    async def _invocations(self, request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > self.max_body:
            return _error(400, "INVALID_PARAMETER_VALUE",
                          f"request body of {len(body)} bytes is above the "
                          f"{self.max_body} a request of serve.max_rows_per_request="
                          f"{self.config.max_rows_per_request} rows needs; split it")
        try:
            x, options = self._read(body)
        except InputError as exc:
            return _error(400, "INVALID_PARAMETER_VALUE", str(exc))
        return await self._answer(x, options)

    def _read(self, body: bytes) -> tuple[np.ndarray, dict[str, str]]:
        """Normalised inputs and inference options of a request body; InputError naming the
        field otherwise (never quoting the values sent)."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            where = f" at char {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
            raise InputError(f"the request body is not JSON{where}; send "
                             '{"inputs": [[...], ...], "params": {...}}') from None
        if not isinstance(payload, Mapping):
            raise InputError('the request body must be a JSON object {"inputs": ..., '
                             f'"params": ...}}, got a JSON {type(payload).__name__}')
        unknown = sorted(set(payload) - {"inputs", "instances", "params"})
        if unknown:
            raise InputError(f"unknown field(s) {[k[:32] for k in unknown[:5]]} in the request "
                             'body; send "inputs" (rows of pixels) and optionally "params"')
        rows = payload.get("inputs", payload.get("instances"))
        if rows is None:
            raise InputError('the request body has no "inputs": send rows of pixels, '
                             '{"inputs": [[...], ...]}')
        options = read_params(payload.get("params"), self.version.defaults)
        x = as_batch(rows, self.version.input_shape)
        if x.shape[0] > self.config.max_rows_per_request:
            raise InputError(f"inputs has {x.shape[0]} rows, above serve.max_rows_per_request="
                             f"{self.config.max_rows_per_request}; split the request")
        x = normalize(x, options.input_scale, self.version.input_norm)
        return x.numpy(), options.inference()

    async def _answer(self, x: np.ndarray, options: dict[str, str]) -> JSONResponse:
        """This request's answer from the batch it joined."""
        result = await self.batcher.submit((x, options))
        if isinstance(result, JSONResponse):
            return result
        return JSONResponse({"predictions": result})

    async def _send(self, requests: list[tuple[np.ndarray, dict[str, str]]]
                    ) -> list[Rows | JSONResponse]:
        """One batch to a bank replica; sent again while a dead replica is being restarted.
        Each request gets its rows or its error response."""
        delay = 1.0
        for attempt in range(_RETRIES):
            try:
                answers = await self.bank.answer.remote(requests)
                return [_error(400, "INVALID_PARAMETER_VALUE", a[:300]) if isinstance(a, str)
                        else a for a in answers]
            except RayActorError as exc:
                log.warning("bank replica lost (%s); attempt %d of %d", type(exc).__name__,
                            attempt + 1, _RETRIES)
                if attempt + 1 < _RETRIES:
                    await asyncio.sleep(delay)
                    delay *= 2
            except Exception as exc:  # noqa: BLE001  (one bounded line, never a traceback)
                cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the replica's
                log.exception("answering failed")
                first = (str(cause).strip().splitlines() or [""])[-1][:200]
                return [_error(500, "INTERNAL_ERROR",
                               f"{type(cause).__name__} while answering: {first}; the replica "
                               "log has the traceback")] * len(requests)
        return [_error(503, "REPLICA_UNAVAILABLE",
                       f"the bank replica of {self.version.model_uri} died and was not back "
                       f"after {_RETRIES} tries; Ray restarts it, retry shortly")] * len(requests)


def build_app(version: ServedVersion, config: ServeSection) -> Any:
    """The bound application: `serve.run(build_app(...))` deploys it."""
    settings = config.model_dump()
    bank = serve.deployment(
        BankReplica, name="BankReplica", num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        # the front's batch (one at a time per replica) and health checks
        max_ongoing_requests=4,
    ).bind(version, settings)
    front = serve.deployment(
        Front, name="Front", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, 4 * config.max_batch_size * config.replicas),
    )
    return front.bind(version, settings, bank)

