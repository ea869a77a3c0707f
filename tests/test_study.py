"""The study's verdict rules (recipes/study_rules.py) on hand-made numbers, and the runner's grid logic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import study_rules as rules  # noqa: E402

R, P, N = rules.REPRODUCED, rules.PARTLY, rules.NOT_REPRODUCED


def test_clearly_greater_needs_mean_and_significance():
    assert rules.clearly_greater([90, 91, 92], [80, 81, 82])
    assert not rules.clearly_greater([90, 95, 85], [89, 94, 84])  # higher mean, within noise
    assert not rules.clearly_greater([80, 81, 82], [90, 91, 92])
    assert rules.clearly_greater([1, 1, 1], [0, 0, 0])  # no spread: the means decide
    assert rules.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))


def _grid(f):
    return {(H, K): [f(H, K) + d for d in (-0.1, 0.0, 0.1)] for H in (1, 4, 16) for K in (4, 16, 64)}


def test_claim2_rule():
    assert rules.claim2_rule(_grid(lambda H, K: 100 - H - K)).verdict == R
    # accuracy rises with K: along K every pair is wrong, along H every pair is right
    assert rules.claim2_rule(_grid(lambda H, K: 100 - 3 * H + K / 10)).verdict == N
    flat_k = rules.claim2_rule(_grid(lambda H, K: 100 - 3 * H))  # K has no effect: half the pairs
    assert flat_k.verdict == N and flat_k.evidence["adjacent_pairs_lower"] == "6 of 12"
    # only the largest K hurts: all ends clear, one adjacent pair per H line flat -> partly
    mostly = rules.claim2_rule(_grid(lambda H, K: 100 - 3 * H - (5 if K == 64 else 0)))
    assert mostly.verdict == P


def test_claim3_rule_prefers_the_product():
    hk = rules.claim3_rule(_grid(lambda H, K: 100 - H * K / 100))
    assert hk.verdict == R and hk.evidence["score_per_candidate_over_point_means"]["H x K"] > 0.95
    only_h = rules.claim3_rule(_grid(lambda H, K: 100 - H))
    assert only_h.evidence["best_candidate"] == "H" and only_h.verdict == N


def test_claim4_rule():
    minutes = {0: 10.0, 3: 11.0, 6: 12.0, 12: 14.0}
    arms = {0: [90, 90.5, 91], 3: [92, 92.5, 92], 6: [93, 93.2, 93.1], 12: [94, 94.1, 94.2]}
    assert rules.claim4_rule(arms, minutes).verdict == R
    same = {T: [92, 93, 94] for T in minutes}
    assert rules.claim4_rule(same, minutes).verdict == N
    assert rules.claim4_rule(arms, {0: 10.0, 3: 10.0, 6: 12.0, 12: 14.0}).verdict == N


def test_claim5_rule():
    assert rules.claim5_rule({"a": [90, 90.2, 90.1], "b": [92, 92.1, 92.2]}).verdict == R
    assert rules.claim5_rule({"a": [90, 90.2, 90.1], "b": [90.5, 90.6, 90.7]}).verdict == P  # clear, small
    assert rules.claim5_rule({"a": [90, 95, 85], "b": [90.3, 95.3, 85.3]}).verdict == N


def test_claim6_rule():
    epochs = 6
    msgd = [[50, 60, 70, 80, 90, 95 + d] for d in (0, 0.1, 0.2)]
    # after a switch at T = 2: higher in epochs 3-4, lower at the end
    post = {2: [[50, 60, 75, 85, 90, 93 + d] for d in (0, 0.1, 0.2)]}
    v = rules.claim6_rule(post, msgd, epochs)
    assert v.verdict == R and v.evidence["per_T"][0]["epochs_after_switch"] == [3, 4]
    only_harm = {2: [[50, 60, 69, 79, 90, 93 + d] for d in (0, 0.1, 0.2)]}
    assert rules.claim6_rule(only_harm, msgd, epochs).verdict == P
    better = {2: [[50, 60, 69, 79, 90, 97 + d] for d in (0, 0.1, 0.2)]}
    assert rules.claim6_rule(better, msgd, epochs).verdict == N


def test_claim7_rule():
    err = {"msgd": [50, 20, 10, 5, 3], "T=0": [55, 22, 11, 6, 3.5]}
    loss = {"msgd": [2, 1, 0.5, 0.3, 0.2], "T=0": [2.1, 1.1, 0.6, 0.35, 0.25]}
    assert rules.claim7_rule(err, loss, "msgd").verdict == R
    err["T=0"] = [55, 5, 10, 3, 20]
    assert rules.claim7_rule(err, loss, "msgd").verdict == N


def test_claim8_rule():
    base = {"name": "H=16,K=16", "local_bytes": 1000.0, "slowmo_bytes": 1000.0}
    assert rules.claim8_rule([{**base, "local": [90, 90.1, 90.2], "slowmo": [92, 92.1, 92.2]}]).verdict == R
    assert rules.claim8_rule([{**base, "local": [90, 91, 89], "slowmo": [90.3, 91.3, 89.3]}]).verdict == P
    more_bytes = {**base, "slowmo_bytes": 2000.0, "local": [90, 90.1, 90.2], "slowmo": [92, 92.1, 92.2]}
    assert rules.claim8_rule([more_bytes]).verdict == N


def test_claim1_rule():
    limited = {"setting": "1 Gbit/s", "limited_link": True, "msgd_share": 0.8, "local_share": 0.35}
    limited |= {"msgd_comm_ms": 431.0, "local_comm_ms": 49.0}
    fast = {
        "setting": "model",
        "msgd_share": 0.4,
        "local_share": 0.08,
        "msgd_comm_ms": 65.0,
        "local_comm_ms": 8.0,
    }
    slow = {**fast, "msgd_share": 0.6, "msgd_comm_ms": 150.0, "local_comm_ms": 19.0}
    assert rules.claim1_rule([limited], [slow, fast]).verdict == R
    assert rules.claim1_rule([limited], [fast, fast, slow]).verdict == P
    no_amortize = {**fast, "local_comm_ms": 30.0}
    assert rules.claim1_rule([limited], [slow, no_amortize]).verdict == N


# -- the runner's grid, config and resume logic --------------------------------------------------------------

import json  # noqa: E402
import textwrap  # noqa: E402

import study  # noqa: E402

STUDY = study.load_study(ROOT / "recipes" / "study.yaml")


def test_expand_grid_dedupes_and_maps_h1_to_msgd():
    section = {
        "epochs": 4,
        "seeds": [0, 1],
        "schedule": "step-w1",
        "groups": {"hk": {"H": [1, 4], "K": [2, 8], "T": [0]}, "switch": {"H": [4], "K": [8], "T": [0, 2]}},
    }
    runs = study.expand_grid(section)
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids)) == (4 + 1) * 2  # H4 K8 T0 is in both groups
    msgd = [r for r in runs if r.H == 1]
    assert msgd and all(r.T is None and r.method == "msgd" for r in msgd)
    shared = next(r for r in runs if (r.H, r.K, r.T, r.seed) == (4, 8, 0, 0))
    assert shared.groups == ("hk", "switch")
    assert {r.method for r in runs} == {"msgd", "local", "postlocal"}


def test_committed_grids_expand():
    fixed, tuning, second = study.plan(STUDY["cpu"])
    assert len({r.run_id for r in fixed}) == len(fixed) and second == 6
    assert len(STUDY["cpu"]["seeds"]) >= 3 and len(STUDY["gpu"]["seeds"]) >= 3
    assert len(study.plan(STUDY["gpu"])[0]) > len(fixed)
    for spec in fixed + tuning:  # every run's JSON is a valid recipe config
        from train_config import RunConfig

        RunConfig.from_dict(study.run_config(spec, STUDY), world_size=spec.K)


def test_run_config_fills_the_point():
    spec = study.RunSpec(16, 8, 3, 7, "step-w1", 12, lr_mult=0.5, beta=0.5)
    cfg = study.run_config(spec, STUDY)
    assert cfg["local_sgd"] == {
        **STUDY["base"]["local_sgd"],
        "H": 16,
        "K": "auto",
        "T": 3,
        "slowmo": {"beta": 0.5, "alpha": 1.0},
    }
    lr = cfg["train"]["lr_schedule"]
    assert (
        lr["milestones"] == [6, 9] and lr["base_lr"] == STUDY["base"]["train"]["lr_schedule"]["base_lr"] * 0.5
    )
    assert cfg["train"]["seed"] == 7 and cfg["train"]["epochs"] == 12
    assert "slowmo" not in STUDY["base"]["local_sgd"]  # the base is not modified


def test_pick_lr_multipliers():
    section = STUDY["cpu"]
    scores = {0.5: 90.0, 1.0: 95.0, 2.0: 95.0}
    picked = study.pick_lr_multipliers(
        section, lambda s: scores[s.lr_mult] + (1 if s.beta and s.lr_mult == 0.5 else 0)
    )
    assert picked == {"local H=16 K=8": 1.0, "slowmo H=16 K=8": 1.0}  # a tie goes to the smaller multiplier
    assert study.pick_lr_multipliers(section, lambda s: None if s.lr_mult == 2.0 else 1.0) is None
    runs = study.slowmo_eval_runs(section, picked)
    assert len(runs) == 2 * len(section["seeds"]) and {r.lr_mult for r in runs} == {1.0}


FAKE_TRAINER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    cfg = json.loads(Path(args["--deepspeed_config"]).read_text())
    out = Path(args["--output-dir"]); out.mkdir(parents=True)
    E = cfg["train"]["epochs"]
    if cfg["train"]["seed"] == 13: sys.exit(3)
    for e in range(1, E + 1):
        rec = dict(epoch=e, step=e, phase="local", lr=0.1, train_loss=1.0 / e, top1=50.0 + e + int(args["--virtual"]),
                   top5=90.0, images_per_s=1.0, train_s=1.0, compute_s=1.0, data_wait_s=0.0, comm_s=0.0, eval_s=0.0,
                   syncs=1, bytes_sent=100, grad_allreduces=0, minutes=0.0)
        with open(out / "metrics.jsonl", "a") as f: f.write(json.dumps(rec) + "\\n")
        print(f"epoch {e}/{E}", flush=True)
    """
)


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    """The runner launches FAKE_TRAINER instead of the recipe, with the recipe's arguments."""
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    monkeypatch.setattr(
        study.Runner,
        "command",
        lambda self, spec, cfg, out: [
            sys.executable,
            str(trainer),
            "--deepspeed_config",
            str(cfg),
            "--output-dir",
            str(out),
            "--virtual",
            str(spec.K),
        ],  # fmt: skip
    )


