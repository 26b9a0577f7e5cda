"""Across nodes: a local two-node Ray cluster (`ray.cluster_utils.Cluster`, one 1-CPU node each, so the two Ray Train
workers land one per node), `output.root` as the storage both nodes share, sae_fd through two tasks, and the worker
on the second node SIGKILLed mid-task 2. Ray restarts the worker group from the last mid-task checkpoint, and the
R matrix equals the one-node run's.

A `Cluster` is its own Ray: the session `ray_cluster` is shut down for this test and started again afterwards with
the same arguments, so tests that run later find it as before.
"""

from __future__ import annotations

import json

import pytest

from test_faults import TOLERANCE
from test_methods_ray import sae_folder, sequence_config  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.timeout(1800),  # 431 s on the 2-core box while a SmolLM2 suite shared it (2026-12-01)
]


def sae_fd_config(root, cache_dir, sae_path, run_name):
    method = {"name": "sae_fd", "sae": {"path": str(sae_path), "layer": 1}, "anchor_size": 4, "anchor_batch": 2}
    config = sequence_config(root, cache_dir, method, run_name, max_train=64, epochs=2, max_failures=1)
    config.training.checkpoint_every = 2  # 4 steps an epoch per worker: a mid-task checkpoint every 2
    return config


@pytest.fixture
def two_nodes(ray_cluster):
    """Swap the session Ray for a two-node cluster; restore the session Ray afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield second.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()
        # as the session fixture does; "local": a new instance, never a leftover cluster address
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)


def test_two_nodes_worker_killed_on_second_node_matches_one_node(tmp_path, cache_dir, sae_folder, ray_cluster,  # noqa: F811
                                                                 request, monkeypatch):
    from saefd_ray.train.sequence import run_sequence, task_dir

    one_node = run_sequence(sae_fd_config(tmp_path / "one", cache_dir, sae_folder, "one-node"))
    second_node = request.getfixturevalue("two_nodes")
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    monkeypatch.setenv("SAEFD_KILL_WORKER_AT", f"1,1,2,{second_node}")  # task 2, epoch 2, after step 2
    config = sae_fd_config(tmp_path / "shared", cache_dir, sae_folder, "two-nodes")
    two_nodes = run_sequence(config)
    second = json.loads((task_dir(config.run_dir, 1, "rule_b") / "row.json").read_text())
    assert second["resumed_from"] is not None and tuple(second["resumed_from"]) <= (1, 2)  # the kill happened
    assert json.loads((task_dir(config.run_dir, 0, "rule_a") / "row.json").read_text())["resumed_from"] is None
    for got, want in zip(sum(two_nodes["r_matrix"], []), sum(one_node["r_matrix"], [])):
        assert abs(got - want) <= TOLERANCE, (two_nodes["r_matrix"], one_node["r_matrix"])
