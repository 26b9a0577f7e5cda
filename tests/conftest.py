"""Shared fixtures: one local Ray cluster and one tiny model for the whole test session.

Starting Ray costs seconds and building the tiny model a few more, so both are session-scoped. Tests use the
real components (Ray, DeepSpeed, peft, Ray Data) on CPU; nothing here mocks them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Every Ray a test starts is its own: with no address, ray.init() joins the last `ray start` cluster of the machine
# (/tmp/ray/ray_current_cluster), and a live one made every Ray test of a CI run fail. Tests that need another
# cluster pass its address explicitly.
os.environ["RAY_ADDRESS"] = "local"

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors gain nothing from threads, and the machine is shared: one thread, restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_model_path(cache_dir) -> str:
    """A tiny Llama (hidden 64, 2 layers) with a tokenizer trained on the synthetic tasks' text."""
    from saefd_ray.config import TinyModelConfig
    from saefd_ray.data.synthetic import corpus_text
    from saefd_ray.models.tiny import build_tiny_model

    cfg = TinyModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)
    return str(build_tiny_model(cfg, corpus_text(), cache_dir))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the session (4 logical CPUs on a 2-core box, so 2 train workers + a controller fit)."""
    import ray

    from saefd_ray.train.sequence import pin_state_api

    if not ray.is_initialized():
        pin_state_api()  # as the jobs do: Ray Train never asks another Ray on the machine about our controller
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def two_task_overrides(tmp_root: Path, cache_dir: Path, run_name: str) -> list[str]:
    """The 2-task demo sequence the integration and fault tests share (3 epochs of 12 steps on 2 workers)."""
    return [
        "tasks.sequence=[{name: rule_a, format: synthetic, generator: rule_a}, "
        "{name: rule_b, format: synthetic, generator: rule_b}]",
        "tasks.sequence.0.max_test=48", "tasks.sequence.1.max_test=48", f"model.cache_dir={cache_dir}",
        "training.epochs=3", "training.checkpoint_every=4", f"output.root={tmp_root}", f"output.run_name={run_name}",
    ]


@pytest.fixture(scope="session")
def reference_run(ray_cluster, tmp_path_factory, cache_dir):
    """One uninterrupted 2-task SeqLoRA run: (overrides, config, results); fault tests compare against it."""
    from saefd_ray.config import load_config
    from saefd_ray.train.sequence import run_sequence

    root = tmp_path_factory.mktemp("runs")
    overrides = two_task_overrides(root, cache_dir, "reference")
    config = load_config(None, overrides)
    return overrides, config, run_sequence(config)
