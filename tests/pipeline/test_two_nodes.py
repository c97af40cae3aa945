"""Two Ray nodes as two hosts: network namespaces joined by a bridge, the registry on an S3 server.

The test process owns the bridge (10.213.N.254, where its S3 server listens); host A (10.213.N.1)
runs the Ray head and the driver (`supsup train`, which joins through RAY_ADDRESS), host B
(10.213.N.2) runs a worker node. Every address exists only on links this test creates, and all of
it is removed at the end. Needs root and iproute2; skipped elsewhere.

Task groups spread over both nodes; data-parallel training (Ray Train) puts one rank on each node
and checkpoints to S3, with no GLOO_SOCKET_IFNAME given although the host name resolves to
loopback; an unshared registry or Ray Train storage folder is refused; a killed node is survived.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.builders import task_groups
from pipeline.config import load_config
from pipeline.jobs.train import train_group_worker
from pipeline.registry import MaskRegistry
from tests.pipeline.servers import Guarded, free_port, stop_group

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BUCKET = "supsup-cluster"
VENV_BIN = Path(sys.executable).parent


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Hosts:
    """Namespaces A and B on a bridge owned by the test's own namespace."""

    def __init__(self) -> None:
        tag = os.getpid() % 200 + 20
        self.net = f"10.213.{tag}"
        self.names = {"a": f"supsup-a{tag}", "b": f"supsup-b{tag}"}
        self.ip = {"a": f"{self.net}.1", "b": f"{self.net}.2", "bridge": f"{self.net}.254"}
        self.bridge = f"sbr{tag}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def up(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.ip['bridge']}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        _sh("ip", "link", "set", "lo", "up")
        for host, ns in self.names.items():
            _sh("ip", "netns", "add", ns)
            outer, inner = f"v{host}{self.net.split('.')[-1]}", self.link(host)
            _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
            _sh("ip", "link", "set", outer, "master", self.bridge)
            _sh("ip", "link", "set", outer, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", inner)
            _sh("ip", "-n", ns, "link", "set", inner, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def link(host: str) -> str:
        """The name of host's network interface, inside its namespace."""
        return f"v{host}in"

    def start(self, host: str, args: list[str], env: dict[str, str],
              log: Path) -> subprocess.Popen[bytes]:
        """A process in host's namespace, in its own process group (stopped at teardown)."""
        out = log.open("wb")
        proc = Guarded(["ip", "netns", "exec", self.names[host], *args], env=env, stdout=out,
                       stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def run(self, host: str, args: list[str], env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.names[host], *args], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def down(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc, seconds=5)  # also ends its watchdog; what is left is killed below
        for ns in self.names.values():
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)


def _raylet_pid(node_ip: str) -> int:
    """The PID of the raylet serving `node_ip`, from /proc (no psutil here)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"raylet") and f"--node_ip_address={node_ip}".encode() in cmd:
            return int(entry.name)
    raise LookupError(f"no raylet for {node_ip}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A two-node Ray cluster (head in A, worker in B) and an S3 server on the bridge."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create the test hosts")
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    tmp = tmp_path_factory.mktemp("two-nodes")
    hosts = Hosts()
    s3 = None
    try:
        hosts.up()
        s3 = ThreadedMotoServer(ip_address=hosts.ip["bridge"], port=0, verbose=False)
        s3.start()
        endpoint = f"http://{hosts.ip['bridge']}:{s3.get_host_and_port()[1]}"
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        saved = {k: os.environ.get(k) for k in aws}
        os.environ.update(aws)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        env = {**os.environ, **aws, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(Path.cwd())}
        env.pop("RAY_ADDRESS", None)
        env.pop("GLOO_SOCKET_IFNAME", None)
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # "0" would refuse a second node
        port = free_port()
        common = ["--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats",
                  "--block"]
        head_tmp = tempfile.mkdtemp(prefix="rta", dir="/tmp")  # socket paths must stay short
        worker_tmp = tempfile.mkdtemp(prefix="rtb", dir="/tmp")
        # Here the host name resolves to 127.0.0.1, where torch's gloo would bind and the other
        # host could not reach it; GLOO_SOCKET_IFNAME is left unset: data-parallel training
        # finds each host's link itself.
        hosts.start("a", [str(VENV_BIN / "ray"), "start", "--head", f"--port={port}",
                          f"--node-ip-address={hosts.ip['a']}", "--include-dashboard=false",
                          f"--temp-dir={head_tmp}", *common],
                    env, tmp / "head.log")
        address = f"{hosts.ip['a']}:{port}"
        time.sleep(3)
        # Host B has its own disk at `private`: a tmpfs over that folder in B's mount namespace,
        # so a registry there is not shared storage, as on two real machines.
        private = tmp / "private"
        private.mkdir()
        ray_b = " ".join([str(VENV_BIN / "ray"), "start", f"--address={address}",
                          f"--node-ip-address={hosts.ip['b']}", f"--temp-dir={worker_tmp}",
                          *common])
        hosts.start("b", ["unshare", "--mount", "sh", "-c",
                          f"mount -t tmpfs tmpfs {private} && exec {ray_b}"],
                    env, tmp / "worker.log")
        check = ("import ray, time\nray.init()\nfor _ in range(360):\n"
                 "    if sum(n['Alive'] for n in ray.nodes()) == 2: break\n"
                 "    time.sleep(0.5)\nprint(sum(n['Alive'] for n in ray.nodes()))\n")
        seen = hosts.run("a", [sys.executable, "-c", check], {**env, "RAY_ADDRESS": address},
                         timeout=300)
        assert seen.stdout.strip().endswith("2"), (seen.stdout, seen.stderr,
                                                   (tmp / "worker.log").read_text()[-2000:])
        yield {"hosts": hosts, "env": {**env, "RAY_ADDRESS": address}, "tmp": tmp,
               "root": f"s3://{BUCKET}/registry", "private": private}
    finally:
        hosts.down()
        if s3 is not None:
            s3.stop()
        for k, v in locals().get("saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for d in (locals().get("head_tmp"), locals().get("worker_tmp")):
            if d:
                shutil.rmtree(d, ignore_errors=True)


def _config(tmp: Path, name: str, num_tasks: int, steps: int,
            root: str = f"s3://{BUCKET}/registry") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "output_dir": str(tmp / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": num_tasks},
        "train": {"steps": steps, "group_size": 2, "max_retries": 3},
        "cluster": {"cpus_per_worker": 1, "threads_per_worker": 1},
        "registry": {"root": root},
        "tracking": {"register_model": False},
    }))
    return path


def _reference_bits(config_path: Path, root: Path) -> dict[int, dict[str, bytes]]:
    """The same groups trained in this process, one after another, into a local registry."""
    config = load_config(config_path, [f"registry.root={root}"])
    from pipeline.jobs.train import prepare_bank

    prepare_bank(config)
    data = config.model_dump()
    for group in task_groups(list(range(config.tasks.num_tasks)), config.train.group_size):
        train_group_worker(data, group)
    return _bits(MaskRegistry(root), config.bank)


def _bits(registry: MaskRegistry, bank: str) -> dict[int, dict[str, bytes]]:
    return {t: {k: v.tobytes() for k, v in registry.read_task(bank, t).packed.items()}
            for t in registry.tasks(bank)}


def _train(cluster: dict[str, Any], config: Path) -> subprocess.Popen[bytes]:
    log = cluster["tmp"] / f"{config.stem}.log"
    return cluster["hosts"].start("a", [str(VENV_BIN / "supsup"), "train", str(config)],
                                  cluster["env"], log)


def test_groups_run_on_both_nodes_and_match_one_node_bit_for_bit(
        cluster: dict[str, Any], tmp_path: Path, one_thread: None) -> None:
    config = _config(cluster["tmp"], "spread", num_tasks=8, steps=40)
    driver = _train(cluster, config)
    assert driver.wait(timeout=600) == 0, (cluster["tmp"] / "spread.log").read_text()[-3000:]
    registry = MaskRegistry(cluster["root"])
    assert registry.tasks("spread") == list(range(8)) and registry.verify("spread").all_ok
    nodes = {t: registry.read_task("spread", t).metadata["node_id"] for t in range(8)}
    per_node = {n: sorted(t for t, m in nodes.items() if m == n) for n in set(nodes.values())}
    print("groups per node:", json.dumps({n[:8]: len(ts) // 2 for n, ts in per_node.items()}))
    assert len(per_node) == 2, per_node  # both hosts trained groups
    assert _bits(registry, "spread") == _reference_bits(config, tmp_path / "reference")


# Runs before the node kill below, while host B is still in the cluster.
def test_data_parallel_ranks_on_both_nodes_checkpoint_to_shared_storage(
        cluster: dict[str, Any]) -> None:
    """`train.data_parallel_workers: 2` on two 1-CPU nodes: Ray Train must put one rank on each
    host, and its run folder goes to `cluster.storage`, an S3 URI whose endpoint is given in its
    query (as pyarrow reads it), not only through AWS_ENDPOINT_URL."""
    import boto3
    from mlflow.tracking import MlflowClient

    endpoint = cluster["env"]["AWS_ENDPOINT_URL"].split("://", 1)[1]
    config = _config(cluster["tmp"], "dataparallel", num_tasks=1, steps=10)
    raw = yaml.safe_load(config.read_text())
    raw["train"]["data_parallel_workers"] = 2
    raw["cluster"]["storage"] = f"s3://{BUCKET}/ray-train?endpoint_override={endpoint}&scheme=http"
    config.write_text(yaml.safe_dump(raw))
    driver = _train(cluster, config)
    log = cluster["tmp"] / "dataparallel.log"
    assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    registry = MaskRegistry(cluster["root"])
    assert registry.tasks("dataparallel") == [0] and registry.verify("dataparallel").all_ok
    both = sorted([cluster["hosts"].ip["a"], cluster["hosts"].ip["b"]])
    assert sorted(registry.read_task("dataparallel", 0).metadata["node_ips"]) == both
    # Ray Train's run folder, with rank 0's checkpoint, is on S3 under cluster.storage
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=BUCKET, Prefix="ray-train/").get("Contents", [])]
    (checkpoint,) = [k for k in keys if k.startswith("ray-train/dataparallel-task-0000000-")
                     and k.endswith("/metrics.json") and "/checkpoint_" in k]
    reported = json.loads(boto3.client("s3").get_object(
        Bucket=BUCKET, Key=checkpoint)["Body"].read())
    assert reported["task_id"] == 0 and reported["workers"] == 2
    assert sorted(reported["node_ips"]) == both
    assert len(set(reported["score_checksums"])) == 1  # both ranks ended with the same scores
    run_folder = checkpoint.split("/checkpoint_")[0]
    assert any(k.startswith(f"{run_folder}/") and "/checkpoint_" not in k for k in keys), keys
    # the driver says where the ranks ran, and keeps its log with the (parentless) train run
    loaded = load_config(config)
    said = [line for line in (loaded.run_dir / "supsup.log").read_text().splitlines()
            if "ranks ran on" in line]
    assert said and all(ip in said[0] for ip in both), said
    # the host name resolves to loopback on both hosts: gloo was given each host's link
    hosts = cluster["hosts"]
    gloo = [line for line in (loaded.run_dir / "supsup.log").read_text().splitlines()
            if "gloo uses" in line]
    assert gloo and all(f"GLOO_SOCKET_IFNAME={hosts.link(h)} on {hosts.ip[h]}" in gloo[0]
                        for h in ("a", "b")), gloo
    client = MlflowClient(loaded.tracking_uri)
    experiment = client.get_experiment_by_name(loaded.experiment_name)
    (train_run,) = [r for r in client.search_runs([experiment.experiment_id])
                    if r.data.tags.get("job") == "train"]
    assert "supsup.log" in {a.path for a in client.list_artifacts(train_run.info.run_id)}


def test_a_registry_folder_that_a_node_does_not_share_is_refused_before_training(
        cluster: dict[str, Any]) -> None:
    config = _config(cluster["tmp"], "unshared", num_tasks=4, steps=20,
                     root=str(cluster["private"] / "registry"))
    driver = _train(cluster, config)
    assert driver.wait(timeout=300) == 2
    log = (cluster["tmp"] / "unshared.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is not shared by every node" in errors[0], log[-3000:]
    assert cluster["hosts"].ip["b"] in errors[0] and "s3://" in errors[0]
    assert MaskRegistry(cluster["private"] / "registry").tasks("unshared") == []  # none trained


def test_data_parallel_storage_that_a_node_does_not_share_is_refused_before_training(
        cluster: dict[str, Any]) -> None:
    """Ray Train would checkpoint on each node's own disk: a local `cluster.storage` must be
    shared like the registry."""
    config = _config(cluster["tmp"], "dpunshared", num_tasks=1, steps=10)
    raw = yaml.safe_load(config.read_text())
    raw["train"]["data_parallel_workers"] = 2
    raw["cluster"]["storage"] = str(cluster["private"] / "ray-train")
    config.write_text(yaml.safe_dump(raw))
    driver = _train(cluster, config)
    assert driver.wait(timeout=300) == 2
    log = (cluster["tmp"] / "dpunshared.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: cluster.storage {cluster['private'] / 'ray-train'} is not shared by every "
        "node"), log[-3000:]
    assert cluster["hosts"].ip["b"] in errors[0] and "s3://" in errors[0]
    assert MaskRegistry(cluster["root"]).tasks("dpunshared") == []  # none trained


def test_a_killed_worker_node_is_survived_without_loss_or_duplicates(
        cluster: dict[str, Any], tmp_path: Path, one_thread: None) -> None:
    config = _config(cluster["tmp"], "survive", num_tasks=12, steps=120)
    driver = _train(cluster, config)
    registry = MaskRegistry(cluster["root"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        try:
            stored = registry.tasks("survive")
        except KeyError:
            stored = []
        if stored:
            break
        time.sleep(0.2)
    assert 0 < len(stored) < 12, stored  # the kill lands in the middle of the run
    os.kill(_raylet_pid(cluster["hosts"].ip["b"]), signal.SIGKILL)
    assert driver.wait(timeout=600) == 0, (cluster["tmp"] / "survive.log").read_text()[-3000:]
    names = [i.base_name for i in registry.store.listdir(registry.store.join("survive", "tasks"))]
    assert sorted(names) == [f"task-{t:07d}.parquet" for t in range(12)]  # once each, no extras
    assert registry.verify("survive").all_ok
    print("stored before the kill:", len(stored), "of 12")
    assert _bits(registry, "survive") == _reference_bits(config, tmp_path / "reference")
