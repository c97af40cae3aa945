"""Config validation: errors name the key and the file; overrides go through the same checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, dump_config, load_config, parse_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.name
    assert load_config(path).model_dump() == config.model_dump()


def test_configs_exist() -> None:
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"lr": 0.1, "learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown key 'train\.learning_rate'"):
        load_config(path)


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1])
def test_density_outside_unit_interval(tmp_path: Path, density: float) -> None:
    path = write(tmp_path, {"train": {"rule": "topk", "density": density}})
    with pytest.raises(ConfigError, match=r"exp\.yaml: train\.density: .*\(0, 1\]"):
        load_config(path)


def test_density_one_is_allowed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"train": {"rule": "topk", "density": 1.0}}))
    assert config.train_config().density == 1.0


def test_topk_needs_density(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.density"):
        load_config(write(tmp_path, {"train": {"rule": "topk"}}))


def test_unknown_network(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"network\.name: .*unknown network 'vgg'"):
        load_config(write(tmp_path, {"network": {"name": "vgg"}}))


def test_bad_type_names_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tasks\.num_tasks"):
        load_config(write(tmp_path, {"tasks": {"num_tasks": "many"}}))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "x"})
    config = load_config(path, ["train.lr=0.01", "tasks.num_tasks=7", "network.hidden=[64, 32]"])
    assert config.train.lr == 0.01
    assert config.tasks.num_tasks == 7
    assert config.network.hidden == [64, 32]
    with pytest.raises(ConfigError, match=r"unknown key 'train\.nope'"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match=r"train\.density"):
        load_config(path, ["train.rule=topk", "train.density=0"])


def test_dump_round_trips_and_derived_values(tmp_path: Path) -> None:
    config = parse_config({"name": "demo", "output_dir": str(tmp_path)}, overrides=["seed=3"])
    again = parse_config(yaml.safe_load(dump_config(config)))
    assert again == config
    assert config.bank == "demo"
    assert config.tracking_uri.startswith("sqlite:///") and config.tracking_uri.endswith(
        "demo/mlflow.db")
    spec = config.network_spec(10, (1, 28, 28))
    assert spec.seed == 3 and spec.num_outputs == 100 and spec.superfluous == 90
    assert config.flat_params()["train.lr"] == "0.0001"


def test_bad_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name"):
        parse_config({"name": "a/b"})


def test_reduced_scale_switch_and_command_line_wins() -> None:
    raw = {"name": "x", "tasks": {"num_tasks": 250},
           "reduced": {"tasks.num_tasks": 5, "data.dataset": "mnist-bundled", "data.root": None}}
    full = parse_config(raw)
    assert full.tasks.num_tasks == 250 and full.scale == "full"
    small = parse_config(raw, overrides=["scale=reduced"])
    assert small.tasks.num_tasks == 5 and small.data.dataset == "mnist-bundled"
    mine = parse_config(raw, overrides=["scale=reduced", "tasks.num_tasks=7"])
    assert mine.tasks.num_tasks == 7
    assert parse_config(yaml.safe_load(dump_config(mine))) == mine
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\.bogus'"):
        parse_config({**raw, "reduced": {"tasks.bogus": 1}}, overrides=["scale=reduced"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_reduced(path: Path) -> None:
    config = load_config(path, ["scale=reduced"])
    assert config.scale == "reduced"
