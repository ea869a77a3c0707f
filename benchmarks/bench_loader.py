"""Loader throughput: streaming shards from a local S3 server vs. the same shards on local disk vs. a
bare decode + augment loop on the same cores (the ceiling of any CPU input pipeline).

Three sides, measured interleaved (S3, disk, bare; S3, disk, bare; ...) for ``--rounds`` rounds so
that the noise of a shared machine hits all sides alike; the ratios are computed per round and
reported as median and spread (min..max):

- ``s3``:    ``localsgd_ds.data.train_loader("s3://...")`` with 2 DataLoader worker processes, from
             SeaweedFS ``weed mini`` on 127.0.0.1 (the server shares the same cores);
- ``disk``:  the same loader, the same shard files, from a local folder;
- ``bare``:  2 processes running ``decode_train`` (PIL decode + RandomResizedCrop 224 + flip) over the
             same JPEG bytes held in memory: no tar, no I/O, no batching, no normalization, no IPC.

Images are ImageNet-sized JPEGs (500x375, about 95 KB, quality 90) cut from real photos shipped with
scikit-learn (``data_prep.synthetic.make_photo_imagefolder``), sharded with data_prep. Loader
throughput is steady state: from the moment every worker has delivered its first batch to the last
batch (start-up, i.e. forking workers and filling the first shuffle block, is printed separately).
Steady-state CPU time per image (all processes of a side: loader process, workers and, for S3, the
server) is printed too: it is what decides throughput once the cores are saturated, and it is far
less noisy than wall-clock rates on a shared machine.

Run (needs the test extra for ``weed``; about 3 minutes on 2 cores)::

    python benchmarks/bench_loader.py --images 2048 --rounds 5

``--draft-ab`` measures instead whether libjpeg's reduced-size decoding pays in training: the disk
loader with ``jpeg_draft=True`` and with ``jpeg_draft=False``, interleaved (the side that goes first
alternates), on source images of ``--image-px`` (draft decoding only starts when a crop is at least
twice the output, so use images larger than 500x375 to see it)::

    python benchmarks/bench_loader.py --draft-ab --image-px 1000x750 --images 1024 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds of this process and its waited-for children, or of process ``pid`` (the S3 server)."""
    if pid is not None:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def side_cpu(server_pid: int | None, count_server: bool) -> float:
    """CPU seconds so far of this process and its live children (DataLoader workers), plus the S3
    server's if ``count_server`` (the server is a child too, idle for the disk side: left out there)."""
    import psutil  # a dependency of deepspeed

    me = psutil.Process()
    total = sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)] if p.pid != server_pid)
    return total + (cpu_seconds(server_pid) if count_server else 0.0)


def loader_pass(
    location: str, epoch: int, args, server_pid: int | None, count_server: bool, jpeg_draft: bool = True
) -> tuple[float, float, int, float]:
    """(steady images/s, start-up seconds, images, steady CPU ms per image) of one epoch of the loader."""
    from localsgd_ds.data import train_loader

    loader = train_loader(
        location,
        batch_size=args.batch_size,
        rank=0,
        world_size=1,
        epoch=epoch,
        image_size=args.image_size,
        num_workers=args.workers,
        shuffle_block=args.shuffle_block,
        jpeg_draft=jpeg_draft,
    )
    # Steady state: from the first batch of every worker to the batch after which the first worker
    # may finish, the same window for the rate and for the CPU of the still-running workers.
    first, last = args.workers, len(loader) - args.workers
    start = time.perf_counter()
    images = 0
    for i, (_, labels) in enumerate(loader, start=1):
        images += len(labels)
        if i == first:
            t0, cpu0, images0 = time.perf_counter(), side_cpu(server_pid, count_server), images
        if i == last:
            t1, cpu1, images1 = time.perf_counter(), side_cpu(server_pid, count_server), images
    steady_images = images1 - images0
    return steady_images / (t1 - t0), t0 - start, images, 1000 * (cpu1 - cpu0) / steady_images


