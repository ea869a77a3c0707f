"""Write the study's DeepSpeed JSON files from the sweep described once in ``recipes/sweep.yaml``.

Each point of the grid (model, method, H, K, T, SlowMo beta) becomes one JSON file named after it, e.g.
``resnet50_postlocal_H8_K16_T30.json``: the shared ``base`` with the point's ``local_sgd`` block, the
model, and ``train_batch_size`` = 32 images per worker x K (so DeepSpeed itself refuses a launch on the
wrong number of workers)::

    python recipes/make_configs.py                       # the committed subset + cpu_*.json + README.md
    python recipes/make_configs.py --check               # exit 1 if ds_configs/ differs from the sweep
    python recipes/make_configs.py --all --out /tmp/grid # the whole grid
    python recipes/make_configs.py --model resnet101 --method postlocal --H 4 --K 128 --T 30 --out /tmp/one
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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

    @property
    def name(self) -> str:
        method = self.method if self.beta is None else f"slowmo-beta{self.beta:g}"
        return f"{self.model}_{method}_H{self.H}_K{self.K}_T{'none' if self.T is None else self.T}"


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


def config_for(point: Point, sweep: Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON of one grid point."""
    check_point(point)
    base = sweep["base"]
    local_sgd = {"H": point.H, "K": point.K, "T": point.T}
    if point.method == "slowmo":
        local_sgd["slowmo"] = {"beta": point.beta, "alpha": point.alpha}
    micro = base["train_micro_batch_size_per_gpu"]
    accum = base.get("gradient_accumulation_steps", 1)
    # Key order: the batch, DeepSpeed's other keys, then the hook's block and the recipe's, H/K/T and the
    # model first.
    config = {"train_batch_size": micro * point.K * accum}  # 32 images per worker x K workers x accumulation
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


def committed_points(sweep: Mapping[str, Any]) -> list[Point]:
    commit = sweep["commit"]
    alphas = {m: sweep["methods"][m].get("alpha", 1.0) for m in commit["methods"]}
    methods = {m: {**axes, "alpha": alphas[m]} for m, axes in commit["methods"].items()}
    return list(expand(methods, commit["models"], commit["workers"]))


def all_points(sweep: Mapping[str, Any]) -> list[Point]:
    return list(expand(sweep["methods"], sweep["models"], sweep["workers"]))


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
        "--out DIR`, or `--all --out DIR` for every point.",
        "",
        "Launch one on K GPUs (the file's K must equal the number of workers; DeepSpeed and the hook refuse",
        "anything else):",
        "",
        "```bash",
        "deepspeed --hostfile hosts --num_gpus 8 recipes/train_imagenet.py \\",
        "    --deepspeed_config ds_configs/resnet50_postlocal_H8_K16_T30.json \\",
        "    --data s3://bucket/imagenet --output-dir runs/resnet50_postlocal_H8_K16_T30",
        "```",
        "",
        "File names: `<model>_<method>_H<H>_K<K>_T<T>.json`. H: local steps between two averagings",
        "(`sync_every`); K: workers; T: epoch of the switch from mSGD to local SGD (0: local SGD from the start;",
        "`none`: never, plain mSGD). Methods: `msgd` (the baseline, gradients all-reduced every step), `local`",
        "(local SGD from the start), `postlocal` (mSGD until epoch T, then local SGD), `slowmo-beta<b>` (local",
        "SGD with a slow momentum outer step, beta = b, alpha = 1, at each sync).",
        "",
        "## What every file shares",
        "",
        f"- {base['train']['epochs']} epochs, torchvision ResNet (random init, zero-init of the last BN gamma per "
        "block), SGD momentum "
        f"{base['optimizer']['params']['momentum']}, weight decay {base['optimizer']['params']['weight_decay']}, "
        "bf16 autocast with fp32 weights, ZeRO stage 0.",
        f"- Per-worker batch B = {micro}, gradient accumulation {accum}: global batch = {micro} x K x {accum}.",
        f"- Linear scaling rule: peak lr = {schedule['base_lr']} x global batch / {schedule['reference_batch']}, "
        f"reached by a linear warmup from {schedule['base_lr']} over {schedule['warmup_epochs']} epochs, then "
        f"x{schedule['gamma']} at epochs {', '.join(str(m) for m in schedule['milestones'])}.",
        "- BatchNorm statistics averaged at each sync, momentum left local (the reference code's choice).",
        f"- The loaders' options, `train.data`: {loaders['num_workers']} loader processes per worker, "
        f"{loaders['image_size']} px RandomResizedCrop + flip for training, validation resized to "
        f"{loaders['val_resize']} and center-cropped to {loaders['val_crop']}.",
        "",
        "## Batch arithmetic",
        "",
        "| K | global batch | peak lr | steps per ImageNet epoch (1,281,167 images) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for K in sweep["workers"]:
        global_batch = micro * K * accum
        lines.append(
            f"| {K} | {micro} x {K} x {accum} = {global_batch} | "
            f"{schedule['base_lr']} x {global_batch} / {schedule['reference_batch']} = "
            f"{schedule['base_lr'] * global_batch / schedule['reference_batch']:g} | {1281167 // global_batch} |"
        )
    lines += [
        "",
        "An epoch has the same number of steps on every worker: the loader gives each worker",
        "floor(N / (B x K)) batches of B images (see `localsgd_ds.data.steps_per_epoch`).",
        "",
        "## Committed files",
        "",
        "| file | model | method | H | K | T | SlowMo beta | global batch |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        T = "none" if p.T is None else p.T
        beta = "" if p.beta is None else f"{p.beta:g}"
        lines.append(
            f"| `{p.name}.json` | {p.model} | {p.method} | {p.H} | {p.K} | {T} | {beta} | {micro * p.K * accum} |"
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
        point = Point(args.model, args.method, H, args.K, T, args.beta, args.alpha)
        try:
            files = {f"{point.name}.json": render(config_for(point, sweep))}
        except ValueError as error:
            parser.error(str(error))
    elif args.all:
        files = {f"{p.name}.json": render(config_for(p, sweep)) for p in all_points(sweep)}
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
