"""Workers that are nodes, over a slow link: 4 gloo ranks as 2 workers x 2 ranks.

Each worker's two ranks run in one network namespace and talk over its loopback (a node's NVLink); the two
namespaces are joined by the veth + tc link of ``bench_comm.py`` (1 Gbit/s per node by default: the slow
network between nodes). In one run, interleaved A B ... B A, the same model and per-rank batches step as

- mSGD: plain DeepSpeed, gradients all-reduced over the 4 ranks every step (gloo's flat all-reduce, so
  part of it crosses the link every step);
- K = 4 local SGD: the hook with ``ranks_per_worker: 1`` (every rank a worker), parameters averaged over
  the 4 ranks every H steps;
- 2 x 2: the hook with ``ranks_per_worker: 2`` (every node a worker), gradients averaged inside the node
  every step (loopback only), parameters averaged across the two nodes every H steps, hierarchically;
- no communication: plain torch, the compute floor.

It reports per side and H: the step time (slowest rank, median over rounds, [min-max]) and its ratio to
mSGD in the same round; the bytes that crossed the link per step, counted by the kernel (``tx_bytes`` of
each node's interface, TCP/IP headers included) and by the hook (``bytes_across_workers``); and a floor
for each side: the no-communication step plus the across-link bytes at the link's rate plus the measured
inside-node gradient all-reduce (loopback between two processes on shared cores here; NVLink on a GPU node)::

    sudo python benchmarks/bench_nodes.py                  # ResNet-18, 1 Gbit/s, H = 1 4 16 (about 3 min)
    python benchmarks/bench_nodes.py --loopback --tiny     # smoke test: no root, no link, seconds

Results go to ``benchmarks/results/nodes-<time>/`` (``results.json``, ``table.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_report import summary  # noqa: E402

MB = 1e6
IFACE = "lsgd0"  # the link's interface in each node's namespace (bench_comm.LimitedLinks)
RANKS_PER_NODE = 2
NODES = 2


# -- one rank ---------------------------------------------------------------------------------------------


def link_bytes() -> int | None:
    """Bytes this namespace has sent over the link so far (None on loopback: there is no link)."""
    try:
        return int(Path(f"/sys/class/net/{IFACE}/statistics/tx_bytes").read_text())
    except OSError:
        return None


def run_rank(cfg: dict) -> dict:
    import bench_worker as bw
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    batch = bw.make_batch(cfg, rank, torch.device("cpu"))
    base = bw.make_model(cfg["model"])
    local = {"H": bw.NEVER, "T": 0}
    sides = {
        "msgd": bw.DeepSpeedSide("msgd", copy.deepcopy(base), batch, cfg, local_sgd=None),
        "k4": bw.DeepSpeedSide("k4", copy.deepcopy(base), batch, cfg, local_sgd=local),
        "nodes": bw.DeepSpeedSide(
            "nodes", copy.deepcopy(base), batch, cfg, local_sgd={**local, "ranks_per_worker": RANKS_PER_NODE}
        ),
        "nocomm": bw.NoComm(copy.deepcopy(base), batch),
    }
    for name in ("k4", "nodes"):
        sides[name].attach(bw.NEVER)
    assert sides["nodes"].hook.workers.K == NODES and sides["k4"].hook.workers.K == NODES * RANKS_PER_NODE
    torch.set_num_threads(1)  # again, in case an engine changed it
    for name in ("k4", "nodes"):
        sides[name].attach(2)
    for side in sides.values():  # warm-up: every side steps, syncs and all-reduces before anything is timed
        bw.window(side, cfg["warmup_steps"])

    def counts(side) -> tuple[int, int, float]:
        """The hook's across-worker and inside-worker bytes, and its seconds in inside-worker gradient
        all-reduces (all 0 for the sides without a hook)."""
        hook = getattr(side, "hook", None)
        if hook is None:
            return 0, 0, 0.0
        s = hook.stats
        return s.bytes_across_workers, s.bytes_inside_workers, s.worker_grad_allreduce_seconds

    def measured(name: str, H: int | None):
        side = sides[name]
        marks: dict = {}

        def prepare() -> None:
            if H is not None:
                side.attach(H)
            dist.barrier()  # every rank done with the settle steps' traffic before the counter is read
            marks["link"], marks["hook"] = link_bytes(), counts(side)

        def run() -> dict:
            w = bw.window(
                side,
                bw.window_steps(H or 1, cfg["window"]),
                settle=cfg["settle_steps"],
                before=None if H is None else (lambda: side.attach(bw.NEVER)),
                prepare=prepare,
            )
            dist.barrier()
            end = link_bytes()
            w["link_bytes"] = None if end is None else end - marks["link"]
            now = counts(side)
            w["hook_across"], w["hook_inside"], w["inside_grad_s"] = (
                a - b for a, b in zip(now, marks["hook"])
            )
            return w

        return run

    labels = [("msgd", None), ("nocomm", None)]
    labels += [(name, H) for H in cfg["hs"] for name in ("k4", "nodes")]
    rows = bw.interleaved([measured(name, H) for name, H in labels], cfg["rounds"])
    identical = bw.params_identical_across_ranks(sides["nodes"].engine.module.parameters())
    return {
        "param_bytes": bw.nbytes(base.parameters()),
        "windows": [{"side": n, "H": H, "runs": [r[i] for r in rows]} for i, (n, H) in enumerate(labels)],
        "nodes_identical_after_sync": identical,
    }


def rank_main(config_path: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    deepspeed.init_distributed(dist_backend="gloo")
    result = run_rank(cfg)
    dist.barrier()
    Path(cfg["out_dir"], f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# -- the report -------------------------------------------------------------------------------------------


def report(cfg: dict, ranks: list[dict]) -> dict:
    """Per side and H: step time (slowest rank per round), its ratio to mSGD in the same round, bytes over
    the link per step (mean of the two nodes' interfaces), the hook's across-worker bytes per node per step,
    the inside-node gradient all-reduce per step, and the floor: the no-communication step of the same
    round + link bytes / link rate + that inside-node all-reduce."""
    heads = [w["side"] for w in ranks[0]["windows"]]
    hs = [w["H"] for w in ranks[0]["windows"]]

    def per_round(i: int, merge) -> list:
        return [merge([r["windows"][i]["runs"][k] for r in ranks]) for k in range(cfg["rounds"])]

    def step_s(i: int) -> list[float]:
        return per_round(i, lambda ws: max(w["seconds"] for w in ws) / ws[0]["steps"])

    def link_per_step(i: int) -> list[float] | None:
        first = [r * RANKS_PER_NODE for r in range(NODES)]  # one rank per node reads its interface

        def merge(ws):
            counts = [ws[j]["link_bytes"] for j in first]
            return None if None in counts else statistics.mean(counts) / ws[0]["steps"]

        values = per_round(i, merge)
        return None if None in values else values

    def hook_per_node_step(i: int) -> float:
        runs = [r["windows"][i]["runs"][0] for r in ranks]
        return sum(w["hook_across"] for w in runs) / NODES / runs[0]["steps"]

    def inside_s(i: int) -> list[float]:
        # The least over ranks: a rank that reaches the collective first also waits there for its peer.
        return per_round(i, lambda ws: min(w["inside_grad_s"] for w in ws) / ws[0]["steps"])

    msgd, nocomm = step_s(heads.index("msgd")), step_s(heads.index("nocomm"))
    rate = cfg["gbit"] * 1e9 / 8 if cfg["gbit"] else None
    rows = []
    for i, (side, H) in enumerate(zip(heads, hs)):
        steps = step_s(i)
        link = link_per_step(i)
        row = {
            "side": side,
            "H": H,
            "step_s": summary(steps),
            "over_msgd": summary([s / m for s, m in zip(steps, msgd)]),
            "link_bytes_per_step": None if link is None else summary(link),
            "hook_across_bytes_per_node_step": hook_per_node_step(i),
            "inside_grad_s": summary(inside_s(i)),
        }
        if link is not None and rate:
            floor = [c + b / rate + g for c, b, g in zip(nocomm, link, inside_s(i))]
            row["floor_s"] = summary(floor)
            row["over_floor"] = summary([s / f for s, f in zip(steps, floor)])
        rows.append(row)
    return {
        "param_bytes": ranks[0]["param_bytes"],
        "nodes_identical_after_sync": all(r["nodes_identical_after_sync"] for r in ranks),
        "rows": rows,
    }


NAMES = {
    "msgd": "mSGD (all-reduce over 4 ranks)",
    "k4": "local SGD, K = 4 (a rank is a worker)",
    "nodes": "local SGD, 2 x 2 (a node is a worker)",
    "nocomm": "no communication",
}


def markdown(cfg: dict, out: dict, machine: dict) -> str:
    def r(d: dict | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
        if d is None:
            return "-"
        return f"{fmt.format(d['median'] * scale)} [{fmt.format(d['min'] * scale)}-{fmt.format(d['max'] * scale)}]"

    link = f"veth + tc {cfg['gbit']:g} Gbit/s per node" if cfg["gbit"] else "loopback (no link)"
    lines = [
        f"# Workers that are nodes: {cfg['model']}, batch {cfg['batch']} per rank, {cfg['image_size']} px, "
        f"4 ranks as 2 nodes x 2, {link}",
        "",
        f"{machine['date']}, {machine['cores']} cores, torch {machine['torch']}, deepspeed {machine['deepspeed']}, "
        f"localsgd_ds {machine['localsgd_ds']}; {cfg['rounds']} interleaved rounds; parameters "
        f"{out['param_bytes'] / MB:.1f} MB. Median [min-max] over rounds.",
        "",
        "| side | H | step (ms) | step / mSGD | over the link per step, kernel count (MB) "
        "| hook's across-worker bytes per node per step (MB) | inside-node gradient all-reduce per step (ms) "
        "| floor: no-comm step + link bytes at the rate + inside-node all-reduce (ms) | step / floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in out["rows"]:
        lines.append(
            f"| {NAMES[row['side']]} | {row['H'] or '-'} | {r(row['step_s'], 1e3)} "
            f"| {r(row['over_msgd'], fmt='{:.2f}')} | {r(row['link_bytes_per_step'], 1 / MB, '{:.3g}')} "
            f"| {row['hook_across_bytes_per_node_step'] / MB:.3g} | {r(row['inside_grad_s'], 1e3)} "
            f"| {r(row.get('floor_s'), 1e3)} "
            f"| {r(row.get('over_floor'), fmt='{:.2f}')} |"
        )
    lines.append("")
    lines.append(
        f"Ranks of a node identical after the 2 x 2 runs: {out['nodes_identical_after_sync']}. "
        "The kernel count is each node's interface tx_bytes over the window (both nodes' mean), TCP/IP "
        "headers included; the hook counts payload handed to collectives that span workers (its mSGD count "
        "is 0: plain DeepSpeed has no hook)."
    )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16, help="per-rank batch")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--hs", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--window", type=int, default=4, help="minimum steps per window (whole periods of H)")
    p.add_argument("--gbit", type=float, default=1.0, help="the link's rate per node (veth + tc, needs root)")
    p.add_argument("--loopback", action="store_true", help="no link: all 4 ranks on the host's loopback")
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny model, H = 1 2, 2 rounds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.batch, args.image_size, args.hs, args.rounds, args.window = (
            "tiny",
            4,
            8,
            [1, 2],
            2,
            2,
        )
    return args


def main(argv=None) -> dict:
    import bench_comm

    args = parse_args(argv)
    out_dir = args.out or REPO / "benchmarks" / "results" / time.strftime("nodes-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    gbit = None if args.loopback else args.gbit
    cfg = {
        "mode": "nodes",
        "model": args.model,
        "batch": args.batch,
        "image_size": args.image_size,
        "hs": args.hs,
        "rounds": args.rounds,
        "window": args.window,
        "warmup_steps": 1 if args.tiny else 2,
        "settle_steps": 1 if args.tiny else 2,
        "malloc_no_trim": True,
        "gbit": gbit,
        "out_dir": str(out_dir),
    }
    machine = bench_comm.machine()
    started = time.monotonic()
    world = NODES * RANKS_PER_NODE
    if gbit is None:
        ranks = bench_comm.launch(cfg, world, script=Path(__file__))
    else:
        with bench_comm.LimitedLinks(NODES, gbit) as links:
            ranks = bench_comm.launch(
                cfg, world, links, ranks_per_namespace=RANKS_PER_NODE, script=Path(__file__)
            )
    out = report(cfg, ranks)
    results = {"machine": machine, "config": cfg, "wall_s": round(time.monotonic() - started, 1), **out}
    results["machine"]["load_average_end"] = list(os.getloadavg())
    (out_dir / "results.json").write_text(json.dumps({**results, "ranks": ranks}, indent=1))
    table = markdown(cfg, out, machine)
    (out_dir / "table.md").write_text(table)
    print(table)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'table.md'} ({results['wall_s']} s)")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        rank_main(sys.argv[1])  # one rank, started by main() through bench_comm.launch
    else:
        main()
