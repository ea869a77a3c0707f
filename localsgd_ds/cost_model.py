"""Cost model of mSGD and local SGD on K workers: time per step, per epoch, and the communication share.

A step is ``compute + communication``; DeepSpeed's data parallelism at ZeRO stage 0 all-reduces the
gradients after the backward pass (no overlap), and local SGD replaces that by one all-reduce of the
parameters and buffers every H steps. A ring all-reduce of ``n`` bytes on K workers takes 2(K-1) messages
per worker and moves 2(K-1)/K x n bytes over each worker's link, so with a per-hop latency ``a`` and a
link of ``B`` bit/s it takes ``2(K-1) a + 2(K-1)/K x 8 n / B`` seconds (the study's question is how large
this gets at K = 256; Gonzalez Ortiz et al. 2021, "Trade-offs of Local SGD at Scale"). The inputs are
measured: the compute time of one step without communication (``benchmarks/bench_comm.py``) and the
model's size; the link is what one asks about. ``fit_link`` calibrates a link from timed all-reduces::

    work = Workload.for_model("resnet50", compute_s=0.1)
    msgd = predict(work, workers=64, link=Link(gbit_per_s=25))          # H = None: gradient all-reduce
    local = predict(work, workers=64, link=Link(gbit_per_s=25), H=8)
    print(msgd.comm_share, 1 - local.epoch_s / msgd.epoch_s)

``python -m localsgd_ds.cost_model`` prints the answer for K = 64 on 25 Gbit/s and a grid up to K = 256.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

IMAGENET_TRAIN_SAMPLES = 1_281_167
FP32 = 4
INT64 = 8

# torchvision models with 1000 classes: (parameters, floating-point buffer elements, integer buffers).
# The buffers are BatchNorm running mean/var (fp32) and num_batches_tracked (one int64 per BatchNorm).
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "resnet18": (11_689_512, 9_600, 20),
    "resnet50": (25_557_032, 53_120, 53),
    "resnet101": (44_549_160, 105_344, 104),
}


@dataclass(frozen=True)
class Link:
    """One worker's network link, the same for every worker (full duplex, a non-blocking switch)."""

    gbit_per_s: float
    """Bandwidth in each direction, in Gbit/s (1e9 bit/s)."""
    latency_s: float = 10e-6
    """Latency of one ring message (one hop), in seconds."""

    def __post_init__(self) -> None:
        if not self.gbit_per_s > 0:
            raise ValueError(f"Link.gbit_per_s must be > 0, got {self.gbit_per_s!r}")
        if not self.latency_s >= 0:
            raise ValueError(f"Link.latency_s must be >= 0, got {self.latency_s!r}")


@dataclass(frozen=True)
class Workload:
    """What one worker does per step, measured on the hardware in question."""

    compute_s: float
    """Seconds of one optimizer step with no communication (forward, backward, optimizer step)."""
    grad_bytes: int
    """Bytes all-reduced per mSGD step (the fp32 gradients)."""
    sync_bytes: int
    """Bytes all-reduced per local SGD sync (parameters and buffers)."""
    batch_per_worker: int = 32
    """Samples per worker per step (B)."""
    samples_per_epoch: int = IMAGENET_TRAIN_SAMPLES
    """Training samples in one epoch (ImageNet-1k by default)."""

    @classmethod
    def for_model(
        cls,
        name: str,
        *,
        compute_s: float,
        batch_per_worker: int = 32,
        samples_per_epoch: int = IMAGENET_TRAIN_SAMPLES,
    ) -> Workload:
        """A torchvision ResNet in fp32: gradients = parameters; a sync also averages the buffers."""
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_SIZES)}")
        params, float_buffers, int_buffers = MODEL_SIZES[name]
        return cls(
            compute_s=compute_s,
            grad_bytes=params * FP32,
            sync_bytes=(params + float_buffers) * FP32 + int_buffers * INT64,
            batch_per_worker=batch_per_worker,
            samples_per_epoch=samples_per_epoch,
        )


@dataclass(frozen=True)
class Prediction:
    workers: int
    H: int | None
    """Local steps per sync; None for mSGD (a gradient all-reduce every step)."""
    step_s: float
    """Mean seconds per step (compute plus the communication of that step, syncs spread over H steps)."""
    comm_s: float
    """Mean communication seconds per step."""
    wire_bytes_per_step: float
    """Mean bytes each worker sends over its link per step (ring all-reduce)."""
    steps_per_epoch: int
    epoch_s: float

    @property
    def comm_share(self) -> float:
        """Fraction of the step spent communicating."""
        return self.comm_s / self.step_s if self.step_s > 0 else 0.0


