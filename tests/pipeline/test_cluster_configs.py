"""The cluster manifests in configs/cluster/: a Ray cluster-launcher file that `ray up` accepts, a
KubeRay RayJob whose entrypoint is a valid `supsup run` command, and a project config that loads
with the project's own loader; none of them holds a credential.

tests/pipeline/test_config.py loads configs/*.yaml only, so the two manifests (which are not
experiment configs) stay out of it; cluster.yaml is loaded here.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "configs" / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
CONFIG = CLUSTER / "cluster.yaml"
DOC = ROOT / "docs" / "CLUSTER.md"

# AWS access key ids (long-term AKIA, temporary ASIA) and 40-character secret access keys.
ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
SECRET_KEY = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
SENSITIVE_ENV = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: the top level must be a mapping"
    return data


def containers(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    spec = rayjob["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]]
    templates += [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def entrypoint_command(rayjob: dict[str, Any]) -> tuple[Path, list[str]]:
    """The config file (relative to the repository) and the --set overrides of the entrypoint."""
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert not {"&&", "||", ";", "|"} & set(words), (
        "KubeRay's submitter would run what follows a shell operator in its own pod")
    assert words[:2] == ["supsup", "run"], f"entrypoint runs {words[:2]}, not `supsup run`"
    config, rest = words[2], words[3:]
    path = Path(config)
    if path.is_absolute():  # a path inside the image: relative to the containers' workingDir
        workdirs = {c.get("workingDir") for c in containers(rayjob)}
        assert len(workdirs) == 1 and None not in workdirs, workdirs
        path = path.relative_to(workdirs.pop())
    assert path.parts[0] == "configs", f"{config} is not under configs/"
    overrides = [rest[i + 1] for i, word in enumerate(rest) if word == "--set"]
    assert len(overrides) == rest.count("--set") and 2 * len(overrides) == len(rest), (
        f"entrypoint arguments other than --set KEY=VALUE: {rest}")
    return path, overrides


# ------------------------------------------------------------------------- the launcher file
def test_launcher_head_type_is_a_node_type() -> None:
    launcher = load(LAUNCHER)
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    assert workers and all(v["max_workers"] >= v.get("min_workers", 0) for v in workers.values())
    assert all(v["resources"].get("CPU", 0) > 0 for v in workers.values())
    assert sum(v.get("min_workers", 0) for v in workers.values()) <= launcher["max_workers"]


def test_launcher_is_what_ray_up_accepts() -> None:
    """The checks `ray up` runs before it touches the cloud: defaults merged, then the schema."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(load(LAUNCHER))))


def test_launcher_installs_the_project_it_mounts() -> None:
    launcher = load(LAUNCHER)
    mounts = {remote for remote, local in launcher["file_mounts"].items() if local == "."}
    assert mounts, "no file_mounts entry copies the project ('.') to the nodes"
    install = [c for c in launcher["setup_commands"]
               if re.search(r"pip install -e '\.\[s3\]'", c)]
    assert install, "no setup command runs pip install -e '.[s3]'"
    assert any(f"cd {m} " in c for c in install for m in mounts), (
        f"the install does not run in the mounted project {mounts}: {install}")


# ------------------------------------------------------------------------------ the RayJob
def test_rayjob_kind_and_lifecycle() -> None:
    rayjob = load(RAYJOB)
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for c in containers(rayjob):
        assert c["resources"]["limits"]["cpu"], c["name"]


def test_rayjob_entrypoint_runs_a_shipped_config() -> None:
    path, overrides = entrypoint_command(load(RAYJOB))
    assert (ROOT / path).is_file(), f"{path} does not exist in the repository"
    config = load_config(ROOT / path, overrides)  # the overrides pass the project's own checks
    assert config.registry.root.startswith("s3://")
    assert config.tracking.uri is not None and config.tracking.uri.startswith("http://")
    assert config.cluster.threads_per_worker is not None
    assert config.cluster.threads_per_worker <= config.cluster.cpus_per_worker


def test_rayjob_credentials_come_from_secrets() -> None:
    rayjob = load(RAYJOB)
    names: set[str] = set()
    for c in containers(rayjob):
        for var in c.get("env", []):
            names.add(var["name"])
            if SENSITIVE_ENV.search(var["name"]):
                assert "value" not in var, f"{c['name']}: {var['name']} has a literal value"
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"], var
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names


# ---------------------------------------------------------------------- the project config
def test_cluster_config_loads_with_shared_services() -> None:
    config = load_config(CONFIG)
    assert config.registry.root.startswith("s3://")
    assert config.tracking.uri is not None and config.tracking.uri.startswith("http://")
    assert config.cluster.address == "auto"
    assert config.cluster.threads_per_worker == int(config.cluster.cpus_per_worker)
    assert load_config(CONFIG, ["scale=reduced"]).tasks.num_tasks < config.tasks.num_tasks


def test_cluster_config_trains_the_same_bank_as_the_experiment() -> None:
    """The header says so: same name, network, tasks, data and mask rule as the shipped one."""
    cluster = load_config(CONFIG)
    local = load_config(ROOT / "configs" / "permuted_mnist_2500.yaml")
    assert cluster.bank == local.bank
    assert cluster.network_spec(10, (1, 28, 28)) == local.network_spec(10, (1, 28, 28))
    assert cluster.mask_info() == local.mask_info()
    assert cluster.train_config() == local.train_config()
    assert cluster.tasks == local.tasks


# ----------------------------------------------------------------------------- everything
@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")) + [DOC], ids=lambda p: p.name)
def test_no_credentials_in_files(path: Path) -> None:
    text = path.read_text()
    assert not ACCESS_KEY_ID.search(text)
    assert not SECRET_KEY.search(text), SECRET_KEY.search(text)
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*[A-Za-z0-9/+]", text)


def test_doc_names_files_that_exist() -> None:
    named = set(re.findall(r"configs/[\w./-]+\.yaml", DOC.read_text()))
    assert {"configs/cluster/ray-cluster.yaml", "configs/cluster/rayjob.yaml",
            "configs/cluster/cluster.yaml"} <= named
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"docs/CLUSTER.md names files that do not exist: {missing}"
