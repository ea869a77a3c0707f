"""One rank of a real multi-process DeepSpeed run with the hook attached (launched by tests/distributed.py).

    python tests/hook_worker.py OUT_DIR SCENARIO [SCENARIO ...]

Runs each named scenario on a fresh engine in the same gloo world and saves this rank's results to
OUT_DIR/rank<r>.pt as {scenario: result}. The test process compares them with hook_reference.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

import deepspeed  # noqa: E402
from tiny import batch, loss_fn, lr_factor, make_model, make_optimizer  # noqa: E402

import localsgd_ds  # noqa: E402

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce",
    "barrier",
    "all_to_all_single",
    "all_reduce_coalesced",
    "gather",
    "scatter",
)
calls: list[str] = []
groups: list[tuple[int, ...]] = []  # the ranks of each call's process group, beside ``calls``


def _count_collectives() -> None:
    # Every deepspeed.comm op ends in one of these torch.distributed functions, looked up at call time.
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def counted(*args, __fn=fn, __name=name, **kwargs):
            calls.append(__name)
            group = kwargs.get("group")
            groups.append(tuple(dist.get_process_group_ranks(group or dist.group.WORLD)))
            return __fn(*args, **kwargs)

        setattr(dist, name, counted)


def engine_for(
    local_sgd: dict | None,
    *,
    gas: int = 1,
    clip: float = 0.0,
    extra: dict | None = None,
    seed: int = 0,
    variant: str = "plain",
    group_lrs: tuple[float, float] | None = None,
    schedule: bool = False,
):
    model = make_model(seed, variant, rank=dist.get_rank())
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10**9,
        "gradient_clipping": clip,
        **(extra or {}),
    }
    if local_sgd is not None:
        config["local_sgd"] = local_sgd
    optimizer = make_optimizer(model, group_lrs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor) if schedule else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def train(engine, steps: int, *, start: int = 0, gas: int = 1, hook=None, trace: list | None = None) -> None:
    rank = dist.get_rank()
    for s in range(start, start + steps):
        before = len(calls)
        local = hook.in_local_phase if hook is not None else False
        for micro in range(gas):
            x, y = batch(rank, s, micro)
            engine.backward(loss_fn(engine(x), y))
            engine.step()
        if trace is not None:
            trace.append(
                {
                    "step": s,
                    "local": local,
                    "collectives": calls[before:],
                    "groups": groups[before:],
                    "params": [p.detach().clone() for p in engine.module.parameters()],
                }
            )


def state(engine) -> dict:
    opt = engine.basic_optimizer
    return {
        "model": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
        "momentum": [
            opt.state[p]["momentum_buffer"].clone()
            for p in engine.module.parameters()
            if "momentum_buffer" in opt.state.get(p, {})
        ],
    }


def local_run(block: dict, steps: int, spe: int, *, gas: int = 1, clip: float = 0.0, **model) -> dict:
    engine = engine_for(block, gas=gas, clip=clip, **model)
    hook = localsgd_ds.attach(engine, steps_per_epoch=spe)
    trace: list = []
    train(engine, steps, gas=gas, hook=hook, trace=trace)
    return {**state(engine), "trace": trace, "stats": hook.stats.as_dict(), "step": hook.step}


# -- scenarios: each returns what this rank should report ---------------------------------------------------


def msgd_parity() -> dict:
    """T past the end vs plain DeepSpeed data parallelism (no hook), step by step."""
    ours, plain = [], []
    engine = engine_for({"H": 4, "T": 100})
    hook = localsgd_ds.attach(engine, steps_per_epoch=3)
    train(engine, 3, hook=hook, trace=ours)
    # Evaluating the average in the mSGD phase: BN statistics averaged inside, this rank's back after.
    before = engine.module.bn.running_mean.clone()
    with hook.averaged():
        inside = engine.module.bn.running_mean.clone()
    after = engine.module.bn.running_mean.clone()
    train(engine, 3, start=3, hook=hook, trace=ours)
    reference = engine_for(None)
    train(reference, 6, trace=plain)
    return {
        "ours": [t["params"] for t in ours],
        "plain": [t["params"] for t in plain],
        "stats": hook.stats.as_dict(),
        "bn_before": before,
        "bn_inside": inside,
        "bn_after": after,
    }


def zero1_msgd() -> dict:
    """T = null under ZeRO stage 1: the hook stays out of DeepSpeed's partitions; same weights as without it."""
    zero = {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
    engine = engine_for({"T": None}, extra=zero)
    hook = localsgd_ds.attach(engine, steps_per_epoch=2)
    ours: list = []
    train(engine, 2, hook=hook, trace=ours)
    with hook.averaged():  # evaluation: BN statistics averaged, then handed back
        pass
    train(engine, 2, start=2, hook=hook, trace=ours)
    plain: list = []
    reference = engine_for(None, extra=zero)
    train(reference, 4, trace=plain)
    return {"ours": [t["params"] for t in ours], "plain": [t["params"] for t in plain]}


def local_h3() -> dict:
    return local_run({"H": 3, "T": 0}, steps=7, spe=5)


def postlocal() -> dict:
    return local_run({"H": 2, "T": 1}, steps=9, spe=4)


def buffers_broadcast() -> dict:
    return local_run({"H": 2, "T": 0, "buffers": "broadcast", "momentum": "average"}, steps=4, spe=4)


def buffers_local() -> dict:
    return local_run({"H": 2, "T": 0, "buffers": "local", "momentum": "reset"}, steps=4, spe=4)


def slowmo_plain() -> dict:
    return local_run({"H": 2, "T": 1, "slowmo": {"beta": 0.0, "alpha": 1.0}}, steps=8, spe=2)


def slowmo_beta() -> dict:
    return local_run({"H": 2, "T": 1, "slowmo": {"beta": 0.5, "alpha": 0.8}}, steps=8, spe=2)


def grad_accumulation() -> dict:
    return local_run({"H": 2, "T": 0}, steps=5, spe=5, gas=3)


def clipping() -> dict:
    return local_run({"H": 2, "T": 1}, steps=6, spe=2, clip=0.05)


def autocast_bf16() -> dict:
    """torch_autocast: fp32 weights stepped by the optimizer, bf16 compute; local steps stay collective-free."""
    engine = engine_for({"H": 2, "T": 0}, extra={"torch_autocast": {"enabled": True, "dtype": "bfloat16"}})
    hook = localsgd_ds.attach(engine, steps_per_epoch=4)
    trace: list = []
    train(engine, 4, hook=hook, trace=trace)
    return {**state(engine), "trace": trace}


def postlocal_offset() -> dict:
    """A switch (step 3) that is not a multiple of H = 2: syncs after steps 5 and 7, not 4, 6, 8."""
    return local_run({"H": 2, "T": 1}, steps=8, spe=3)


def msgd_gas() -> dict:
    """mSGD with 2 micro-batches per step: 4 optimizer steps are 4 gradient all-reduces."""
    return local_run({"T": None}, steps=4, spe=4, gas=2)


SLOWMO = {"beta": 0.5, "alpha": 1.0}


def slowmo_loaded() -> dict:
    """Weights loaded after attach (fine-tuning): SlowMo's anchor must follow them, not the random init."""
    engine = engine_for({"H": 2, "T": 0, "slowmo": SLOWMO})
    hook = localsgd_ds.attach(engine, steps_per_epoch=4)
    engine.module.load_state_dict(make_model(1).state_dict())
    train(engine, 8, hook=hook)
    return state(engine)


def slowmo_loaded_ckpt() -> dict:
    """The same, from a checkpoint written by plain DeepSpeed without the hook."""
    plain = engine_for(None, seed=1)
    plain.save_checkpoint(os.environ["CKPT_DIR"] + "/plain", tag="init")
    engine = engine_for({"H": 2, "T": 0, "slowmo": SLOWMO})
    hook = localsgd_ds.attach(engine, steps_per_epoch=4)
    path, _ = engine.load_checkpoint(os.environ["CKPT_DIR"] + "/plain")
    assert path is not None
    train(engine, 8, hook=hook)
    return state(engine)


def slowmo_schedule() -> dict:
    """SlowMo under an lr that changes every step, two parameter groups at different lrs, and a forced
    sync mid-period after step 6 (the next scheduled sync stays at step 8)."""
    engine = engine_for({"H": 4, "T": 0, "slowmo": SLOWMO}, group_lrs=(0.1, 0.05), schedule=True)
    hook = localsgd_ds.attach(engine, steps_per_epoch=10)
    train(engine, 6, hook=hook)
    hook.sync()
    train(engine, 4, start=6, hook=hook)
    return state(engine)


def slowmo_frozen_group() -> dict:
    """Parameter group 0 frozen by lr = 0: SlowMo must still act on group 1 at its own lr."""
    return local_run({"H": 2, "T": 0, "slowmo": SLOWMO}, steps=6, spe=6, group_lrs=(0.0, 0.1))


def extras_local() -> dict:
    """A bool mask (never averaged) and an integer counter that differs per rank (floor of the mean)."""
    return local_run({"H": 2, "T": 0}, steps=4, spe=4, variant="extras")


def extras_msgd() -> dict:
    """The same buffers in plain mSGD: inside averaged() and in the saved model file the mask stays True."""
    engine = engine_for({"T": None}, variant="extras")
    hook = localsgd_ds.attach(engine, steps_per_epoch=2)
    train(engine, 2, hook=hook)
    with hook.averaged():
        inside = {"mask": engine.module.mask.clone(), "counter": engine.module.counter.clone()}
    engine.save_checkpoint(os.environ["CKPT_DIR"] + "/extras", tag="end")
    return {**state(engine), "inside": inside}


def tied_local() -> dict:
    """Parameters tied through .data stay tied after attach and through syncs."""
    engine = engine_for({"H": 2, "T": 0}, variant="tied")
    hook = localsgd_ds.attach(engine, steps_per_epoch=4)
    tied_after_attach = engine.module.pre.weight.data_ptr() == engine.module.post.weight.data_ptr()
    train(engine, 4, hook=hook)
    tied_at_end = engine.module.pre.weight.data_ptr() == engine.module.post.weight.data_ptr()
    return {**state(engine), "tied": (tied_after_attach, tied_at_end)}


def autocast_reference() -> dict:
    return local_run(
        {"H": 2, "T": 0}, steps=6, spe=6, extra={"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    )


# -- workers of 2 ranks (4 processes: workers {0, 1} and {2, 3}) -------------------------------------------


def workers_local() -> dict:
    return local_run({"H": 2, "T": 0, "ranks_per_worker": 2}, steps=5, spe=5)


def workers_postlocal() -> dict:
    """Switch after 3 steps (not a multiple of H = 2); gradient accumulation and clipping per worker."""
    return local_run({"H": 2, "T": 1, "ranks_per_worker": 2}, steps=8, spe=3, gas=2, clip=0.05)


def workers_slowmo() -> dict:
    return local_run({"H": 2, "T": 0, "ranks_per_worker": 2, "slowmo": SLOWMO}, steps=6, spe=6)


def workers_node() -> dict:
    """ "node" under a launcher that says 2 ranks per node (as deepspeed's LOCAL_SIZE does)."""
    rank = dist.get_rank()
    saved = {k: os.environ.get(k) for k in ("LOCAL_SIZE", "LOCAL_RANK")}
    os.environ.update(LOCAL_SIZE="2", LOCAL_RANK=str(rank % 2))
    try:
        result = local_run({"H": 2, "T": 0, "ranks_per_worker": "node"}, steps=5, spe=5)
    finally:
        for k, v in saved.items():
            os.environ[k] = v
    return result


def workers_one() -> dict:
    """ranks_per_worker = 1 is today's hook: compared bitwise with the same run without the key."""
    return {
        "with_key": local_run({"H": 2, "T": 0, "ranks_per_worker": 1}, steps=4, spe=4),
        "without": local_run({"H": 2, "T": 0}, steps=4, spe=4),
    }


def workers_errors() -> dict:
    errors = {}
    rank = dist.get_rank()
    for name, block, env in [
        ("not_dividing", {"H": 2, "T": 0, "ranks_per_worker": 3}, {}),
        ("K", {"H": 2, "T": 0, "K": 4, "ranks_per_worker": 2}, {}),
        ("bad_value", {"H": 2, "T": 0, "ranks_per_worker": 0}, {}),
        # nodes of 1, 1 and 2 ranks
        ("unequal_nodes", {"H": 2, "T": 0, "ranks_per_worker": "node"},
         {"LOCAL_SIZE": "1" if rank < 2 else "2", "LOCAL_RANK": "0" if rank < 2 else str(rank - 2)}),
    ]:  # fmt: skip
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        engine = engine_for(block)
        try:
            localsgd_ds.attach(engine, steps_per_epoch=2)
            errors[name] = None
        except localsgd_ds.ConfigError as e:
            errors[name] = str(e)
        finally:
            for k, v in saved.items():
                os.environ[k] = v
    return errors


CKPT_BLOCK = {"H": 4, "T": 1, "slowmo": {"beta": 0.5, "alpha": 1.0}}
CKPT_SPE, CKPT_AT, CKPT_END = 3, 5, 10  # switch at step 3, syncs at 7 and 11: the save at 5 is mid-period


def ckpt_full(block: dict = CKPT_BLOCK, name: str = "") -> dict:
    engine = engine_for(block)
    hook = localsgd_ds.attach(engine, steps_per_epoch=CKPT_SPE)
    train(engine, CKPT_AT, hook=hook)
    engine.save_checkpoint(os.environ["CKPT_DIR"] + f"/full{name}", tag="mid")
    train(engine, CKPT_END - CKPT_AT, start=CKPT_AT, hook=hook)
    return {**state(engine), "stats": hook.stats.as_dict()}


def ckpt_part1(block: dict = CKPT_BLOCK, name: str = "") -> dict:
    engine = engine_for(block)
    hook = localsgd_ds.attach(engine, steps_per_epoch=CKPT_SPE)
    train(engine, CKPT_AT, hook=hook)
    before = state(engine)
    engine.save_checkpoint(os.environ["CKPT_DIR"] + f"/part{name}", tag="mid")
    return {"before_save": before, "after_save": state(engine)}


def ckpt_part2(block: dict = CKPT_BLOCK, name: str = "") -> dict:
    engine = engine_for(block, seed=123)  # different init: everything must come from the checkpoint
    hook = localsgd_ds.attach(engine, steps_per_epoch=CKPT_SPE)
    path, _ = engine.load_checkpoint(os.environ["CKPT_DIR"] + f"/part{name}")
    assert path is not None
    resumed_step = hook.step
    train(engine, CKPT_END - CKPT_AT, start=CKPT_AT, hook=hook)
    return {**state(engine), "resumed_step": resumed_step, "stats": hook.stats.as_dict()}


WORKERS_CKPT = {**CKPT_BLOCK, "ranks_per_worker": 2}


def workers_ckpt_full() -> dict:
    return ckpt_full(WORKERS_CKPT, "_workers")


def workers_ckpt_part1() -> dict:
    return ckpt_part1(WORKERS_CKPT, "_workers")


def workers_ckpt_part2() -> dict:
    return ckpt_part2(WORKERS_CKPT, "_workers")


def ckpt_changed_h() -> dict:
    engine = engine_for({**CKPT_BLOCK, "H": 2})
    localsgd_ds.attach(engine, steps_per_epoch=CKPT_SPE)
    try:
        engine.load_checkpoint(os.environ["CKPT_DIR"] + "/part")
    except localsgd_ds.ConfigError as e:
        return {"error": str(e)}
    return {"error": None}


def attach_errors() -> dict:
    errors = {}
    for name, block, extra in [
        ("K", {"H": 2, "T": 0, "K": dist.get_world_size() + 1}, {}),
        (
            "zero",
            {"H": 2, "T": 0},
            {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True},
        ),
        ("missing", None, {}),
        # the legacy spelling: DeepSpeed runs ZeRO stage 1
        ("zero_legacy", {"H": 2, "T": 0}, {"zero_optimization": True, "zero_allow_untested_optimizer": True}),
    ]:
        engine = engine_for(block, extra=extra)
        try:
            localsgd_ds.attach(engine, steps_per_epoch=2)
            errors[name] = None
        except localsgd_ds.ConfigError as e:
            errors[name] = str(e)
    return errors


def main() -> None:
    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    _count_collectives()
    results = {}
    for name in names:
        results[name] = globals()[name]()
        dist.barrier()
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    print(json.dumps({"rank": dist.get_rank(), "done": names}))


if __name__ == "__main__":
    main()