def ring_allreduce_bytes(nbytes: float, workers: int) -> float:
    """Bytes each worker sends (and receives) in a ring all-reduce of ``nbytes``: 2(K-1)/K x nbytes."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return 2.0 * (workers - 1) / workers * nbytes


def allreduce_seconds(nbytes: float, workers: int, link: Link) -> float:
    """Seconds of one ring all-reduce of ``nbytes`` on ``workers`` workers: 2(K-1) hops of latency plus the
    ring's bytes at the link's bandwidth. Zero for one worker."""
    if workers == 1:
        return 0.0
    wire = ring_allreduce_bytes(nbytes, workers)
    return 2 * (workers - 1) * link.latency_s + wire * 8 / (link.gbit_per_s * 1e9)


def steps_per_epoch(work: Workload, workers: int) -> int:
    """Optimizer steps per epoch: the global batch is B x K."""
    return math.ceil(work.samples_per_epoch / (work.batch_per_worker * workers))


def predict(work: Workload, *, workers: int, link: Link, H: int | None = None) -> Prediction:
    """Time per step and per epoch of mSGD (``H=None``) or local SGD syncing every ``H`` steps."""
    if H is not None and H < 1:
        raise ValueError(f"H must be >= 1 or None, got {H!r}")
    if H is None:
        comm = allreduce_seconds(work.grad_bytes, workers, link)
        wire = ring_allreduce_bytes(work.grad_bytes, workers)
    else:
        comm = allreduce_seconds(work.sync_bytes, workers, link) / H
        wire = ring_allreduce_bytes(work.sync_bytes, workers) / H
    return _prediction(work, workers=workers, gpus=workers, H=H, comm_s=comm, wire=wire)


def _prediction(
    work: Workload, *, workers: int, gpus: int, H: int | None, comm_s: float, wire: float
) -> Prediction:
    """A step of compute plus ``comm_s``; an epoch of ImageNet at a global batch of B x ``gpus``."""
    step = work.compute_s + comm_s
    n = steps_per_epoch(work, gpus)
    return Prediction(workers, H, step, comm_s, wire, n, n * step)  # the fields in their order


def predict_nodes(
    work: Workload,
    *,
    nodes: int,
    gpus_per_node: int,
    inter: Link,
    intra: Link,
    H: int | None = None,
    worker: str = "gpu",
) -> Prediction:
    """Time per step on ``nodes`` x ``gpus_per_node`` GPUs: a fast link inside a node (``intra``, per GPU,
    NVLink) and a slow one between nodes (``inter``, one per node, shared by its GPUs).

    Every all-reduce over all GPUs is hierarchical (what NCCL does on such a machine): reduce-scatter inside
    the node, an all-reduce of each GPU's 1/g across nodes (one copy of the data per node crosses the node's
    link), all-gather inside the node. ``worker="gpu"``: K = all GPUs, local SGD syncs every H steps and
    nothing else. ``worker="node"`` (``ranks_per_worker: "node"``): K = nodes, gradients all-reduced inside
    the node every step, parameters averaged across nodes every H (localsgd_ds/workers.py). mSGD (``H=None``)
    is the same for both. ``wire_bytes_per_step`` counts what crosses one node's link.
    """
    if worker not in ("gpu", "node"):
        raise ValueError(f'worker must be "gpu" or "node", got {worker!r}')
    if H is not None and H < 1:
        raise ValueError(f"H must be >= 1 or None, got {H!r}")
    g = gpus_per_node

    def inside(nbytes: float) -> float:  # reduce-scatter + all-gather inside a node
        return allreduce_seconds(nbytes, g, intra) if g > 1 else 0.0

    def across(nbytes: float) -> float:  # the node's share over its one link
        return allreduce_seconds(nbytes, nodes, inter)

    if H is None:
        comm = inside(work.grad_bytes) + across(work.grad_bytes)
        wire = ring_allreduce_bytes(work.grad_bytes, nodes)
    else:
        comm = (inside(work.sync_bytes) + across(work.sync_bytes)) / H
        wire = ring_allreduce_bytes(work.sync_bytes, nodes) / H
        if worker == "node":
            comm += inside(work.grad_bytes)
    workers = nodes * g if worker == "gpu" or H is None else nodes
    return _prediction(work, workers=workers, gpus=nodes * g, H=H, comm_s=comm, wire=wire)


def nodes_table(
    work: Workload,
    *,
    nodes: int,
    gpus_per_node: int,
    inter: Link,
    intra: Link,
    hs: Sequence[int] = (2, 8, 32),
) -> str:
    """Markdown: mSGD, local SGD with a GPU as a worker, and with a node as a worker, at each H."""
    msgd = predict_nodes(work, nodes=nodes, gpus_per_node=gpus_per_node, inter=inter, intra=intra)
    lines = [
        "| method | K | H x K | step (ms) | comm share | across a node's link per step (MB) | epoch (min) "
        "| epoch time saved vs mSGD |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [("mSGD", msgd)]
    for h in hs:
        for worker in ("gpu", "node"):
            p = predict_nodes(
                work, nodes=nodes, gpus_per_node=gpus_per_node, inter=inter, intra=intra, H=h, worker=worker
            )
            rows.append((f"local SGD H={h}, worker = {worker}", p))
    for name, p in rows:
        hk = "-" if p.H is None else str(p.H * p.workers)
        lines.append(
            f"| {name} | {p.workers} | {hk} | {_ms(p.step_s)} | {p.comm_share:.1%} "
            f"| {p.wire_bytes_per_step / 1e6:.1f} | {p.epoch_s / 60:.2f} | {1 - p.epoch_s / msgd.epoch_s:.1%} |"
        )
    return "\n".join(lines)


def fit_link(samples: Sequence[tuple[float, float]], workers: int) -> Link:
    """The link that best explains timed all-reduces ``(nbytes, seconds)`` on ``workers`` workers.

    Fits ``seconds = 2(K-1) a + ring_bytes x 8 / B`` by least squares on relative error (sizes span
    orders of magnitude), and clamps the latency at zero.
    """
    if workers < 2:
        raise ValueError("fit_link needs timings from at least 2 workers")
    if len(samples) < 2:
        raise ValueError("fit_link needs at least two (nbytes, seconds) samples")
    # Minimise sum ((c0 x0 + c1 x1 - t) / t)^2 with x0 = 2(K-1), x1 = ring bits: a 2x2 normal system.
    s00 = s01 = s11 = r0 = r1 = 0.0
    for nbytes, seconds in samples:
        w = 1.0 / (seconds * seconds)
        x0 = 2.0 * (workers - 1)
        x1 = ring_allreduce_bytes(nbytes, workers) * 8
        s00 += w * x0 * x0
        s01 += w * x0 * x1
        s11 += w * x1 * x1
        r0 += w * x0 * seconds
        r1 += w * x1 * seconds
    det = s00 * s11 - s01 * s01
    latency = (r0 * s11 - r1 * s01) / det
    per_bit = (s00 * r1 - s01 * r0) / det
    if latency < 0:  # the bandwidth term alone, refitted
        latency = 0.0
        per_bit = r1 / s11
    return Link(gbit_per_s=1.0 / (per_bit * 1e9), latency_s=latency)


# -- tables ---------------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def answer_table(
    work: Workload, *, workers: int, link: Link, hs: Sequence[int] = (1, 2, 4, 8, 16, 32)
) -> str:
    """Markdown: mSGD and local SGD at each H on one (K, link): step, communication, epoch, savings."""
    msgd = predict(work, workers=workers, link=link)
    lines = [
        "| method | step (ms) | comm per step (ms) | comm share | sent per step (MB) | epoch (min) "
        "| epoch time saved vs mSGD | bytes saved vs mSGD |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [("mSGD", msgd)] + [
        (f"local SGD H={h}", predict(work, workers=workers, link=link, H=h)) for h in hs
    ]
    for name, p in rows:
        lines.append(
            f"| {name} | {_ms(p.step_s)} | {_ms(p.comm_s)} | {p.comm_share:.1%} "
            f"| {p.wire_bytes_per_step / 1e6:.1f} | {p.epoch_s / 60:.2f} "
            f"| {1 - p.epoch_s / msgd.epoch_s:.1%} | {1 - p.wire_bytes_per_step / msgd.wire_bytes_per_step:.1%} |"
        )
    return "\n".join(lines)


def grid_table(
    work: Workload,
    *,
    workers: Sequence[int] = (2, 8, 16, 32, 64, 128, 256),
    gbits: Sequence[float] = (10, 25, 100, 400),
    H: int = 8,
    latency_s: float = 10e-6,
) -> str:
    """Markdown: for each K and link, mSGD's communication share and the epoch time local SGD at H saves."""
    head = "| K | " + " | ".join(f"{g:g} Gbit/s: mSGD comm share / H={H} saves" for g in gbits) + " |"
    lines = [head, "| ---: |" + " ---: |" * len(gbits)]
    for k in workers:
        cells = []
        for g in gbits:
            link = Link(gbit_per_s=g, latency_s=latency_s)
            msgd = predict(work, workers=k, link=link)
            local = predict(work, workers=k, link=link, H=H)
            cells.append(f"{msgd.comm_share:.1%} / {1 - local.epoch_s / msgd.epoch_s:.1%}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compute_from_bench(path: str, model: str) -> tuple[float, int]:
    """(compute seconds per step, batch) from a bench_comm.py results.json: the GPU compute-only run if
    there is one for ``model``, else the no-communication CPU step."""
    with open(path) as f:
        results = json.load(f)
    for case in results.get("cases", []):
        if case.get("model") == model and "compute_s" in case:
            return float(case["compute_s"]["median"]), int(case["batch"])
    raise SystemExit(f"{path} has no measured compute time for {model}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m localsgd_ds.cost_model",
        description="Predict mSGD vs local SGD time per epoch and communication share (ring all-reduce).",
    )
    parser.add_argument("--model", default="resnet50", choices=sorted(MODEL_SIZES))
    parser.add_argument(
        "--compute-s",
        type=float,
        default=0.1,
        help="seconds of one step without communication (default 0.1: an ASSUMED ResNet-50, 32 images per "
        "GPU, V100-class fp32 step; measure yours with benchmarks/bench_comm.py --device cuda --compute-only)",
    )
    parser.add_argument("--from-bench", help="take --compute-s and --batch from a bench_comm.py results.json")
    parser.add_argument("--batch", type=int, default=32, help="samples per worker per step (default 32)")
    parser.add_argument("--workers", type=int, default=64, help="K for the answer table (default 64)")
    parser.add_argument(
        "--gbit", type=float, default=25.0, help="link Gbit/s for the answer table (default 25)"
    )
    parser.add_argument("--latency-us", type=float, default=10.0, help="per-hop latency in us (default 10)")
    parser.add_argument("--nodes", type=int, default=32, help="nodes for the node-worker table (default 32)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    intra_help = "per-GPU bandwidth inside a node in Gbit/s (default 2400: NVLink, 300 GB/s each way)"
    parser.add_argument("--intra-gbit", type=float, default=2400.0, help=intra_help)
    args = parser.parse_args(argv)

    compute_s, batch, source = args.compute_s, args.batch, "assumed (--compute-s)"
    if args.from_bench:
        compute_s, batch = _compute_from_bench(args.from_bench, args.model)
        source = f"measured ({args.from_bench})"
    work = Workload.for_model(args.model, compute_s=compute_s, batch_per_worker=batch)
    link = Link(gbit_per_s=args.gbit, latency_s=args.latency_us * 1e-6)
    msgd = predict(work, workers=args.workers, link=link)
    h8 = predict(work, workers=args.workers, link=link, H=8)
    print(
        f"# {args.model} ({work.grad_bytes / 1e6:.1f} MB of fp32 gradients, {work.sync_bytes / 1e6:.1f} MB per "
        f"sync), compute {compute_s * 1e3:.1f} ms per step of {batch} samples [{source}], "
        f"K = {args.workers}, {args.gbit:g} Gbit/s, {args.latency_us:g} us per hop, ring all-reduce, "
        f"no overlap of communication with backward (DeepSpeed ZeRO stage 0)\n"
    )
    print(answer_table(work, workers=args.workers, link=link))
    print(
        f"\nAnswer: at K = {args.workers} on {args.gbit:g} Gbit/s, communication is {msgd.comm_share:.1%} of an "
        f"mSGD step ({_ms(msgd.comm_s)} of {_ms(msgd.step_s)} ms); local SGD with H = 8 sends "
        f"{1 - h8.wire_bytes_per_step / msgd.wire_bytes_per_step:.1%} fewer bytes and saves "
        f"{1 - h8.epoch_s / msgd.epoch_s:.1%} of the time per epoch "
        f"({msgd.epoch_s / 60:.2f} -> {h8.epoch_s / 60:.2f} min, {msgd.epoch_s / h8.epoch_s:.2f}x faster)."
    )
    print(f"\n## mSGD communication share / epoch time saved by H = 8, compute {compute_s * 1e3:.1f} ms\n")
    print(grid_table(work, latency_s=link.latency_s))
    print("\n## Sensitivity to the compute time: K = 64, 25 Gbit/s\n")
    print("| compute per step (ms) | mSGD comm share | H=8 saves |")
    print("| ---: | ---: | ---: |")
    for c in (0.025, 0.05, 0.1, 0.2, 0.4):
        w = Workload.for_model(args.model, compute_s=c, batch_per_worker=batch)
        m = predict(w, workers=64, link=Link(25, link.latency_s))
        l8 = predict(w, workers=64, link=Link(25, link.latency_s), H=8)
        print(f"| {c * 1e3:g} | {m.comm_share:.1%} | {1 - l8.epoch_s / m.epoch_s:.1%} |")
    intra = Link(gbit_per_s=args.intra_gbit, latency_s=2e-6)
    print(
        f"\n## {args.nodes} nodes x {args.gpus_per_node} GPUs: {args.gbit:g} Gbit/s between nodes, "
        f"{args.intra_gbit:g} Gbit/s per GPU inside a node, compute {compute_s * 1e3:.1f} ms\n"
    )
    print(nodes_table(work, nodes=args.nodes, gpus_per_node=args.gpus_per_node, inter=link, intra=intra))


if __name__ == "__main__":
    main()
