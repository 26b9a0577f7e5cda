"""End to end on the real stack: Ray Train V2 + DeepSpeed ZeRO-2 + peft LoRA, 2 CPU workers over gloo."""

import json

import pytest

from saefd_ray.config import load_config
from saefd_ray.errors import CheckpointError
from saefd_ray.train.sequence import is_complete, run_sequence, task_dir

pytestmark = pytest.mark.ray


def two_task_config(tmp_path, cache_dir, *extra):
    return load_config(None, [
        "tasks.sequence=[{name: rule_a, format: synthetic, generator: rule_a}, "
        "{name: rule_b, format: synthetic, generator: rule_b}]",
        "tasks.sequence.0.max_test=48", "tasks.sequence.1.max_test=48", f"model.cache_dir={cache_dir}",
        "training.epochs=3", f"output.root={tmp_path}", "output.run_name=seq", *extra,
    ])


def test_two_task_sequence_trains_reports_and_resumes(ray_cluster, tmp_path, cache_dir, capsys):
    config = two_task_config(tmp_path, cache_dir)
    results = run_sequence(config)

    rows = results["r_matrix"]
    assert len(rows) == 3 and all(len(row) == 2 for row in rows)  # base + one row per task
    assert rows[1][0] > rows[0][0] + 20, f"task 1 not learned: {rows}"  # diagonal well above the base row
    assert results["summary"]["aa"] == pytest.approx(sum(rows[2]) / 2)
    assert results["summary"]["bwt"] == pytest.approx(rows[2][0] - rows[1][0])

    run_dir = config.run_dir
    for name in ("results.json", "report.md", "r_matrix.png", "config.json"):
        assert (run_dir / name).exists(), name
    for index, name in enumerate(["rule_a", "rule_b"]):
        folder = task_dir(run_dir, index, name)
        assert is_complete(folder)
        assert (folder / "adapter" / "adapter_model.safetensors").exists()
        metrics = json.loads((folder / "row.json").read_text())
        assert metrics["train_loss"] < metrics["first_loss"]  # training lowered the task loss

    capsys.readouterr()
    again = run_sequence(config)  # same command again: nothing is trained, rows come from disk
    out = capsys.readouterr().out
    assert out.count("finished earlier, not trained again") == 2 and "training on" not in out
    assert again["r_matrix"] == rows

    changed = two_task_config(tmp_path, cache_dir, "training.lr=0.5")
    with pytest.raises(CheckpointError, match="written by a different config; refusing to resume"):
        run_sequence(changed)
