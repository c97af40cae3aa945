"""`supsup serve MODEL_URI`: check the version, deploy it on Ray Serve, print where, block.

The version is resolved and its masks loaded once here, through `load_bank` (snapshot checked),
before Ray starts: a version whose snapshot the mask registry no longer holds is refused with one
error line and nothing is served. Ray is local, or the cluster `--address` / cluster.address /
RAY_ADDRESS names, as for the other commands. Ctrl-C (or SIGTERM) stops serving: a local Ray and
its Serve are shut down; on a joined cluster only this application is deleted.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

from pipeline.config.sections import ServeSection

log = logging.getLogger("supsup")

_POLL_S = 1.0


def _load_config(config_path: str | None, overrides: tuple[str, ...]) -> Any:
    """The config file with its overrides, or the defaults with `--set` overrides alone (only
    the serve and cluster sections matter here)."""
    from pipeline.config import load_config, parse_config

    if config_path:
        return load_config(config_path, list(overrides))
    return parse_config({}, "--set", list(overrides))


def check_port_free(host: str, port: int) -> None:
    """ValueError naming serve.port when this machine cannot listen there (another server holds
    it): Ray Serve's proxy would otherwise retry the port in the background while nothing
    answers."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # as servers bind: a port whose old connections linger in TIME_WAIT is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"serve.port {port} on {host} is not free ({exc.strerror}); stop "
                             "what listens there or choose another, e.g. --set "
                             f"serve.port={port + 1}") from None


def checked_version(model_uri: str, tracking_uri: str, whole: bool = True) -> Any:
    """The ServedVersion of `model_uri` (an alias resolves to its version number now), after
    loading its masks once (`whole`), or, for a bank served by shards, after hashing its tasks'
    checksums without holding the masks: BankMismatchError naming the bank when the registry
    no longer holds the version's snapshot."""
    from pipeline.registry import check_snapshot, load_bank, read_manifest
    from pipeline.serve.app import ServedVersion
    from pipeline.serve.shards import range_checksums
    from pipeline.tracking.pyfunc import input_normalization
    from pipeline.tracking.versions import model_source
    from supsup.networks import NetworkSpec

    with tempfile.TemporaryDirectory(prefix="supsup-serve-") as tmp:
        info, source = model_source(model_uri, tracking_uri, tmp)
        if whole:
            _, spec = load_bank(source)
        else:
            spec = NetworkSpec.from_dict(read_manifest(source)["network"])
            checks = range_checksums(source, source.task_ids)
            check_snapshot(source, checks, "its tasks' checksums")
    return ServedVersion(
        model_uri=info["model_uri"], tracking_uri=tracking_uri,
        snapshot=source.snapshot_sha256, tasks=source.num_tasks,
        input_shape=tuple(spec.input_shape),
        # what registration records in model.json, from the bank's (hashed) manifest
        input_norm=input_normalization(info["mask"].get("dataset")),
        # each row's own task unless a request asks otherwise, also for versions registered
        # when the evaluation's mode was recorded as the served one
        defaults={**info["inference_defaults"], "mode": "per_example"})


def cmd_serve(model_uri: str, tracking_uri: str | None, config_path: str | None,
              overrides: tuple[str, ...], address: str | None) -> int:
    """Serve MODEL_URI until interrupted; 0 once stopped."""
    from pipeline.cluster import cluster_address, ray_session
    from pipeline.command_setup import resolve_tracking_uri

    config = _load_config(config_path, overrides)
    settings: ServeSection = config.serve
    joined = cluster_address(config.cluster, address) is not None
    if not joined:  # on a cluster, the proxy listens on the cluster's nodes
        check_port_free(settings.host, settings.port)
    uri = resolve_tracking_uri(tracking_uri, config_path, overrides)
    version = checked_version(model_uri, uri, whole=settings.shards == 1)
    with ray_session(config.cluster, address):
        from ray import serve

        from pipeline.serve.app import build_app

        name = version.model_uri.removeprefix("models:/").replace("/", "-v")
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(version, settings), name=name, route_prefix="/")
        url = f"http://{settings.host}:{settings.port}"
        print(f"serving {version.model_uri} (snapshot {version.snapshot[:12]}, "
              f"{version.tasks} tasks) at {url}/invocations; health: {url}/health; "
              "Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(_POLL_S)
        except KeyboardInterrupt:
            log.info("stopping %s", name)
        finally:
            if joined:  # the cluster's Serve keeps running, with its other applications
                serve.delete(name)
            else:
                serve.shutdown()
    print(f"stopped serving {version.model_uri}", flush=True)
    return 0
