"""The same seed on the same versions gives the same numbers, whatever the workers' CPU share.

Ray sets each worker's OMP_NUM_THREADS from its CPU share (or inherits the machine's); `distributed.threads_per_worker`
fixes the torch thread count from the config instead, since CPU reductions may split their work by thread. Here the
workers get 1 vs 2 CPUs each and the trained adapter, the losses and the R matrix must be bit-identical.
(At the tiny model's sizes this held before the fix too; what does change numbers between machines is the CPU's
instruction set: ATEN_CPU_CAPABILITY=avx2 vs default gives different gradients for the same batch.)
"""

from __future__ import annotations

import json

import pytest
import torch

from test_methods_ray import sequence_config

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def test_same_seed_same_numbers_across_worker_thread_settings(tmp_path, cache_dir):
    from safetensors.torch import load_file

    from saefd_ray.train.sequence import run_sequence, task_dir

    runs = []
    for cpus in (1, 2):
        config = sequence_config(tmp_path, cache_dir, {"name": "seq_lora"}, f"cpus{cpus}", max_train=48,
                                 cpus_per_worker=cpus)
        config.tasks.sequence = config.tasks.sequence[:1]
        results = run_sequence(config)
        folder = task_dir(config.run_dir, 0, "rule_a")
        row = json.loads((folder / "row.json").read_text())
        adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        runs.append((results["r_matrix"], row["first_loss"], row["train_loss"], adapter))
    (r1, first1, last1, a1), (r2, first2, last2, a2) = runs
    assert (first1, last1) == (first2, last2)  # exact: the same float operations in the same order
    assert sorted(a1) == sorted(a2) and all(torch.equal(a1[k], a2[k]) for k in a1), \
        max(float((a1[k] - a2[k]).abs().max()) for k in a1)
    assert r1 == r2
