"""Tests for pipeline.registry: real Parquet files under tmp_path, real supsup networks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.registry import (
    BankMismatchError,
    MaskRegistry,
    RegistryConflictError,
    RegistryCorruptError,
    export_bank,
    import_file,
    load_bank,
    row_checksum,
)
from supsup.masks import pack_bits
from supsup.networks import SupermaskNet, build_network
from supsup.scores import TaskScores
from tests.pipeline.racing import assert_one_winner_each, race

MASK_INFO = {"rule": "threshold"}
Packed = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def lenet() -> tuple[SupermaskNet, dict[int, dict[str, torch.Tensor]]]:
    """LeNet with 100 outputs and the (untrained, threshold) masks of tasks 0, 1, 2."""
    net = build_network(name="lenet", num_outputs=100)
    exported = TaskScores(net, [0, 1, 2]).export()
    return net, {t: masks for t, (masks, _) in exported.items()}


def _pack(masks: dict[str, torch.Tensor]) -> Packed:
    return {k: pack_bits(m).numpy() for k, m in masks.items()}


def _bank(root: Any, net: SupermaskNet, name: str = "b") -> MaskRegistry:
    reg = MaskRegistry(root)
    reg.create_bank(name, net.spec.to_dict(), net.layer_shapes(), net.bn_features(), MASK_INFO)
    return reg


def _filled(root: Any, lenet: tuple) -> MaskRegistry:
    net, masks = lenet
    reg = _bank(root, net)
    for t, m in masks.items():
        assert reg.write_task("b", t, _pack(m), metadata={"train_accuracy": 0.9 + t / 100}) == (
            "written")
    return reg


def _task_file(root: Path, bank: str, task_id: int) -> Path:
    return root / bank / "tasks" / f"task-{task_id:07d}.parquet"


def test_round_trip_is_bit_exact(tmp_path: Path, lenet: tuple) -> None:
    net, masks = lenet
    root = tmp_path / "reg"
    reg = MaskRegistry(root)
    assert not root.exists() and reg.banks() == []  # nothing is created before the first write
    reg = _filled(root, lenet)
    assert reg.banks() == ["b"] and reg.tasks("b") == [0, 1, 2]
    manifest = json.loads((root / "b" / "_manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["bank"] == "b"
    assert manifest["network"] == net.spec.to_dict() and manifest["mask"] == MASK_INFO
    assert manifest["layer_shapes"] == {  # keyed by the parameter each mask multiplies
        "fc1.weight": [300, 784], "fc2.weight": [100, 300], "fc3.weight": [100, 100]}

    rec = reg.read_task("b", 1)
    assert rec.task_id == 1 and rec.bn_stats == {} and rec.metadata == {"train_accuracy": 0.91}
    for k, m in masks[1].items():
        np.testing.assert_array_equal(rec.packed[k], np.packbits(m.numpy().astype(np.uint8)))
        assert rec.densities[k] == int(m.sum()) / m.numel()

    bank, spec = load_bank(reg.source("b"))
    assert spec == net.spec and bank.task_ids == [0, 1, 2]
    for t, layer_masks in masks.items():
        for k, m in layer_masks.items():
            assert torch.equal(bank.mask(t, k), m)
    sub, _ = load_bank(reg.source("b", task_ids=[2, 0]))
    assert sub.task_ids == [0, 2]  # a source lists its tasks in id order
    for k in masks[0]:
        assert torch.equal(sub.packed(k), bank.packed(k)[[0, 2]])


def test_bn_stats_round_trip_with_a_conv_net(tmp_path: Path) -> None:
    net = build_network(name="conv", input_shape=(1, 28, 28), width=4, num_outputs=10)
    exported = TaskScores(net, [3, 5]).export()
    gen = torch.Generator().manual_seed(0)
    stats = {
        t: {k: torch.stack([torch.randn(s.shape[1], generator=gen),
                            torch.rand(s.shape[1], generator=gen) + 0.1]) for k, s in bn.items()}
        for t, (_, bn) in exported.items()
    }
    reg = MaskRegistry(tmp_path)
    reg.create_bank("conv", net.spec, net.layer_shapes(), net.bn_features(), MASK_INFO)
    assert reg.manifest("conv")["bn_features"] == net.bn_features() != {}
    for t, (masks, _) in exported.items():
        reg.write_task("conv", t, _pack(masks), {k: v.numpy() for k, v in stats[t].items()})
    rec = reg.read_task("conv", 5)
    for k, s in stats[5].items():
        assert rec.bn_stats[k].dtype == np.float32
        np.testing.assert_array_equal(rec.bn_stats[k], s.numpy())
    bank, _ = load_bank(reg.source("conv"))
    for t, (masks, _) in exported.items():
        for k, s in stats[t].items():
            assert torch.equal(bank.bn_stats(t, k), s)
        for k, m in masks.items():
            assert torch.equal(bank.mask(t, k), m)


def test_rewrite_of_identical_masks_is_unchanged_and_keeps_metadata(
    tmp_path: Path, lenet: tuple
) -> None:
    _, masks = lenet
    reg = _filled(tmp_path, lenet)
    before = _task_file(tmp_path, "b", 0).read_bytes()
    assert reg.write_task("b", 0, _pack(masks[0]), metadata={"seconds": 3.0}) == "unchanged"
    assert _task_file(tmp_path, "b", 0).read_bytes() == before
    assert reg.read_task("b", 0).metadata == {"train_accuracy": 0.9}


def test_a_different_mask_for_a_stored_task_conflicts_and_keeps_the_file(
    tmp_path: Path, lenet: tuple
) -> None:
    _, masks = lenet
    reg = _filled(tmp_path, lenet)
    path = _task_file(tmp_path, "b", 1)
    before = path.read_bytes()
    other = _pack(masks[1])
    key = next(iter(other))
    other[key] = other[key].copy()
    other[key][0] ^= 0b1000_0000
    with pytest.raises(RegistryConflictError, match=(
            r"bank 'b' already holds task 1 with different masks; "
            r"the stored mask was kept.*new bank name \(e.g. 'b-v2'\)")):
        reg.write_task("b", 1, other)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "task-0000000.parquet", "task-0000001.parquet", "task-0000002.parquet"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_data_byte(path: Path) -> None:
    """Flip one byte inside the compressed page of the `data` column (past its page header)."""
    col = pq.ParquetFile(path).metadata.row_group(0).column(6)
    assert col.path_in_schema == "data"
    offset = col.data_page_offset + col.total_compressed_size - 16
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _rewrite_with_changed_mask(path: Path) -> None:
    """A well-formed Parquet file (metadata kept) whose first mask no longer fits its checksum."""
    kv = {k: v for k, v in pq.ParquetFile(path).metadata.metadata.items()
          if k != b"ARROW:schema"}
    table = pq.read_table(path)
    data = table.column("data").to_pylist()
    data[0] = bytes([data[0][0] ^ 0x01]) + data[0][1:]
    table = table.set_column(6, "data", pa.array(data, pa.binary()))
    pq.write_table(table.replace_schema_metadata(kv), path)


@pytest.mark.parametrize("damage, problem", [
    (_truncate, "unreadable or truncated Parquet file"),
    (_flip_data_byte, "unreadable or truncated Parquet file"),
    (_rewrite_with_changed_mask, r"checksum mismatch in the mask of layer '.+'"),
])
def test_damaged_files_are_reported_by_verify_and_raise_on_read(
    tmp_path: Path, lenet: tuple, damage: Callable[[Path], None], problem: str
) -> None:
    reg = _filled(tmp_path, lenet)
    damage(_task_file(tmp_path, "b", 1))
    report = reg.verify("b")
    assert report.ok == [0, 2] and list(report.problems) == [1] and not report.all_ok
    assert "task-0000001.parquet" in report.problems[1]
    with pytest.raises(RegistryCorruptError, match=rf"task-0000001\.parquet: {problem}.*"
                                                   r"supsup registry verify"):
        reg.read_task("b", 1)
    with pytest.raises(RegistryCorruptError, match=problem):
        load_bank(reg.source("b"))
    with pytest.raises(RegistryCorruptError, match=problem):
        reg.write_task("b", 1, _pack(lenet[1][1]))
    assert reg.read_task("b", 2).task_id == 2


def test_verify_lists_stray_temp_files_and_tasks_ignores_them(tmp_path: Path, lenet: tuple) -> None:
    reg = _filled(tmp_path, lenet)
    (tmp_path / "b" / "tasks" / ".task-0000009.parquet.tmp-dead").write_bytes(b"partial")
    assert reg.tasks("b") == [0, 1, 2]
    report = reg.verify("b")
    assert report.all_ok and report.ok == [0, 1, 2]
    assert report.temporary == ["tasks/.task-0000009.parquet.tmp-dead"] and report.foreign == []


def test_a_missing_layer_row_is_reported(tmp_path: Path, lenet: tuple) -> None:
    reg = _filled(tmp_path, lenet)
    path = _task_file(tmp_path, "b", 2)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)
    assert "missing layer rows" in reg.verify("b").problems[2]
    with pytest.raises(RegistryCorruptError, match=r"missing layer rows: \['mask .+'\]"):
        reg.read_task("b", 2)


def _drop_layer(p: Packed) -> Packed:
    return dict(list(p.items())[1:])


def _short(p: Packed) -> Packed:
    k = next(iter(p))
    return {**p, k: p[k][:-1]}


def _unpacked(p: Packed) -> Packed:
    k = next(iter(p))
    return {**p, k: np.unpackbits(p[k]).astype(np.float32)}


def _two_dim(p: Packed) -> Packed:
    k = next(iter(p))
    return {**p, k: p[k].reshape(2, -1)}


def _extra(p: Packed) -> Packed:
    return {**p, "head": p[next(iter(p))]}


@pytest.mark.parametrize("mutate, error, match", [
    (_drop_layer, KeyError, r"task 0: no packed mask for layers \['.+'\] of bank 'b'"),
    (_short, ValueError, r"has \d+ bytes, expected \d+ = ceil\(\d+ weights of shape"),
    (_unpacked, ValueError, r"is float32 of shape \(\d+,\); pack the flattened 0/1 mask"),
    (_two_dim, ValueError, r"is uint8 of shape \(2, \d+\); pack the flattened 0/1 mask"),
    (_extra, ValueError, r"layers \['head'\] are not masked layers of bank 'b'"),
])
def test_bad_masks_raise_before_touching_disk(
    tmp_path: Path, lenet: tuple, mutate: Callable[[Packed], Packed], error: type, match: str
) -> None:
    net, masks = lenet
    reg = _bank(tmp_path, net)
    with pytest.raises(error, match=match):
        reg.write_task("b", 0, mutate(_pack(masks[0])))
    assert reg.tasks("b") == [] and not (tmp_path / "b" / "tasks").exists()


def test_padding_bits_and_bn_inputs_are_checked(tmp_path: Path) -> None:
    net = build_network(name="conv", input_shape=(1, 28, 28), width=4, num_outputs=10)
    reg = MaskRegistry(tmp_path)
    # a layer whose weight count is not a multiple of 8, to exercise the padding check
    reg.create_bank("odd", net.spec, {"w": (3, 3)}, {"bn": 2}, MASK_INFO)
    ok = {"w": np.packbits(np.ones(9, np.uint8))}
    with pytest.raises(ValueError, match="padding bits set past its last weight"):
        reg.write_task("odd", 0, {"w": np.array([255, 255], np.uint8)}, {"bn": np.ones((2, 2))})
    with pytest.raises(ValueError, match=r"bank 'odd' has BatchNorm layers \['bn'\]"):
        reg.write_task("odd", 0, ok)
    with pytest.raises(ValueError, match=r"BN stats of layer 'bn' have shape \(2, 3\), "
                                         r"expected \(2, 2\)"):
        reg.write_task("odd", 0, ok, {"bn": np.ones((2, 3))})
    with pytest.raises(ValueError, match="are not all finite"):
        reg.write_task("odd", 0, ok, {"bn": np.array([[0.0, 1.0], [np.nan, 1.0]])})
    with pytest.raises(ValueError, match="task 0 metadata must be JSON-serialisable"):
        reg.write_task("odd", 0, ok, {"bn": np.ones((2, 2))}, metadata={"x": object()})
    assert reg.write_task("odd", 0, ok, {"bn": np.ones((2, 2))}) == "written"
    assert reg.read_task("odd", 0).densities == {"w": 1.0}


def test_bank_and_task_errors_name_what_to_do(tmp_path: Path, lenet: tuple) -> None:
    net, masks = lenet
    reg = _filled(tmp_path, lenet)
    spec = {**net.spec.to_dict(), "seed": 1}
    with pytest.raises(BankMismatchError, match=r"bank 'b' in .* was made with a different "
                       r"configuration: network.seed: bank has 0, given 1\..*new bank name"):
        reg.create_bank("b", spec, net.layer_shapes(), {}, MASK_INFO)
    with pytest.raises(BankMismatchError, match=r"layer_shapes.x.weight: bank has <absent>, "
                       r"given \[4\]; mask.rule: bank has threshold, given topk"):
        reg.create_bank("b", net.spec, {"x": [4]}, {}, {"rule": "topk"})
    reg.create_bank("b", net.spec, net.layer_shapes(), None, MASK_INFO)  # identical: a no-op
    with pytest.raises(KeyError, match=r"no bank 'nope' in the registry at .*; banks present: "
                                       r"\['b'\]"):
        reg.write_task("nope", 0, _pack(masks[0]))
    with pytest.raises(KeyError, match="no bank 'nope'"):
        reg.source("nope")
    with pytest.raises(KeyError, match=r"bank 'b' in .* lacks tasks \[5, 9\]; it holds "
                                       r"tasks \[0, 1, 2\]"):
        reg.source("b", task_ids=[0, 5, 9])
    with pytest.raises(KeyError, match=r"bank 'b' in .* lacks tasks \[7\]"):
        reg.read_task("b", 7)
    with pytest.raises(ValueError, match="bank name '../up' is not allowed"):
        reg.create_bank("../up", net.spec, net.layer_shapes(), {}, MASK_INFO)
    with pytest.raises(ValueError, match="task_id must be a non-negative integer, got -1"):
        reg.write_task("b", -1, _pack(masks[0]))
    with pytest.raises(ValueError, match="unknown network 'nonet'"):
        reg.create_bank("c", {"name": "nonet"}, net.layer_shapes(), {}, MASK_INFO)


def test_export_import_round_trip(tmp_path: Path, lenet: tuple) -> None:
    net, masks = lenet
    reg = _filled(tmp_path / "a", lenet)
    dest = tmp_path / "out" / "b.parquet"
    exported = export_bank(reg, "b", dest)
    assert exported == reg.source("b")  # the pass yields exactly what the bank holds
    assert dest.is_file() and not [p for p in dest.parent.iterdir() if p != dest]
    with pytest.raises(FileExistsError, match="exists; choose another path"):
        export_bank(reg, "b", dest)
    kv = pq.read_metadata(dest).metadata  # the file and its identity travel together
    assert json.loads(kv[b"supsup.manifest"])["network"] == net.spec.to_dict()
    assert kv[b"supsup.snapshot_sha256"].decode() == exported.snapshot_sha256

    from_file = exported.with_location(export=str(dest))
    bank, _ = load_bank(from_file)
    other = MaskRegistry(tmp_path / "z")
    result = import_file(other, dest)
    assert (result.bank, result.written, result.unchanged) == ("b", [0, 1, 2], [])
    assert import_file(other, dest).unchanged == [0, 1, 2]
    assert other.source("b").snapshot_sha256 == exported.snapshot_sha256
    assert other.read_task("b", 2).metadata == {"train_accuracy": 0.92}
    for t, layer_masks in masks.items():
        for k, m in layer_masks.items():
            assert torch.equal(bank.mask(t, k), m)

    one = export_bank(reg, "b", tmp_path / "one.parquet", task_ids=[1])
    assert one.task_ids == (1,) and one.snapshot_sha256 != exported.snapshot_sha256
    renamed = import_file(reg, tmp_path / "one.parquet", "b-copy")
    assert renamed.written == [1] and reg.tasks("b-copy") == [1]
    assert reg.source("b-copy").snapshot_sha256 == one.snapshot_sha256  # names are not content
    with pytest.raises(ValueError, match="is not a mask bank file"):
        import_file(reg, _task_file(tmp_path / "a", "b", 0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_file(reg, tmp_path / "missing.parquet")

    clash = _bank(tmp_path / "c", net)
    clash.write_task("b", 0, _pack(masks[1]))
    with pytest.raises(RegistryConflictError, match="already holds task 0"):
        import_file(clash, dest)

    _rewrite_with_changed_mask(dest)
    with pytest.raises(RegistryCorruptError, match="checksum mismatch.*export it again"):
        import_file(MaskRegistry(tmp_path / "d"), dest)
    with pytest.raises(RegistryCorruptError, match="checksum mismatch"):
        load_bank(from_file)


def test_a_source_pins_content_and_survives_growth(tmp_path: Path, lenet: tuple) -> None:
    net, masks = lenet
    reg = _bank(tmp_path, net)
    reg.write_task("b", 0, _pack(masks[0]))
    first = reg.source("b")
    assert first.task_ids == (0,) and first.root == str(tmp_path)
    assert reg.source("b") == first
    reg.write_task("b", 1, _pack(masks[1]))
    second = reg.source("b")
    assert second.task_ids == (0, 1) and second.snapshot_sha256 != first.snapshot_sha256
    assert second.manifest_sha256 == first.manifest_sha256
    bank, _ = load_bank(first)  # the bank grew; the pinned content is still there
    assert bank.task_ids == [0]
    forged = first.restricted([0, 1], first.snapshot_sha256)
    with pytest.raises(BankMismatchError, match=r"the masks there hash to .*refused"):
        load_bank(forged)
    _task_file(tmp_path, "b", 0).unlink()
    with pytest.raises(BankMismatchError, match=r"lacks tasks \[0\].*no longer holds"):
        load_bank(first)


def test_row_checksum_covers_every_field() -> None:
    base = row_checksum(3, "body.1", "mask", (4, 2), b"\x0f")
    assert len(base) == 64
    assert len({base, row_checksum(4, "body.1", "mask", (4, 2), b"\x0f"),
                row_checksum(3, "body.3", "mask", (4, 2), b"\x0f"),
                row_checksum(3, "body.1", "bn", (4, 2), b"\x0f"),
                row_checksum(3, "body.1", "mask", (2, 4), b"\x0f"),
                row_checksum(3, "body.1", "mask", (4, 2), b"\x1f")}) == 6


@pytest.mark.parametrize("scheme", ["file", "mock"])
def test_uri_roots(tmp_path: Path, lenet: tuple, scheme: str) -> None:
    _, masks = lenet
    root = f"file://{tmp_path}/reg" if scheme == "file" else "mock:///reg"
    reg = _filled(root, lenet)
    k = next(iter(masks[0]))
    np.testing.assert_array_equal(reg.read_task("b", 2).packed[k], _pack(masks[2])[k])
    assert reg.source("b").task_ids == (0, 1, 2)
    changed = _pack(masks[1])
    with pytest.raises(RegistryConflictError, match="already holds task 0"):
        reg.write_task("b", 0, changed)
    assert reg.verify("b").ok == [0, 1, 2]
    if scheme == "file":  # the URI maps onto the local folder (mock:// lives in one instance)
        assert MaskRegistry(tmp_path / "reg").tasks("b") == [0, 1, 2]
        bank, _ = load_bank(reg.source("b"))
        assert torch.equal(bank.mask(2, k), masks[2][k])


RACED_TASKS = tuple(range(7, 31))  # many rounds: one lucky ordering cannot hide a race


def test_concurrent_writers_of_one_task_exactly_one_wins(tmp_path: Path, lenet: tuple) -> None:
    net, _ = lenet
    for n in net.layer_shapes().values():  # the child draws whole bytes: no padding bits
        assert np.prod(n) % 8 == 0
    _bank(tmp_path, net)
    outcomes = race(str(tmp_path), RACED_TASKS)
    reg = MaskRegistry(tmp_path)
    report = reg.verify("b")
    assert report.ok == list(RACED_TASKS) and report.temporary == [] == report.foreign
    assert_one_winner_each(reg, outcomes)
    assert sorted(os.listdir(tmp_path / "b" / "tasks")) == [
        f"task-{t:07d}.parquet" for t in RACED_TASKS]


RECIPE = {"steps": 20, "optimizer": "rmsprop", "lr": 1e-4, "batch_size": 128,
          "precision": "fp32", "fused": False}


def _old_format_hash(manifest: dict[str, Any]) -> str:
    """The manifest hash as it was computed before recipes were recorded."""
    import hashlib

    core = {k: manifest[k] for k in ("format", "network", "layer_shapes", "bn_features", "mask")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_the_recipe_enters_the_manifest_hash_only_when_recorded(
        tmp_path: Path, lenet: tuple) -> None:
    net = lenet[0]
    reg = MaskRegistry(tmp_path)
    args = (net.spec, net.layer_shapes(), net.bn_features(), MASK_INFO)
    old = reg.create_bank("old", *args)
    new = reg.create_bank("new", *args, RECIPE)
    other = reg.create_bank("other", *args, {**RECIPE, "steps": 10})
    assert "recipe" not in old and new["recipe"] == RECIPE
    assert old["manifest_sha256"] == _old_format_hash(old)  # old banks keep their hash
    hashes = {old["manifest_sha256"], new["manifest_sha256"], other["manifest_sha256"]}
    assert len(hashes) == 3
    on_disk = json.loads((tmp_path / "new" / "_manifest.json").read_text())
    assert on_disk["recipe"] == RECIPE


def test_another_recipe_is_refused_naming_both_values_and_a_new_bank(
        tmp_path: Path, lenet: tuple) -> None:
    net, masks = lenet
    reg = MaskRegistry(tmp_path)
    args = (net.spec, net.layer_shapes(), net.bn_features(), MASK_INFO)
    reg.create_bank("b", *args, RECIPE)
    reg.write_task("b", 0, _pack(masks[0]))
    before = _files(tmp_path)
    with pytest.raises(BankMismatchError, match=(
            r"bank 'b' in .* was trained with another recipe: train.lr: bank has 0.0001, given "
            r"0.001; train.steps: bank has 20, given 10\. .*--set registry.bank=b-lr0.001")):
        reg.create_bank("b", *args, {**RECIPE, "steps": 10, "lr": 1e-3})
    assert reg.create_bank("b", *args, RECIPE)["recipe"] == RECIPE
    assert reg.create_bank("b", *args)["recipe"] == RECIPE  # evaluation does not compare it
    assert _files(tmp_path) == before


def test_a_bank_written_before_recipes_loads_verifies_and_is_not_grown(
        tmp_path: Path, lenet: tuple) -> None:
    net, masks = lenet
    reg = MaskRegistry(tmp_path)
    (tmp_path / "old").mkdir()
    old_manifest = {  # the manifest format as written before recipes were recorded
        "format": 2, "bank": "old", "network": net.spec.to_dict(),
        "layer_shapes": {f"{k}.weight": list(s) for k, s in net.layer_shapes().items()},
        "bn_features": {}, "mask": MASK_INFO, "created": "2026-01-01T00:00:00+00:00"}
    (tmp_path / "old" / "_manifest.json").write_text(json.dumps(old_manifest, indent=1))
    for t in (0, 1):
        reg.write_task("old", t, _pack(masks[t]))
    source = reg.source("old")
    assert source.manifest_sha256 == _old_format_hash(old_manifest)
    bank, _ = load_bank(source)
    assert bank.task_ids == [0, 1]
    report = reg.verify("old")
    assert report.all_ok and report.ok == [0, 1] and report.recipe is None
    before = _files(tmp_path)
    args = (net.spec, net.layer_shapes(), net.bn_features(), MASK_INFO)
    with pytest.raises(BankMismatchError, match=(
            r"bank 'old' in .* was written before training recipes were recorded, so how its "
            r"masks were trained is unknown .*--set registry.bank=old-v2")):
        reg.create_bank("old", *args, RECIPE)
    assert reg.create_bank("old", *args)["manifest_sha256"] == source.manifest_sha256
    assert _files(tmp_path) == before


def test_a_task_file_of_a_bank_with_another_recipe_is_never_adopted(
        tmp_path: Path, lenet: tuple) -> None:
    net, masks = lenet
    args = (net.spec, net.layer_shapes(), net.bn_features(), MASK_INFO)
    mine, theirs = MaskRegistry(tmp_path / "mine"), MaskRegistry(tmp_path / "theirs")
    mine.create_bank("b", *args, RECIPE)
    theirs.create_bank("b", *args, {**RECIPE, "steps": 10})  # same name, seed and network
    mine.write_task("b", 0, _pack(masks[0]))
    theirs.write_task("b", 1, _pack(masks[1]))
    copied = _task_file(tmp_path / "mine", "b", 1)
    copied.write_bytes(_task_file(tmp_path / "theirs", "b", 1).read_bytes())
    report = mine.verify("b")
    assert not report.all_ok and report.ok == [0]
    assert str(copied) in report.problems[1] and "written under manifest" in report.problems[1]
    with pytest.raises(BankMismatchError, match=r"the task files of tasks \[1\] were written"):
        mine.source("b")
    with pytest.raises(RegistryCorruptError, match=str(copied)):
        mine.read_task("b", 1)


def test_an_import_keeps_recipes_apart(tmp_path: Path, lenet: tuple) -> None:
    net, masks = lenet
    args = (net.spec, net.layer_shapes(), net.bn_features(), MASK_INFO)
    src = MaskRegistry(tmp_path / "src")
    src.create_bank("b", *args, RECIPE)
    src.write_task("b", 0, _pack(masks[0]))
    src.create_bank("old", *args)
    src.write_task("old", 0, _pack(masks[0]))
    with_recipe = export_bank(src, "b", tmp_path / "b.parquet")
    export_bank(src, "old", tmp_path / "old.parquet")
    dest = MaskRegistry(tmp_path / "dest")
    assert import_file(dest, tmp_path / "b.parquet").written == [0]
    assert dest.manifest("b")["recipe"] == RECIPE
    assert dest.source("b").snapshot_sha256 == with_recipe.snapshot_sha256
    with pytest.raises(BankMismatchError, match="the masks given record no recipe"):
        import_file(dest, tmp_path / "old.parquet", "b")
    other = MaskRegistry(tmp_path / "other")
    other.create_bank("b", *args, {**RECIPE, "steps": 10})
    with pytest.raises(BankMismatchError, match="train.steps: bank has 10, given 20"):
        import_file(other, tmp_path / "b.parquet")
    assert dest.tasks("b") == [0] and other.tasks("b") == []
