"""The ImageNet recipe end to end: the real ``deepspeed`` launcher, 2 CPU workers, tiny real shards.

Shards come from data_prep (sklearn digits as JPEGs). One uninterrupted post-local SGD + SlowMo run is
the reference; a second run is stopped by a SIGTERM sent to its whole process group in the middle of
an epoch of the local phase (as a cluster scheduler does), resumed with ``--resume``, and must end
with exactly the reference's weights, losses and accuracies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import checkpoints  # noqa: E402
from preemption import StopSignal  # noqa: E402

from localsgd_ds.runtime import free_port  # noqa: E402

EPOCHS, STEPS_PER_EPOCH, H, T = 3, 7, 2, 1  # 240 training images // (16 per worker x 2 workers) = 7 steps

# Rank 0 sends SIGTERM to the whole process group (launcher, both workers, loader workers) when it takes
# batch STOP_BATCH of epoch STOP_EPOCH: a scheduler's kill at a reproducible moment.
STOPPER = """
import os, signal, sys
sys.path.insert(0, {recipes!r})
import train_imagenet
from localsgd_ds import data

STOP_EPOCH, STOP_BATCH = {epoch}, {batch}
original = data.train_loader


def train_loader(*args, **kwargs):
    loader = original(*args, **kwargs)
    if kwargs["epoch"] != STOP_EPOCH or kwargs["rank"] != 0 or kwargs["skip_batches"]:
        return loader

    def batches():
        for i, batch in enumerate(loader):
            if i == STOP_BATCH:
                os.killpg(0, signal.SIGTERM)
            yield batch

    return batches()


data.train_loader = train_loader
sys.exit(train_imagenet.main())
"""

# Rank 1 never gets its validation batches (as with a deadlocked loader worker): rank 0 must not wait for
# it for long in the all-reduce of the validation counts.
HANGER = """
import sys, time
sys.path.insert(0, {recipes!r})
import train_imagenet
from localsgd_ds import data

original = data.val_loader


def val_loader(*args, **kwargs):
    if kwargs["rank"] == 1:
        print("rank 1: stuck before its first validation batch", flush=True)
        time.sleep(3600)
    return original(*args, **kwargs)


data.val_loader = val_loader
sys.exit(train_imagenet.main())
"""


def launch(script: Path, config: Path, data: str, out: Path, *extra: str, timeout: float = 300):
    """``deepspeed --num_gpus 2 script ...`` in its own process group; waits for every process in it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)  # the recipe gives each rank its share of the cores
    launcher = (
        ["deepspeed"] if shutil.which("deepspeed") else [sys.executable, "-m", "deepspeed.launcher.runner"]
    )
    command = [
        *launcher,
        *("--num_gpus", "2", "--master_port", str(free_port()), str(script)),
        *("--deepspeed_config", str(config), "--data", data, "--output-dir", str(out), *extra),
    ]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # a killed launcher leaves its workers to finish saving
                os.killpg(proc.pid, 0)
                time.sleep(0.2)
            raise AssertionError(f"processes of {command} still running:\n{log.read_text()[-4000:]}")
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return returncode, log.read_text()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data_prep.shard import shard_dataset
    from data_prep.synthetic import make_digits_imagefolder

    tmp = tmp_path_factory.mktemp("data")
    make_digits_imagefolder(tmp / "digits", image_size=40, train_per_class=24, val_per_class=6)
    shard_dataset(tmp / "digits", tmp / "shards", samples_per_shard=64, progress=False)
    return str(tmp / "shards")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """cpu_postlocal.json, shrunk: 3 epochs of 7 steps, switch after epoch 1, H = 2, SlowMo."""
    config = json.loads((ROOT / "ds_configs" / "cpu_postlocal.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 16
    config["local_sgd"].update(H=H, T=T, slowmo={"beta": 0.5, "alpha": 1.0})
    config["train"].update(epochs=EPOCHS, log_every=1, keep_last=2)
    config["train"]["data"]["num_workers"] = 1
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def reference(shards, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reference"
    returncode, log = launch(RECIPES / "train_imagenet.py", config, shards, out)
    assert returncode == 0, log[-6000:]
    return out, log


def events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_run_logs_checkpoints_and_switches_phase(reference):
    out, log = reference
    lines = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], log[-4000:]
    # Each rank took its share of the cores, and ended cleanly.
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"{threads} CPU thread{'s' if threads > 1 else ''} per rank: " in log
    assert log.count("exits successfully") == 2 and "terminate called" not in log, log[-4000:]
    assert "resnet8 postlocal+slowmo H=2 K=2 T=1" in log and f"{STEPS_PER_EPOCH} steps/epoch" in log

    # The hook acted: gradient all-reduce every step before T, none after; a sync every H local steps.
    records = metrics(out)
    assert [r["phase"] for r in records] == ["msgd", "local", "local"]
    assert [r["grad_allreduces"] for r in records] == [STEPS_PER_EPOCH, 0, 0]
    assert all(r["syncs"] >= STEPS_PER_EPOCH // H for r in records[1:])
    assert records[-1]["step"] == EPOCHS * STEPS_PER_EPOCH
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]

    # TensorBoard: every tag, the config as text, and the run's hyperparameters for the HParams view.
    ea = events(out)
    expected = {
        "train/loss", "train/lr", "train/epoch_loss", "val/top1", "val/top5", "perf/images_per_s",
        "time/epoch_s", "time/compute_s", "time/data_wait_s", "time/comm_s", "time/eval_s",
        "comm/syncs", "comm/bytes_sent", "comm/grad_allreduces",
        "local_sgd/phase", "local_sgd/H", "local_sgd/K", "local_sgd/T",
        "hparams/top1", "hparams/top5", "hparams/minutes",
    }  # fmt: skip
    assert expected <= set(ea.Tags()["scalars"])
    assert [e.value for e in ea.Scalars("local_sgd/phase")] == [0.0, 1.0, 1.0]
    assert [e.value for e in ea.Scalars("local_sgd/T")] == [T] * EPOCHS
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert "config/text_summary" in ea.Tags()["tensors"]
    hparams = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(
        hparams
    )
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        hparams["_hparams_/session_start_info"]
    ).session_start_info
    assert {k: v.number_value for k, v in start.hparams.items() if k in ("H", "K", "T", "slowmo_beta")} == {
        "H": H, "K": 2, "T": T, "slowmo_beta": 0.5,
    }  # fmt: skip
    assert start.hparams["method"].string_value == "postlocal+slowmo"

    # Checkpoints: the last keep_last = 2 epoch ends, `latest` on the final one; the resolved config.
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step{EPOCHS * STEPS_PER_EPOCH:09d}"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [
        f"step{2 * STEPS_PER_EPOCH:09d}",
        f"step{3 * STEPS_PER_EPOCH:09d}",
    ]
    tag_dir = ckpt / f"step{EPOCHS * STEPS_PER_EPOCH:09d}"
    assert (tag_dir / "mp_rank_00_model_states.pt").is_file()
    assert len(list(tag_dir.glob("local_sgd_rank*.pt"))) == 2
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["local_sgd"]["K"] == 2 and resolved["train"]["seed"] == 0
    assert (
        resolved["train"]["num_classes"] == 10 and resolved["train"]["lr_schedule"]["reference_batch"] == 64
    )
    assert (out / "final_model.pt").is_file()


