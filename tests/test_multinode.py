"""Workers that are nodes, for real: two torchrun agents on one machine (two "nodes" of 2 CPU ranks, a
rendezvous on 127.0.0.1) run the recipe with ``"ranks_per_worker": "node"``. "node" must resolve to 2 and K
to 2, the run must finish, and its metrics must equal those of the same run as 4 ranks under one agent
with ``"ranks_per_worker": 2``: the same ranks, the same groups, the same arithmetic."""

from __future__ import annotations

import pytest
from recipe_runs import cpu_config, digits_shards, events, metrics, run_recipe

pytestmark = pytest.mark.slow


def test_two_nodes_with_node_workers_equal_four_ranks_with_two_per_worker(tmp_path):
    shards = digits_shards(tmp_path)
    # 2 epochs of 3 steps (240 images / (20 per rank x 4 ranks)), the switch after epoch 1, H = 2
    node = cpu_config(tmp_path, "node", batch=20, epochs=2, H=2, T=1, ranks_per_worker="node")
    two = cpu_config(tmp_path, "two", batch=20, epochs=2, H=2, T=1, ranks_per_worker=2)
    outputs = run_recipe(node, shards, tmp_path / "two_nodes", nodes=2, per_node=2, launcher="torchrun")
    run_recipe(two, shards, tmp_path / "one_agent", nodes=1, per_node=4, launcher="torchrun")

    # "node" resolved to 2 ranks per worker on a world of 4: K = 2 (the hook's resolved config, as logged)
    assert [e.value for e in events(tmp_path / "two_nodes").Scalars("local_sgd/K")] == [2.0, 2.0]
    ours, theirs = metrics(tmp_path / "two_nodes"), metrics(tmp_path / "one_agent")
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        for key in ("train_loss", "top1", "top5", "syncs"):
            assert a[key] == b[key], (key, a, b)
    assert ours[1]["syncs"] > 0 and "done" in outputs[0]
