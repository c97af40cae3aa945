"""Which network interface gloo uses on each node of a multi-node Ray Train run.

torch's gloo binds each rank to the address its host name resolves to. Many Debian and Ubuntu
images and most containers map the host name to 127.0.0.1 or 127.0.1.1 in /etc/hosts, so gloo
binds to loopback, advertises that address, and ranks on other nodes cannot connect: Ray Train
then only reports a generic worker failure after its retries. Where that is the case and
GLOO_SOCKET_IFNAME is unset, the interface that holds the Ray node's IP is the one the other
nodes reach; the driver finds it on every node before training, and the workers set it before
Ray Train creates the process group.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from pipeline.cluster import alive_nodes

log = logging.getLogger(__name__)

ENV = "GLOO_SOCKET_IFNAME"
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (primary) IPv4 address


def interface_of(ip: str) -> str | None:
    """The name of this machine's network interface whose IPv4 address is `ip`, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR,
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:  # an interface without an IPv4 address
                continue
            if socket.inet_ntoa(answer[20:24]) == ip:
                return name
    return None


def host_address() -> str | None:
    """The address this machine's host name resolves to (where gloo binds), None if none."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def _loopback(address: str | None) -> bool:
    try:
        return address is None or ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def node_interface(node_ip: str) -> tuple[str | None, str | None]:
    """(interface gloo must use here, problem): (None, None) where gloo's default works or
    GLOO_SOCKET_IFNAME is already set; runs on the node in question."""
    host = host_address()
    if os.environ.get(ENV) or not _loopback(host) or _loopback(node_ip):
        return None, None
    name = interface_of(node_ip)
    if name is not None:
        return name, None
    return None, (f"its host name {socket.gethostname()} resolves to {host or 'nothing'} and no "
                  f"interface holds its Ray node IP {node_ip}")


def _probe() -> tuple[str, str | None, str | None]:
    """Runs on one node: its Ray IP and `node_interface` there."""
    import ray.util

    ip = ray.util.get_node_ip_address()
    return (ip, *node_interface(ip))


def node_interfaces() -> dict[str, str]:
    """Ray node IP -> the interface gloo must use there, for each node that needs one.

    Empty on a one-node cluster, where every rank reaches the others through loopback. A
    ValueError, before any training, names the nodes where the interface cannot be found.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) <= 1:
        return {}
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    found = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in nodes], timeout=120)
    problems = [f"node {ip}: {problem}" for ip, _, problem in found if problem]
    if problems:
        more = f"; and {len(problems) - 3} more nodes" if len(problems) > 3 else ""
        raise ValueError(
            f"gloo cannot pick the network interface that other nodes reach "
            f"({'; '.join(problems[:3])}{more}): set {ENV} to that interface (e.g. eth0, see "
            "`ip -brief addr`) in the environment of `ray start` on those nodes, or map the "
            "host name to the node's IP in /etc/hosts")
    interfaces = {ip: name for ip, name, _ in found if name}
    if interfaces:
        log.info("host names resolve to loopback; gloo uses %s", ", ".join(
            f"{ENV}={name} on {ip}" for ip, name in sorted(interfaces.items())))
    return interfaces


def _use_interface(interfaces: dict[str, str]) -> None:
    """Runs in each Ray Train worker, before the process group: this node's interface, if any."""
    import ray.util

    name = interfaces.get(ray.util.get_node_ip_address())
    if name:
        os.environ.setdefault(ENV, name)


class _NodeInterfaceBackend(_TorchBackend):
    """Ray Train's torch backend, setting each worker's GLOO_SOCKET_IFNAME first: the process
    group is created in `on_start`, before the training function runs."""

    def on_start(self, worker_group: Any, backend_config: NodeInterfaceTorchConfig) -> None:
        if backend_config.interfaces:
            worker_group.execute(_use_interface, backend_config.interfaces)
        super().on_start(worker_group, backend_config)


@dataclass
class NodeInterfaceTorchConfig(TorchConfig):
    """TorchConfig with the interface gloo uses on each node (`node_interfaces()`)."""

    interfaces: dict[str, str] = field(default_factory=dict)

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _NodeInterfaceBackend
