"""Runs of the real recipe for the tests: small real shards, and the recipe launched the ways a user
launches it (the deepspeed launcher, torchrun agents as nodes, or --virtual K in one process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from localsgd_ds.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_imagenet.py"


def digits_shards(
    tmp: Path, *, train_per_class: int = 24, val_per_class: int = 6, image_size: int = 40
) -> str:
    """scikit-learn's digits as JPEGs in the ImageNet layout (40 px unless told), sharded by data_prep."""
    from data_prep.shard import shard_dataset
    from data_prep.synthetic import make_digits_imagefolder

    make_digits_imagefolder(
        tmp / "digits", image_size=image_size, train_per_class=train_per_class, val_per_class=val_per_class
    )
    shard_dataset(tmp / "digits", tmp / "shards", samples_per_shard=64, progress=False)
    return str(tmp / "shards")


def cpu_config(
    tmp: Path, name: str, *, batch: int, epochs: int, lr_schedule: dict | None = None, **local_sgd
) -> Path:
    """ds_configs/cpu_postlocal.json with another batch, length, LR schedule and local_sgd block entries."""
    block = json.loads((ROOT / "ds_configs" / "cpu_postlocal.json").read_text())
    block["train_micro_batch_size_per_gpu"] = batch
    block["local_sgd"].update(local_sgd)
    block["train"].update(epochs=epochs, log_every=1, keep_last=1)
    if lr_schedule is not None:
        block["train"]["lr_schedule"] = lr_schedule
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(block))
    return path


def run_recipe(
    cfg: Path,
    data: str,
    out: Path,
    *,
    per_node: int = 2,
    nodes: int = 1,
    virtual: int | None = None,
    launcher: str = "deepspeed",
    timeout: float = 420,
) -> list[str]:
    """The recipe as ``--virtual K`` in one process, or on ``nodes`` x ``per_node`` ranks: the deepspeed
    launcher (one node) or one torchrun agent per node, all on this machine. Returns each process's
    output; fails with it if any exits non-zero."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [str(RECIPE), "--deepspeed_config", str(cfg), "--data", data, "--output-dir", str(out)]
    port = str(free_port())
    commands = []
    if virtual:
        commands.append([sys.executable, *args, "--virtual", str(virtual)])
    elif launcher == "deepspeed":
        launch = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(per_node)]
        commands.append([*launch, "--master_port", port, *args])
    else:
        for node in range(nodes):
            agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes)]
            agent += ["--node_rank", str(node), "--nproc_per_node", str(per_node)]
            commands.append([*agent, "--master_addr", "127.0.0.1", "--master_port", port, *args])
    procs = []
    for i, command in enumerate(commands):
        log = open(out.parent / f"{out.name}.{i}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append((proc, log))
    outputs = []
    try:
        for proc, log in procs:
            code = proc.wait(timeout=timeout)
            log.close()
            text = Path(log.name).read_text()
            assert code == 0, f"{proc.args} exited with {code}:\n{text[-6000:]}"
            outputs.append(text)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return outputs


def metrics(out: Path) -> list[dict]:
    """The run's metrics.jsonl: one record per epoch."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def events(out: Path):
    """The run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator
