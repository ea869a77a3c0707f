"""Pure logic: the local_sgd block, the schedule, the DeepSpeed settings check, bucketing."""

from __future__ import annotations

import pytest
import torch

from localsgd_ds.averaging import _buckets
from localsgd_ds.config import ConfigError, LocalSGDConfig, SlowMoConfig


def test_defaults_are_msgd():
    cfg = LocalSGDConfig.from_dict({}, world_size=4)
    assert (cfg.H, cfg.K, cfg.T, cfg.buffers, cfg.momentum, cfg.slowmo) == (
        1,
        4,
        None,
        "average",
        "local",
        None,
    )
    assert not cfg.uses_local_phase and cfg.switch_step(10) is None


def test_full_block_parses_into_frozen_dataclasses():
    cfg = LocalSGDConfig.from_dict(
        {"H": 8, "K": 2, "T": 30, "buffers": "broadcast", "momentum": "reset", "slowmo": {"beta": 0.5}},
        world_size=2,
    )
    assert cfg.slowmo == SlowMoConfig(beta=0.5, alpha=1.0)
    assert cfg.to_dict()["slowmo"] == {"beta": 0.5, "alpha": 1.0}
    with pytest.raises(AttributeError):
        cfg.H = 4  # frozen


@pytest.mark.parametrize(
    "block, message",
    [
        ({"H": 0, "T": 0}, "local_sgd.H must be an integer >= 1, got 0"),
        ({"H": 2.5, "T": 0}, "local_sgd.H must be an integer >= 1, got 2.5"),
        ({"H": True, "T": 0}, "local_sgd.H must be an integer >= 1, got True"),
        ({"H": 2, "T": -1}, "local_sgd.T must be an integer number of epochs >= 0 or null, got -1"),
        ({"H": 2}, "local_sgd.T is missing"),
        ({"K": 3}, "local_sgd.K = 3 but the data-parallel world size is 2"),
        ({"K": 0}, "local_sgd.K must be an integer >= 1"),
        ({"buffers": "sum"}, "local_sgd.buffers must be one of ['average', 'broadcast', 'local'], got 'sum'"),
        ({"momentum": "keep"}, "local_sgd.momentum must be one of ['local', 'average', 'reset'], got 'keep'"),
        ({"h": 2}, "local_sgd: unknown key(s) ['h']; known keys are ['H', 'K', 'T'"),
        ({"slowmo": {"beta": 1.0}}, "local_sgd.slowmo.beta must be a number in [0, 1), got 1.0"),
        ({"slowmo": {"alpha": 0}}, "local_sgd.slowmo.alpha must be a number > 0, got 0"),
        ({"slowmo": {"lr": 1}}, "local_sgd.slowmo: unknown key(s) ['lr']"),
        ({"slowmo": 0.5}, "local_sgd.slowmo must be null or an object"),
        ({"bucket_mb": -1}, "local_sgd.bucket_mb must be a number > 0, got -1"),
    ],
)
def test_bad_values_name_the_key_and_value(block, message):
    with pytest.raises(ConfigError) as e:
        LocalSGDConfig.from_dict(block, world_size=2)
    assert message in str(e.value)


def test_block_must_be_an_object():
    with pytest.raises(ConfigError, match="local_sgd must be a JSON object"):
        LocalSGDConfig.from_dict([1, 2])


def test_schedule_first_sync_is_H_steps_after_the_switch():
    cfg = LocalSGDConfig.from_dict({"H": 3, "T": 2})  # switch at step 2 x 5 = 10
    assert [s for s in range(20) if cfg.is_local_step(s, 5)] == list(range(10, 20))
    assert [n for n in range(1, 21) if cfg.sync_due(n, 5)] == [13, 16, 19]
    never = LocalSGDConfig.from_dict({"H": 3, "T": None})
    assert not any(never.is_local_step(s, 5) or never.sync_due(s, 5) for s in range(50))


def test_buckets_are_bounded_and_split_by_dtype():
    ts = [
        torch.zeros(10),
        torch.zeros(30),
        torch.zeros(5, dtype=torch.int64),
        torch.zeros(100),
        torch.zeros(20),
    ]
    buckets = list(_buckets(ts, bucket_numel=40))
    shapes = [[t.numel() for t in b] for b in buckets]
    assert shapes == [[100], [10, 30], [20], [5]]  # the big one alone, at once; int64 apart
    assert all(len({t.dtype for t in b}) == 1 for b in buckets)


