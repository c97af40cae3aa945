"""The bank folder as files other tools read, and publication reading each task file once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import parse_config
from pipeline.publish import publish_bank
from pipeline.registry import MaskRegistry, load_bank
from pipeline.registry.store import READS
from pipeline.tracking import Tracker
from supsup.masks import pack_bits
from supsup.networks import build_network
from supsup.scores import TaskScores


def _random_bank(root: Path, bank: str, num_tasks: int, num_outputs: int = 100) -> MaskRegistry:
    """A LeNet bank of `num_tasks` random packed masks (no training: the files are the point)."""
    net = build_network(name="lenet", num_outputs=num_outputs)
    registry = MaskRegistry(root)
    registry.create_bank(bank, net.spec, net.layer_shapes(), {}, {"rule": "threshold"})
    rng = np.random.default_rng(0)
    for t in range(num_tasks):
        packed = {k: rng.integers(0, 256, (int(np.prod(s)) + 7) // 8, dtype=np.uint8)
                  for k, s in net.layer_shapes().items()}
        registry.write_task(bank, t, packed, metadata={"train_accuracy": 0.5})
    return registry


def test_the_bank_folder_is_a_parquet_dataset(tmp_path: Path) -> None:
    registry = _random_bank(tmp_path, "b", 5)
    (tmp_path / "b" / "tasks" / ".task-0000009.parquet.tmp-dead").write_bytes(b"partial")
    table = ds.dataset(tmp_path / "b", format="parquet").to_table()
    assert table.num_rows == 5 * 3  # three masked layers per task; manifest and temp skipped
    assert sorted(set(table.column("task_id").to_pylist())) == [0, 1, 2, 3, 4]
    assert set(table.column("layer").to_pylist()) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert registry.tasks("b") == [0, 1, 2, 3, 4]


def test_a_mask_decodes_with_numpy_alone_from_the_schema_metadata(tmp_path: Path) -> None:
    net = build_network(name="lenet", num_outputs=10)
    masks = TaskScores(net, [3]).export()[3][0]
    registry = MaskRegistry(tmp_path)
    registry.create_bank("b", net.spec, net.layer_shapes(), {}, {"rule": "threshold"})
    registry.write_task("b", 3, {k: pack_bits(m).numpy() for k, m in masks.items()})
    path = tmp_path / "b" / "tasks" / "task-0000003.parquet"
    pf = pq.ParquetFile(path)
    packing = pf.schema_arrow.field("data").metadata[b"packing"].decode()
    covers = pf.schema_arrow.field("sha256").metadata[b"covers"].decode()
    assert "most significant bit" in packing and "row-major" in packing
    assert "json.dumps([task_id, layer, kind, shape])" in covers
    manifest = json.loads((tmp_path / "b" / "_manifest.json").read_text())
    kv = pf.metadata.metadata
    assert kv[b"supsup.bank"] == b"b" and kv[b"supsup.task_id"] == b"3"
    assert len(kv[b"supsup.manifest_sha256"]) == 64
    for row in pf.read().to_pylist():
        assert row["kind"] == "mask"
        shape = manifest["layer_shapes"][row["layer"]]
        assert shape == row["shape"]
        # What the metadata says, with numpy: MSB-first bits, row-major, zero padding.
        bits = np.unpackbits(np.frombuffer(row["data"], np.uint8), bitorder="big")
        mask = bits[: int(np.prod(shape))].reshape(shape)
        assert not bits[int(np.prod(shape)):].any()
        layer = row["layer"].removesuffix(".weight")
        np.testing.assert_array_equal(mask, masks[layer].numpy().astype(np.uint8))
        header = json.dumps([3, row["layer"], "mask", shape]).encode()
        assert hashlib.sha256(header + b"\n" + row["data"]).hexdigest() == row["sha256"]


@pytest.mark.slow
def test_publication_of_250_tasks_reads_each_task_file_once(tmp_path: Path) -> None:
    registry = _random_bank(tmp_path / "registry", "pub", 250, num_outputs=500)
    config = parse_config({
        "name": "pub", "output_dir": str(tmp_path / "runs"),
        "network": {"name": "lenet", "num_outputs": 500},
        "registry": {"root": str(tmp_path / "registry")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    tracker = Tracker(config.tracking_uri, "pub")
    READS.clear()
    with tracker.run("train") as run_id:
        publication = publish_bank(config, tracker, run_id)
    task_reads = {p: n for p, n in READS.items() if "/tasks/" in p}
    assert len(task_reads) == 250 and set(task_reads.values()) == {1}
    assert publication.registration.created and publication.registration.version == 1
    assert publication.source == registry.source("pub")
    versions = MlflowClient(config.tracking_uri).search_model_versions("name = 'pub'")
    assert [mv.tags["supsup.embedded"] for mv in versions] == ["true"]  # 250 x 39 kB embeds

    READS.clear()
    with tracker.run("again") as run_id:
        again = publish_bank(config, tracker, run_id)
    assert (again.registration.version, again.registration.created) == (1, False)
    assert set(n for p, n in READS.items() if "/tasks/" in p) == {1}

    pinned = config.model_copy(update={"tracking": config.tracking.model_copy(update={
        "model_name": "pub-pinned", "embed_masks_max_bytes": 0})})
    READS.clear()
    with tracker.run("pinned") as run_id:  # masks left in the registry: still one read each
        assert publish_bank(pinned, tracker, run_id).registration.created
    assert len(READS) > 250 and set(n for p, n in READS.items() if "/tasks/" in p) == {1}
    pinned_version = MlflowClient(config.tracking_uri).get_model_version("pub-pinned", "1")
    assert pinned_version.tags["supsup.embedded"] == "false"

    bank, _ = load_bank(again.source)
    assert bank.task_ids == list(range(250))
    assert torch.equal(bank.packed("fc1")[7], torch.from_numpy(
        registry.read_task("pub", 7).packed["fc1"]))
