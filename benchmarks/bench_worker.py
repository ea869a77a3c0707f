"""One rank of the communication benchmark; ``bench_comm.py`` launches K of these (gloo, one thread each).

    python benchmarks/bench_worker.py CONFIG.json        # RANK, WORLD_SIZE, MASTER_ADDR/PORT in the env

In one process and one gloo world, the same model (same initial weights, same per-rank batch) runs as:
plain DeepSpeed data parallelism (mSGD), DeepSpeed with the localsgd_ds hook (local SGD, T = 0),
PyTorch's own post-local SGD (DDP + ``post_localSGD_hook`` with no gradient all-reduce after the switch +
``PeriodicModelAverager``) and a plain torch model stepped with no communication at all. Every measured
window starts after a barrier, the sides are interleaved A B A B and the order flips every round, so
the load of whoever else uses the machine hits all sides alike. Each rank writes its own timings to
``rank<r>.json``; the driver takes the slowest rank per window (synchronous training waits for it).

``mode = "memory"`` instead measures, in a fresh process with glibc's mmap threshold pinned at 64 KiB
(every large buffer is its own mapping and is unmapped when freed, so RSS follows what is live), how much
a sync raises the process's resident memory above where it was when the sync started (VmHWM after
``/proc/self/clear_refs`` reset it); ``mode = "compute"`` times single-device steps only (the GPU run).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
logging.getLogger("torch.distributed").setLevel(logging.WARNING)

NEVER = 10**9  # an H no window reaches: local steps only
STEPS_PER_EPOCH = 10**6  # T = 0, so the epoch length never matters


# -- model and data -------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """A few thousand parameters with BatchNorm: the smoke test's model."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank and for every side
    if name == "tiny":
        return TinyNet()
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=1000)


def make_batch(cfg: dict, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, so local models drift apart
    x = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"], generator=g)
    y = torch.randint(0, 10, (cfg["batch"],), generator=g)
    return x.to(device), y.to(device)


def make_sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- the sides ------------------------------------------------------------------------------------------------


class NoComm:
    """The same model and batch in plain torch: one process, no communication, no DeepSpeed."""

    name = "nocomm"

    def __init__(self, model: nn.Module, batch) -> None:
        self.model, self.batch = model, batch
        self.optimizer = make_sgd(model.parameters())
        self.comm_s, self.comm_bytes = 0.0, 0

    def step(self) -> None:
        x, y = self.batch
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()


class DeepSpeedSide:
    """A DeepSpeed engine: plain (mSGD, its gradient all-reduce timed here) or with the hook attached."""

    def __init__(self, name: str, model: nn.Module, batch, cfg: dict, local_sgd: dict | None) -> None:
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": cfg["batch"],
            "gradient_accumulation_steps": 1,
            "steps_per_print": 10**9,
            "gradient_clipping": 0.0,
        }
        if local_sgd is not None:
            ds_config["local_sgd"] = local_sgd
        self.name, self.batch = name, batch
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=make_sgd(model.parameters()), config=ds_config
        )
        self.hook = None
        self._grad_s, self._grad_bytes = 0.0, 0
        if local_sgd is None:
            # Plain DeepSpeed: time its gradient all-reduce (an instance attribute, as the hook does).
            original = self.engine.allreduce_gradients

            def timed(*args, **kwargs):
                start = time.perf_counter()
                out = original(*args, **kwargs)
                self._grad_s += time.perf_counter() - start
                self._grad_bytes += nbytes(p.grad for p in model.parameters() if p.grad is not None)
                return out

            self.engine.allreduce_gradients = timed

    def attach(self, H: int) -> None:
        """(Re)attach the hook with sync period H: local SGD from step 0, first sync after H steps."""
        import localsgd_ds

        if self.hook is None:
            self.hook = localsgd_ds.attach(self.engine, steps_per_epoch=STEPS_PER_EPOCH)
        if self.hook.config.H != H:
            config = dataclasses.replace(self.hook.config, H=H)
            scratch = self.hook._scratch
            self.hook.detach()
            self.hook = localsgd_ds.LocalSGD(
                self.engine, config, steps_per_epoch=STEPS_PER_EPOCH, workers=self.hook.workers
            )
            # A hook attached once keeps its process groups and its bucket buffer from sync to sync; only the
            # benchmark swaps hooks to change H, so it hands both on rather than charge every window anew.
            self.hook._scratch = scratch

    @property
    def comm_s(self) -> float:
        if self.hook is None:
            return self._grad_s
        stats = self.hook.stats
        return stats.seconds + stats.grad_allreduce_seconds + stats.worker_grad_allreduce_seconds

    @property
    def comm_bytes(self) -> int:
        if self.hook is None:
            return self._grad_bytes
        return self.hook.stats.bytes + self.hook.stats.grad_allreduce_bytes

    def step(self) -> None:
        x, y = self.batch
        self.engine.backward(nn.functional.cross_entropy(self.engine(x), y))
        self.engine.step()