def test_run_all_resumes_and_reports_failures(tmp_path, fake_trainer):
    section = {
        "epochs": 2,
        "seeds": [0, 1],
        "schedule": "step-w1",
        "groups": {"g": {"H": [1, 4], "K": [2], "T": [0]}},
    }
    results = study.Results(tmp_path / "results", STUDY)
    epochs = []
    runner = study.Runner(
        STUDY, section, results, tmp_path / "shards", tmp_path / "work", "cpu", 1, lambda: epochs.append(1)
    )
    fixed = study.expand_grid(section)
    # a leftover of an interrupted attempt is removed before the run starts over
    (tmp_path / "work" / fixed[0].run_id / "out").mkdir(parents=True)
    (tmp_path / "work" / fixed[0].run_id / "out" / "metrics.jsonl").write_text("garbage")
    assert study.run_all(runner, fixed, [], lambda: [], parallel=2) == []
    assert len(epochs) == 4 * 2 and all(results.done(s) for s in fixed)
    record = json.loads(results.path(fixed[0]).read_text())
    assert record["final"]["top1"] == 54.0 and len(record["epochs"]) == 2 and record["spec"]["K"] == 2
    # finished runs are skipped
    assert study.run_all(runner, fixed, [], lambda: [], parallel=2) == [] and len(epochs) == 8
    # a changed config (another seed list leaves these; another schedule makes them stale) runs again
    stale = study.Results(
        tmp_path / "results", {**STUDY, "base": {**STUDY["base"], "train_micro_batch_size_per_gpu": 4}}
    )
    assert not stale.done(fixed[0])
    # a failing run is reported, the others still run, and it leaves no result
    bad = study.RunSpec(4, 2, 0, 13, "step-w1", 2)
    good = study.RunSpec(4, 2, 0, 5, "step-w1", 2)
    failures = study.run_all(runner, [bad, good], [], lambda: [], parallel=1)
    assert len(failures) == 1 and "exit 3" in failures[0] and results.done(good) and not results.done(bad)


