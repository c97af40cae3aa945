"""Config validation: errors name the key and the file; overrides go through the same checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------ values that would be silently wrong
PYTHON_TAG = 'train.lr=!!python/object/apply:os.system ["echo hi"]'


@pytest.mark.parametrize("override, named", [
    ("train.lr=.inf", r"train\.lr: Input should be a finite number"),
    ("train.lr=.nan", r"train\.lr: Input should be a finite number"),
    ("train.lr=0", r"train\.lr: Input should be greater than 0"),
    ("train.lr=true", r"train\.lr: .*not a boolean"),
    ("train.momentum=.inf", r"train\.momentum: "),
    ("train.momentum=1", r"train\.momentum: Input should be less than 1"),
    ("train.momentum=-0.1", r"train\.momentum: "),
    ("train.weight_decay=-1e-4", r"train\.weight_decay: "),
    ("train.epochs=.inf", r"train\.epochs: Input should be a finite number"),
    ("train.epochs=0", r"train\.epochs: "),
    ("train.erdos_renyi_scale=-.inf", r"train\.erdos_renyi_scale: "),
    ("train.steps=true", r"train\.steps: .*whole number, not a boolean"),
    ("train.steps=1.5", r"train\.steps: Input should be a valid integer"),
    ("train.steps='300'", r"train\.steps: Input should be a valid integer"),
    ("train.batch_size=false", r"train\.batch_size: "),
    ("train.group_size=0", r"train\.group_size: "),
    ("tasks.num_tasks=.inf", r"tasks\.num_tasks: "),
    ("tasks.degrees=.nan", r"tasks\.degrees: Input should be a finite number"),
    ("tasks.degrees=-.inf", r"tasks\.degrees: "),
    ("data.test_fraction=1", r"data\.test_fraction: "),
    ("data.test_fraction=0", r"data\.test_fraction: "),
    ("data.dataset=mnistt", r"data\.dataset: .*unknown data set 'mnistt'"),
    ("network.hidden=[300, true]", r"network\.hidden\.1: "),
    ("network.hidden=[300, 0]", r"network\.hidden\.1: "),
    ("network.num_classes=101", r"network\.num_classes: 101 is above network\.num_outputs"),
    ("seed=-1", r"seed: "),
    ("seed=true", r"seed: "),
    ("cluster.cpus_per_worker=.inf", r"cluster\.cpus_per_worker: "),
    ("cluster.gpus_per_worker=.nan", r"cluster\.gpus_per_worker: "),
    ("cluster.num_gpus=0.5", r"cluster\.num_gpus: .*whole number of GPUs"),
    ("evaluate.max_batches=0", r"evaluate\.max_batches: "),
    ("tracking.embed_masks_max_bytes=true", r"tracking\.embed_masks_max_bytes: "),
    ("discovery.eps=.inf", r"discovery\.eps: "),
    ("discovery.lr=.nan", r"discovery\.lr: "),
    ("discovery.task_order=[0, -1]", r"discovery\.task_order\.1: "),
    ("hopfield.gamma=.inf", r"hopfield\.gamma: "),
    ("hopfield.momentum=1.5", r"hopfield\.momentum: "),
    ("hopfield.train_momentum=1", r"hopfield\.train_momentum: "),
    ("hopfield.capacity_flip=.nan", r"hopfield\.capacity_flip: "),
    ("hopfield.epochs=.inf", r"hopfield\.epochs: "),
    ("sweep={space: {train.lr: {uniform: [1.0e-4, .inf]}}}", r"sweep\.space\.train\.lr\.uniform"),
    ("sweep={space: {train.lr: {grid: [0.1]}}, val_fraction: .nan}", r"sweep\.val_fraction: "),
    ("sweep={space: {train.lr: {grid: [0.1]}}, scheduler: {type: asha, "
     "reduction_factor: .inf}}", r"sweep\.scheduler\.reduction_factor: "),
    ("sweep={space: {train.lr: {grid: [0.1]}}, tasks: [true]}", r"sweep\.tasks\.0: "),
    ("name=..", r"name: .*'\.\.' cannot be the experiment name"),
    ("name=.", r"name: "),
    ("name=.hidden", r"name: "),
    ("name=''", r"name: .*must not be empty"),
    ("name=a/b", r"name: .*'/'"),
    ("name=a\\b", r"name: "),
    ("name=c:x", r"name: .*':'"),
    ("name='a b'", r"name: "),
    ("name=\"a\\tb\"", r"name: "),
    ("name=\"a\\u200bb\"", r"name: "),  # a zero-width space: invisible in every listing
    ("name=a@b", r"name: .*'@'"),
    ("name=a+b", r"name: .*cannot be the bank name .*registry\.bank is unset"),
    ("registry.bank=../x", r"registry\.bank: .*cannot be a bank name"),
    ("registry.bank=.x", r"registry\.bank: "),
    ("registry.bank=''", r"registry\.bank: "),
    (f"registry.bank={'b' * 129}", r"registry\.bank: "),
    ("tracking.model_name=a/b", r"tracking\.model_name: .*'/'"),
    ("tracking.model_name=a@b", r"tracking\.model_name: .*'@'"),
    ("tracking.model_name=a:b", r"tracking\.model_name: "),
    ("tracking.model_name=..", r"tracking\.model_name: "),
    ("tracking.model_name=''", r"tracking\.model_name: "),
    ("tracking.experiment=a/b", r"tracking\.experiment: "),
    ("tracking.experiment='my exp'", r"tracking\.experiment: "),
    ("tracking.experiment=..", r"tracking\.experiment: "),
    ("tracking.alias=v2", r"tracking\.alias: .*reserved"),
    ("tracking.alias=V17", r"tracking\.alias: "),
    ("tracking.alias=latest", r"tracking\.alias: .*reserved"),
    ("tracking.alias=a.b", r"tracking\.alias: "),
    ("tracking.alias=''", r"tracking\.alias: "),
    (f"tracking.alias={'a' * 256}", r"tracking\.alias: "),
    ("train.lr=[1,", r"exp\.yaml: override 'train\.lr=\[1,': the value is not valid YAML"),
    (PYTHON_TAG, r"exp\.yaml: override 'train\.lr=!!python/object/apply:os\.system .*not valid "
                 r"YAML .*constructor"),
    ("=0.1", r"override '=0\.1': the key '' has an empty part"),
    ("train..lr=0.1", r"override 'train\.\.lr=0\.1': the key 'train\.\.lr' has an empty part"),
    ("train.=0.1", r"empty part"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, override: str, named: str) -> None:
    path = write(tmp_path, {"name": "x"})
    with pytest.raises(ConfigError, match=named) as caught:
        load_config(path, [override])
    assert "Traceback" not in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")  # the file, then the key or the override


def test_a_python_tag_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, {"name": "x"}),
                    [f'train.lr=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()
    bad = tmp_path / "tagged.yaml"
    bad.write_text(f'train: {{lr: !!python/object/apply:os.system ["touch {marker}"]}}\n')
    with pytest.raises(ConfigError, match=r"tagged\.yaml: not valid YAML"):
        load_config(bad)
    assert not marker.exists()


def test_a_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train")
    with pytest.raises(ConfigError, match=r"binary\.yaml: cannot read"):
        load_config(binary)


def test_bad_values_in_the_file_name_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train: {lr: .inf, steps: true}\ntracking: {alias: v3}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert any(re.match(rf"{re.escape(str(path))}: train\.lr: ", line) for line in lines)
    assert any(re.match(rf"{re.escape(str(path))}: train\.steps: ", line) for line in lines)
    assert any(re.match(rf"{re.escape(str(path))}: tracking\.alias: ", line) for line in lines)


@pytest.mark.parametrize("degrees, num_tasks", [(90, 5), (360, 2), (0, 2), (-180, 3), (10, 37)])
def test_rotations_that_repeat_a_task_are_refused(degrees: float, num_tasks: int) -> None:
    raw = {"tasks": {"family": "rotated", "degrees": degrees, "num_tasks": num_tasks}}
    with pytest.raises(ConfigError, match=r"tasks\.degrees: .* is task 0 again"):
        parse_config(raw)


@pytest.mark.parametrize("overrides, check", [
    (["train.steps=2.0"], lambda c: c.train.steps == 2 and isinstance(c.train.steps, int)),
    (["train.steps=1.0e+3"], lambda c: c.train.steps == 1000),
    (["train.steps=0"], lambda c: c.train.steps == 0),
    (["train.lr=1e-3"], lambda c: c.train.lr == 1e-3),  # PyYAML reads 1e-3 as a string
    (["train.lr=1.0e+38"], lambda c: c.train.lr == 1e38),  # huge, but finite
    (["train.lr=5"], lambda c: c.train.lr == 5.0),
    (["train.momentum=0"], lambda c: c.train.momentum == 0.0),
    (["train.momentum=0.999"], lambda c: c.train.momentum == 0.999),
    (["train.weight_decay=0"], lambda c: c.train.weight_decay == 0.0),
    (["train.epochs=0.5"], lambda c: c.train.epochs == 0.5),
    (["train.epochs=null"], lambda c: c.train.epochs is None),
    (["train.rule=topk", "train.density=1"], lambda c: c.train.density == 1.0),
    (["tasks.degrees=-7.5"], lambda c: c.tasks.degrees == -7.5),
    (["tasks.family=rotated", "tasks.degrees=10", "tasks.num_tasks=36"],
     lambda c: c.tasks.num_tasks == 36),
    (["tasks.family=rotated", "tasks.degrees=0.1", "tasks.num_tasks=3600"],
     lambda c: c.tasks.num_tasks == 3600),
    (["tasks.family=rotated", "tasks.degrees=0", "tasks.num_tasks=1"],
     lambda c: c.tasks.degrees == 0),
    (["data.test_fraction=0.999"], lambda c: c.data.test_fraction == 0.999),
    (["seed=9223372036854775807"], lambda c: c.seed == 2**63 - 1),
    (["cluster.num_gpus=2.0"], lambda c: c.cluster.num_gpus == 2),
    (["cluster.gpus_per_worker=0.25"], lambda c: c.cluster.gpus_per_worker == 0.25),
    (["network.hidden=[256.0, 64]"], lambda c: c.network.hidden == [256, 64]),
    (["network.num_classes=100"], lambda c: c.network.num_classes == 100),
    (["name=pmnist250-lenet_v2.1"], lambda c: c.bank == "pmnist250-lenet_v2.1"),
    (["name=exp+1", "registry.bank=exp1"], lambda c: c.name == "exp+1" and c.bank == "exp1"),
    (["name=Ä-run", "registry.bank=a-run"], lambda c: c.run_dir.name == "Ä-run"),
    ([f"registry.bank={'b' * 128}"], lambda c: len(c.bank) == 128),
    (["tracking.model_name=My.Model-1", "tracking.experiment=exp_1"],
     lambda c: c.model_name == "My.Model-1" and c.experiment_name == "exp_1"),
    (["tracking.alias=v2-candidate"], lambda c: c.tracking.alias == "v2-candidate"),
    (["tracking.alias=version_2"], lambda c: c.tracking.alias == "version_2"),
    ([f"tracking.alias={'a' * 255}"], lambda c: len(c.tracking.alias) == 255),
    (["train.lr='0.01'"], lambda c: c.train.lr == 0.01),
])
def test_good_edge_values_still_load(overrides: list[str], check: Any) -> None:
    config = parse_config({"name": "x"}, "exp.yaml", overrides)
    assert check(config)
    assert parse_config(yaml.safe_load(dump_config(config))) == config


def test_resolved_config_round_trips_through_strict_checks() -> None:
    """Workers rebuild the config from model_dump(): strict ints and finite floats survive it."""
    config = parse_config({"name": "x"}, overrides=["train.steps=2.0", "network.hidden=[8.0]"])
    again = type(config).model_validate(config.model_dump())
    assert again == config and isinstance(again.train.steps, int)


def test_params_hold_only_the_sections_in_use() -> None:
    plain = parse_config({"name": "p"}).flat_params()
    assert {k.split(".")[0] for k in plain} >= {"train", "network", "evaluate", "tasks"}
    assert not any(k.startswith(("discovery.", "hopfield.", "sweep.", "reduced")) for k in plain)
    nns = parse_config({"name": "p", "scenario": "nns"}).flat_params()
    assert "discovery.batches_per_task" in nns and not any(k.startswith("hopfield.") for k in nns)


# ----------------------------------------------------------- silent combinations, strict YAML
def test_fused_with_data_parallel_workers_is_refused_saying_what_to_set() -> None:
    with pytest.raises(ConfigError, match=r"exp\.yaml: train\.fused: cannot be true with "
                                          r"train\.data_parallel_workers=2: .*each rank would "
                                          r"train alone; set train\.fused: false, or "
                                          r"train\.data_parallel_workers: 1"):
        parse_config({"train": {"fused": True, "data_parallel_workers": 2}}, "exp.yaml")
    # Each alone is fine, and one rank with the fused step is the single-process job.
    assert parse_config({"train": {"fused": True, "data_parallel_workers": 1}}).train.fused
    assert parse_config({"train": {"data_parallel_workers": 2}}).train.data_parallel_workers == 2


@pytest.mark.parametrize("job", [{"model": "dense"}, {"model": "batchensemble"},
                                 {"model": "psp"}, {"scenario": "nns"},
                                 {"scenario": "hopfield"}])
@pytest.mark.parametrize("field, value, written", [("precision", "bf16", "fp32"),
                                                   ("fused", True, "false"),
                                                   ("data_parallel_workers", 2, "1")])
def test_training_fields_a_job_ignores_are_refused_by_name(job: dict, field: str, value: Any,
                                                           written: str) -> None:
    kind = next(iter(job.values()))
    with pytest.raises(ConfigError, match=rf"exp\.yaml: train\.{field}: .*'{kind}'.* ignores "
                                          rf"train\.{field} .*set train\.{field}: {written} or "
                                          "remove it"):
        parse_config({**job, "train": {field: value}}, "exp.yaml")
    # Left at its default, the field is no problem for that job.
    assert getattr(parse_config(job).train, field) != value


@pytest.mark.parametrize("raw, field, default", [
    ({"model": "dense", "train": {"rule": "topk", "density": 0.5}}, "rule", "threshold"),
    ({"model": "psp", "train": {"erdos_renyi_scale": 1.0, "rule": "topk"}}, "rule", "threshold"),
    ({"model": "batchensemble", "train": {"density": 0.5}}, "density", "null"),
    ({"scenario": "nns", "train": {"steps": 50}}, "steps", "1000"),
    ({"scenario": "nns", "train": {"epochs": 2}}, "epochs", "null"),
])
def test_mask_and_step_fields_a_job_never_reads_are_refused(raw: dict, field: str,
                                                            default: str) -> None:
    with pytest.raises(ConfigError, match=rf"exp\.yaml: train\.{field}: .* ignores "
                                          rf"train\.{field} \(.*\), but it is set to .*; set "
                                          rf"train\.{field}: {default} or remove it"):
        parse_config(raw, "exp.yaml")


def test_an_empty_config_file_is_refused(tmp_path: Path) -> None:
    for text in ("", "\n", "# only a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"empty\.yaml: the config file is empty \(or only "
                                              r"comments\); write the settings"):
            load_config(path)


@pytest.mark.parametrize("text, key, lines", [
    ("name: a\ntrain: {steps: 3}\nname: b\n", "name", (1, 3)),
    ("train:\n  lr: 0.1\n  steps: 3\n  lr: 0.01\n", "train.lr", (2, 4)),
    ("sweep:\n  space:\n    train.lr: {grid: [0.1]}\n    train.lr: {grid: [0.2]}\n",
     "sweep.space.train.lr", (3, 4)),
])
def test_a_duplicate_key_is_refused_naming_key_lines_and_file(tmp_path: Path, text: str,
                                                              key: str, lines: tuple) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup\.yaml: duplicate key '{re.escape(key)}' "
                                          rf"\(lines {lines[0]} and {lines[1]}\)"):
        load_config(path)


def test_a_merge_may_still_be_overridden_by_its_own_mapping(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("train: {<<: {steps: 3, lr: 0.1}, lr: 0.01}\n")
    config = load_config(path)
    assert (config.train.steps, config.train.lr) == (3, 0.01)


def _nested_aliases(levels: int) -> str:
    """A few hundred bytes whose aliases expand to 9**levels values ("billion laughs")."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    names = "abcdefghijklmnop"
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append(f"train: *{names[levels - 1]}")
    return "\n".join(lines) + "\n"