def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(reference, shards, config, tmp_path):
    ref_out, _ = reference
    stopper = tmp_path / "stopper.py"
    stopper.write_text(STOPPER.format(recipes=str(RECIPES), epoch=1, batch=3))
    out = tmp_path / "run"

    returncode, log = launch(stopper, config, shards, out)
    assert returncode != 0  # the launcher is killed by the signal; the workers save and exit 143
    assert "stopped by SIGTERM at step" in log, log[-6000:]
    stop_step = int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert STEPS_PER_EPOCH < stop_step < 2 * STEPS_PER_EPOCH  # in the middle of the local phase's first epoch
    assert not (out / "final_model.pt").exists()
    assert len(metrics(out)) == 1

    returncode, log = launch(RECIPES / "train_imagenet.py", config, shards, out, "--resume")
    assert returncode == 0, log[-6000:]
    assert f"resuming at step {stop_step}" in log

    final, expected = torch.load(out / "final_model.pt"), torch.load(ref_out / "final_model.pt")
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    for got, want in zip(metrics(out), metrics(ref_out), strict=True):
        for key in ("epoch", "step", "phase", "train_loss", "top1", "top5", "syncs", "grad_allreduces"):
            assert got[key] == want[key], (key, got, want)
    # One point per step in TensorBoard, none doubled by the resume.
    steps = [e.step for e in events(out).Scalars("train/loss")]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert [e.value for e in events(out).Scalars("train/loss")] == [
        e.value for e in events(ref_out).Scalars("train/loss")
    ]


def test_a_rank_stuck_before_evaluation_fails_the_run_in_time_naming_the_wait(shards, config, tmp_path):
    hanger = tmp_path / "hanger.py"
    hanger.write_text(HANGER.format(recipes=str(RECIPES)))
    start = time.monotonic()
    returncode, log = launch(hanger, config, shards, tmp_path / "run", "--collective-timeout", "5")
    elapsed = time.monotonic() - start
    assert returncode != 0 and "rank 1: stuck before its first validation batch" in log, log[-6000:]
    assert (
        "CollectiveTimeout: rank 0 of 2 waited 5 s for the other ranks in the evaluation after epoch 1 "
        "and gave up (--collective-timeout, LOCALSGD_COLLECTIVE_TIMEOUT)" in log
    ), log[-6000:]
    # Start, one epoch, the 5 s wait, and the launcher's 30 s between SIGTERM and SIGKILL for the stuck
    # rank (it treats SIGTERM as "checkpoint at the next step", which it never reaches): not 600 s.
    assert elapsed < 150, elapsed


