"""Which Ray Train failures the driver retries (`saefd_ray/train/failures.py`): lost workers only.

Real Ray Train runs on the session cluster, one worker each; every attempt appends to a file, so the number of
attempts is counted, not inferred.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from saefd_ray.errors import DataError
from saefd_ray.train.failures import fit_with_retries

pytestmark = pytest.mark.ray


def _by_value() -> None:
    """Ray workers cannot import this test module: ship its functions by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _loop(cfg: dict) -> None:
    import ray.train

    attempts = Path(cfg["attempts"])
    with open(attempts, "a") as f:
        f.write("x")
    if cfg["mode"] == "value_error":
        raise ValueError("bad record 7 (a bug that fails the same way every time)")
    if cfg["mode"] == "user_error":
        raise DataError("data.json: record 7 has no field 'answer'")
    if cfg["mode"] == "die_once" and attempts.read_text() == "x":
        folder = Path(tempfile.mkdtemp())
        (folder / "position.txt").write_text("step 3")
        ray.train.report({"step": 3}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        # the controller collects reports by polling the workers; a kill right after report() can beat the poll and
        # lose the checkpoint (a worker in training dies steps after its last checkpoint). Give the poll time.
        time.sleep(10)
        os.kill(os.getpid(), signal.SIGKILL)  # a lost worker, as an OOM kill or a preempted node
    checkpoint = ray.train.get_checkpoint()
    restored = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = (Path(folder) / "position.txt").read_text()
    (attempts.parent / "restored").write_text(str(restored))  # V2's Result.metrics come from checkpoint reports only
    ray.train.report({"attempts": len(attempts.read_text())})


def _trainer(tmp_path: Path, mode: str):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _by_value()
    return lambda: TorchTrainer(
        _loop, train_loop_config={"attempts": str(tmp_path / "attempts"), "mode": mode},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name=mode, storage_path=str(tmp_path / "ray"), failure_config=FailureConfig(0)))


def test_deterministic_error_is_not_retried(ray_cluster, tmp_path):
    with pytest.raises(Exception, match="bad record 7"):
        fit_with_retries(_trainer(tmp_path, "value_error"), max_failures=3, what="test")
    assert (tmp_path / "attempts").read_text() == "x"


def test_user_error_in_a_worker_is_raised_on_the_driver_unretried(ray_cluster, tmp_path):
    with pytest.raises(DataError, match="^data.json: record 7 has no field 'answer'$"):
        fit_with_retries(_trainer(tmp_path, "user_error"), max_failures=3, what="test")
    assert (tmp_path / "attempts").read_text() == "x"


def test_lost_worker_is_retried(ray_cluster, tmp_path):
    fit_with_retries(_trainer(tmp_path, "die_once"), max_failures=1, what="test")
    assert (tmp_path / "attempts").read_text() == "xx"
    assert (tmp_path / "restored").read_text() == "step 3"  # the retry starts from the checkpoint before the kill


def test_lost_worker_beyond_max_failures_is_raised(ray_cluster, tmp_path):
    with pytest.raises(Exception):
        fit_with_retries(_trainer(tmp_path, "die_once"), max_failures=0, what="test")
    assert (tmp_path / "attempts").read_text() == "x"
