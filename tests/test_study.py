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