class PeerSide:
    """PyTorch's post-local SGD as its docs set it up, with the switch at step 0 and per-worker local SGD.

    DDP's comm hook ``post_localSGD_hook`` all-reduces gradients before ``start_localSGD_iter`` and, with
    ``post_local_gradient_allreduce=False``, not at all after it (its default would all-reduce inside a
    per-node subgroup, which on one machine is the whole world: mSGD again). ``broadcast_buffers=False``
    removes DDP's per-step broadcast of BatchNorm buffers and ``gradient_as_bucket_view=True`` its gradient
    copy, so the peer has no per-step collective and its cheapest local step.
    ``PeriodicModelAverager(period=H, warmup_steps=0)`` averages after optimizer steps 1, H+1, 2H+1, ...
    """

    name = "peer"

    def __init__(self, model: nn.Module, batch) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as post_local
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.batch = batch
        self.ddp = DDP(model, broadcast_buffers=False, gradient_as_bucket_view=True)
        state = post_local.PostLocalSGDState(
            process_group=None, subgroup=None, start_localSGD_iter=0, post_local_gradient_allreduce=False
        )
        self.ddp.register_comm_hook(state, post_local.post_localSGD_hook)
        self.optimizer = make_sgd(self.ddp.parameters())
        self.averager = None
        self.comm_s, self.comm_bytes = 0.0, 0
        self.param_bytes = nbytes(self.ddp.parameters())

    def attach(self, H: int) -> None:
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        # PeriodicModelAverager averages at its very first call; NEVER means no averager at all.
        self.averager = None if H == NEVER else PeriodicModelAverager(period=H, warmup_steps=0)

    def step(self) -> None:
        x, y = self.batch
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.ddp(x), y).backward()
        self.optimizer.step()
        if self.averager is not None:
            averages = self.averager.step >= 0 and self.averager.step % self.averager.period == 0
            start = time.perf_counter()
            self.averager.average_parameters(self.ddp.parameters())
            self.comm_s += time.perf_counter() - start
            self.comm_bytes += self.param_bytes if averages else 0

    def average_now(self) -> None:
        from torch.distributed.algorithms.model_averaging.utils import average_parameters

        average_parameters(iter(list(self.ddp.parameters())), dist.group.WORLD)


# -- measuring ------------------------------------------------------------------------------------------------


def window(side, steps: int, *, settle: int = 0, prepare=None, before=None) -> dict:
    """Time ``steps`` steps of ``side`` after a barrier: wall and CPU seconds, communication seconds and
    bytes. First, untimed: ``before()``, ``settle`` steps (the side's own allocation pattern and caches
    back in place after another side ran), then ``prepare()`` (e.g. attach the hook with the window's H)."""
    if before is not None:
        before()
    for _ in range(settle):
        side.step()
    if prepare is not None:
        prepare()
    comm_s, comm_bytes = side.comm_s, side.comm_bytes
    dist.barrier()
    cpu = time.process_time()
    start = time.perf_counter()
    for _ in range(steps):
        side.step()
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "seconds": seconds,
        "cpu_s": time.process_time() - cpu,
        "comm_s": side.comm_s - comm_s,
        "bytes": side.comm_bytes - comm_bytes,
    }


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def params_identical_across_ranks(params) -> bool:
    """Whether every rank holds the same parameters (a checksum per rank, gathered)."""
    with torch.no_grad():
        local = torch.stack([torch.cat([p.detach().reshape(-1).double() for p in params]).sum()]).cpu()
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def interleaved(tasks: list, rounds: int) -> list:
    """Run ``tasks`` (callables) ``rounds`` times, in reverse order every other round (A B, B A, ...)."""
    out = []
    for r in range(rounds):
        order = list(range(len(tasks)))
        if r % 2:
            order.reverse()
        row = [None] * len(tasks)
        for i in order:
            row[i] = tasks[i]()
        out.append(row)
    return out


