"""Checks of a loaded config against this machine, before a command has any side effect.

`check_before_side_effects(config)` runs after the config is validated and before the CLI creates
the run folder, the MLflow store or a bank's manifest. A run that cannot fit in memory, or that
would write where it cannot, then fails at once with one message, instead of after Ray started,
MLflow opened a run and the registry created a bank that the failure leaves behind.

Everything here reads (file metadata, /proc/meminfo, the cgroup's limit) and creates nothing.
Where a value is unknown before the data is read (the image shape or labels of an ImageFolder
tree), its check is skipped rather than guessed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from pipeline.config import ExperimentConfig
from pipeline.datasets import NORMALIZATION
from pipeline.paths import sqlite_path
from supsup.layers import MaskedLayer, TaskBatchNorm2d
from supsup.masks import packed_size
from supsup.networks import NETWORKS, NetworkSpec

# (image side, labels) of each data set of pipeline/datasets.py as its loader returns it without
# data.image_size; the channels are those of its NORMALIZATION entry. "imagefolder" is absent:
# its labels are its class folders and its image side is data.image_size or the images' own.
NATIVE_IMAGES: dict[str, tuple[int, int]] = {
    "mnist-bundled": (28, 10),
    "mnist": (28, 10),
    "fashion_mnist": (28, 10),
    "kmnist": (28, 10),
    "cifar10": (32, 10),
    "cifar100": (32, 100),
}

# Bytes the driver keeps per task besides its masks: the task id in the bank's list and index,
# its row of training and evaluation metrics, its entries in the manifest, snapshot and report.
BOOKKEEPING_BYTES_PER_TASK = 4096
# MaskBank grows its storage by doubling, and the old rows are copied into the new storage: for a
# moment both exist, up to 3x the packed masks of the tasks held.
BANK_GROWTH_FACTOR = 3
# Share of the available memory a run may plan to use: the rest is for the data set, torch,
# Ray's and MLflow's clients and whatever else the machine runs.
MEMORY_FRACTION = 0.8


def check_before_side_effects(config: ExperimentConfig, *, available: int | None = None) -> None:
    """ValueError naming the key, the place and what to do, for a run that would fail later:

    - the labels of the data set do not fit the tasks or the network's outputs;
    - output_dir is (inside) a local registry.root, or registry.root is the run folder;
    - the run folder (output_dir/name), the SQLite tracking store or the bank's folder under a
      local registry.root cannot be created or written (a regular file in the way, a folder
      that is not writable, a name that climbs out of its folder);
    - the masks of tasks.num_tasks tasks and their bookkeeping do not fit in `available` bytes
      (default: what this machine has available now, see `available_memory`).

    Creates nothing; object-store roots and tracking servers are checked by their own modules.
    """
    _check_labels(config)
    _check_inside(config.output_dir, config.name, "output_dir", "name")
    _check_creatable(config.run_dir, "the run folder (output_dir/name)")
    db = sqlite_path(config.tracking_uri)
    if db is not None:
        _check_database(Path(db))
    root = local_registry_root(config.registry.root)
    if root is not None:
        _check_apart(config, root)
        bank_key = "registry.bank" if config.registry.bank else "name"
        _check_inside(root, config.bank, "registry.root", bank_key)
        _check_creatable(root / config.bank, f"registry.root {root}: the bank folder")
    _check_memory(config, available)


# ----------------------------------------------------------------------------- data and labels
def input_shape(config: ExperimentConfig) -> tuple[int, int, int] | None:
    """(C, H, W) of the data set's images as the tasks see them, None where only the data
    itself can tell (an ImageFolder tree without data.image_size)."""
    d = config.data
    side = d.image_size
    if side is None and d.dataset in NATIVE_IMAGES:
        side = NATIVE_IMAGES[d.dataset][0]
    if side is None:
        return None
    return len(NORMALIZATION[d.dataset][0]), side, side


def _check_labels(config: ExperimentConfig) -> None:
    """Split tasks take disjoint blocks of labels, and each task's labels are the network's
    first outputs: both are known from the data set's name before any data is read."""
    if config.data.dataset not in NATIVE_IMAGES:
        return
    labels = NATIVE_IMAGES[config.data.dataset][1]
    t, net = config.tasks, config.network
    if t.family == "split" and t.num_tasks * t.classes_per_task > labels:
        raise ValueError(
            f"tasks: {t.num_tasks} split tasks of {t.classes_per_task} classes need "
            f"{t.num_tasks * t.classes_per_task} labels, but data set {config.data.dataset!r} "
            f"has {labels}; lower tasks.num_tasks to at most {labels // t.classes_per_task}")
    per_task = net.num_classes or (t.classes_per_task if t.family == "split" else labels)
    if per_task > net.num_outputs:
        raise ValueError(
            f"network.num_outputs {net.num_outputs} is below the {per_task} labels of each "
            f"{t.family} task of {config.data.dataset!r}; set network.num_outputs to at least "
            f"{per_task}")