def test_second_stage_joins_after_tuning(tmp_path, fake_trainer):
    section = {
        "epochs": 1,
        "seeds": [0],
        "schedule": "step-w1",
        "groups": {},
        "slowmo": {
            "settings": [{"H": 2, "K": 2}],
            "beta": 0.5,
            "alpha": 1.0,
            "lr_multipliers": [1.0, 2.0],
            "tune_seeds": [100],
        },
    }
    results = study.Results(tmp_path / "results", STUDY)
    runner = study.Runner(STUDY, section, results, tmp_path / "shards", tmp_path / "work", "cpu", 1)
    tuning = study.slowmo_tuning_runs(section)

    def second():
        chosen = study.pick_lr_multipliers(section, results.final_top1)
        return None if chosen is None else study.slowmo_eval_runs(section, chosen)

    assert study.run_all(runner, [], tuning, second, parallel=2, expected_second=2) == []
    assert len(results.all()) == 4 + 2  # 2 arms x 2 multipliers, then 2 arms x 1 seed


def test_study_end_to_end_tiny(tmp_path):
    """The real command on a 2-run grid of 1 epoch: data through data_prep, --virtual runs, results, report;
    a second call skips both runs."""
    import subprocess

    import yaml

    tiny = {k: STUDY[k] for k in ("base", "schedules")}
    tiny["data"] = {"train_per_class": 16, "val_per_class": 4, "split_seed": 0}
    tiny["tiny"] = {
        "device": "cpu", "epochs": 1, "seeds": [0], "parallel": 2, "threads": 1, "schedule": "step-w1",
        "groups": {"hk": {"H": [1, 2], "K": [2], "T": [0]}}, "cost_model": STUDY["cpu"]["cost_model"],
    }  # fmt: skip
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny))
    command = [
        sys.executable, str(ROOT / "recipes" / "study.py"), "--config", str(config), "--grid", "tiny",
        "--results", str(tmp_path / "results"), "--report-dir", str(tmp_path / "report"),
        "--work", str(tmp_path / "work"), "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = sorted((tmp_path / "results").glob("*.json"))
    assert [p.name.split("_")[0] for p in records] == ["local", "msgd"]
    for p in records:
        r = json.loads(p.read_text())
        assert len(r["epochs"]) == 1 and 0 <= r["final"]["top1"] <= 100 and r["spec"]["K"] == 2
    claims = json.loads((tmp_path / "report" / "claims.json").read_text())
    assert len(claims["claims"]) == 8 and (tmp_path / "report" / "README.md").exists()
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "2 already done" in second.stdout