def test_flatten_makes_parameters_views_of_one_buffer_and_keeps_layout():
    from localsgd_ds.averaging import flatten_

    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    lin = torch.nn.Linear(4, 2)
    params = [conv.weight, conv.bias, lin.weight, lin.bias]
    before = [p.detach().clone() for p in params]
    strides = [p.stride() for p in params]
    buffers, leftovers = flatten_(params)
    assert len(buffers) == 1 and leftovers == []
    assert buffers[0].numel() == sum(p.numel() for p in params)
    for p, b, st in zip(params, before, strides):
        assert torch.equal(p, b) and p.stride() == st  # same values, same (channels_last) layout
        assert p.untyped_storage().data_ptr() == buffers[0].untyped_storage().data_ptr()
    buffers[0].fill_(2.0)  # writing the buffer writes the parameters: averaging it in place is enough
    assert all(bool((p == 2.0).all()) for p in params)
    loss = conv(torch.randn(1, 3, 5, 5)).sum() + lin(torch.randn(1, 4)).sum()
    loss.backward()  # autograd still works on the views
    assert conv.weight.grad is not None and conv.weight.grad.shape == conv.weight.shape


class _Engine:
    """What check_engine asks of a DeepSpeed engine: its config and what it actually runs."""

    def __init__(self, config: dict, stage: int = 0, fp16: bool = False, bf16: bool = False) -> None:
        self.config, self._stage, self._fp16, self._bf16 = config, stage, fp16, bf16

    def zero_optimization_stage(self) -> int:
        return self._stage

    def fp16_enabled(self) -> bool:
        return self._fp16

    def bfloat16_enabled(self) -> bool:
        return self._bf16


@pytest.mark.parametrize(
    "engine, key",
    [
        (_Engine({"zero_optimization": {"stage": 2}}, stage=2), "zero_optimization.stage = 2"),
        (_Engine({"zero_optimization": True}, stage=1), r"zero_optimization = true \(ZeRO stage 1\)"),
        (_Engine({"fp16": {"enabled": True}}, fp16=True), r"fp16\.enabled = true"),
        (_Engine({"bfloat16": {"enabled": True}}, bf16=True), r"bfloat16\.enabled = true"),
    ],
)
def test_check_engine_refuses_what_the_engine_runs_by_key(engine, key):
    from localsgd_ds.config import check_engine

    with pytest.raises(ConfigError, match=key):
        check_engine(engine, LocalSGDConfig.from_dict({"H": 2, "T": 0}))
    check_engine(engine, LocalSGDConfig.from_dict({"T": None}))  # plain mSGD runs whatever DeepSpeed runs


def test_flat_layout_keeps_exact_aliases_tied_and_refuses_partial_overlap():
    from localsgd_ds.flat import FlatLayout

    a, b, c = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    b.weight.data = a.weight.data  # tied through .data: one storage
    params = [a.weight, a.bias, b.weight, b.bias, c.weight]
    layout = FlatLayout(params, [], buffer_policy="average", flatten=True)
    assert a.weight.data_ptr() == b.weight.data_ptr()
    assert layout.flats[0].numel() == 9 + 3 + 3 + 9  # the tied weight is stored once
    layout.flats[0].fill_(1.5)
    assert bool((b.weight == 1.5).all()) and bool((c.weight == 1.5).all())

    whole = torch.nn.Parameter(torch.zeros(10))
    left, right = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    left.data, right.data = whole.data[:6], whole.data[4:]  # share part of one storage
    names = {id(left): "left", id(right): "right"}
    with pytest.raises(ConfigError, match="'left' and 'right' share part of one storage"):
        FlatLayout([left, right], [], buffer_policy="average", flatten=True, names=names)


def test_resolve_checks_K_against_the_number_of_workers():
    cfg = LocalSGDConfig.from_dict({"H": 2, "T": 0})
    assert cfg.resolve(8).K == 8 and LocalSGDConfig.from_dict({"H": 2, "T": 0, "K": 4}).resolve(4).K == 4
    with pytest.raises(ConfigError, match="local_sgd.K = 4 but the data-parallel world size is 2"):
        LocalSGDConfig.from_dict({"H": 2, "T": 0, "K": 4}).resolve(2)


def test_ranks_per_worker_resolves_K_and_node_waits_for_the_launcher():
    cfg = LocalSGDConfig.from_dict({"H": 2, "T": 0, "ranks_per_worker": 8})
    assert cfg.resolve(64) == LocalSGDConfig.from_dict({"H": 2, "T": 0, "K": 8, "ranks_per_worker": 8})
    node = LocalSGDConfig.from_dict({"H": 2, "T": 0, "ranks_per_worker": "node"})
    assert node.resolve(16) is node  # no local size known yet: attach resolves it on every rank
    assert node.resolve(16, local_size=4).ranks_per_worker == 4 and node.resolve(16, local_size=4).K == 4
    with pytest.raises(ConfigError, match='"node" = 3 ranks on this node, which does not divide'):
        node.resolve(16, local_size=3)
