"""Write the study's DeepSpeed JSON files from the sweep described once in ``recipes/sweep.yaml``.

Each point of the grid (model, method, H, K, T, SlowMo beta, ranks per worker) becomes one JSON file named
after it, e.g. ``resnet50_postlocal_H8_K16_T30.json`` (16 workers of one GPU) or
``resnet50_local_H8_K8x8_T0.json`` (8 workers that are nodes of 8 GPUs, ``"ranks_per_worker": "node"``):
the shared ``base`` with the point's ``local_sgd`` block, the model, and ``train_batch_size`` = 32 images
per GPU x world size, world size = K workers x ranks per worker (so DeepSpeed itself refuses a launch on
the wrong number of GPUs)::

    python recipes/make_configs.py                       # the committed subset + cpu_*.json + README.md
    python recipes/make_configs.py --check               # exit 1 if ds_configs/ differs from the sweep
    python recipes/make_configs.py --all --out /tmp/grid # the whole grid
    python recipes/make_configs.py --model resnet101 --method postlocal --H 4 --K 128 --T 30 --out /tmp/one
    python recipes/make_configs.py --model resnet50 --method local --H 8 --K 32 --ranks-per-worker node \
        --gpus-per-node 8 --out /tmp/one    # 32 nodes x 8 GPUs: resnet50_local_H8_K32x8_T0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "recipes" / "sweep.yaml"
OUT = ROOT / "ds_configs"
METHODS = ("msgd", "local", "postlocal", "slowmo")


@dataclass(frozen=True)
class Point:
    """One experiment of the grid."""

    model: str
    """"resnet50" or "resnet101"."""
    method: str
    """"msgd", "local", "postlocal" or "slowmo"."""
    H: int
    """Local steps between two averagings (1 for mSGD)."""
    K: int
    """Number of workers."""
    T: int | None
    """Epoch of the switch to local SGD (0 from the start, None never)."""
    beta: float | None = None
    """SlowMo momentum (SlowMo only)."""
    alpha: float = 1.0
    """SlowMo learning rate (SlowMo only)."""
    ranks_per_worker: int | str = 1
    """Ranks (GPUs) that form one worker, or "node" (written as is; the launcher's GPUs per node)."""
    gpus_per_node: int = 8
    """The GPUs of a node, for "node": what fixes the file's world size and ``train_batch_size``."""

    @property
    def ranks(self) -> int:
        """Ranks per worker as a number."""
        return self.gpus_per_node if self.ranks_per_worker == "node" else int(self.ranks_per_worker)

    @property
    def world_size(self) -> int:
        """GPUs of the run: K workers x ranks per worker."""
        return self.K * self.ranks

    @property
    def name(self) -> str:
        method = self.method if self.beta is None else f"slowmo-beta{self.beta:g}"
        workers = f"K{self.K}" if self.ranks == 1 else f"K{self.K}x{self.ranks}"  # K8x8: 8 workers x 8 GPUs
        return f"{self.model}_{method}_H{self.H}_{workers}_T{'none' if self.T is None else self.T}"


def check_point(point: Point) -> None:
    """Refuse a point that is not a method of the study, naming the offending value."""
    if point.method not in METHODS:
        raise ValueError(f"--method must be one of {list(METHODS)}, got {point.method!r}")
    if point.method == "msgd" and (point.H != 1 or point.T is not None):
        raise ValueError(f"msgd has H = 1 and T = none, got H = {point.H}, T = {point.T}")
    if point.method in ("local", "slowmo", "postlocal") and point.H < 2:
        raise ValueError(f"{point.method} needs H >= 2, got H = {point.H}")
    if point.method == "local" and point.T != 0:
        raise ValueError(f"local SGD starts at T = 0, got T = {point.T} (use --method postlocal)")
    if point.method == "postlocal" and (point.T is None or point.T < 1):
        raise ValueError(f"postlocal needs T >= 1, got T = {point.T}")
    if point.method == "slowmo" and point.beta is None:
        raise ValueError("slowmo needs --beta")
    if point.K < 1:
        raise ValueError(f"--K must be >= 1, got {point.K}")
    if point.ranks_per_worker != "node" and (
        not isinstance(point.ranks_per_worker, int) or point.ranks_per_worker < 1
    ):
        raise ValueError(
            f'--ranks-per-worker must be an integer >= 1 or "node", got {point.ranks_per_worker!r}'
        )
    if point.ranks_per_worker == "node" and point.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be >= 1, got {point.gpus_per_node}")


def config_for(point: Point, sweep: Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON of one grid point."""
    check_point(point)
    base = sweep["base"]
    local_sgd: dict[str, Any] = {"H": point.H, "K": point.K, "T": point.T}
    if point.method == "slowmo":
        local_sgd["slowmo"] = {"beta": point.beta, "alpha": point.alpha}
    if point.ranks_per_worker != 1:  # the default (a worker is one GPU) is left out
        local_sgd["ranks_per_worker"] = point.ranks_per_worker
    micro = base["train_micro_batch_size_per_gpu"]
    accum = base.get("gradient_accumulation_steps", 1)
    # Key order: the batch, DeepSpeed's other keys, then the hook's block and the recipe's, H/K/T and the
    # model first. 32 images per GPU x world size (K workers x ranks per worker) x accumulation.
    config = {"train_batch_size": micro * point.world_size * accum}
    config.update({k: copy.deepcopy(v) for k, v in base.items() if k not in ("local_sgd", "train")})
    config["local_sgd"] = {**local_sgd, **base["local_sgd"]}
    config["train"] = {"model": point.model, **base["train"]}
    return config


def expand(methods: Mapping[str, Any], models: list[str], workers: list[int]) -> Iterator[Point]:
    """Every point of a ``methods`` table (as in sweep.yaml) for the given models and K."""
    for model in models:
        for K in workers:
            for method, axes in methods.items():
                for H in axes["H"]:
                    for T in axes["T"]:
                        for beta in axes.get("beta", [None]):
                            yield Point(model, method, H, K, T, beta, float(axes.get("alpha", 1.0)))


def _with_alphas(methods: Mapping[str, Any], sweep: Mapping[str, Any]) -> dict[str, Any]:
    return {m: {**axes, "alpha": sweep["methods"][m].get("alpha", 1.0)} for m, axes in methods.items()}


def node_points(sweep: Mapping[str, Any]) -> list[Point]:
    """The committed points whose workers are nodes (``commit.nodes``), then the mSGD baselines (one rank per
    worker: mSGD does not depend on the split) of their world sizes that the GPU-worker grid lacks."""
    nodes = sweep["commit"]["nodes"]
    gpus = nodes["gpus_per_node"]
    points = [
        replace(p, ranks_per_worker="node", gpus_per_node=gpus)
        for p in expand(_with_alphas(nodes["methods"], sweep), nodes["models"], nodes["workers"])
    ]
    baselines = [
        Point(model, "msgd", 1, K * gpus, None) for model in nodes["models"] for K in nodes["workers"]
    ]
    return points + baselines


def committed_points(sweep: Mapping[str, Any]) -> list[Point]:
    commit = sweep["commit"]
    points = list(expand(_with_alphas(commit["methods"], sweep), commit["models"], commit["workers"]))
    return points + [p for p in node_points(sweep) if p not in points]


def all_points(
    sweep: Mapping[str, Any], ranks_per_worker: int | str = 1, gpus_per_node: int = 8
) -> list[Point]:
    """The whole grid; K counts workers of ``ranks_per_worker`` ranks each."""
    return [
        replace(p, ranks_per_worker=ranks_per_worker, gpus_per_node=gpus_per_node)
        for p in expand(sweep["methods"], sweep["models"], sweep["workers"])
    ]


def cpu_configs(sweep: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The small CPU configs (ResNet-8, K = "auto") by file stem."""
    configs = {}
    for stem, point in sweep["cpu"]["files"].items():
        local_sgd = {"H": point["H"], "T": point["T"]}
        if point.get("beta") is not None:
            local_sgd["slowmo"] = {"beta": point["beta"], "alpha": point.get("alpha", 1.0)}
        base = sweep["cpu"]["base"]
        config = {k: copy.deepcopy(v) for k, v in base.items() if k != "local_sgd"}
        config["local_sgd"] = {**local_sgd, **base["local_sgd"]}
        configs[stem] = {k: config[k] for k in [*base]}
    return configs


def render(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"


def readme(points: list[Point], sweep: Mapping[str, Any]) -> str:
    """ds_configs/README.md: what the files are, with the batch arithmetic."""
    base = sweep["base"]
    micro, accum = base["train_micro_batch_size_per_gpu"], base.get("gradient_accumulation_steps", 1)
    schedule, loaders = base["train"]["lr_schedule"], base["train"]["data"]
    lines = [
        "# ds_configs",
        "",
        'DeepSpeed JSON files of the study grid of "Trade-offs of Local SGD at Scale" (Gonzalez Ortiz et al.',
        "2021). Generated from `recipes/sweep.yaml` by `python recipes/make_configs.py`; do not edit by hand",
        "(`python recipes/make_configs.py --check` fails when a file and the sweep disagree). Any other point",
        "of the grid: `python recipes/make_configs.py --model resnet50 --method postlocal --H 4 --K 128 --T 30",
        "--out DIR` (add `--ranks-per-worker node --gpus-per-node 8` for K nodes of 8 GPUs), or `--all --out DIR`",
        "for every point.",
        "",
        "Launch one on its world size in GPUs: K workers x ranks per worker (`_K16_`: 16 workers of one GPU, 16",
        "GPUs; `_K8x8_`: 8 workers that are nodes of 8 GPUs, 64 GPUs). DeepSpeed (`train_batch_size`) and the",
        "hook (K, `ranks_per_worker`) refuse anything else:",
        "",
        "```bash",
        "deepspeed --hostfile hosts --num_gpus 8 recipes/train_imagenet.py \\",
        "    --deepspeed_config ds_configs/resnet50_postlocal_H8_K16_T30.json \\",
        "    --data s3://bucket/imagenet --output-dir runs/resnet50_postlocal_H8_K16_T30",
        "# 8 workers that are nodes: a hostfile of 8 lines `<host> slots=8`, 64 GPUs",
        "deepspeed --hostfile hosts8 recipes/train_imagenet.py \\",
        "    --deepspeed_config ds_configs/resnet50_local_H8_K8x8_T0.json \\",
        "    --data s3://bucket/imagenet --output-dir runs/resnet50_local_H8_K8x8_T0",
        "```",
        "",
        "File names: `<model>_<method>_H<H>_K<K>_T<T>.json`, or `..._K<K>x<r>_...` when a worker is r GPUs. H: local",
        "steps between two averagings (`sync_every`); K: workers; r: GPUs per worker (`x8` with",
        '`"ranks_per_worker": "node"`: a worker is a node of 8 GPUs); T: epoch of the switch from mSGD to local SGD',
        "(0: local SGD from the start; `none`: never, plain mSGD). Methods: `msgd` (the baseline, gradients",
        "all-reduced every step), `local` (local SGD from the start), `postlocal` (mSGD until epoch T, then local",
        "SGD), `slowmo-beta<b>` (local SGD with a slow momentum outer step, beta = b, alpha = 1, at each sync).",
        "",
        "## What every file shares",
        "",
        f"- {base['train']['epochs']} epochs, torchvision ResNet (random init, zero-init of the last BN gamma per "
        "block), SGD momentum "
        f"{base['optimizer']['params']['momentum']}, weight decay {base['optimizer']['params']['weight_decay']}, "
        "bf16 autocast with fp32 weights, ZeRO stage 0.",
        f"- Per-GPU batch B = {micro}, gradient accumulation {accum}: global batch = {micro} x world size x {accum},"
        " world size = K workers x ranks (GPUs) per worker.",
        f"- Linear scaling rule: peak lr = {schedule['base_lr']} x global batch / {schedule['reference_batch']}, "
        f"reached by a linear warmup from {schedule['base_lr']} over {schedule['warmup_epochs']} epochs, then "
        f"x{schedule['gamma']} at epochs {', '.join(str(m) for m in schedule['milestones'])}.",
        "- BatchNorm statistics averaged at each sync, momentum left local (the reference code's choice).",
        f"- The loaders' options, `train.data`: {loaders['num_workers']} loader processes per GPU, "
        f"{loaders['image_size']} px RandomResizedCrop + flip for training, validation resized to "
        f"{loaders['val_resize']} and center-cropped to {loaders['val_crop']}.",
        "",
        "## Batch arithmetic",
        "",
        "Workers and ranks count apart: the batch and the learning rate follow the GPUs (the world size), H x K",
        "and the bytes across workers follow the workers. The linear scaling rule takes the global batch:",
        "",
        "```python",
        f"# {micro} per GPU x 8 GPUs x 8 nodes = 2048: {micro} x 64 ranks x {accum} accumulation",
        f"lr = {schedule['base_lr']} * 2048 / {schedule['reference_batch']}   # = "
        f"{schedule['base_lr'] * 2048 / schedule['reference_batch']:g}, whether K = 64 GPUs or K = 8 nodes",
        "```",
        "",
        "| K workers | GPUs per worker | world size | global batch | peak lr | steps per ImageNet epoch (1,281,167 "
        "images) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    nodes = sweep["commit"]["nodes"]
    rows = [(K, 1) for K in sweep["workers"]] + [(K, nodes["gpus_per_node"]) for K in nodes["workers"]]
    for K, r in rows:
        world = K * r
        global_batch = micro * world * accum
        gpus = f"{micro} per GPU x {world} GPUs" if r == 1 else f"{micro} per GPU x {r} GPUs x {K} nodes"
        lines.append(
            f"| {K} | {r}{' (node)' if r > 1 else ''} | {world} | {gpus} x {accum} = {global_batch} | "
            f"{schedule['base_lr']} x {global_batch} / {schedule['reference_batch']} = "
            f"{schedule['base_lr'] * global_batch / schedule['reference_batch']:g} | {1281167 // global_batch} |"
        )
    lines += [
        "",
        "An epoch has the same number of steps on every rank: the loader gives each rank",
        "floor(N / (B x world size)) batches of B images (see `localsgd_ds.data.steps_per_epoch`).",
        "",
        "## GPUs or nodes as workers",
        "",
        "Choose GPU workers (`_K64_`) where all GPUs are joined equally well (one node, or a network between",
        "nodes as fast as inside them): no GPU all-reduces gradients on a local step. Choose node workers",
        '(`_K8x8_`, `"ranks_per_worker": "node"`) where nodes talk over a slower network than NVLink: at the same',
        "bytes across nodes per sync, H x K is 8 times smaller (K counts nodes), and the study finds accuracy",
        "falls as H x K grows (see the README's \"Workers that are nodes\" for the cost model's numbers).",
        "",
        "mSGD runs the same whatever the split (gradients averaged over all GPUs every step): the baselines of",
        "the node points are the one-GPU-per-worker mSGD files of the same world size (`_K64_`, `_K128_`).",
        "",
        "## Committed files",
        "",
        "| file | model | method | H | K | GPUs per worker | T | SlowMo beta | global batch |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        T = "none" if p.T is None else p.T
        beta = "" if p.beta is None else f"{p.beta:g}"
        r = f"{p.ranks} (node)" if p.ranks_per_worker == "node" else p.ranks
        lines.append(
            f"| `{p.name}.json` | {p.model} | {p.method} | {p.H} | {p.K} | {r} | {T} | {beta} | "
            f"{micro * p.world_size * accum} |"
        )
    cpu = sweep["cpu"]["base"]
    cpu_lr = cpu["train"]["lr_schedule"]
    lines += [
        "",
        "## CPU configs",
        "",
        f"`cpu_*.json`: ResNet-8 on {cpu['train']['data']['image_size']} px crops, "
        f'B = {cpu["train_micro_batch_size_per_gpu"]} per worker, K = "auto" (any number of workers), '
        f"{cpu['train']['epochs']} epochs, lr = {cpu_lr['base_lr']} x {cpu['train_micro_batch_size_per_gpu']}K / "
        f"{cpu_lr['reference_batch']} with a {cpu_lr['warmup_epochs']}-epoch warmup and a {cpu_lr['decay']} decay.",
        "`cpu_postlocal.json` is what `python recipes/quickstart.py` runs on 2 CPU workers.",
        "",
        "| file | H | T | SlowMo beta |",
        "| --- | ---: | ---: | ---: |",
    ]
    for stem, point in sweep["cpu"]["files"].items():
        T = "none" if point["T"] is None else point["T"]
        lines.append(f"| `{stem}.json` | {point['H']} | {T} | {point.get('beta') or ''} |")
    return "\n".join(lines) + "\n"


def shipped_files(sweep: Mapping[str, Any]) -> dict[str, str]:
    """File name -> content of everything ``ds_configs/`` should hold."""
    points = committed_points(sweep)
    files = {f"{p.name}.json": render(config_for(p, sweep)) for p in points}
    files.update({f"{stem}.json": render(c) for stem, c in cpu_configs(sweep).items()})
    files["README.md"] = readme(points, sweep)
    return files


def ranks_per_worker(text: str) -> int | str:
    """``--ranks-per-worker``: "node" or an integer >= 1."""
    if text == "node":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be an integer >= 1 or "node", got {text!r}')
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", type=Path, default=SWEEP)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--check", action="store_true", help="compare ds_configs/ with the sweep; write nothing"
    )
    parser.add_argument("--all", action="store_true", help="write every point of the grid")
    parser.add_argument("--model", choices=("resnet50", "resnet101"))
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--H", type=int)
    parser.add_argument("--K", type=int)
    parser.add_argument("--T", help="switch epoch or 'none'; default: none for msgd, 0 for local and slowmo")
    parser.add_argument("--beta", type=float)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument(
        "--ranks-per-worker",
        type=ranks_per_worker,
        default=1,
        help='GPUs that form one worker (K counts workers): an integer, or "node" (written as "node"; the world '
        "size is K x --gpus-per-node); default 1",
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=8,
        help="GPUs per node with --ranks-per-worker node (sets train_batch_size); default 8",
    )
    args = parser.parse_args(argv)
    sweep = yaml.safe_load(args.sweep.read_text())

    if args.method is not None:
        missing = [k for k in ("model", "K") if getattr(args, k) is None]
        if missing:
            parser.error(f"--method needs {', '.join('--' + k for k in missing)}")
        H = args.H if args.H is not None else 1
        if args.T is None:
            T = None if args.method in ("msgd", "postlocal") else 0
        else:
            T = None if args.T.lower() in ("none", "null") else int(args.T)
        point = Point(
            args.model,
            args.method,
            H,
            args.K,
            T,
            args.beta,
            args.alpha,
            args.ranks_per_worker,
            args.gpus_per_node,
        )
        try:
            files = {f"{point.name}.json": render(config_for(point, sweep))}
        except ValueError as error:
            parser.error(str(error))
    elif args.all:
        points = all_points(sweep, args.ranks_per_worker, args.gpus_per_node)
        files = {f"{p.name}.json": render(config_for(p, sweep)) for p in points}
    else:
        files = shipped_files(sweep)

    if args.check:
        stale = [
            n
            for n, text in files.items()
            if not (args.out / n).exists() or (args.out / n).read_text() != text
        ]
        extra = sorted(p.name for p in args.out.glob("*.json") if p.name not in files)
        for name in stale:
            print(f"differs from the sweep: {args.out / name}")
        for name in extra:
            print(f"not in the sweep: {args.out / name}")
        return 1 if stale or extra else 0

    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
