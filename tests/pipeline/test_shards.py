"""pipeline.serve.shards: a registry bank split across Ray actors answers as the whole bank does.

Banks of random masks (density 1/2, random BN statistics for conv) are written through the real
mask registry; each shard is a real Ray actor that loads only its task range through `load_bank`.
The reference is `supsup.engine.InferenceEngine` over the same source loaded whole.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from pipeline.bank_source import BankSource
from pipeline.registry import BankMismatchError, MaskRegistry, export_bank, load_bank
from pipeline.serve.shards import (
    ShardedBank,
    ShardedInferenceError,
    packed_bytes,
    split_ranges,
)
from supsup.engine import InferenceEngine, factor_gradients, query_factors
from supsup.masks import pack_bits
from supsup.networks import SupermaskNet, build_network

SIDE, CLASSES = 12, 4


def _fc() -> SupermaskNet:
    return build_network(name="fc", hidden=(48, 24), num_outputs=2 * CLASSES,
                         num_classes=CLASSES, input_shape=(1, SIDE, SIDE))


def _conv() -> SupermaskNet:
    return build_network(name="conv", width=2, num_outputs=2 * CLASSES, num_classes=CLASSES,
                         input_shape=(1, SIDE, SIDE))


def _publish(root: Path, name: str, net: SupermaskNet, num_tasks: int, seed: int) -> BankSource:
    """`num_tasks` random masks (and BN statistics where the network has BN) written to the
    registry at `root` as bank `name`; the bank's source."""
    registry = MaskRegistry(root)
    registry.create_bank(name, net.spec, net.layer_shapes(), net.bn_features(),
                         {"rule": "threshold"})
    gen = torch.Generator().manual_seed(seed)
    for t in range(num_tasks):
        packed = {k: pack_bits(torch.rand(s, generator=gen) < 0.5).numpy()
                  for k, s in net.layer_shapes().items()}
        stats = {k: np.stack([torch.randn(c, generator=gen).numpy(),
                              (torch.rand(c, generator=gen) + 0.5).numpy()]).astype(np.float32)
                 for k, c in net.bn_features().items()}
        assert registry.write_task(name, t, packed, stats or None) == "written"
    return registry.source(name)


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shards-registry")


@pytest.fixture(scope="module")
def fc_source(registry_root: Path) -> BankSource:
    return _publish(registry_root, "fc-bank", _fc(), 11, seed=0)


@pytest.fixture(scope="module")
def sharded_fc(ray_local: None, fc_source: BankSource) -> Iterator[ShardedBank]:
    with ShardedBank.from_source(fc_source, 3, block_queries=5) as sharded:
        yield sharded


def _within_fixed_point(got: torch.Tensor, want: torch.Tensor) -> None:
    """Each query's gradients within the engine's fixed-point tolerance (2 digits, as in
    tests/supsup/test_engine.py) of its largest |gradient|: factors made twice may differ in
    their last bits (a BLAS may split its sums by the threads it finds free), which can move one
    fixed-point step."""
    bound = 4e-4 * want.abs().amax(1, keepdim=True)
    assert bool(((got - want).abs() <= bound).all()), float((got - want).abs().max())


def _queries(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def test_ranges_are_consecutive_and_even() -> None:
    assert split_ranges(list(range(7)), 3) == [(0, 1, 2), (3, 4), (5, 6)]
    assert split_ranges([2, 5, 9], 3) == [(2,), (5,), (9,)]
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match=r"shards must be an integer from 1 to the bank's 3"):
            split_ranges([0, 1, 2], bad)  # type: ignore[arg-type]


def test_each_shard_actor_holds_only_its_range(sharded_fc: ShardedBank,
                                               fc_source: BankSource) -> None:
    held = ray.get([s.actor.describe.remote() for s in sharded_fc.shards])
    assert [h["task_ids"] for h in held] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [h["num_tasks"] for h in held] == [4, 4, 3]
    pids = {h["pid"] for h in held}
    assert len(pids) == 3 and os.getpid() not in pids
    whole, _ = load_bank(fc_source)
    assert sum(h["packed_bytes"] for h in held) == packed_bytes(whole)
    assert [m["pid"] for m in sharded_fc.memory()] == [h["pid"] for h in held]
    assert all(m["rss_kib"] > 0 for m in sharded_fc.memory())


