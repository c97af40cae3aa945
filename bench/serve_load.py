"""One registered bank served two ways under the same load: `supsup serve` against `mlflow models
serve`.

A K-task LeNet-500 bank of random masks (the cost of inference does not depend on what the masks
learned) is written to a fresh mask registry and registered as an MLflow model version the way
`supsup train` does (publish_bank). The same version is then served on loopback, one server at a
time so they never share the cores:

- `supsup serve models:/NAME/1`: Ray Serve, concurrent requests batched into passes over the bank;
- `mlflow models serve -m models:/NAME/1 --env-manager local -w 1`: one request at a time.

C client threads, each on one kept HTTP connection, send N single-image requests between them
(raw 0-255 MNIST test digits, each row's task inferred on its own), each with a bounded timeout,
the whole load with a deadline.
The table gives requests per second, p50/p95/p99 latency and the peak memory of the server's
process tree (the sum of resident sets, sampled; Ray's processes included for supsup serve) and
of its largest process. The last line is the JSON of every number.

    ../shared/offline-run .venv/bin/python bench/serve_load.py --tasks 50 --requests 200 --clients 8
    ../shared/offline-run .venv/bin/python bench/serve_load.py            # 2,500 tasks, 64 clients

Goal (k = 2,500, 64 clients): supsup serve at least 10x the requests per second of mlflow models
serve, with p95 latency under 1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import emit_json, machine, print_table
from north_star import descendants, sample

HOST = "127.0.0.1"
MODEL = "bench-serve"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=2500, help="masks in the bank (k)")
    p.add_argument("--requests", type=int, default=2000, help="single-image requests per server")
    p.add_argument("--clients", type=int, default=64, help="concurrent client threads")
    p.add_argument("--outputs", type=int, default=500, help="lenet outputs (north star: 500)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="serve.max_batch_size (default: the config's)")
    p.add_argument("--batch-wait-s", type=float, default=None,
                   help="serve.batch_wait_timeout_s (default: the config's)")
    p.add_argument("--replica-cpus", type=float, default=1, help="serve.num_cpus of the replica")
    p.add_argument("--threads", type=int, default=2,
                   help="threads of each server's model (serve.threads; OMP_NUM_THREADS of "
                        "mlflow models serve, measured fastest with 2 here: 11.7 against 11.0 "
                        "requests/s with 1); on a loaded machine, 1 (OpenMP threads that wait "
                        "for busy cores spin, measured 20x slower with 2 than 1 at load 14)")
    p.add_argument("--timeout-s", type=float, default=120, help="one request's timeout")
    p.add_argument("--deadline-s", type=float, default=900, help="one server's whole load")
    p.add_argument("--start-timeout-s", type=float, default=600, help="a server's start")
    p.add_argument("--only", choices=("supsup_serve", "mlflow_serve"), help="one server only")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    return p.parse_args(argv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def register_bank(folder: Path, tasks: int, outputs: int) -> tuple[str, str, dict[str, Any]]:
    """A registry of `tasks` random LeNet masks, registered as MODEL version 1 like `supsup
    train` registers a bank. Returns (model URI, tracking URI, what was built)."""
    from pipeline.config import parse_config
    from pipeline.publish import publish_bank
    from pipeline.registry import MaskRegistry
    from pipeline.tracking import Tracker
    from supsup.networks import build_network

    started = time.perf_counter()
    net = build_network(name="lenet", num_outputs=outputs)
    registry = MaskRegistry(folder / "registry")
    registry.create_bank(MODEL, net.spec, net.layer_shapes(), {},
                         {"rule": "threshold", "dataset": "mnist-bundled"})
    rng = np.random.default_rng(0)
    for t in range(tasks):
        packed = {key: rng.integers(0, 256, (int(np.prod(s)) + 7) // 8, dtype=np.uint8)
                  for key, s in net.layer_shapes().items()}
        registry.write_task(MODEL, t, packed, metadata={"train_accuracy": 0.5})
    config = parse_config({
        "name": MODEL, "output_dir": str(folder / "runs"),
        "network": {"name": "lenet", "num_outputs": outputs},
        "registry": {"root": str(folder / "registry")},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    })
    tracker = Tracker(config.tracking_uri, MODEL)
    with tracker.run("publish") as run_id:
        publication = publish_bank(config, tracker, run_id)
    reg = publication.registration
    return (f"models:/{MODEL}/{reg.version}", config.tracking_uri,
            {"build_s": time.perf_counter() - started,
             "stored_mib": registry.stored_bytes(MODEL) / 2**20})


def request_bodies(count: int) -> list[bytes]:
    """`count` JSON bodies of one raw 0-255 MNIST test digit each (cycling over 256 digits)."""
    from pipeline.datasets import load_dataset

    _, test = load_dataset("mnist-bundled")
    x = test.x[:256].reshape(256, -1).double().numpy()  # normalised: back to the pixels sent
    x = np.rint((x * 0.3081 + 0.1307) * 255)
    return [json.dumps({"inputs": [x[i % len(x)].tolist()],
                        "params": {"input_scale": "0-255"}}).encode() for i in range(count)]


def _get(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def _health(url: str) -> dict[str, Any]:
    """The server's health body as JSON ({} when it is not JSON, as mlflow's is not)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = json.loads(response.read())
            return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], log: Path, health: str,
            timeout_s: float) -> Iterator[subprocess.Popen[bytes]]:
    """The server `command` in its own process group, once `health` answers 200; stopped by
    SIGINT to its group (SIGKILL after 60 s) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while _get(health) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{command[0]} did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


class MemoryWatch:
    """Samples the resident memory of a process tree every `every` seconds in a thread: the
    peak of the tree's sum and the largest single process's peak (VmHWM)."""

    def __init__(self, root: int, every: float = 0.5) -> None:
        self.root, self.every = root, every
        self.peak_tree_kib = 0
        self.peak_process: tuple[int, str] = (0, "")  # (VmHWM KiB, command line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        total = 0
        for pid in descendants(self.root):
            rss = _rss_kib(pid)
            total += rss
            seen = sample(pid)
            if seen is not None and seen[1] > self.peak_process[0]:
                self.peak_process = (seen[1], seen[0][:60])
        self.peak_tree_kib = max(self.peak_tree_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Client:
    """One client's HTTP/1.1 connection, kept open between requests as load generators keep
    theirs (a new connection per request costs the server's front more than the request);
    opened again after an error."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path or "/"
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> int:
        for attempt in range(2):  # a kept connection the server closed: once more, fresh
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", self.path, body,
                                  {"Content-Type": "application/json"})
                response = self.conn.getresponse()
                response.read()
                return int(response.status)
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    return 0
        return 0


