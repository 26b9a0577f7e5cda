"""SAE-FD and sae_reg end to end: a 2-task sequence on Ray Train + DeepSpeed ZeRO-2 with 2 CPU workers, then a
resume after task 1 (a second run dir holding only task 1's published checkpoint) that must continue exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from saefd_ray.config import RunConfig
from saefd_ray.sae import SAEConfig, build_sae, save_saelens

pytestmark = pytest.mark.usefixtures("ray_cluster")


def sequence_config(tmp_path, cache_dir, method: dict, run_name: str, max_train: int = 64, epochs: int = 1,
                    **distributed) -> RunConfig:
    tasks = [{"name": n, "format": "synthetic", "generator": g, "max_train": max_train, "max_test": 16}
             for n, g in (("rule_a", "rule_a"), ("rule_b", "rule_b"))]
    return RunConfig.model_validate({
        "model": {"name_or_path": "tiny", "cache_dir": str(cache_dir),
                  "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                           "num_heads": 2}},
        "lora": {"r": 4, "alpha": 8},
        "tasks": {"sequence": tasks},
        "training": {"epochs": epochs, "lr": 3e-3, "batch_size": 8, "max_prompt_len": 48, "max_answer_len": 4},
        "distributed": {"num_workers": 2, "zero_stage": 2, "max_failures": 0, **distributed},
        "evaluation": {"batch_size": 16},
        "method": method,
        "output": {"root": str(tmp_path / "runs"), "run_name": run_name},
    })


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    sae = build_sae(SAEConfig("gated", 64, 256, metadata={"hook_name": "blocks.1.hook_resid_post"}), seed=0)
    with torch.no_grad():
        sae.b_gate.fill_(0.05)
    return save_saelens(sae, tmp_path_factory.mktemp("sae") / "gated-l1")


def run_and_resume(tmp_path, cache_dir, method: dict, **options):
    from saefd_ray.train.sequence import run_sequence, task_dir

    first = run_sequence(sequence_config(tmp_path, cache_dir, method, "full", **options))
    assert len(first["r_matrix"]) == 3
    full_dir = tmp_path / "runs" / "full"
    resumed_cfg = sequence_config(tmp_path, cache_dir, method, "resumed", **options)
    task1 = task_dir(full_dir, 0, "rule_a")
    shutil.copytree(task1, task_dir(resumed_cfg.run_dir, 0, "rule_a"))
    second = run_sequence(resumed_cfg)
    assert "task_rule_a_s" not in second["timings"] and "task_rule_b_s" in second["timings"]  # task 1 not retrained
    assert second["r_matrix"][:2] == first["r_matrix"][:2]
    row_full = json.loads((task_dir(full_dir, 1, "rule_b") / "row.json").read_text())
    row_resumed = json.loads((task_dir(resumed_cfg.run_dir, 1, "rule_b") / "row.json").read_text())
    assert row_resumed["train_loss"] == pytest.approx(row_full["train_loss"], rel=1e-4)
    return full_dir, resumed_cfg.run_dir


def test_sae_fd_sequence_zero2_and_resume(tmp_path, cache_dir, sae_folder):
    from safetensors.torch import load_file

    from saefd_ray.train.sequence import task_dir

    method = {"name": "sae_fd", "sae": {"path": str(sae_folder), "layer": 1}, "anchor_size": 8, "anchor_batch": 2,
              "rho": RHO, "ema_alpha": 0.5, "lambda_init": 10.0}
    full_dir, resumed_dir = run_and_resume(tmp_path, cache_dir, method, max_train=96, epochs=2)  # 12 steps a task
    t2 = task_dir(full_dir, 1, "rule_b")
    anchors = sorted(p.name for p in (t2 / "sae_fd" / "anchors").iterdir())
    assert anchors == ["01-rule_a.safetensors", "02-rule_b.safetensors"]  # all earlier anchors carried forward
    a1 = load_file(str(t2 / "sae_fd" / "anchors" / "01-rule_a.safetensors"))
    assert len(a1["lengths"]) == 8 and a1["values"].shape[0] == a1["input_ids"].shape[0] == int(a1["lengths"].sum())
    log = json.loads((t2 / "sae_fd" / "log.json").read_text())
    assert len(log) == 12
    check_lambda_dynamics(log)
    resumed_log = json.loads((task_dir(resumed_dir, 1, "rule_b") / "sae_fd" / "log.json").read_text())
    assert [s["lambda"] for s in resumed_log] == pytest.approx([s["lambda"] for s in log], rel=1e-4)


RHO = 0.05  # here λ·L_FD settles below 0.15·L_total whatever λ: L_FD shrinks as λ grows, λ pins at its clip


def check_lambda_dynamics(log: list[dict]) -> None:
    """What adaptive λ is for (lambda_control.py): λ starts high (its clip, 10), comes down toward
    λ* = ρ/(1−ρ)·L_task/L_FD as L_task falls and L_FD grows from 0 (task 2 starts at the anchors' own model), and
    the realized share λ·L_FD / (L_task + λ·L_FD) moves to ρ. Thirds of the log are compared, never single steps;
    the first step (L_FD = 0: share undefined, λ unchanged) is left out of the share."""
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    third = len(log) // 3
    first, last = [s for s in log[:third] if s["l_fd"] > 0], log[-third:]
    lam, shares = [s["lambda"] for s in log], [s["fd_share"] for s in log]
    assert lam[0] == 10.0 and max(s["lambda"] for s in last) < lam[0], lam
    assert mean(last, "l_task") < mean(log[:third], "l_task"), [s["l_task"] for s in log]
    off = lambda rows: sum(abs(r["fd_share"] - RHO) for r in rows) / len(rows)  # noqa: E731  (mean |share − ρ|)
    assert off(last) < off(first), shares
    assert abs(mean(last, "fd_share") - RHO) < 0.02, shares


def test_sae_reg_sequence_zero2_and_resume(tmp_path, cache_dir, sae_folder):
    from saefd_ray.train.sequence import task_dir

    method = {"name": "sae_reg", "sae": {"path": str(sae_folder), "layer": 1}, "knn_k": 4, "mask_examples": 32}
    full_dir, _ = run_and_resume(tmp_path, cache_dir, method)
    masks = sorted(p.name for p in (task_dir(full_dir, 1, "rule_b") / "sae_reg" / "masks").iterdir())
    assert masks == ["01-rule_a.safetensors", "02-rule_b.safetensors"]

