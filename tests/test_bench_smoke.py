"""The measured benchmark runs end to end in its tiny mode (tiny model, 2 gloo ranks, a few steps) and
writes its JSON, table and plot. Timing targets are not asserted: they mean nothing at this size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_comm.py"


def test_bench_comm_tiny_emits_results(tmp_path):
    subprocess.run([sys.executable, str(BENCH), "--tiny", "--out", str(tmp_path)], check=True, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "argv", "cases", "wall_s"} <= set(results)
    (case,) = results["cases"]
    assert case["model"] == "tiny" and case["workers"] == 2 and case["transport"] == "loopback"
    for key in (
        "local_over_nocomm",
        "local_over_nocomm_cpu",
        "local_over_peer_local",
        "sync_over_raw",
        "peer_sync_over_raw",
        "by_H",
    ):
        assert key in case["ratios"], key
    assert set(case["ratios"]["by_H"]) == {"1", "2"}
    for key in ("ours_over_peer", "ours_over_peer_cpu", "ours_over_peer_composed", "ours_over_msgd"):
        assert {"median", "min", "max"} <= set(case["ratios"]["by_H"]["2"][key]), key
    steps = case["steps"]
    for side in ("ours", "peer"):
        for H in ("1", "2"):
            assert {"step_s", "comm_s", "compute_s", "comm_share", "payload_bytes", "wire_bytes"} <= set(
                steps[side][H]
            )
    assert steps["msgd"]["payload_bytes"] == case["param_bytes"]
    assert steps["ours"]["2"]["payload_bytes"] == pytest.approx(case["sync_bytes"] / 2)
    assert {
        "ours_first_sync_extra_bytes",
        "peer_sync_extra_bytes",
        "ours_peak_with_sync_over_without",
    } <= set(case["memory"])
    assert {"rows", "msgd_error", "local_median_abs_error", "link"} <= set(case["cost_model"])
    assert len(case["cost_model"]["rows"]) == 3  # mSGD and H in {1, 2}
    # What the run checked about itself: no gradient all-reduce between syncs, identical after a sync.
    assert all(case["checks"].values()), case["checks"]
    assert (tmp_path / "table.md").read_text().startswith("# Communication benchmark")
    assert (tmp_path / "plot.png").stat().st_size > 0


NODES = BENCH.parent / "bench_nodes.py"


def test_bench_nodes_tiny_counts_what_crosses_between_workers(tmp_path):
    """4 ranks as 2 x 2 on loopback: the hook's across-worker bytes of a node-as-worker sync are half those of
    K = 4 (one copy of the parameters per node, not one per rank), the inside-node gradient all-reduce is
    timed for 2 x 2 only, and a node's ranks end identical."""
    subprocess.run(
        [sys.executable, str(NODES), "--loopback", "--tiny", "--out", str(tmp_path)], check=True, timeout=300
    )
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["side"], r["H"]): r for r in results["rows"]}
    assert set(rows) == {("msgd", None), ("nocomm", None), ("k4", 1), ("nodes", 1), ("k4", 2), ("nodes", 2)}
    assert results["nodes_identical_after_sync"]
    for H in (1, 2):
        k4, nodes = rows[("k4", H)], rows[("nodes", H)]
        # Up to BatchNorm's integer counters (8 bytes each), which every rank averages over all ranks.
        assert k4["hook_across_bytes_per_node_step"] == pytest.approx(
            2 * nodes["hook_across_bytes_per_node_step"], rel=0.01
        )
        assert nodes["hook_across_bytes_per_node_step"] >= results["param_bytes"] / H
        assert nodes["inside_grad_s"]["median"] > 0 and k4["inside_grad_s"]["max"] == 0
        assert nodes["link_bytes_per_step"] is None  # loopback: no link to count
    assert rows[("msgd", None)]["hook_across_bytes_per_node_step"] == 0
    assert (tmp_path / "table.md").read_text().startswith("# Workers that are nodes")
