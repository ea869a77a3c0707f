"""The hook on the real DeepSpeed engine: 2 and 4 CPU processes on gloo, compared with local SGD done by
hand in one process (hook_reference.py). Scenarios run in hook_worker.py; see there for the setups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from hook_reference import reference

pytestmark = pytest.mark.slow
WORKER = str(Path(__file__).with_name("hook_worker.py"))
ATOL = 1e-6  # all-reduce sums in another order than torch.stack(...).mean(); nothing else differs

FIRST_LAUNCH = [
    "msgd_parity",
    "local_h3",
    "postlocal",
    "buffers_broadcast",
    "buffers_local",
    "slowmo_plain",
    "slowmo_beta",
    "grad_accumulation",
    "clipping",
    "attach_errors",
    "zero1_msgd",
    "autocast_bf16",
    "ckpt_full",
    "ckpt_part1",
    "postlocal_offset",
    "msgd_gas",
    "slowmo_loaded",
    "slowmo_loaded_ckpt",
    "slowmo_schedule",
    "slowmo_frozen_group",
    "extras_local",
    "extras_msgd",
    "tied_local",
    "autocast_reference",
]


WORKERS_LAUNCH = [
    "workers_local",
    "workers_postlocal",
    "workers_slowmo",
    "workers_node",
    "workers_one",
    "workers_errors",
    "workers_ckpt_full",
    "workers_ckpt_part1",
]


def launch(tmp: Path, nprocs: int, scenarios: list[str], ckpt_dir: Path) -> list[dict]:
    run_ranks([WORKER, str(tmp), *scenarios], nprocs, timeout=600, env={"CKPT_DIR": str(ckpt_dir)})
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    ckpt = tmp_path_factory.mktemp("ckpt")
    first = launch(tmp_path_factory.mktemp("k2"), 2, FIRST_LAUNCH, ckpt)
    # The resume runs in fresh processes, as after a crash.
    second = launch(tmp_path_factory.mktemp("k2resume"), 2, ["ckpt_part2", "ckpt_changed_h"], ckpt)
    four = launch(tmp_path_factory.mktemp("k4"), 4, ["local_h3", "postlocal", *WORKERS_LAUNCH], ckpt)
    four_resumed = launch(tmp_path_factory.mktemp("k4resume"), 4, ["workers_ckpt_part2"], ckpt)
    return {
        "k2": [{**a, **b} for a, b in zip(first, second)],
        "k4": [{**a, **b} for a, b in zip(four, four_resumed)],
    }


def per_rank(runs, scenario, k="k2"):
    return [r[scenario] for r in runs[k]]


def assert_matches_reference(results: list[dict], ref: list[dict], atol: float = ATOL) -> None:
    for rank, (ours, theirs) in enumerate(zip(results, ref)):
        for name, expected in theirs.items():
            got = ours["model"][name]
            assert got.dtype == expected.dtype, name
            torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=f"rank {rank} {name}")


def test_msgd_phase_equals_plain_deepspeed_step_for_step(runs):
    for r in per_rank(runs, "msgd_parity"):
        assert len(r["ours"]) == len(r["plain"]) == 6
        for step, (ours, plain) in enumerate(zip(r["ours"], r["plain"])):
            for a, b in zip(ours, plain):
                assert torch.equal(a, b), f"step {step} differs from plain DeepSpeed"
        assert r["stats"]["syncs"] == 0 and r["stats"]["grad_allreduces"] == 6
    ranks = per_rank(runs, "msgd_parity")
    mean = (ranks[0]["bn_before"] + ranks[1]["bn_before"]) / 2
    assert not torch.equal(ranks[0]["bn_before"], ranks[1]["bn_before"])  # DeepSpeed never syncs buffers
    for r in ranks:  # averaged() evaluates the mean statistics, then gives each rank its own back
        torch.testing.assert_close(r["bn_inside"], mean, atol=ATOL, rtol=0)
        assert torch.equal(r["bn_after"], r["bn_before"])


@pytest.mark.parametrize("k", ["k2", "k4"])
def test_local_sgd_no_collectives_between_syncs_and_matches_hand_reference(runs, k):
    results = per_rank(runs, "local_h3", k)
    K = len(results)
    trace = results[0]["trace"]
    assert all(t["local"] for t in trace)
    for t in trace:
        if (t["step"] + 1) % 3 == 0:  # H = 3: a sync after steps 3 and 6
            # parameters and BN statistics share one flat fp32 buffer; num_batches_tracked (int64) is apart
            assert t["collectives"] == ["all_reduce"] * 2, t
        else:
            assert t["collectives"] == [], f"step {t['step']} issued {t['collectives']}"
    for step_idx, t in enumerate(trace):
        params = [r["trace"][step_idx]["params"] for r in results]
        same = all(torch.equal(a, b) for other in params[1:] for a, b in zip(params[0], other))
        assert same == ((t["step"] + 1) % 3 == 0), f"step {t['step']}: identical across ranks = {same}"
    assert results[0]["stats"]["syncs"] == 2 and results[0]["stats"]["grad_allreduces"] == 0
    assert_matches_reference(results, reference(K, 7, H=3, switch=0))


@pytest.mark.parametrize("k", ["k2", "k4"])
def test_post_local_switches_at_T_times_steps_per_epoch(runs, k):
    results = per_rank(runs, "postlocal", k)
    trace = results[0]["trace"]
    assert [t["local"] for t in trace] == [False] * 4 + [True] * 5  # T = 1 epoch of 4 steps
    for t in trace[:4]:
        assert t["collectives"] == ["all_reduce"], t  # DeepSpeed's own gradient all-reduce, one bucket
    assert [len(t["collectives"]) for t in trace[4:]] == [0, 2, 0, 2, 0]  # first sync H = 2 after the switch
    assert results[0]["stats"]["grad_allreduces"] == 4 and results[0]["stats"]["syncs"] == 2
    assert_matches_reference(results, reference(len(results), 9, H=2, switch=4))


def test_buffer_and_momentum_policies(runs):
    bcast = per_rank(runs, "buffers_broadcast")
    assert_matches_reference(bcast, reference(2, 4, H=2, switch=0, buffers="broadcast", momentum="average"))
    for a, b in zip(bcast[0]["momentum"], bcast[1]["momentum"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # averaged momentum: identical after the sync
    # params, momentum, then the BN buffers from rank 0 (fp32 bucket, int64 bucket)
    assert bcast[0]["trace"][1]["collectives"] == ["all_reduce", "all_reduce", "broadcast", "broadcast"]
    local = per_rank(runs, "buffers_local")
    assert_matches_reference(local, reference(2, 4, H=2, switch=0, buffers="local", momentum="reset"))
    assert not torch.equal(local[0]["model"]["bn.running_mean"], local[1]["model"]["bn.running_mean"])
    assert all(m.abs().max() == 0 for m in local[0]["momentum"])  # reset at the sync after the last step


def test_integer_buffers_are_not_averaged_as_floats(runs):
    for r in per_rank(runs, "local_h3"):
        tracked = r["model"]["bn.num_batches_tracked"]
        assert tracked.dtype == torch.int64 and tracked.item() == 7


def test_slowmo_beta0_alpha1_is_plain_local_sgd_and_beta_matches_formula(runs):
    plain = per_rank(runs, "slowmo_plain")
    assert_matches_reference(plain, reference(2, 8, H=2, switch=2))
    assert_matches_reference(
        per_rank(runs, "slowmo_beta"), reference(2, 8, H=2, switch=2, slowmo=(0.5, 0.8)), atol=1e-5
    )
    # and beta > 0 really moves the weights away from plain averaging
    diff = (
        (per_rank(runs, "slowmo_beta")[0]["model"]["fc.weight"] - plain[0]["model"]["fc.weight"]).abs().max()
    )
    assert diff > 1e-3


def test_gradient_accumulation_counts_optimizer_steps_not_micro_batches(runs):
    results = per_rank(runs, "grad_accumulation")
    assert results[0]["step"] == 5
    assert [len(t["collectives"]) for t in results[0]["trace"]] == [0, 2, 0, 2, 0]
    assert_matches_reference(results, reference(2, 5, H=2, switch=0, gas=3))


def test_gradient_clipping_is_local_in_the_local_phase(runs):
    results = per_rank(runs, "clipping")
    trace = results[0]["trace"]
    # mSGD steps: the gradient all-reduce plus DeepSpeed's norm all-reduce; local steps: nothing
    assert [len(t["collectives"]) for t in trace] == [2, 2, 0, 2, 0, 2]
    assert_matches_reference(results, reference(2, 6, H=2, switch=2, clip=0.05))


def test_autocast_bf16_averages_the_fp32_weights(runs):
    results = per_rank(runs, "autocast_bf16")
    assert [len(t["collectives"]) for t in results[0]["trace"]] == [0, 2, 0, 2]
    for name, v in results[0]["model"].items():
        assert v.dtype in (torch.float32, torch.int64), name
        assert torch.equal(v, results[1]["model"][name]), f"{name} differs right after a sync"


def test_msgd_under_zero1_is_untouched(runs):
    for r in per_rank(runs, "zero1_msgd"):
        assert len(r["ours"]) == len(r["plain"]) == 4
        for step, (ours, plain) in enumerate(zip(r["ours"], r["plain"])):
            for a, b in zip(ours, plain):
                assert torch.equal(a, b), f"ZeRO-1 step {step} differs from plain DeepSpeed"


def test_attach_refuses_bad_setups_by_key(runs):
    for errors in per_rank(runs, "attach_errors"):
        assert "local_sgd.K = 3" in errors["K"] and "world size is 2" in errors["K"]
        assert "zero_optimization.stage = 1" in errors["zero"]
        assert errors["zero_legacy"] is not None, "the legacy ZeRO flag passed (it crashes at the first step)"
        assert "zero_optimization = true (ZeRO stage 1)" in errors["zero_legacy"]
        assert '"local_sgd"' in errors["missing"]


def test_checkpoint_mid_period_resumes_exactly(runs):
    full, part1, part2 = (per_rank(runs, s) for s in ("ckpt_full", "ckpt_part1", "ckpt_part2"))
    for rank in range(2):
        # saving the averaged model does not change the live (local) weights
        for name, v in part1[rank]["before_save"]["model"].items():
            assert torch.equal(v, part1[rank]["after_save"]["model"][name]), name
        assert part2[rank]["resumed_step"] == 5
        for name, v in full[rank]["model"].items():
            assert torch.equal(v, part2[rank]["model"][name]), f"rank {rank} {name} differs after resume"
        for a, b in zip(full[rank]["momentum"], part2[rank]["momentum"]):
            assert torch.equal(a, b)
    # the two ranks were really different at the save (mid-period), so the rank files mattered
    assert not torch.equal(
        part1[0]["before_save"]["model"]["fc.weight"], part1[1]["before_save"]["model"]["fc.weight"]
    )


def test_checkpoint_model_file_holds_the_global_average(runs, tmp_path_factory):
    part1 = per_rank(runs, "ckpt_part1")
    ckpt = Path(tmp_path_factory.getbasetemp()) / "ckpt0" / "part" / "mid" / "mp_rank_00_model_states.pt"
    saved = torch.load(ckpt, weights_only=False)["module"]
    mean = (part1[0]["before_save"]["model"]["fc.weight"] + part1[1]["before_save"]["model"]["fc.weight"]) / 2
    torch.testing.assert_close(saved["fc.weight"], mean, atol=ATOL, rtol=0)


def test_resume_with_changed_H_is_refused(runs):
    for r in per_rank(runs, "ckpt_changed_h"):
        assert r["error"] is not None and "H: checkpoint 4 -> now 2" in r["error"]


# -- what an outside audit found: each compared with the hand reference, not with the hook itself ------------


def test_post_local_switch_not_a_multiple_of_H_counts_from_the_switch(runs):
    results = per_rank(runs, "postlocal_offset")
    # switch after 3 steps, H = 2: syncs after steps 5 and 7 (a hook syncing on step % H would sync at 4, 6, 8)
    assert [len(t["collectives"]) > 0 for t in results[0]["trace"][3:]] == [False, True, False, True, False]
    assert_matches_reference(results, reference(2, 8, H=2, switch=3))


def test_gradient_allreduce_counters_count_optimizer_steps(runs):
    for r in per_rank(runs, "msgd_gas"):
        all_reduces = sum(len(t["collectives"]) for t in r["trace"])
        assert all_reduces == 4  # DeepSpeed reduces at the accumulation boundary: one per optimizer step
        assert r["stats"]["grad_allreduces"] == 4
        param_bytes = sum(
            v.numel() * 4 for k, v in r["model"].items() if "running" not in k and "num" not in k
        )
        assert r["stats"]["grad_allreduce_bytes"] == 4 * param_bytes


@pytest.mark.parametrize("scenario", ["slowmo_loaded", "slowmo_loaded_ckpt"])
def test_slowmo_anchor_follows_weights_loaded_after_attach(runs, scenario):
    # the same run started on the loaded weights (seed 1), by hand
    ref = reference(2, 8, H=2, switch=0, slowmo=(0.5, 1.0), seed=1)
    assert_matches_reference(per_rank(runs, scenario), ref, atol=1e-5)


def test_slowmo_uses_each_groups_lr_of_the_last_step_under_a_schedule_and_a_forced_sync(runs):
    ref = reference(
        2, 10, H=4, switch=0, slowmo=(0.5, 1.0), group_lrs=(0.1, 0.05), schedule=True, forced=(6,)
    )
    assert_matches_reference(per_rank(runs, "slowmo_schedule"), ref, atol=1e-5)
    # the lr really matters here: the same run with the lr left out of the formula ends elsewhere
    flat = reference(
        2, 10, H=4, switch=0, slowmo=(0.5, 1.0), group_lrs=(0.1, 0.1), schedule=True, forced=(6,)
    )
    assert (flat[0]["fc.weight"] - ref[0]["fc.weight"]).abs().max() > 1e-3


def test_slowmo_with_a_group_frozen_by_lr_zero_still_acts_on_the_others(runs):
    results = per_rank(runs, "slowmo_frozen_group")
    assert_matches_reference(results, reference(2, 6, H=2, switch=0, slowmo=(0.5, 1.0), group_lrs=(0.0, 0.1)))
    plain = reference(2, 6, H=2, switch=0, group_lrs=(0.0, 0.1))  # SlowMo off
    assert (results[0]["model"]["fc.weight"] - plain[0]["fc.weight"]).abs().max() > 1e-3


def test_bool_buffers_are_never_averaged_and_int_buffers_take_the_floor_of_the_mean(runs, tmp_path_factory):
    results = per_rank(runs, "extras_local")
    assert_matches_reference(results, reference(2, 4, H=2, switch=0, variant="extras"))
    for r in results:
        assert r["model"]["mask"].dtype == torch.bool and bool(r["model"]["mask"].all())
    # counters started at 1 and 6, +1 per step; sync after 2 steps: floor((3 + 8) / 2) = 5; then 7 at the end
    assert [r["model"]["counter"].item() for r in results] == [7, 7]
    for rank, r in enumerate(per_rank(runs, "extras_msgd")):  # plain mSGD (T = null)
        assert bool(r["inside"]["mask"].all()) and bool(r["model"]["mask"].all())
        assert r["inside"]["counter"].item() == (3 + 8) // 2  # averaged() evaluates the floor of the mean
        assert r["model"]["counter"].item() == 5 * rank + 3  # and gives each rank its own back
    ckpt = Path(tmp_path_factory.getbasetemp()) / "ckpt0" / "extras" / "end" / "mp_rank_00_model_states.pt"
    saved = torch.load(ckpt, weights_only=False)["module"]
    assert bool(saved["mask"].all()), "the saved model's mask was averaged"


def test_tied_parameters_stay_tied(runs):
    results = per_rank(runs, "tied_local")
    for r in results:
        assert r["tied"] == (True, True)
    assert_matches_reference(results, reference(2, 4, H=2, switch=0, variant="tied"))


def test_autocast_bf16_matches_a_reference_run(runs):
    assert_matches_reference(
        per_rank(runs, "autocast_reference"), reference(2, 6, H=2, switch=0, autocast=True)
    )


# -- workers of several ranks (issue: a worker is a node) -----------------------------------------------------

WORKER_OF = {0: (0, 1), 1: (0, 1), 2: (2, 3), 3: (2, 3)}


def assert_workers_behave(results: list[dict], H: int, switch: int) -> None:
    """On local steps no collective spans workers except at a sync; a worker's ranks are identical at every
    step; workers differ between syncs."""
    for rank, r in enumerate(results):
        for t in r["trace"]:
            if not t["local"]:
                continue
            sync = (t["step"] + 1 - switch) % H == 0
            spanning = [g for g in t["groups"] if not set(g) <= set(WORKER_OF[rank])]
            if not sync:
                assert spanning == [], (
                    f"rank {rank} step {t['step']}: collectives span workers: {t['groups']}"
                )
            else:
                assert spanning, f"rank {rank} step {t['step']}: a sync without a collective across workers"
    for step_idx, t in enumerate(results[0]["trace"]):
        params = [r["trace"][step_idx]["params"] for r in results]
        for a, b in ((0, 1), (2, 3)):
            assert all(torch.equal(x, y) for x, y in zip(params[a], params[b])), (
                f"worker ranks {a}, {b} differ"
            )
        if t["local"] and (t["step"] + 1 - switch) % H != 0:
            assert not all(torch.equal(x, y) for x, y in zip(params[0], params[2])), (
                "workers identical off-sync"
            )


def test_workers_of_two_ranks_local_sgd_matches_reference(runs):
    results = per_rank(runs, "workers_local", "k4")
    assert_workers_behave(results, H=2, switch=0)
    assert_matches_reference(results, reference(4, 5, H=2, switch=0, ranks_per_worker=2))
    stats = results[0]["stats"]
    assert stats["worker_grad_allreduces"] == 5 and stats["grad_allreduces"] == 0 and stats["syncs"] == 2
    assert stats["bytes_inside_workers"] > 0 and stats["bytes_across_workers"] > 0


def test_workers_post_local_with_accumulation_and_clipping_matches_reference(runs):
    results = per_rank(runs, "workers_postlocal", "k4")
    assert [t["local"] for t in results[0]["trace"]] == [False] * 3 + [True] * 5
    assert_workers_behave(results, H=2, switch=3)
    ref = reference(4, 8, H=2, switch=3, gas=2, clip=0.05, ranks_per_worker=2)
    assert_matches_reference(results, ref)


def test_workers_slowmo_matches_reference(runs):
    results = per_rank(runs, "workers_slowmo", "k4")
    ref = reference(4, 6, H=2, switch=0, slowmo=(0.5, 1.0), ranks_per_worker=2)
    assert_matches_reference(results, ref, atol=1e-5)


def test_sync_sends_one_copy_per_worker_across_workers(runs):
    results = per_rank(runs, "workers_local", "k4")
    param_bytes = sum(v.numel() * 4 for k, v in results[0]["model"].items() if v.is_floating_point())
    across = sum(r["stats"]["bytes_across_workers"] for r in results[:2])  # both ranks of worker 0
    counters = (
        2 * 2 * 8
    )  # num_batches_tracked (int64) all-reduced over the world at each of 2 syncs, per rank
    assert across == 2 * param_bytes + counters  # 2 syncs, each one copy of parameters + BN statistics


def test_node_equals_ranks_per_worker_two_and_one_equals_today(runs):
    node, two = per_rank(runs, "workers_node", "k4"), per_rank(runs, "workers_local", "k4")
    for a, b in zip(node, two):
        for name, v in a["model"].items():
            assert torch.equal(v, b["model"][name]), name
    for r in per_rank(runs, "workers_one", "k4"):
        for name, v in r["with_key"]["model"].items():
            assert torch.equal(v, r["without"]["model"][name]), name
        assert r["with_key"]["trace"][1]["collectives"] == r["without"]["trace"][1]["collectives"]


def test_workers_refusals_name_the_key_and_value(runs):
    for errors in per_rank(runs, "workers_errors", "k4"):
        assert "local_sgd.ranks_per_worker = 3 does not divide the world size 4" in errors["not_dividing"]
        assert "local_sgd.K = 4 but world size 4 / ranks_per_worker 2 = 2 workers" in errors["K"]
        assert 'local_sgd.ranks_per_worker must be an integer >= 1 or "node", got 0' in errors["bad_value"]
        assert 'ranks_per_worker = "node" but the nodes run [1, 2] ranks' in errors["unequal_nodes"]


def test_workers_checkpoint_mid_period_resumes_exactly(runs):
    full, part1, part2 = (
        per_rank(runs, s, "k4") for s in ("workers_ckpt_full", "workers_ckpt_part1", "workers_ckpt_part2")
    )
    assert not torch.equal(
        part1[0]["before_save"]["model"]["fc.weight"], part1[2]["before_save"]["model"]["fc.weight"]
    )
    for rank in range(4):
        assert part2[rank]["resumed_step"] == 5
        for name, v in full[rank]["model"].items():
            assert torch.equal(v, part2[rank]["model"][name]), f"rank {rank} {name} differs after resume"
        for a, b in zip(full[rank]["momentum"], part2[rank]["momentum"]):
            assert torch.equal(a, b)
