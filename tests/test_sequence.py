"""End to end on the real stack: Ray Train V2 + DeepSpeed ZeRO-2 + peft LoRA, 2 CPU workers over gloo."""

import json

import pytest

from saefd_ray.config import load_config
from saefd_ray.errors import CheckpointError
from saefd_ray.train.sequence import is_complete, run_sequence, task_dir

pytestmark = pytest.mark.ray


def test_two_task_sequence_trains_and_reports(reference_run):
    _, config, results = reference_run
    rows = results["r_matrix"]
    assert len(rows) == 3 and all(len(row) == 2 for row in rows)  # base + one row per task
    assert rows[1][0] > rows[0][0] + 20, f"task 1 not learned: {rows}"  # diagonal well above the base row
    assert rows[2][1] > rows[0][1] + 20, f"task 2 not learned: {rows}"
    assert results["summary"]["aa"] == pytest.approx(sum(rows[2]) / 2)
    assert results["summary"]["bwt"] == pytest.approx(rows[2][0] - rows[1][0])

    run_dir = config.run_dir
    for name in ("results.json", "report.md", "r_matrix.png", "config.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "results.json").read_text())["r_matrix"] == rows
    import torch  # what makes seeded numbers differ between machines is recorded with them

    assert results["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert results["environment"]["versions"]["torch"] == torch.__version__
    for index, name in enumerate(["rule_a", "rule_b"]):
        folder = task_dir(run_dir, index, name)
        assert is_complete(folder)
        assert (folder / "adapter" / "adapter_model.safetensors").exists()
        metrics = json.loads((folder / "row.json").read_text())
        epochs = metrics["epoch_losses"]  # like with like: the mean task loss of the first and the last epoch
        assert len(epochs) == config.training.epochs and epochs[-1] < epochs[0], epochs


def test_rerun_resumes_without_training(reference_run, capsys):
    overrides, config, results = reference_run
    capsys.readouterr()
    again = run_sequence(load_config(None, overrides))  # the same command again
    out = capsys.readouterr().out
    assert out.count("finished earlier, not trained again") == 2 and "training on" not in out
    assert again["r_matrix"] == results["r_matrix"]


def test_other_config_refuses_to_resume(reference_run):
    overrides, _, _ = reference_run
    with pytest.raises(CheckpointError, match="written by a different config; refusing to resume"):
        run_sequence(load_config(None, [*overrides, "training.lr=0.5"]))


def test_half_written_task_folder_is_ignored(reference_run, tmp_path):
    _, config, _ = reference_run
    folder = task_dir(config.run_dir, 0, "rule_a")
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(folder, copy)
    assert is_complete(copy)
    (copy / "adapter" / "adapter_model.safetensors").write_bytes(b"truncated")
    assert not is_complete(copy)  # checksum mismatch: a crashed write is never loaded
    (copy / "MANIFEST.json").unlink()
    assert not is_complete(copy)