def _bare_worker(jpegs: list[bytes], size: int, seed: int, barrier, results) -> None:
    import numpy as np
    import torch

    from localsgd_ds.data import decode_train

    torch.set_num_threads(1)
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for i, jpeg in enumerate(jpegs):
        decode_train(jpeg, np.random.default_rng([seed, i]), size)
    results.put((start, time.perf_counter(), len(jpegs), time.process_time() - cpu))


def bare_pass(jpegs: list[bytes], epoch: int, args) -> tuple[float, float]:
    """(images/s, CPU ms per image) of ``args.workers`` processes decoding and augmenting ``jpegs``."""
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(args.workers), ctx.Queue()
    procs = [
        ctx.Process(
            target=_bare_worker, args=(jpegs[w :: args.workers], args.image_size, epoch, barrier, results)
        )
        for w in range(args.workers)
    ]
    for p in procs:
        p.start()
    spans = [results.get() for _ in procs]
    for p in procs:
        p.join()
    images = sum(n for _, _, n, _ in spans)
    rate = images / (max(e for _, e, _, _ in spans) - min(s for s, _, _, _ in spans))
    return rate, 1000 * sum(c for *_, c in spans) / images


def spread(values, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def header(m: dict, jpegs: list[bytes], args) -> None:
    import PIL
    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    print(
        f"bench_loader: {m['num_samples']} images ({args.image_px} JPEG, {statistics.mean(map(len, jpegs)) / 1e3:.0f} KB "
        f"mean, real photos), {m['num_shards']} shards of {args.samples_per_shard} ({m['num_bytes'] / 1e6:.0f} MB); "
        f"batch {args.batch_size}, {args.image_size} px, {args.workers} processes per side, shuffle block "
        f"{args.shuffle_block}"
    )
    print(
        f"machine: {os.cpu_count()} cores ({cpu}), shared with other jobs (noisy); python "
        f"{platform.python_version()}, torch {torch.__version__}, pillow {PIL.__version__}"
        + ("" if args.draft_ab else "; S3 = SeaweedFS weed mini on 127.0.0.1 (on the same cores)")
    )


def compare_storage(remote: str, local: str, jpegs: list[bytes], server_pid: int, args) -> None:
    """The three sides s3, disk and bare, interleaved round by round."""
    print(
        f"{'round':>5} {'s3 img/s':>9} {'disk img/s':>10} {'bare img/s':>10} {'s3/disk':>8} {'s3/bare':>8} "
        f"{'disk/bare':>9}   CPU ms/img: {'s3':>5} {'disk':>5} {'bare':>5}"
    )
    rows, cpus = [], []
    startup: dict[str, list[float]] = {"s3": [], "disk": []}
    for r in range(args.rounds):
        s3_rate, s3_start, n, s3_cpu = loader_pass(remote, r, args, server_pid, count_server=True)
        disk_rate, disk_start, _, disk_cpu = loader_pass(local, r, args, server_pid, count_server=False)
        bare_rate, bare_cpu = bare_pass(jpegs[:n], r, args)
        startup["s3"].append(s3_start)
        startup["disk"].append(disk_start)
        rows.append((s3_rate, disk_rate, bare_rate))
        cpus.append((s3_cpu, disk_cpu, bare_cpu))
        print(
            f"{r + 1:>5} {s3_rate:>9.0f} {disk_rate:>10.0f} {bare_rate:>10.0f} {s3_rate / disk_rate:>8.2f} "
            f"{s3_rate / bare_rate:>8.2f} {disk_rate / bare_rate:>9.2f}   {'':>11} {s3_cpu:>5.2f} "
            f"{disk_cpu:>5.2f} {bare_cpu:>5.2f}"
        )
    s3_r, disk_r, bare_r = zip(*rows, strict=True)
    s3_c, disk_c, bare_c = zip(*cpus, strict=True)
    print(f"median (min..max) over {args.rounds} rounds:")
    print(f"  s3 {spread(s3_r)} img/s, disk {spread(disk_r)} img/s, bare {spread(bare_r)} img/s")
    print(f"  s3/disk   = {spread([a / b for a, b, _ in rows], '{:.2f}')}   (target >= 0.90)")
    print(f"  s3/bare   = {spread([a / c for a, _, c in rows], '{:.2f}')}   (target >= 0.85)")
    print(f"  disk/bare = {spread([b / c for _, b, c in rows], '{:.2f}')}")
    print(
        f"  steady-state CPU per image (loader process + workers; s3 also the server): s3 {spread(s3_c, '{:.2f}')} ms, "
        f"disk {spread(disk_c, '{:.2f}')} ms, bare {spread(bare_c, '{:.2f}')} ms; "
        f"bare/s3 = {spread([c / a for a, _, c in cpus], '{:.2f}')}, bare/disk = "
        f"{spread([c / b for _, b, c in cpus], '{:.2f}')}"
    )
    print(
        f"  start-up to the first batch of every worker: s3 {spread(startup['s3'], '{:.2f}')} s, "
        f"disk {spread(startup['disk'], '{:.2f}')} s"
    )


def compare_draft(local: str, args) -> None:
    """The disk loader with libjpeg's reduced-size decoding (``jpeg_draft=True``) and without, interleaved;
    the side that goes first alternates from round to round."""
    print(
        f"{'round':>5} {'draft img/s':>11} {'full img/s':>10} {'draft/full':>10}   "
        f"CPU ms/img: {'draft':>6} {'full':>6} {'full/draft':>10}"
    )
    rates, cpus = [], []
    for r in range(args.rounds):
        result = {}
        for draft in (True, False) if r % 2 == 0 else (False, True):
            rate, _, _, cpu = loader_pass(local, r, args, None, count_server=False, jpeg_draft=draft)
            result[draft] = (rate, cpu)
        (d_rate, d_cpu), (f_rate, f_cpu) = result[True], result[False]
        rates.append((d_rate, f_rate))
        cpus.append((d_cpu, f_cpu))
        print(
            f"{r + 1:>5} {d_rate:>11.0f} {f_rate:>10.0f} {d_rate / f_rate:>10.2f}   {'':>11} {d_cpu:>6.2f} "
            f"{f_cpu:>6.2f} {f_cpu / d_cpu:>10.2f}"
        )
    print(f"median (min..max) over {args.rounds} rounds:")
    print(
        f"  draft {spread([a for a, _ in rates])} img/s, full {spread([b for _, b in rates])} img/s, "
        f"draft/full = {spread([a / b for a, b in rates], '{:.2f}')}"
    )
    print(
        f"  steady-state CPU per image: draft {spread([a for a, _ in cpus], '{:.2f}')} ms, "
        f"full {spread([b for _, b in cpus], '{:.2f}')} ms, full/draft = {spread([b / a for a, b in cpus], '{:.2f}')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048, help="training images (default 2048)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2, help="loader / bare-loop processes (default 2)")
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--shuffle-block", type=int, default=256)
    parser.add_argument(
        "--image-px", default="500x375", help="WIDTHxHEIGHT of the source JPEGs (default 500x375)"
    )
    parser.add_argument(
        "--draft-ab",
        action="store_true",
        help="compare the disk loader with and without reduced-size JPEG decoding (no S3 side)",
    )
    args = parser.parse_args()
    width, height = (int(v) for v in args.image_px.lower().split("x"))

    from data_prep.local_s3 import S3Server
    from data_prep.shard import shard_dataset
    from data_prep.synthetic import make_photo_imagefolder

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-loader-"))
        per_class = -(-args.images // 10)
        src = make_photo_imagefolder(
            Path(tmp) / "src",
            num_classes=10,
            train_per_class=per_class,
            val_per_class=1,
            size=(width, height),
        )
        jpegs = [p.read_bytes() for p in sorted((src / "train").glob("*/*.JPEG"))]
        local = str(Path(tmp) / "shards")
        report = shard_dataset(
            src, local, samples_per_shard=args.samples_per_shard, splits=("train",), progress=False
        )
        header(report.splits["train"].manifest, jpegs, args)
        if args.draft_ab:
            compare_draft(local, args)
            return
        server = stack.enter_context(S3Server(bucket="bench"))
        os.environ.update(server.env())
        remote = "s3://bench/photos"
        shard_dataset(
            src, remote, samples_per_shard=args.samples_per_shard, splits=("train",), progress=False
        )
        compare_storage(remote, local, jpegs, server.pid, args)


if __name__ == "__main__":
    main()