def load(url: str, bodies: list[bytes], clients: int, timeout_s: float,
         deadline_s: float) -> dict[str, Any]:
    """Send every body once from `clients` threads, each on its own kept connection; latency
    of each answered request."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        connection = Client(url, timeout_s)
        while time.monotonic() < stop_at:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            started = time.perf_counter()
            status = connection.post(bodies[i])
            took = time.perf_counter() - started
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(took)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.asarray(latencies) if latencies else np.full(1, np.nan)
    return {"requests": len(bodies), "ok": len(latencies), "statuses": statuses,
            "wall_s": wall, "req_per_s": len(latencies) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "p99_s": float(np.percentile(lat, 99))}


def measure(name: str, command: list[str], env: dict[str, str], url: str, health: str,
            bodies: list[bytes], args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Start the server, warm it up, load it while watching its memory, stop it."""
    print(f"{name}: starting", flush=True)
    started = time.perf_counter()
    with running(command, env, folder / f"{name}.log", health, args.start_timeout_s) as proc:
        start_s = time.perf_counter() - started
        warm = Client(url, args.timeout_s)
        for body in bodies[:4]:  # first answers pay one-off costs (imports, allocations)
            warm.post(body)
        print(f"{name}: up in {start_s:.1f} s; {len(bodies)} requests from {args.clients} "
              "clients", flush=True)
        with MemoryWatch(proc.pid) as watch:
            result = load(url, bodies, args.clients, args.timeout_s, args.deadline_s)
        result["health"] = _health(health)  # supsup serve: the batches its passes held
    result.update(start_s=start_s, peak_tree_mib=watch.peak_tree_kib / 1024,
                  peak_process_mib=watch.peak_process[0] / 1024,
                  peak_process=watch.peak_process[1])
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from pipeline.config.sections import ServeSection

    defaults = ServeSection()
    batching = {"max_batch_size": args.max_batch_size or defaults.max_batch_size,
                "batch_wait_s": (defaults.batch_wait_timeout_s if args.batch_wait_s is None
                                 else args.batch_wait_s)}
    with contextlib.ExitStack() as stack:
        if args.keep:
            folder = Path(args.keep)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-")))
        print(f"building and registering {args.tasks} random LeNet-{args.outputs} masks in "
              f"{folder}", flush=True)
        model_uri, tracking_uri, built = register_bank(folder, args.tasks, args.outputs)
        bodies = request_bodies(args.requests)
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
               "MLFLOW_DISABLE_TELEMETRY": "true",
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        results: dict[str, dict[str, Any]] = {}
        if args.only in (None, "supsup_serve"):
            port = free_port()
            command = [str(bin_dir / "supsup"), "serve", model_uri, "--tracking-uri",
                       tracking_uri, "--set", f"serve.port={port}",
                       *(["--set", f"serve.max_batch_size={args.max_batch_size}"]
                         if args.max_batch_size is not None else []),
                       *(["--set", f"serve.batch_wait_timeout_s={args.batch_wait_s}"]
                         if args.batch_wait_s is not None else []),
                       "--set", f"serve.num_cpus={args.replica_cpus}",
                       "--set", f"serve.threads={args.threads}",
                       "--set", f"cluster.num_cpus={max(2, int(args.replica_cpus + 0.999))}"]
            base = f"http://{HOST}:{port}"
            results["supsup_serve"] = measure("supsup_serve", command, env,
                                              f"{base}/invocations", f"{base}/health", bodies,
                                              args, folder)
        if args.only in (None, "mlflow_serve"):
            port = free_port()
            command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri,
                       "--env-manager", "local", "-h", HOST, "-p", str(port), "-w", "1"]
            base = f"http://{HOST}:{port}"
            threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            results["mlflow_serve"] = measure("mlflow_serve", command, {**env, **threads},
                                              f"{base}/invocations", f"{base}/health", bodies,
                                              args, folder)
    rows = [[name, r["ok"], r["requests"], f"{r['req_per_s']:.2f}", f"{r['p50_s']:.3f}",
             f"{r['p95_s']:.3f}", f"{r['p99_s']:.3f}", f"{r['peak_tree_mib']:.0f}",
             f"{r['peak_process_mib']:.0f}", f"{r['start_s']:.0f}"]
            for name, r in results.items()]
    print_table(f"{args.tasks} tasks (LeNet-{args.outputs}, random masks, {built['stored_mib']:.0f}"
                f" MiB stored), {args.requests} single-image requests from {args.clients} "
                f"clients; load average {os.getloadavg()[0]:.2f}",
                ["server", "ok", "sent", "req/s", "p50 s", "p95 s", "p99 s", "tree MiB",
                 "largest MiB", "start s"], rows)
    held = (results.get("supsup_serve") or {}).get("health", {})
    if held.get("batches"):
        print(f"supsup serve: {held['requests']} requests in {held['batches']} passes "
              f"({held['requests'] / held['batches']:.1f} per pass, largest "
              f"{held['largest_batch']})")
    if "supsup_serve" in results and "mlflow_serve" in results:
        ratio = results["supsup_serve"]["req_per_s"] / max(results["mlflow_serve"]["req_per_s"],
                                                          1e-9)
        print(f"supsup serve / mlflow models serve: {ratio:.1f}x the requests per second "
              "(goal at 2,500 tasks and 64 clients: 10x, p95 under 1 s)")
    emit_json("serve_load", tasks=args.tasks, requests=args.requests, clients=args.clients,
              **batching,
              replica_cpus=args.replica_cpus, threads=args.threads, build=built,
              machine=machine(),
              **{name: results.get(name) for name in ("supsup_serve", "mlflow_serve")})


if __name__ == "__main__":
    main()
