"""Preflight: a run that cannot fit or cannot write is refused before anything is created."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from pipeline.config import ExperimentConfig, load_config, parse_config
from pipeline.datasets import load_dataset
from pipeline.preflight import (
    BANK_GROWTH_FACTOR,
    BOOKKEEPING_BYTES_PER_TASK,
    MEMORY_FRACTION,
    NATIVE_IMAGES,
    available_memory,
    check_before_side_effects,
    check_registry_exists,
    check_store_exists,
    estimate_memory,
    input_shape,
    masked_sizes,
)
from supsup.bank import MaskBank
from supsup.networks import build_network

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
GIB = 2**30


def config_in(folder: Path, *overrides: str, name: str = "probe") -> ExperimentConfig:
    """A small lenet run whose run folder and registry live under `folder`."""
    return parse_config({"name": name, "output_dir": str(folder / "runs"),
                         "registry": {"root": str(folder / "registry")}},
                        "probe.yaml", list(overrides))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # config.tracking_uri prefers MLFLOW_TRACKING_URI; these tests check the run folder's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ----------------------------------------------------------------------------- what passes
@pytest.mark.parametrize("scale", ["full", "reduced"])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes_and_creates_nothing(tmp_path: Path, path: Path,
                                                         scale: str) -> None:
    config = load_config(path, [f"scale={scale}", f"output_dir={tmp_path / 'runs'}",
                                f"registry.root={tmp_path / 'registry'}"])
    check_before_side_effects(config, available=64 * GIB)
    assert listing(tmp_path) == []


def test_existing_writable_folders_pass(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    (tmp_path / "runs" / "probe").mkdir(parents=True)
    (tmp_path / "registry" / "probe").mkdir(parents=True)
    (tmp_path / "runs" / "probe" / "mlflow.db").write_bytes(b"")
    check_before_side_effects(config, available=64 * GIB)


def test_object_store_roots_are_left_to_the_registry(tmp_path: Path) -> None:
    config = config_in(tmp_path, "registry.root=s3://bucket/prefix")
    check_before_side_effects(config, available=64 * GIB)
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- memory
def test_a_billion_tasks_is_refused_at_once_naming_estimate_and_limit(tmp_path: Path) -> None:
    config = config_in(tmp_path, "tasks.num_tasks=1000000000")
    with pytest.raises(ValueError, match=r"tasks\.num_tasks 1,000,000,000: the run needs about "
                                         r"[\d.]+ TiB of memory .* above the limit of "):
        check_before_side_effects(config)  # this machine's own available memory
    assert listing(tmp_path) == []


def test_the_limit_is_a_share_of_what_is_available(tmp_path: Path) -> None:
    config = config_in(tmp_path, "tasks.num_tasks=1000")
    estimate = estimate_memory(config)
    check_before_side_effects(config, available=math.ceil(estimate.total / MEMORY_FRACTION) + 1)
    with pytest.raises(ValueError, match=r"memory .* lower tasks\.num_tasks to at most 99\d "):
        check_before_side_effects(config, available=int(estimate.total / MEMORY_FRACTION) - 2)
    fitting = estimate.tasks_within(int(2 * GIB * MEMORY_FRACTION))
    check_before_side_effects(config_in(tmp_path, f"tasks.num_tasks={fitting}"),
                              available=2 * GIB)
    with pytest.raises(ValueError, match="memory"):
        check_before_side_effects(config_in(tmp_path, f"tasks.num_tasks={fitting + 1}"),
                                  available=2 * GIB)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("network, shape", [
    ({"name": "lenet"}, (1, 28, 28)),
    ({"name": "fc", "hidden": [64, 32]}, (1, 28, 28)),
    ({"name": "conv", "width": 8}, (3, 32, 32)),
    ({"name": "resnet18", "width": 8, "num_outputs": 10}, (3, 32, 32)),
])
def test_measured_sizes_equal_the_real_network_and_bank(network: dict, shape: tuple) -> None:
    dataset = "mnist-bundled" if shape[0] == 1 else "cifar10"
    config = parse_config({"network": network, "data": {"dataset": dataset}})
    assert input_shape(config) == shape
    sizes = masked_sizes(config)
    assert sizes is not None
    net = build_network(config.network_spec(10, shape))
    assert sizes[0] == [math.prod(s) for s in net.layer_shapes().values()]
    assert sizes[1] == list(net.bn_features().values())
    # The estimate's bank row is exactly what a MaskBank stores per task.
    bank = MaskBank(net.layer_shapes(), net.bn_features())
    empty = bank.nbytes()  # the per-weight counts only
    masks = {k: (m.weight > 0).float() for k, m in net.masked_layers().items()}
    stats = {k: torch.stack([torch.zeros(c), torch.ones(c)]) for k, c in net.bn_features().items()}
    bank.add(0, masks, stats)
    row = bank.nbytes() - empty
    estimate = estimate_memory(config)
    assert estimate.per_task == BOOKKEEPING_BYTES_PER_TASK + BANK_GROWTH_FACTOR * row
    assert estimate.fixed == 8 * net.num_weights  # float32 weights + int32 counts


def test_native_shapes_match_the_loader() -> None:
    train, test = load_dataset("mnist-bundled")
    side, labels = NATIVE_IMAGES["mnist-bundled"]
    assert tuple(train.x.shape[1:]) == (1, side, side) == tuple(test.x.shape[1:])
    assert train.num_labels == labels


def test_unknown_shapes_skip_the_mask_estimate(tmp_path: Path) -> None:
    """ImageFolder images have the side of the files unless data.image_size says: no guess."""
    unknown = config_in(tmp_path, "data.dataset=imagefolder")
    assert input_shape(unknown) is None and masked_sizes(unknown) is None
    assert estimate_memory(unknown).per_task == BOOKKEEPING_BYTES_PER_TASK
    known = config_in(tmp_path, "data.dataset=imagefolder", "data.image_size=16")
    assert input_shape(known) == (3, 16, 16)
    assert estimate_memory(known).per_task > BOOKKEEPING_BYTES_PER_TASK
    with pytest.raises(ValueError, match="memory"):  # the bookkeeping alone is still counted
        check_before_side_effects(config_in(tmp_path, "data.dataset=imagefolder",
                                            "tasks.num_tasks=1000000000"))


def test_a_stream_holds_at_most_its_budget_of_masks(tmp_path: Path) -> None:
    few = estimate_memory(config_in(tmp_path, "scenario=nns", "discovery.budget=10",
                                    "tasks.num_tasks=5"))
    many = estimate_memory(config_in(tmp_path, "scenario=nns", "discovery.budget=10",
                                     "tasks.num_tasks=500"))
    assert few.per_task > BOOKKEEPING_BYTES_PER_TASK
    assert many.per_task == BOOKKEEPING_BYTES_PER_TASK  # the 10 masks moved into `fixed`
    assert many.fixed == few.fixed + 10 * (few.per_task - BOOKKEEPING_BYTES_PER_TASK)


def test_available_memory_is_positive_and_below_the_total() -> None:
    found = available_memory()
    assert found is not None and found > 0
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert found <= total


# ----------------------------------------------------------------------------- places
@pytest.mark.parametrize("key, below", [
    ("output_dir", ""), ("output_dir", "/deeper"),
    ("registry.root", ""), ("registry.root", "/sub"),
])
def test_a_file_in_the_way_is_named_and_nothing_is_created(tmp_path: Path, key: str,
                                                           below: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = config_in(tmp_path, f"{key}={blocker}{below}")
    with pytest.raises(ValueError, match=rf"{re.escape(str(blocker))} is a file, not a folder"):
        check_before_side_effects(config, available=64 * GIB)
    assert listing(tmp_path) == ["a-file"]


def test_a_file_where_the_run_or_bank_folder_goes_is_named(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "probe").write_text("x")
    with pytest.raises(ValueError, match=r"run folder .*/runs/probe is a file"):
        check_before_side_effects(config_in(tmp_path), available=64 * GIB)
    (tmp_path / "runs" / "probe").unlink()
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "probe").write_text("x")
    with pytest.raises(ValueError, match=r"registry\.root .*/registry/probe is a file"):
        check_before_side_effects(config_in(tmp_path), available=64 * GIB)
    assert listing(tmp_path) == ["registry", "registry/probe", "runs"]


def test_a_file_uri_root_is_checked_as_a_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(blocker))):
        check_before_side_effects(config_in(tmp_path, f"registry.root=file://{blocker}/r"),
                                  available=64 * GIB)
    assert listing(tmp_path) == ["a-file"]


def test_a_broken_link_in_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"dangling is a broken symbolic link"):
        check_before_side_effects(config_in(tmp_path, f"output_dir={tmp_path / 'dangling'}"),
                                  available=64 * GIB)
    assert listing(tmp_path) == ["dangling"]


def test_sqlite_stores_elsewhere_are_checked(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    where = re.escape(str(blocker))
    with pytest.raises(ValueError, match=rf"tracking database's folder {where}/db cannot be "
                                         rf"created: {where} is a file"):
        check_before_side_effects(config_in(tmp_path, f"tracking.uri=sqlite:///{blocker}/db/m.db"),
                                  available=64 * GIB)
    (tmp_path / "store.db").mkdir()
    with pytest.raises(ValueError, match=r"store\.db is a folder, not a SQLite file"):
        check_before_side_effects(
            config_in(tmp_path, f"tracking.uri=sqlite:///{tmp_path / 'store.db'}"),
            available=64 * GIB)
    assert listing(tmp_path) == ["a-file", "store.db"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: os.access "
                    "says yes, and so does mkdir; the file-in-the-way tests cover the refusal")
def test_a_read_only_parent_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for key in ("output_dir", "registry.root"):
            with pytest.raises(ValueError, match=rf"may not write into {re.escape(str(locked))}"):
                check_before_side_effects(config_in(tmp_path, f"{key}={locked}/x"),
                                          available=64 * GIB)
        assert listing(tmp_path) == ["locked"]
    finally:
        locked.chmod(0o755)


def test_names_that_climb_out_are_refused_even_past_validation(tmp_path: Path) -> None:
    """The config refuses '..'; a config built without validation is caught here as well."""
    config = config_in(tmp_path)
    with pytest.raises(ValueError, match=r"name '\.\.' would leave output_dir"):
        check_before_side_effects(config.model_copy(update={"name": ".."}), available=64 * GIB)
    climbing = config.model_copy(update={"registry": config.registry.model_copy(
        update={"bank": "../elsewhere"})})
    with pytest.raises(ValueError, match=r"registry\.bank '\.\./elsewhere' would leave "
                                         r"registry\.root"):
        check_before_side_effects(climbing, available=64 * GIB)
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- labels
def test_split_tasks_need_enough_labels(tmp_path: Path) -> None:
    config = config_in(tmp_path, "tasks.family=split", "tasks.num_tasks=6",
                       "tasks.classes_per_task=2")
    with pytest.raises(ValueError, match=r"6 split tasks of 2 classes need 12 labels, but data "
                                         r"set 'mnist-bundled' has 10; lower tasks\.num_tasks "
                                         r"to at most 5"):
        check_before_side_effects(config, available=64 * GIB)
    check_before_side_effects(config_in(tmp_path, "data.dataset=cifar100", "tasks.family=split",
                                        "tasks.num_tasks=20", "tasks.classes_per_task=5"),
                              available=64 * GIB)
    assert listing(tmp_path) == []


def test_outputs_must_hold_each_tasks_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"network\.num_outputs 50 is below the 100 labels"):
        check_before_side_effects(config_in(tmp_path, "data.dataset=cifar100",
                                            "network.num_outputs=50"), available=64 * GIB)
    check_before_side_effects(config_in(tmp_path, "tasks.family=split", "tasks.num_tasks=5",
                                        "network.num_outputs=2"),
                              available=64 * GIB)
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- reading only
def test_a_store_to_read_must_exist_and_nothing_is_created(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "missing" / "x.db"
    with pytest.raises(ValueError, match=rf"tracking database {re.escape(str(missing))} does "
                                         r"not exist; lookup reads the MLflow store"):
        check_store_exists(f"sqlite:///{missing}", "lookup")
    with pytest.raises(ValueError, match=r"is a folder, not a SQLite file"):
        check_store_exists(f"sqlite:///{tmp_path}", "lookup")
    assert listing(tmp_path) == []
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"")
    check_store_exists(f"sqlite:///{existing}", "lookup")
    check_store_exists("http://127.0.0.1:5000", "lookup")  # a server answers for itself


def test_a_registry_to_read_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"registry root {re.escape(str(tmp_path / 'no'))} "
                                         r"does not exist; pass the folder"):
        check_registry_exists(str(tmp_path / "no"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        check_registry_exists(f"file://{tmp_path / 'file'}")
    check_registry_exists(str(tmp_path))
    check_registry_exists("s3://bucket/prefix")  # opened and checked by the registry itself
    assert listing(tmp_path) == ["file"]
