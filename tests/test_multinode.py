"""Workers that are nodes, for real: two torchrun agents on one machine (two "nodes" of 2 CPU ranks, a
rendezvous on 127.0.0.1) run the recipe with ``"ranks_per_worker": "node"``. "node" must resolve to 2 and K
to 2, the run must finish, and its metrics must equal those of the same run as 4 ranks under one agent
with ``"ranks_per_worker": 2``: the same ranks, the same groups, the same arithmetic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_imagenet.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data_prep.shard import shard_dataset
    from data_prep.synthetic import make_digits_imagefolder

    tmp = tmp_path_factory.mktemp("data")
    make_digits_imagefolder(tmp / "digits", image_size=40, train_per_class=24, val_per_class=6)
    shard_dataset(tmp / "digits", tmp / "shards", samples_per_shard=64, progress=False)
    return str(tmp / "shards")


def config(tmp: Path, ranks_per_worker) -> Path:
    """cpu_postlocal.json, shrunk: 2 epochs of 3 steps (240 images / (20 per rank x 4 ranks)), switch after
    epoch 1, H = 2."""
    block = json.loads((ROOT / "ds_configs" / "cpu_postlocal.json").read_text())
    block["train_micro_batch_size_per_gpu"] = 20
    block["local_sgd"].update(H=2, T=1, ranks_per_worker=ranks_per_worker)
    block["train"].update(epochs=2, log_every=1, keep_last=1)
    path = tmp / f"rpw_{ranks_per_worker}.json"
    path.write_text(json.dumps(block))
    return path


def torchrun(nodes: int, per_node: int, cfg: Path, data: str, out: Path, timeout: float = 420) -> list[str]:
    """One torchrun agent per node, all on this machine; returns each agent's output."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    for node in range(nodes):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *("--nnodes", str(nodes), "--node_rank", str(node), "--nproc_per_node", str(per_node)),
            *("--master_addr", "127.0.0.1", "--master_port", str(port)),
            str(RECIPE),
            *("--deepspeed_config", str(cfg), "--data", data, "--output-dir", str(out)),
        ]
        log = open(out.parent / f"{out.name}.node{node}.log", "w")  # noqa: SIM115
        procs.append((subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))  # fmt: skip
    outputs = []
    try:
        for proc, log in procs:
            code = proc.wait(timeout=timeout)
            log.close()
            text = Path(log.name).read_text()
            assert code == 0, f"agent exited with {code}:\n{text[-6000:]}"
            outputs.append(text)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return outputs


def events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_with_node_workers_equal_four_ranks_with_two_per_worker(shards, tmp_path):
    two_nodes = tmp_path / "two_nodes"
    outputs = torchrun(2, 2, config(tmp_path, "node"), shards, two_nodes)
    one_agent = tmp_path / "one_agent"
    torchrun(1, 4, config(tmp_path, 2), shards, one_agent)

    # "node" resolved to 2 ranks per worker on a world of 4: K = 2 (the hook's resolved config, as logged)
    assert [e.value for e in events(two_nodes).Scalars("local_sgd/K")] == [2.0, 2.0]
    ours, theirs = metrics(two_nodes), metrics(one_agent)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        for key in ("train_loss", "top1", "top5", "syncs"):
            assert a[key] == b[key], (key, a, b)
    assert ours[1]["syncs"] > 0 and "done" in outputs[0]
