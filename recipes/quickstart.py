"""The embedded default: post-local SGD on 2 CPU workers, end to end, in a few minutes, no download.

Builds a small real dataset (sklearn's handwritten digits as colour JPEGs in the ImageNet folder layout),
shards it with data_prep into a local folder, launches the real recipe (``recipes/train_imagenet.py``)
with the ``deepspeed`` launcher on 2 CPU workers running post-local SGD on ResNet-8
(``ds_configs/cpu_postlocal.json``: mSGD until epoch T, then local SGD averaging every H steps), and
prints a table of the epochs and the ``tensorboard --logdir`` line::

    pip install -e ".[demo]" && python recipes/quickstart.py
    python recipes/quickstart.py --output-dir /tmp/qs      # everything under /tmp/qs
    python recipes/quickstart.py --config ds_configs/cpu_slowmo.json

The launcher's own output goes to ``<output-dir>/train.log``. A second run reuses the dataset and the
shards and starts the training over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localsgd_ds.runtime import free_port  # noqa: E402

# The dataset: 10 digit classes, 20 px JPEGs; the recipe trains on 16 px crops.
# 300 train images per class = 3000 images: 3000 // (32 per worker x 2 workers) = 46 steps per epoch.
IMAGE_SIZE, TRAIN_PER_CLASS, VAL_PER_CLASS = 20, 300, 40
WORKERS = 2


def build_shards(out: Path, bar: tqdm) -> Path:
    """The digits dataset in class folders, then webdataset shards with manifests (reused when present)."""
    from data_prep.shard import shard_dataset
    from data_prep.synthetic import make_digits_imagefolder

    digits, shards = out / "digits", out / "shards"
    bar.set_description("dataset: sklearn digits as JPEGs")
    if not (digits / "val").is_dir():
        make_digits_imagefolder(
            digits, image_size=IMAGE_SIZE, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS
        )
    bar.update()
    bar.set_description("shards: python -m data_prep shard")
    shard_dataset(digits, shards, samples_per_shard=512, workers=1, progress=False)
    bar.update()
    return shards


def train(config: Path, shards: Path, run_dir: Path, log_path: Path, bar: tqdm) -> int:
    """``deepspeed --num_gpus 2 recipes/train_imagenet.py ...``, one bar tick per epoch line."""
    port = free_port()
    command = [
        "deepspeed", "--num_gpus", str(WORKERS), "--master_port", str(port),
        str(ROOT / "recipes" / "train_imagenet.py"),
        "--deepspeed_config", str(config), "--data", str(shards), "--output-dir", str(run_dir),
    ]  # fmt: skip
    if shutil.which("deepspeed") is None:  # the same launcher, through this interpreter
        command[:1] = [sys.executable, "-m", "deepspeed.launcher.runner"]
    # The package need not be installed. Each worker takes its share of the cores (the recipe does that).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    bar.set_description(f"launching {WORKERS} CPU workers (the first run compiles a DeepSpeed op, ~40 s)")
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith(("epoch ", "resnet", "done:")):
                tqdm.write(line.rstrip())
            if line.startswith("epoch "):
                bar.set_description(f"training: epoch {line.split()[1]}")
                bar.update()
            elif line.startswith("resnet"):
                bar.set_description("training")
        code = proc.wait()
    # DeepSpeed's CPU accelerator leaves a 69 MB /dev/shm workspace per worker, named after the port.
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)
    return code


def table(run_dir: Path) -> str:
    """One row per epoch from the run's metrics.jsonl (the last record of an epoch wins)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["epoch"]] = record
    rows = [
        "| epoch | phase | train loss | top-1 % | top-5 % | train s | comm s | syncs |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records.values():
        rows.append(
            f"| {r['epoch']} | {r['phase']} | {r['train_loss']:.3f} | {r['top1']:.1f} | {r['top5']:.1f} | "
            f"{r['train_s']:.1f} | {r['comm_s']:.2f} | {r['syncs']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("quickstart_out"), help="default: quickstart_out"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "ds_configs" / "cpu_postlocal.json")
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()
    run_dir, log_path = out / "run", out / "train.log"
    config = json.loads(args.config.read_text())
    epochs = config["train"]["epochs"]
    local = config["local_sgd"]

    start = time.perf_counter()
    print(
        f"post-local SGD on {WORKERS} CPU workers: ResNet-8, {epochs} epochs, mSGD until epoch T = {local['T']}, "
        f"then local SGD averaging every H = {local['H']} steps ({args.config.name})"
    )
    out.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time (the recipe refuses to overwrite checkpoints)
    with tqdm(
        total=3 + epochs, unit="stage", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]"
    ) as bar:
        shards = build_shards(out, bar)
        returncode = train(args.config.resolve(), shards, run_dir, log_path, bar)
        bar.update()
    if returncode != 0:
        print("".join(log_path.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        print(f"training failed (exit {returncode}); full log: {log_path}", file=sys.stderr)
        return returncode

    print()
    print(table(run_dir))
    print()
    print(
        f"{time.perf_counter() - start:.0f} s in all. Outputs in {out} (log: {log_path}). Look at the run with:"
    )
    print(f"    tensorboard --logdir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
