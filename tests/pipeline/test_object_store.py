"""The mask registry on object storage: an S3-protocol server on loopback (moto's server mode),
reached through pyarrow's S3 client, with first-writer-wins through conditional writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.registry import (
    MaskRegistry,
    RegistryConflictError,
    export_bank,
    import_file,
    load_bank,
)
from supsup.masks import pack_bits
from supsup.networks import build_network
from supsup.scores import TaskScores
from tests.pipeline.racing import assert_one_winner_each, race

pytestmark = pytest.mark.cluster
BUCKET = "supsup-registry"
RACED_TASKS = tuple(range(12))


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with one bucket; credentials only in the environment."""
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_a_bank_round_trips_through_s3(s3: str, tmp_path: Path) -> None:
    net = build_network(name="lenet", num_outputs=100)
    masks = {t: m for t, (m, _) in TaskScores(net, [0, 1, 2]).export().items()}
    registry = MaskRegistry(f"{s3}/roundtrip")
    assert registry.store.exclusive  # conditional writes, not write-then-verify
    registry.create_bank("b", net.spec, net.layer_shapes(), {}, {"rule": "threshold"})
    for t, m in masks.items():
        packed = {k: pack_bits(v).numpy() for k, v in m.items()}
        assert registry.write_task("b", t, packed) == "written"
        assert registry.write_task("b", t, packed) == "unchanged"
    assert registry.banks() == ["b"] and registry.tasks("b") == [0, 1, 2]
    report = registry.verify("b")
    assert report.all_ok and report.ok == [0, 1, 2] and not report.temporary
    bank, spec = load_bank(registry.source("b"))
    assert spec == net.spec
    for t, m in masks.items():
        for k, v in m.items():
            assert torch.equal(bank.mask(t, k), v)
    other = {k: pack_bits(1 - v).numpy() for k, v in masks[1].items()}
    with pytest.raises(RegistryConflictError, match="already holds task 1"):
        registry.write_task("b", 1, other)
    source = export_bank(registry, "b", tmp_path / "b.parquet")
    local = MaskRegistry(tmp_path / "local")
    assert import_file(local, tmp_path / "b.parquet").written == [0, 1, 2]
    assert local.source("b").snapshot_sha256 == source.snapshot_sha256


def test_two_writers_racing_on_s3_exactly_one_wins(s3: str) -> None:
    root = f"{s3}/race"
    net = build_network(name="lenet", num_outputs=100)
    MaskRegistry(root).create_bank("b", net.spec, net.layer_shapes(), {}, {"rule": "threshold"})
    outcomes = race(root, RACED_TASKS)
    registry = MaskRegistry(root)
    report = registry.verify("b")
    assert report.ok == list(RACED_TASKS) and not report.temporary and not report.foreign
    assert_one_winner_each(registry, outcomes)