def test_nested_aliases_are_refused_in_one_short_line(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(_nested_aliases(9))
    assert path.stat().st_size < 500
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert re.fullmatch(rf"{re.escape(str(path))}: its aliases \(\*name\) expand to more than "
                        r"100,000 values \(at line \d+\); .*", message)
    assert "\n" not in message and len(message) < 1000


def test_values_in_error_lines_are_shortened(tmp_path: Path) -> None:
    # Below the alias bound, the structure is still far too big to print whole.
    path = tmp_path / "laughs.yaml"
    path.write_text(_nested_aliases(4))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert any(line.startswith(f"{path}: train: Input should be") for line in lines)
    assert all(len(line) < 1000 for line in lines)
    huge = "9" * 100_000
    with pytest.raises(ConfigError, match=r"train\.steps: .*\(got '9+\.\.\.9+'\)") as caught:
        parse_config({}, "exp.yaml", [f"train.steps='{huge}'"])
    assert len(str(caught.value)) < 1000
    with pytest.raises(ConfigError) as caught:
        parse_config({}, "exp.yaml", [f"{huge}=1"])
    assert len(str(caught.value)) < 1000


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("train: &t {steps: 3, more: *t}\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml: line 1: an alias refers to the value "
                                          "that contains it"):
        load_config(path)


@pytest.mark.parametrize("evaluate", [{"mode": "batch"}, {"method": "binary"}, {"gn": False}])
def test_evaluation_by_shards_is_one_shot_per_query(tmp_path: Path, evaluate: dict) -> None:
    path = write(tmp_path, {"evaluate": {"shards": 2, **evaluate}})
    with pytest.raises(ConfigError, match=r"evaluate\.shards.*set evaluate\.shards: 1"):
        load_config(path)
    assert load_config(write(tmp_path, {"evaluate": {"shards": 2}}, "ok.yaml")).evaluate.shards == 2