def test_sharded_fc_answers_equal_the_unsharded_engine(sharded_fc: ShardedBank,
                                                       fc_source: BankSource) -> None:
    """Blocks of 5 queries over 3 shards: the combined mixture is the whole bank's, and from the
    same factors the shards' slices are the whole bank's gradients bit for bit (linear layers sum
    exact integers per row), so the task ids are the engine's."""
    x = _queries(13, seed=1)
    bank, spec = load_bank(fc_source)
    engine = InferenceEngine(build_network(spec), bank, block_queries=5)  # same forward batches
    for key, counts in engine.mixture.counts.items():
        assert torch.equal(sharded_fc.mixture.counts[key], counts)
    factors = query_factors(engine.net, engine.mixture, x[:5])
    parts = ray.get([s.actor.gradients.remote(factors) for s in sharded_fc.shards])
    assert torch.equal(torch.cat(parts, 1),
                       factor_gradients(bank, bank.rows(None), engine.net, factors))
    want, got = engine.infer(x), sharded_fc.infer(x)
    assert torch.equal(got.candidates, want.candidates)
    _within_fixed_point(got.gradients, want.gradients)
    assert torch.equal(got.task_ids, want.task_ids)
    assert got.task_ids.unique().numel() > 1  # the queries do not all land on one task
    assert (got.method, got.mode, got.passes) == ("one_shot", "per_example", 1)
    assert torch.equal(sharded_fc.classify(x, got.task_ids), engine.classify(x, want.task_ids))


def test_sharded_bank_refuses_binary_and_bad_queries(sharded_fc: ShardedBank) -> None:
    with pytest.raises(ShardedInferenceError, match="binary inference is not answered by a "
                                                    "sharded bank"):
        sharded_fc.infer(_queries(2, seed=2), method="binary")
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 12, 12\)"):
        sharded_fc.infer(torch.zeros(2, 1, 5, 5))
    with pytest.raises(KeyError, match=r"no shard holds tasks \[40\]"):
        sharded_fc.classify(_queries(1, seed=3), torch.tensor([40]))


def test_sharded_conv_answers_equal_the_unsharded_engine(ray_local: None,
                                                         registry_root: Path) -> None:
    """Per-task BN statistics are mixed across shards; conv gradients are float sums (and the
    head's linear layers fixed point), so they agree within the engine's tolerance and the task
    ids exactly."""
    source = _publish(registry_root, "conv-bank", _conv(), 5, seed=4)
    x = _queries(6, seed=5)
    bank, spec = load_bank(source)
    engine = InferenceEngine(build_network(spec), bank)
    want = engine.infer(x)
    with ShardedBank.from_source(source, 2) as sharded:
        assert [len(s.task_ids) for s in sharded.shards] == [3, 2]
        got = sharded.infer(x)
        classes = sharded.classify(x, got.task_ids)
    _within_fixed_point(got.gradients, want.gradients)
    assert torch.equal(got.task_ids, want.task_ids)
    assert torch.equal(classes, engine.classify(x, want.task_ids))


def test_a_source_whose_snapshot_the_shards_do_not_hold_is_refused(
        ray_local: None, fc_source: BankSource) -> None:
    """A source naming tasks 0-9 with the snapshot of 0-10: each range loads what its files
    hold, and together they do not hash to the snapshot named, so nothing is answered."""
    wrong = dataclasses.replace(fc_source, task_ids=fc_source.task_ids[:-1])
    with pytest.raises(BankMismatchError, match=r"its shards' masks hash to [0-9a-f]{12}; a task "
                                                "was rewritten"):
        ShardedBank.from_source(wrong, 2)
    gone = dataclasses.replace(fc_source, task_ids=(*fc_source.task_ids, 99))
    with pytest.raises(BankMismatchError, match=r"lacks tasks \[99\]; it holds 11 tasks \(0..10\)"):
        ShardedBank.from_source(gone, 2)


def test_a_bank_file_pinned_to_some_tasks_is_sharded_by_its_own_tasks(
        ray_local: None, registry_root: Path, fc_source: BankSource, tmp_path: Path) -> None:
    """A bank file (as embedded in a model version) holding tasks 2-8 only: the shards split
    those tasks, read them from the file, and answer as the whole file does."""
    dest = tmp_path / "bank.parquet"
    located = export_bank(MaskRegistry(registry_root), "fc-bank", dest, range(2, 9))
    source = located.with_location(export=str(dest))
    x = _queries(7, seed=6)
    bank, spec = load_bank(source)
    want = InferenceEngine(build_network(spec), bank).infer(x)
    with ShardedBank.from_source(source, 2) as sharded:
        assert [s.task_ids for s in sharded.shards] == [(2, 3, 4, 5), (6, 7, 8)]
        got = sharded.infer(x)
    assert torch.equal(got.candidates, torch.arange(2, 9))
    _within_fixed_point(got.gradients, want.gradients)
    assert torch.equal(got.task_ids, want.task_ids)
