"""The cost model (localsgd_ds/cost_model.py) is pure arithmetic: check its formulas and limits."""

from __future__ import annotations

import pytest

from localsgd_ds.cost_model import (
    MODEL_SIZES,
    Link,
    Workload,
    allreduce_seconds,
    answer_table,
    fit_link,
    main,
    predict,
    ring_allreduce_bytes,
    steps_per_epoch,
)

WORK = Workload.for_model("resnet50", compute_s=0.1)


def test_ring_allreduce_moves_2_k_minus_1_over_k_of_the_bytes():
    assert ring_allreduce_bytes(100.0, 1) == 0.0
    assert ring_allreduce_bytes(100.0, 2) == pytest.approx(100.0)
    assert ring_allreduce_bytes(100.0, 4) == pytest.approx(150.0)
    assert ring_allreduce_bytes(100.0, 256) == pytest.approx(2 * 255 / 256 * 100.0)


def test_allreduce_seconds_is_latency_plus_bytes_over_bandwidth():
    link = Link(gbit_per_s=8.0, latency_s=1e-3)  # 1 GB/s
    # K = 4: 6 hops of latency, 1.5 x 1 GB at 1 GB/s
    assert allreduce_seconds(1e9, 4, link) == pytest.approx(6e-3 + 1.5)


def test_one_worker_communicates_nothing():
    link = Link(gbit_per_s=25)
    for H in (None, 1, 8):
        p = predict(WORK, workers=1, link=link, H=H)
        assert p.comm_s == 0 and p.wire_bytes_per_step == 0 and p.comm_share == 0
        assert p.step_s == pytest.approx(WORK.compute_s)


def test_local_sgd_with_h1_sends_what_msgd_sends_give_or_take_the_buffers():
    link = Link(gbit_per_s=25)
    msgd = predict(WORK, workers=64, link=link)
    h1 = predict(WORK, workers=64, link=link, H=1)
    assert h1.wire_bytes_per_step == pytest.approx(msgd.wire_bytes_per_step, rel=0.01)
    assert h1.step_s == pytest.approx(msgd.step_s, rel=0.01)


def test_local_sgd_divides_communication_by_h():
    link = Link(gbit_per_s=25)
    h1 = predict(WORK, workers=64, link=link, H=1)
    for H in (2, 4, 8, 16, 32):
        p = predict(WORK, workers=64, link=link, H=H)
        assert p.comm_s == pytest.approx(h1.comm_s / H)
        assert p.wire_bytes_per_step == pytest.approx(h1.wire_bytes_per_step / H)


def test_more_bandwidth_never_costs_time_and_lowers_the_share():
    shares, steps = [], []
    for gbit in (1, 10, 25, 100, 400):
        p = predict(WORK, workers=64, link=Link(gbit_per_s=gbit))
        shares.append(p.comm_share)
        steps.append(p.step_s)
    assert shares == sorted(shares, reverse=True) and steps == sorted(steps, reverse=True)


def test_epoch_is_steps_times_step_time_with_the_global_batch():
    p = predict(WORK, workers=64, link=Link(gbit_per_s=25))
    assert steps_per_epoch(WORK, 64) == -(-1_281_167 // (32 * 64))
    assert p.epoch_s == pytest.approx(p.steps_per_epoch * p.step_s)


def test_model_sizes_count_parameters_and_buffers():
    params, float_buffers, int_buffers = MODEL_SIZES["resnet50"]
    w = Workload.for_model("resnet50", compute_s=0.1)
    assert w.grad_bytes == 4 * params
    assert w.sync_bytes == 4 * (params + float_buffers) + 8 * int_buffers
    with pytest.raises(ValueError, match="unknown model"):
        Workload.for_model("vgg", compute_s=0.1)


def test_fit_link_recovers_the_link_that_made_the_timings():
    truth = Link(gbit_per_s=3.0, latency_s=50e-6)
    samples = [(n, allreduce_seconds(n, 4, truth)) for n in (4e3, 6.4e4, 1e6, 8e6, 6.4e7)]
    fitted = fit_link(samples, 4)
    assert fitted.gbit_per_s == pytest.approx(3.0, rel=1e-6)
    assert fitted.latency_s == pytest.approx(50e-6, rel=1e-6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        Link(gbit_per_s=0)
    with pytest.raises(ValueError):
        predict(WORK, workers=4, link=Link(gbit_per_s=1), H=0)
    with pytest.raises(ValueError):
        fit_link([(1e6, 1e-3)], 2)


def test_cli_prints_the_k64_25gbit_answer(capsys):
    main([])
    out = capsys.readouterr().out
    assert "K = 64" in out and "25 Gbit/s" in out and "H = 8" in out
    assert "| mSGD |" in out and "| local SGD H=8 |" in out
    table = answer_table(WORK, workers=64, link=Link(gbit_per_s=25))
    assert table.count("\n") == 8  # header, rule, mSGD and H in 1..32


def test_nodes_as_workers_pay_one_intra_node_gradient_all_reduce_per_step_and_send_the_same_across():
    from localsgd_ds.cost_model import Link, Workload, allreduce_seconds, predict_nodes, ring_allreduce_bytes

    work = Workload.for_model("resnet50", compute_s=0.1)
    inter, intra = Link(25), Link(2400, latency_s=2e-6)
    kw = dict(nodes=32, gpus_per_node=8, inter=inter, intra=intra)
    msgd = predict_nodes(work, **kw)
    gpu = predict_nodes(work, H=8, worker="gpu", **kw)
    node = predict_nodes(work, H=8, worker="node", **kw)
    assert (msgd.workers, gpu.workers, node.workers) == (256, 256, 32)
    # one copy of the data per node crosses the node's link, whoever the worker is
    assert gpu.wire_bytes_per_step == node.wire_bytes_per_step
    assert abs(node.wire_bytes_per_step - ring_allreduce_bytes(work.sync_bytes, 32) / 8) < 1e-6
    assert abs(node.comm_s - gpu.comm_s - allreduce_seconds(work.grad_bytes, 8, intra)) < 1e-12
    # hierarchical mSGD: inside (NVLink) plus across (the node's link)
    expect = allreduce_seconds(work.grad_bytes, 8, intra) + allreduce_seconds(work.grad_bytes, 32, inter)
    assert abs(msgd.comm_s - expect) < 1e-12
    assert msgd.steps_per_epoch == gpu.steps_per_epoch == node.steps_per_epoch  # global batch B x 256 GPUs
