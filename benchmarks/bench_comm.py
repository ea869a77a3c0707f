"""Communication benchmark: mSGD vs the localsgd_ds hook vs PyTorch's post-local SGD, on CPU gloo workers.

For each model and worker count K it launches K ranks of ``bench_worker.py`` (one thread each) and
measures, interleaved in one run: per-step compute and communication seconds and bytes for plain
DeepSpeed (mSGD) and for local SGD at each H, ours and PyTorch's side by side; a local step over a step
with no communication; one sync over one raw all-reduce of the same bytes; and, in a fresh process, the
memory a sync adds. It writes ``results.json``, ``table.md`` and ``plot.png`` and validates the cost
model (``localsgd_ds/cost_model.py``) against the measured steps::

    python benchmarks/bench_comm.py --hook-only            # issue "hook": the two ratios, K=2, ResNet-18
    python benchmarks/bench_comm.py                        # K=2 and 4, ResNet-18 and -50 (about 10 min)
    python benchmarks/bench_comm.py --link-gbit 1          # over veth + tc (root): 1 Gbit/s per worker
    python benchmarks/bench_comm.py --device cuda --compute-only --models resnet50 --image-size 224
    python benchmarks/bench_comm.py --tiny                 # smoke test: tiny model, seconds

Ratios are medians over interleaved rounds (A B, B A, ...) with their min-max.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_report  # noqa: E402

from localsgd_ds.runtime import free_port  # noqa: E402

WORKER = HERE / "bench_worker.py"
DEFAULT_BATCH = {"tiny": 4, "resnet18": 16, "resnet50": 8}
NETNS_PREFIX = "lsgdbench"
SUBNET = "10.231.7"  # inside the benchmark's own network namespaces only


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


# -- veth + tc: K network namespaces on one bridge, each link limited by a token bucket --------------------


class LimitedLinks:
    """K namespaces ``lsgdbench_r<i>`` (address 10.231.7.<i+1> on ``lsgd0``), each joined by a veth pair to a
    bridge in namespace ``lsgdbench_sw``. A ``tbf`` qdisc on both ends of each pair limits the worker's
    upload and download to ``gbit`` Gbit/s: a full-duplex link per worker into a non-blocking switch.
    Nothing is created in the host's own namespace; ``close`` deletes all of it."""

    def __init__(self, workers: int, gbit: float) -> None:
        self.workers, self.gbit = workers, gbit
        self.switch = f"{NETNS_PREFIX}_sw"
        self.namespaces = [f"{NETNS_PREFIX}_r{i}" for i in range(workers)]

    def __enter__(self) -> LimitedLinks:
        self.close()  # leftovers of an interrupted run
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        rate = f"{self.gbit}gbit"
        # The bucket must hold a whole GSO packet (64 KiB) or tbf drops it; 2 ms of traffic otherwise.
        burst = max(256 * 1024, int(self.gbit * 1e9 / 8 * 0.002))
        tbf = ["root", "tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
        run(["ip", "netns", "add", self.switch])
        run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.namespaces):
            run(["ip", "netns", "add", ns])
            port = f"port{i}"
            run(
                [
                    "ip",
                    "-n",
                    self.switch,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "lsgd0",
                    "netns",
                    ns,
                ]
            )
            run(["ip", "-n", self.switch, "link", "set", port, "master", "br0"])
            run(["ip", "-n", self.switch, "link", "set", port, "up"])
            run(["ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "lsgd0"])
            run(["ip", "-n", ns, "link", "set", "lsgd0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lsgd0", *tbf])
            run(["ip", "netns", "exec", self.switch, "tc", "qdisc", "add", "dev", port, *tbf])

    def close(self) -> None:
        for ns in [*self.namespaces, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def rank_prefix(self, index: int) -> list[str]:
        """The command prefix that runs a process in namespace ``index``."""
        return ["ip", "netns", "exec", self.namespaces[index]]


# -- launching ranks ------------------------------------------------------------------------------------------


def launch(
    cfg: dict,
    workers: int,
    links: LimitedLinks | None = None,
    timeout: float = 1800,
    *,
    ranks_per_namespace: int = 1,
    script: Path = WORKER,
) -> list[dict]:
    """Run ``workers`` ranks of ``script`` (bench_worker.py) on ``cfg``; return each rank's result. Over
    ``links``, rank r runs in namespace r // ``ranks_per_namespace``: ranks sharing a namespace talk over its
    loopback (a node's ranks), the others over the limited link."""
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    if links is None:
        master, port, iface = "127.0.0.1", free_port(), "lo"
    else:
        master, port, iface = f"{SUBNET}.1", 29511, "lsgd0"
    procs, logs = [], []
    for rank in range(workers):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(workers),
            MASTER_ADDR=master,
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME=iface,
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        )
        # No LOCAL_SIZE: with LOCAL_SIZE == WORLD_SIZE DeepSpeed's CPU accelerator creates a 69 MB shared-memory
        # workspace per rank in /dev/shm at init_distributed and never removes it (gloo does not need it).
        env.pop("LOCAL_SIZE", None)
        if cfg.get("malloc_no_trim") and cfg["mode"] == "timing":
            # Keep freed memory in the heap: all sides share each process, and with glibc's defaults its
            # heap trimming re-faults the memory DeepSpeed frees and reallocates every step (benchmarks/README.md).
            env["GLIBC_TUNABLES"] = (
                "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432"
            )
        if cfg["mode"] == "memory":
            # Every allocation of 64 KiB or more gets its own mapping, unmapped when freed: RSS = live.
            env["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=65536"
        prefix = [] if links is None else links.rank_prefix(rank // ranks_per_namespace)
        log = open(out_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [*prefix, sys.executable, str(script), str(cfg_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            tail = (out_dir / f"rank{rank}.log").read_text()[-4000:]
            raise RuntimeError(f"rank {rank} exited with {p.returncode} ({out_dir}):\n{tail}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(workers)]


# -- the run --------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception:  # noqa: BLE001 - a GPU-only box may lack it; only the version string is wanted
        ds_version = None
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    # The hook is what is measured: record its exact state (uncommitted edits included).
    hook_state = git("rev-parse", "--short", "HEAD")
    diff = git("diff", "HEAD", "--", "localsgd_ds")
    if diff:
        hook_state += (
            f" + uncommitted localsgd_ds/ changes (diff sha1 {hashlib.sha1(diff.encode()).hexdigest()[:10]})"
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "load_average_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "localsgd_ds": hook_state,
    }


def base_config(args, model: str, mode: str, out_dir: Path) -> dict:
    tiny = model == "tiny"
    return {
        "mode": mode,
        "model": model,
        "batch": args.batch or DEFAULT_BATCH.get(model, 8),
        "image_size": args.image_size,
        "hs": args.hs,
        "rounds": args.rounds,
        "sync_rounds": args.sync_rounds,
        "local_rounds": args.local_rounds,
        "window": args.window,
        "local_window": args.local_window,
        "warmup_steps": 1 if tiny else 2,
        "settle_steps": 1 if tiny else 2,
        "calibration_bytes": [4 << 10, 64 << 10, 1 << 20, 8 << 20]
        if tiny
        else [4 << 10, 64 << 10, 1 << 20, 8 << 20, 32 << 20, 64 << 20],
        "calibration_reps": 3 if tiny else 5,
        "peer": not args.no_peer,
        "malloc_no_trim": args.malloc == "no-trim",
        "device": args.device,
        "out_dir": str(out_dir),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--workers", nargs="+", type=int, default=[2, 4], help="K values on loopback gloo")
    p.add_argument("--hs", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--batch", type=int, default=None, help="per-worker batch (default per model)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the H sweep")
    p.add_argument("--sync-rounds", type=int, default=30, help="rounds of sync vs raw all-reduce")
    p.add_argument("--local-rounds", type=int, default=15, help="rounds of local step vs no-comm step")
    p.add_argument(
        "--window", type=int, default=4, help="minimum steps per timed window (whole periods of H)"
    )
    p.add_argument("--local-window", type=int, default=4, help="steps per local/no-comm window")
    p.add_argument("--no-peer", action="store_true", help="leave PyTorch's post-local SGD out")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument(
        "--malloc",
        choices=["no-trim", "default"],
        default="no-trim",
        help="glibc malloc of the timed ranks: no-trim (default) keeps freed memory in the heap "
        "(GLIBC_TUNABLES trim and mmap thresholds), so that no side pays page faults for memory another "
        "side's frees made glibc hand back; default leaves glibc as it is",
    )
    p.add_argument(
        "--hook-only", action="store_true", help='issue "hook": K=2, ResNet-18, the two ratios only'
    )
    p.add_argument(
        "--link-gbit", nargs="*", type=float, default=[], help="also run over veth+tc at these Gbit/s"
    )
    p.add_argument("--link-workers", nargs="+", type=int, default=[2, 4])
    p.add_argument("--link-only", action="store_true", help="only the veth+tc runs")
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny model, 2 workers, few steps")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--compute-only", action="store_true", help="one process on --device: compute time per step"
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--latest", action="store_true", help="copy table.md and plot.png to benchmarks/latest/")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.workers, args.hs = ["tiny"], [2], [1, 2]
        args.rounds, args.sync_rounds, args.local_rounds = 2, 2, 2
        args.window, args.local_window, args.image_size = 2, 2, 8
    if args.hook_only:
        args.models, args.workers, args.hs, args.no_peer, args.no_memory = ["resnet18"], [2], [], True, True
    if args.compute_only and args.image_size == 32:
        args.image_size = 224
    if args.device != "cpu" and not args.compute_only:
        p.error(
            "the gloo runs are CPU only; on a GPU use --compute-only (one process, compute time per step)"
        )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out or REPO / "benchmarks" / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "argv": sys.argv[1:] if argv is None else list(argv), "cases": []}
    started = time.monotonic()

    if args.compute_only:
        for model in args.models:
            cfg = base_config(args, model, "compute", out / f"{model}_compute")
            cfg["batch"] = args.batch or 32
            cfg["warmup_steps"] = 5
            cfg["rounds"], cfg["window"] = max(args.rounds, 5), 10
            Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
            Path(cfg["out_dir"], "config.json").write_text(json.dumps(cfg))
            subprocess.run(
                [sys.executable, str(WORKER), str(Path(cfg["out_dir"], "config.json"))],
                check=True,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
            )
            raw = json.loads(Path(cfg["out_dir"], "rank0.json").read_text())
            results["cases"].append(bench_report.compute_case(cfg, raw))
            print(bench_report.case_lines(results["cases"][-1]), flush=True)
    else:
        plan = []
        if not args.link_only:
            plan += [(m, k, None) for m in args.models for k in args.workers]
        plan += [(m, k, g) for g in args.link_gbit for m in args.models[:1] for k in args.link_workers]
        for model, workers, gbit in plan:
            transport = "loopback" if gbit is None else f"veth_{gbit:g}gbit"
            name = f"{model}_K{workers}_{transport}"
            cfg = base_config(args, model, "timing", out / name)
            t0 = time.monotonic()
            if gbit is None:
                ranks = launch(cfg, workers)
            else:
                with LimitedLinks(workers, gbit) as links:
                    ranks = launch(cfg, workers, links)
            memory = None
            if not args.no_memory and not args.no_peer and gbit is None and workers == min(args.workers):
                mem_cfg = base_config(args, model, "memory", out / f"{model}_memory")
                memory = launch(mem_cfg, workers)
            case = bench_report.timing_case(
                cfg, ranks, workers=workers, transport=transport, gbit=gbit, memory=memory
            )
            case["wall_s"] = round(time.monotonic() - t0, 1)
            results["cases"].append(case)
            print(bench_report.case_lines(case), flush=True)

    results["machine"]["load_average_end"] = os.getloadavg()
    results["wall_s"] = round(time.monotonic() - started, 1)
    bench_report.annotate_runs(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = bench_report.markdown(results)
    (out / "table.md").write_text(table)
    plotted = bench_report.plot(results, out / "plot.png")
    print(
        f"\nwrote {out / 'results.json'}, {out / 'table.md'}" + (f", {out / 'plot.png'}" if plotted else "")
    )
    if args.latest:
        latest = REPO / "benchmarks" / "latest"
        latest.mkdir(exist_ok=True)
        shutil.copy(out / "table.md", latest / "table.md")
        if plotted:
            shutil.copy(out / "plot.png", latest / "plot.png")
    return results


if __name__ == "__main__":
    main()