def sync_breakdown(hook, rounds: int) -> dict | None:
    """Time the pieces of a sync the way the hook does them, against one raw all-reduce of the same bytes:
    the flat buffers' all-reduce as a plain sum and the divide pass that makes it a mean, the mean in one
    call (``average_flat_``: ReduceOp.AVG where the backend has it), the buffers outside the flat buffers
    alone and started alongside the flat all-reduce (the hook's order), and an alternative the hook does
    not use: bucket-sized async chunks, each divided while the next is reduced. Works on zero-filled
    copies, so the model is left alone. Reads the hook's private layout on purpose (``_layout.flats``,
    ``_layout.other_buffers``, ``_bucket_bytes``); returns None if that layout is not there."""
    from localsgd_ds.averaging import average_flat_, start_average_

    layout = getattr(hook, "_layout", None)
    if layout is None or not layout.flats:
        return None
    world = dist.get_world_size()
    flats = [torch.zeros_like(f) for f in layout.flats]
    others = [torch.zeros_like(b) for b in layout.other_buffers]
    other_bytes = sum(b.numel() * b.element_size() for b in others)
    raw = torch.zeros((sum(f.numel() * f.element_size() for f in flats) + other_bytes) // 4)
    chunk = max(1, hook._bucket_bytes // 4)

    def alongside() -> None:
        finish = start_average_(others, world_size=world)
        average_flat_(flats, world_size=world)
        finish()

    def overlapped_chunks() -> None:
        finish = start_average_(others, world_size=world)
        for flat in flats:
            parts = flat.split(chunk)
            works = [dist.all_reduce(p, async_op=True) for p in parts]
            for p, w in zip(parts, works):
                w.wait()
                p.div_(world)
        finish()

    pieces = {
        "allreduce_sum_flat": lambda: [dist.all_reduce(f) for f in flats],
        "divide": lambda: [f.div_(world) for f in flats],
        "allreduce_mean_flat": lambda: average_flat_(flats, world_size=world),
        "other_buffers_alone": lambda: start_average_(others, world_size=world)(),
        "hook_order": alongside,
        "overlapped_chunks": overlapped_chunks,
        "raw_allreduce": lambda: dist.all_reduce(raw),
    }
    names = list(pieces)
    rows = interleaved([lambda f=pieces[n]: timed(f) for n in names], rounds)
    out: dict = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    out["flat_bytes"] = [f.numel() * f.element_size() for f in flats]
    out["other_buffer_count"] = len(others)
    return out


def window_steps(H: int, minimum: int) -> int:
    """A whole number of sync periods, at least ``minimum`` steps."""
    return H * max(1, math.ceil(minimum / H))


def run_timing(cfg: dict, rank: int, world: int) -> dict:
    device = torch.device("cpu")
    batch = make_batch(cfg, rank, device)
    base = make_model(cfg["model"])
    sides = {
        "nocomm": NoComm(copy.deepcopy(base), batch),
        "msgd": DeepSpeedSide("msgd", copy.deepcopy(base), batch, cfg, local_sgd=None),
        "ours": DeepSpeedSide("ours", copy.deepcopy(base), batch, cfg, local_sgd={"H": NEVER, "T": 0}),
    }
    if cfg["peer"]:
        sides["peer"] = PeerSide(copy.deepcopy(base), batch)
    ours = sides["ours"]
    ours.attach(NEVER)
    params = list(base.parameters())
    result: dict = {
        "param_bytes": nbytes(params),
        "buffer_bytes": nbytes(base.buffers()),
        "params": sum(p.numel() for p in params),
    }

    torch.set_num_threads(1)  # again, in case an engine changed it
    result["threads"] = torch.get_num_threads()

    # Warm-up: every side steps, syncs and all-reduces before anything is timed.
    ours.attach(2)
    if cfg["peer"]:
        sides["peer"].attach(2)
    for side in sides.values():
        window(side, cfg["warmup_steps"])
    ours.attach(NEVER)
    bytes_before = ours.hook.stats.bytes
    ours.step()
    ours.hook.sync()
    sync_bytes = ours.hook.stats.bytes - bytes_before
    raw = torch.zeros(sync_bytes // 4)  # zeros stay zeros: no overflow, no denormals
    dist.all_reduce(raw)
    result["sync_bytes"] = sync_bytes

    # Sync vs one raw all-reduce of the same bytes (and the peer's averaging vs the same for its bytes).
    # Each timed collective follows the same untimed local step (a sync needs one to have something to
    # average), so both sides start from the same state of caches and of the scheduler.
    def after_step(side, fn):
        def run() -> float:
            side.step()
            return timed(fn)

        return run

    tasks = [after_step(ours, ours.hook.sync), after_step(ours, lambda: dist.all_reduce(raw))]
    if cfg["peer"]:
        peer = sides["peer"]
        peer.attach(NEVER)
        raw_peer = torch.zeros(peer.param_bytes // 4)
        tasks += [after_step(peer, peer.average_now), after_step(peer, lambda: dist.all_reduce(raw_peer))]
    # Also the backend's own averaging collective of the same bytes (ReduceOp.AVG, where it has one): the
    # floor for any sync that must divide by K, since a sum all-reduce leaves that pass undone.
    try:
        dist.all_reduce(raw, op=dist.ReduceOp.AVG)
        tasks.append(after_step(ours, lambda: dist.all_reduce(raw, op=dist.ReduceOp.AVG)))
    except (RuntimeError, ValueError):
        pass
    rows = interleaved(tasks, cfg["sync_rounds"])
    result["sync_s"] = [r[0] for r in rows]
    result["raw_allreduce_s"] = [r[1] for r in rows]
    if len(rows[0]) in (3, 5):
        result["raw_avg_allreduce_s"] = [r[-1] for r in rows]
    if cfg["peer"]:
        result["peer_sync_s"] = [r[2] for r in rows]
        result["peer_raw_allreduce_s"] = [r[3] for r in rows]

    result["sync_breakdown"] = sync_breakdown(ours.hook, cfg["sync_rounds"])

    # All-reduce of several sizes on the same group: calibrates the cost model's link (once per sweep round).
    calibration_tensors = [torch.zeros(max(1, size // 4)) for size in cfg["calibration_bytes"]]
    for t in calibration_tensors:
        dist.all_reduce(t)

    def calibrate() -> dict:
        return {
            "bytes": [t.numel() * 4 for t in calibration_tensors],
            "seconds": [timed(lambda t=t: dist.all_reduce(t)) for t in calibration_tensors],
        }

    # A local step vs a step of the same model in plain torch with no communication, vs the plain DeepSpeed
    # engine with its gradient all-reduce switched off (the switch the hook uses: DeepSpeed with no
    # communication and no hook), and PyTorch's local step (for the composed per-H comparison). Windows
    # of each side alternate in the same processes, the order flipping every round; each window starts
    # with settle steps so that it measures the side's own steady state, not the one it follows.
    ours.attach(NEVER)
    sides["msgd"].engine.enable_backward_allreduce = False
    local_sides = [ours, sides["nocomm"], sides["msgd"]]
    if cfg["peer"]:
        sides["peer"].attach(NEVER)
        local_sides.append(sides["peer"])
    settle = cfg["settle_steps"]
    rows = interleaved(
        [lambda s=side: window(s, cfg["local_window"], settle=settle) for side in local_sides],
        cfg["local_rounds"],
    )
    sides["msgd"].engine.enable_backward_allreduce = True
    result["local_window"] = [r[0] for r in rows]
    result["nocomm_window"] = [r[1] for r in rows]
    result["ds_nocomm_window"] = [r[2] for r in rows]
    if cfg["peer"]:
        result["peer_local_window"] = [r[3] for r in rows]
    result["local_steps_rank_params_differ"] = not params_identical_across_ranks(
        ours.engine.module.parameters()
    )

    # The H sweep: mSGD, then ours and the peer at each H, all interleaved.
    checks = {"ours_identical_after_window": True, "peer_differs_between_syncs": True}

    def h_window(side, H: int):
        def run() -> dict:
            # Settle with local steps only, then a fresh hook / averager: the window holds whole periods.
            w = window(
                side,
                window_steps(H, cfg["window"]),
                settle=settle,
                before=lambda: side.attach(NEVER),
                prepare=lambda: side.attach(H),
            )
            if side is ours:
                checks["ours_identical_after_window"] &= params_identical_across_ranks(
                    ours.engine.module.parameters()
                )
            elif H > 1:  # its last average was H - 1 steps ago: ranks differ (no gradient all-reduce)
                checks["peer_differs_between_syncs"] &= not params_identical_across_ranks(
                    side.ddp.parameters()
                )
            return w

        return run

    # Each round also times a no-communication window and the calibration all-reduces, so the cost model
    # is checked round by round against inputs measured under the same load.
    tasks = [
        lambda: window(sides["msgd"], cfg["window"], settle=settle),
        lambda: window(sides["nocomm"], cfg["window"], settle=settle),
        calibrate,
    ]
    labels = [("msgd", None), ("nocomm", None), ("calibration", None)]
    for H in cfg["hs"]:
        tasks.append(h_window(ours, H))
        labels.append(("ours", H))
        if cfg["peer"]:
            tasks.append(h_window(sides["peer"], H))
            labels.append(("peer", H))
    rows = interleaved(tasks, cfg["rounds"])
    result["sweep"] = [
        {"side": side, "H": H, "windows": [r[i] for r in rows]} for i, (side, H) in enumerate(labels)
    ]
    result["checks"] = checks
    return result


# -- memory ---------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL("libc.so.6")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def extra_memory(fn) -> dict:
    """Resident bytes ``fn`` adds at its peak over where the process stood when it started."""
    gc.collect()
    _libc.malloc_trim(0)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    start = _status_kib("VmRSS")
    fn()
    return {
        "rss_start": start * 1024,
        "peak": _status_kib("VmHWM") * 1024,
        "extra": (_status_kib("VmHWM") - start) * 1024,
    }


def run_memory(cfg: dict, rank: int, world: int) -> dict:
    batch = make_batch(cfg, rank, torch.device("cpu"))
    base = make_model(cfg["model"])
    ours = DeepSpeedSide("ours", copy.deepcopy(base), batch, cfg, local_sgd={"H": NEVER, "T": 0})
    ours.attach(NEVER)
    peer = PeerSide(copy.deepcopy(base), batch)
    peer.attach(NEVER)
    for side in (ours, peer):
        for _ in range(cfg["warmup_steps"]):
            side.step()
    out: dict = {"param_bytes": nbytes(base.parameters()), "buffer_bytes": nbytes(base.buffers())}
    out["bucket_bytes"] = ours.hook._bucket_bytes

    # Ours: the first sync of a fresh hook allocates its bucket buffer (kept for later syncs).
    ours.step()
    out["ours_step"] = extra_memory(ours.step)
    fresh = localsgd_ds_fresh_hook(ours)
    ours.step()
    out["ours_first_sync"] = extra_memory(fresh.sync)
    ours.step()
    out["ours_sync"] = extra_memory(fresh.sync)
    # The peer: torch.cat of every parameter, one all-reduce, parameters re-pointed at the flat copy.
    peer.step()
    out["peer_step"] = extra_memory(peer.step)
    peer.step()
    out["peer_sync"] = extra_memory(peer.average_now)
    raw = torch.zeros(out["param_bytes"] // 4)
    dist.all_reduce(raw)
    out["raw_allreduce"] = extra_memory(lambda: dist.all_reduce(raw))
    return out


def localsgd_ds_fresh_hook(side: DeepSpeedSide):
    """A new hook on the same engine (an empty bucket cache), as right after ``attach``."""
    import localsgd_ds

    config = side.hook.config
    side.hook.detach()
    side.hook = localsgd_ds.LocalSGD(side.engine, config, steps_per_epoch=STEPS_PER_EPOCH)
    return side.hook


# -- single device compute (the GPU run) ----------------------------------------------------------------------


def run_compute(cfg: dict) -> dict:
    device = torch.device(cfg["device"])
    batch = make_batch(cfg, 0, device)
    side = NoComm(make_model(cfg["model"]).to(device), batch)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(cfg["warmup_steps"]):
        side.step()
    sync()
    seconds = []
    for _ in range(cfg["rounds"]):
        start = time.perf_counter()
        for _ in range(cfg["window"]):
            side.step()
        sync()
        seconds.append((time.perf_counter() - start) / cfg["window"])
    return {
        "compute_step_s": seconds,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out_dir = Path(cfg["out_dir"])
    if cfg["mode"] == "compute":
        (out_dir / "rank0.json").write_text(json.dumps(run_compute(cfg)))
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = run_memory(cfg, rank, world) if cfg["mode"] == "memory" else run_timing(cfg, rank, world)
    dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
