"""The averaging primitives on a real gloo world of 2 and 3 processes (3: a mean that is not exact in
binary and an integer sum that does not divide), with ReduceOp.AVG and with the sum-then-divide fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import run_ranks

WORKER = str(Path(__file__).with_name("averaging_worker.py"))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["native", "fallback"])
def test_averaging_primitives_match_the_mean_by_hand(world, mode):
    outputs = run_ranks([WORKER, mode], world, timeout=120)
    for rank, out in enumerate(outputs):
        assert f"ok {rank}" in out, out
        # native: this torch's gloo has ReduceOp.AVG (2.14 does), so the AVG path is the one tested
        assert f"native_avg={mode == 'native'}" in out, out
