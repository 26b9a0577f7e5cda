"""Faults survived with real process kills on the real local Ray cluster.

- a Ray Train worker SIGKILLed mid-task: Ray restarts the worker group from the last mid-task checkpoint
  (`training.checkpoint_every`), finished tasks are not retrained, and the R matrix equals the uninterrupted run's;
- the driver (`jobs/run_sequence.py`) SIGKILLed after task 1: the same command continues with task 2;
- a non-finite loss stops the task with one message naming task, step and term;
- another Ray on the same machine cannot make Ray Train remove our placement group: the State API that Ray
  Train's PlacementGroupCleaner asks is pinned in every process of our Ray (`sequence.pin_state_api`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, two_task_overrides
from saefd_ray.config import load_config
from saefd_ray.errors import NonFiniteLossError
from saefd_ray.train.sequence import MANIFEST, run_sequence, task_dir

pytestmark = pytest.mark.ray
TOLERANCE = 2.1  # points of accuracy on 48 test examples: one example flipping by float-order noise


def test_worker_killed_mid_task_restores_and_matches(reference_run, tmp_path, cache_dir, monkeypatch):
    _, _, reference = reference_run
    monkeypatch.setenv("SAEFD_KILL_WORKER_AT", "1,1,6,1")  # task 2, epoch 2, after step 6, rank 1
    config = load_config(None, two_task_overrides(tmp_path, cache_dir, "killed-worker"))
    results = run_sequence(config)
    first, second = (json.loads((task_dir(config.run_dir, i, n) / "row.json").read_text())
                     for i, n in enumerate(["rule_a", "rule_b"]))
    assert first["resumed_from"] is None
    # restarted from a mid-task checkpoint before the kill point (epoch index 1, step 6); which one depends on how
    # fast Ray's controller registered the last report before the worker died
    assert second["resumed_from"] is not None and tuple(second["resumed_from"]) <= (1, 6)
    for got, want in zip(sum(results["r_matrix"], []), sum(reference["r_matrix"], [])):
        assert abs(got - want) <= TOLERANCE, (results["r_matrix"], reference["r_matrix"])


def test_driver_killed_between_tasks_continues(reference_run, ray_cluster, tmp_path, cache_dir):
    _, _, reference = reference_run
    overrides = two_task_overrides(tmp_path, cache_dir, "killed-driver")
    command = [sys.executable, str(REPO / "jobs" / "run_sequence.py"), *sum((["--set", o] for o in overrides), [])]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    first_task = task_dir(load_config(None, overrides).run_dir, 0, "rule_a")

    driver = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 900
    while not (first_task / MANIFEST).exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert driver.poll() is None, "driver ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "task 1/2 rule_a: finished earlier, not trained again" in rerun.stdout
    assert "task 2/2 rule_b: training on" in rerun.stdout
    results = load_results(first_task.parent.parent)
    for got, want in zip(sum(results["r_matrix"], []), sum(reference["r_matrix"], [])):
        assert abs(got - want) <= TOLERANCE, (results["r_matrix"], reference["r_matrix"])


def load_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_nonfinite_loss_stops_with_a_clear_message(ray_cluster, tmp_path, cache_dir):
    overrides = two_task_overrides(tmp_path, cache_dir, "nonfinite")
    config = load_config(None, [*overrides, "training.lr=.inf", "training.epochs=1"])
    with pytest.raises(NonFiniteLossError, match=r"task 'rule_a' epoch 1 step \d+: task loss is (nan|inf)"):
        run_sequence(config)
    assert not (task_dir(config.run_dir, 0, "rule_a") / MANIFEST).exists()  # nothing bad was published


@pytest.mark.usefixtures("ray_cluster")
def test_state_api_in_our_ray_processes_never_reaches_another_ray():
    """Unpinned, a process of a dashboard-less local Ray auto-detects "the" Ray of the machine for State API
    queries; with a second Ray running (a test session beside a job) Ray Train's cleaner was told our controller
    did not exist and removed our placement group. Pinned, a query fails at once, which the cleaner ignores."""
    import ray

    from saefd_ray.train.sequence import STATE_API_PIN

    @ray.remote(num_cpus=0)
    def ask_state_api():
        from ray.util.state import get_actor
        from ray.util.state.exception import ServerUnavailable

        try:
            get_actor("ff" * 16, timeout=5)
        except ServerUnavailable:
            return os.environ.get("RAY_API_SERVER_ADDRESS")
        return "answered"

    assert ray.get(ask_state_api.remote(), timeout=120) == STATE_API_PIN