def test_deepspeed_scheduler_section_drives_the_lr(shards, tmp_path):
    """The other home of the learning rate: DeepSpeed's own scheduler section (here mSGD, one epoch)."""
    config = json.loads((ROOT / "ds_configs" / "cpu_msgd.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 16
    del config["train"]["lr_schedule"]
    config["optimizer"]["params"]["lr"] = 0.05
    config["scheduler"] = {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 0.05,
            "warmup_num_steps": 4,
            "warmup_type": "linear",
        },
    }
    config["train"].update(epochs=1, log_every=1)
    config["train"]["data"]["num_workers"] = 0
    path = tmp_path / "warmup.json"
    path.write_text(json.dumps(config))
    returncode, log = launch(RECIPES / "train_imagenet.py", path, shards, tmp_path / "run")
    assert returncode == 0, log[-6000:]
    assert "lr from DeepSpeed's scheduler" in log
    lrs = [e.value for e in events(tmp_path / "run").Scalars("train/lr")]
    # After s optimizer steps DeepSpeed's WarmupLR (counting from -1) is at 0.05 x min((s - 1) / 4, 1).
    assert lrs == pytest.approx([0.05 * min((s - 1) / 4, 1.0) for s in range(1, STEPS_PER_EPOCH + 1)])
    assert metrics(tmp_path / "run")[0]["grad_allreduces"] == STEPS_PER_EPOCH


def test_quickstart_table_reads_the_last_record_of_each_epoch(tmp_path):
    import quickstart

    records = [
        {"epoch": 1, "phase": "msgd", "train_loss": 2.5, "top1": 10.0, "top5": 50.0, "train_s": 3.0, "comm_s": 0.5, "syncs": 1},
        {"epoch": 1, "phase": "msgd", "train_loss": 2.25, "top1": 12.0, "top5": 52.0, "train_s": 3.5, "comm_s": 0.25, "syncs": 1},
        {"epoch": 2, "phase": "local", "train_loss": 2.0, "top1": 20.0, "top5": 60.0, "train_s": 2.0, "comm_s": 0.125, "syncs": 12},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = quickstart.table(tmp_path).splitlines()
    assert rows[2:] == [
        "| 1 | msgd | 2.250 | 12.0 | 52.0 | 3.5 | 0.25 | 1 |",
        "| 2 | local | 2.000 | 20.0 | 60.0 | 2.0 | 0.12 | 12 |",
    ]


# -- the pieces, in one process ----------------------------------------------------------------------------


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class FakeEngine:
    """Writes one file per save like DeepSpeed; can crash half-way through."""

    def __init__(self) -> None:
        self.crash = False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours to move
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "part1").write_text(json.dumps(client_state))
        if self.crash:
            raise RuntimeError("disk full")
        (path / "part2").write_text("done")


def test_checkpoints_keep_the_last_n_and_survive_a_crashed_save(single_process_group, tmp_path):
    engine, ckpt = FakeEngine(), tmp_path / "checkpoints"
    assert checkpoints.latest_tag(ckpt) is None
    for step in (10, 20, 30):
        checkpoints.save(engine, ckpt, step=step, client_state={"step": step}, keep_last=2)
    assert checkpoints.latest_tag(ckpt) == "step000000030"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step000000020", "step000000030"]

    engine.crash = True
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoints.save(engine, ckpt, step=40, client_state={"step": 40}, keep_last=2)
    assert checkpoints.latest_tag(ckpt) == "step000000030"  # untouched, and still complete
    assert (ckpt / "step000000030" / "part2").exists() and (ckpt / "step000000020").exists()

    engine.crash = False  # the rerun reaches step 40 again: the partial tag is replaced
    checkpoints.save(engine, ckpt, step=40, client_state={"step": 40}, keep_last=2)
    assert checkpoints.latest_tag(ckpt) == "step000000040" and (ckpt / "step000000040" / "part2").exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step000000030", "step000000040"]
    # Saving again at the step `latest` names (a signal right after resuming) changes nothing.
    checkpoints.save(engine, ckpt, step=40, client_state={"step": 41}, keep_last=2)
    assert json.loads((ckpt / "step000000040" / "part1").read_text()) == {"step": 40}


def test_stop_signal_is_agreed_and_children_are_shielded(single_process_group):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopSignal()
        assert not stop.agreed()
        # A child forked under the shield has SIGTERM blocked: a process-group SIGTERM cannot kill it.
        with stop.shielding_children():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            blocked = next(
                int(line.split()[1], 16)
                for line in Path(f"/proc/{child.pid}/status").read_text().splitlines()
                if line.startswith("SigBlk:")
            )
            assert blocked & (1 << (signal.SIGTERM - 1)) and blocked & (1 << (signal.SIGINT - 1))
        finally:
            child.kill()
            child.wait()
        assert not stop.agreed()  # the shield did not swallow anything here

        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag, does not kill pytest
        assert stop.agreed() and stop.name == "SIGTERM"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
