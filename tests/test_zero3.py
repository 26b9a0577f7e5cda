"""DeepSpeed ZeRO-3 on the real stack (2 CPU workers, gloo): sae_fd through two tasks and a resume; the methods that
do not work at stage 3 are refused at config time with one line.

`zero3_persistence_threshold: 1000` makes the tiny model look like a real one under ZeRO-3: its base weights
(>= 4096 elements) are partitioned across the workers and gathered per module in every forward, including the
anchor pass truncated after the SAE layer and the scoring forwards, which all ranks must run in lock step.
ewc was tried at stage 3 and fails at its first penalty (the LoRA tensors it reads are partitioned, even below the
threshold); l2, o_lora and lwf read or swap the same tensors, so all four are refused in config.py.
"""

from __future__ import annotations

import pytest

from saefd_ray.config import load_config
from saefd_ray.errors import ConfigError
from test_methods_ray import run_and_resume, sae_folder  # noqa: F401  (sae_folder is a fixture)

ZERO3 = {"zero_stage": 3, "zero3_persistence_threshold": 1000}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_sae_fd_zero3_two_tasks_and_resume(tmp_path, cache_dir, sae_folder):  # noqa: F811
    from saefd_ray.train.sequence import task_dir

    method = {"name": "sae_fd", "sae": {"path": str(sae_folder), "layer": 1}, "anchor_size": 4, "anchor_batch": 2}
    full_dir, _ = run_and_resume(tmp_path, cache_dir, method, max_train=32, **ZERO3)
    anchors = sorted(p.name for p in (task_dir(full_dir, 1, "rule_b") / "sae_fd" / "anchors").iterdir())
    assert anchors == ["01-rule_a.safetensors", "02-rule_b.safetensors"]


@pytest.mark.parametrize("name", ["ewc", "l2", "lwf", "o_lora"])
def test_weight_space_methods_refused_at_zero3(name, tmp_path):
    with pytest.raises(ConfigError, match=rf"^--set distributed.zero_stage: 3 does not work with method {name}: "
                                          r"it .* LoRA .*; use 2$"):  # named by the --set that gave the key
        load_config(None, ["distributed.zero_stage=3", f"method.name={name}"])
    from saefd_ray.config import DEFAULT_CONFIG

    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text(DEFAULT_CONFIG.read_text().replace("zero_stage: 2", "zero_stage: 3"))
    with pytest.raises(ConfigError, match=rf"^{zero3}: distributed.zero_stage: 3 does not work"):  # or the file
        load_config(zero3, [f"method.name={name}"])
    assert load_config(None, ["distributed.zero_stage=2", f"method.name={name}"]).method.name == name