# ----------------------------------------------------------------------------- places
def local_registry_root(root: str) -> Path | None:
    """The folder of a registry root on this machine's file system; None for object stores and
    other remote URIs, which the registry checks itself when it opens them."""
    if root.startswith("file://"):
        return Path(root[len("file://"):])
    return None if "://" in root else Path(root)


def _check_inside(parent: str | Path, name: str, parent_key: str, name_key: str) -> None:
    """The config refuses names such as '..'; this second look makes sure the folder a name
    becomes is a direct child of its parent, whatever the validation lets through."""
    base = Path(os.path.abspath(parent))
    if Path(os.path.abspath(base / name)).parent != base:
        raise ValueError(f"{name_key} {name!r} would leave {parent_key} {base}: use a plain "
                         "folder name (letters, digits, '.', '_' and '-')")


def _check_apart(config: ExperimentConfig, root: Path) -> None:
    """The run folders (MLflow store, logs, reports) never go inside the mask registry, nor the
    registry's banks into the run folder itself: a bank folder would then hold files that are
    not its own, and `registry verify` would fail on them."""
    reg = Path(os.path.abspath(root))
    out = Path(os.path.abspath(config.output_dir))
    run = Path(os.path.abspath(config.run_dir))
    if out == reg or reg in out.parents:
        raise ValueError(f"output_dir {out} is inside registry.root {reg} (or is it): run "
                         "folders, MLflow stores and logs would land among the banks; choose an "
                         "output_dir outside registry.root, e.g. the default runs with "
                         "registry.root runs/registry")
    if run == reg:
        raise ValueError(f"registry.root {reg} is the run folder (output_dir/name): banks and "
                         "the run's MLflow store, logs and reports would share one folder; "
                         "choose another registry.root, e.g. output_dir/registry")


def _check_creatable(path: Path, what: str) -> None:
    """ValueError unless `path` is a writable folder or could be made one by mkdir -p: its
    nearest existing ancestor must be a folder this user may write into. Nothing is created."""
    path = Path(os.path.abspath(path))
    existing = path
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.exists():
        raise ValueError(f"{what} {path} cannot be created: {existing} is a broken symbolic "
                         "link; remove it or choose another place")
    if not existing.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {existing} is a file, not a folder; "
                         "move the file or choose another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be created: this user may not write into "
                         f"{existing}; choose a writable place or fix its permissions")


def _check_database(db: Path) -> None:
    """The SQLite tracking store: an existing file must be writable, else its folder must be
    creatable (MLflow creates the file on first use)."""
    if db.is_dir():
        raise ValueError(f"tracking database {db} is a folder, not a SQLite file; point "
                         "tracking.uri at a file (sqlite:///ABS/PATH/mlflow.db)")
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        raise ValueError(f"tracking database {db} is not writable by this user; fix its "
                         "permissions or set tracking.uri to another file")
    _check_creatable(db.parent, "the tracking database's folder")


# ----------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryEstimate:
    """What a run keeps in the driver's memory, in bytes: `fixed` once (the base network's
    float32 weights and the bank's int32 per-weight counts), `per_task` for each of `tasks`
    tasks (packed masks and BatchNorm statistics times the bank's growth factor, plus
    bookkeeping)."""

    tasks: int
    per_task: int
    fixed: int

    @property
    def total(self) -> int:
        return self.fixed + self.tasks * self.per_task

    def tasks_within(self, limit: int) -> int:
        """The most tasks whose estimate stays within `limit` bytes."""
        return max(0, (limit - self.fixed) // self.per_task)


class _ShapesOnly(TorchFunctionMode):
    """Tensor factories make meta tensors (a shape without storage): building a network then
    allocates and initialises nothing, so a huge one is measured without being made. torch.tensor
    copies data written out in the code, which a builder may read back, so it stays real."""

    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand,
                           torch.randn, torch.randint, torch.randperm, torch.arange})

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def masked_sizes(config: ExperimentConfig) -> tuple[list[int], list[int]] | None:
    """(weights of each masked layer, channels of each BatchNorm layer) of the config's base
    network, measured without drawing a weight; None when the input shape is unknown or the
    network cannot be measured that way."""
    shape = input_shape(config)
    if shape is None:
        return None
    net = config.network
    # The masked shapes do not depend on how many outputs carry labels.
    spec = NetworkSpec(name=net.name, num_outputs=net.num_outputs, num_classes=1,
                       seed=config.seed, input_shape=shape, hidden=tuple(net.hidden),
                       width=net.width)
    try:
        with _ShapesOnly():
            body = NETWORKS[spec.name](spec)
    except (RuntimeError, NotImplementedError):
        return None  # a builder that needs real values: skip the estimate rather than guess
    modules = list(body.modules())
    return ([math.prod(m.shape) for m in modules if isinstance(m, MaskedLayer)],
            [m.num_features for m in modules if isinstance(m, TaskBatchNorm2d)])


