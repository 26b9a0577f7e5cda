"""What a user sees on the real stack: the demo CLI's quiet console, and the TensorBoard events and curve PNGs a
run leaves (read back with TensorBoard's own reader and checked against the R matrix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saefd_ray.observe.tb import read_scalars
from saefd_ray.train.sequence import task_dir

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def planned_steps(run_dir: Path, names: list[str]) -> list[int]:
    rows = [json.loads((task_dir(run_dir, i, n) / "row.json").read_text()) for i, n in enumerate(names)]
    return [row["planned_steps"] for row in rows]


def check_events_and_figures(run_dir: Path, results: dict) -> dict:
    """The scores in the events are the R matrix's; train/loss covers every optimizer step of the sequence."""
    names, rows = results["tasks"], results["r_matrix"]
    scalars = read_scalars(run_dir / "tb")
    ends = [sum(planned_steps(run_dir, names)[: i + 1]) for i in range(len(names))]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, ends[-1] + 1))
    for j, name in enumerate(names):
        assert scalars[f"score/{name}"] == [(step, pytest.approx(row[j], abs=1e-4))
                                           for step, row in zip([0, *ends], rows)], name
    assert all(v > 0 for _, v in scalars["train/lr"]) and all(v > 0 for _, v in scalars["train/step_s"])
    for png in ("r_matrix.png", "score_lines.png", "loss_curves.png"):
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG"), png
    md = (run_dir / "report.md").read_text()
    assert "![Task loss per task](loss_curves.png)" in md and "![Scores over the sequence](score_lines.png)" in md
    return scalars


def test_reference_run_writes_events_and_curves(reference_run):
    _, config, results = reference_run
    scalars = check_events_and_figures(config.run_dir, results)
    assert "method/lambda" not in scalars and not (config.run_dir / "lambda_share.png").exists()  # seq_lora


def test_demo_cli_prints_stage_lines_bars_and_the_table_only(ray_cluster, cache_dir, tmp_path):
    """The demo job cut to 2 tasks of 1 epoch on a smaller, un-pretrained tiny model (this checks the console, not
    learning), joined to the session's Ray (no second cluster on the box)."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("SAEFD_VERBOSE", None)
    overrides = ["tasks.sequence=[{name: rule_a, format: synthetic, generator: rule_a}, "
                 "{name: rule_b, format: synthetic, generator: rule_b}]",
                 "tasks.sequence.0.max_test=48", "tasks.sequence.1.max_test=48", "training.epochs=1",
                 "model.tiny.pretrain_epochs=0", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
                 "model.tiny.num_layers=2", "model.tiny.vocab_size=512",
                 f"model.cache_dir={cache_dir}", f"output.root={tmp_path}", "output.run_name=cli"]
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "run_sequence.py"),
                           *[arg for o in overrides for arg in ("--set", o)]],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # off a terminal a long stage also prints `progress: ...` lines once a minute (a loaded box): not counted here
    lines = [line for line in out.splitlines() if not line.startswith("progress: ")]
    assert "Traceback" not in out and "WARNING" not in out and "Warning" not in out, out
    assert len(lines) < 40, out
    bars = [line for line in lines if line.startswith("task ")]
    assert len(bars) == 2 and "task 1/2 rule_a: training on" in bars[0] and "task 2/2 rule_b" in bars[1], out
    assert all("loss " in bar and " s/step" in bar for bar in bars), out  # the final state of each progress bar
    # one row per split and task stage (task 1's base-model scoring reuses its rows)
    assert sum("scoring (test)" in line for line in lines) == 2, out
    assert sum("scoring (validation)" in line for line in lines) == 2, out
    assert "R matrix" in out and "tensorboard --logdir" in out
    run_dir = tmp_path / "cli"
    check_events_and_figures(run_dir, json.loads((run_dir / "results.json").read_text()))