def estimate_memory(config: ExperimentConfig) -> MemoryEstimate:
    """The driver-side memory of `config`'s run: a bank of one mask per task for supermask runs
    (without task ids, a stream allocates about one per task, at most discovery.budget), and
    the per-task bookkeeping of every run. Baselines and the Hopfield reservoir keep no mask
    bank; for them, and where the network cannot be measured, only the bookkeeping counts."""
    tasks = config.tasks.num_tasks
    per_task, fixed = BOOKKEEPING_BYTES_PER_TASK, 0
    sizes = None
    if config.model == "supsup" and config.scenario in ("gg_gn", "nns"):
        sizes = masked_sizes(config)
    if sizes is not None:
        weights, channels = sizes
        # One bank row: packed masks and (mean, var) float32 BatchNorm statistics.
        row = sum(packed_size(n) for n in weights) + sum(2 * 4 * c for c in channels)
        fixed = (4 + 4) * sum(weights)
        budget = config.discovery.budget
        if config.scenario == "nns" and tasks > budget:
            fixed += BANK_GROWTH_FACTOR * row * budget
        else:
            per_task += BANK_GROWTH_FACTOR * row
    return MemoryEstimate(tasks=tasks, per_task=per_task, fixed=fixed)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2): no limit


def available_memory() -> int | None:
    """Bytes this process can still use: the kernel's MemAvailable, lowered to what is left of
    the memory cgroup's limit (a container sees the host's /proc/meminfo); None if unknown."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024  # kB
                    break
    except OSError:
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None:
            found = min(found, max(0, limit - usage))
    return found


def _size(n: float) -> str:
    """Bytes for people: 36.4 TiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _check_memory(config: ExperimentConfig, available: int | None) -> None:
    available = available_memory() if available is None else available
    if available is None:
        return  # nothing to compare with: the run finds out itself
    estimate = estimate_memory(config)
    limit = int(available * MEMORY_FRACTION)
    if estimate.total <= limit:
        return
    raise ValueError(
        f"tasks.num_tasks {estimate.tasks:,}: the run needs about {_size(estimate.total)} of "
        f"memory in the driver ({_size(estimate.per_task)} per task for its masks and "
        f"bookkeeping, plus {_size(estimate.fixed)} for the base network "
        f"{config.network.name!r}), above the limit of {_size(limit)} "
        f"({MEMORY_FRACTION:.0%} of the {_size(available)} available on this machine); lower "
        f"tasks.num_tasks to at most {estimate.tasks_within(limit):,} or run on a machine with "
        "more memory")


# ----------------------------------------------------------------------------- reading only
def check_store_exists(uri: str, command: str) -> None:
    """ValueError when a read-only command (lookup, evaluating a models:/ URI) names a SQLite
    tracking store that does not exist: opening it would create the folder and an empty
    database, and the command would answer from nothing ("registered models: none")."""
    db = sqlite_path(uri)
    if db is None or db.is_file():
        return
    what = "is a folder, not a SQLite file" if db.is_dir() else "does not exist"
    raise ValueError(
        f"tracking database {os.path.abspath(db)} {what}; {command} reads the MLflow store that "
        "registered the model: pass its --tracking-uri, e.g. sqlite:///runs/NAME/mlflow.db as "
        "`supsup train` printed it")


def check_registry_exists(root: str) -> None:
    """ValueError when a local registry root to be read is not a folder (an object store is
    checked by the registry itself when it opens it)."""
    folder = local_registry_root(root)
    if folder is None or folder.is_dir():
        return
    what = "is a file, not a folder" if folder.exists() else "does not exist"
    raise ValueError(f"registry root {os.path.abspath(folder)} {what}; pass the folder the "
                     "banks were trained into with --root (registry.root of the config)")
