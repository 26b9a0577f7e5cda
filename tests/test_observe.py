"""Observation without Ray: the monitors' TensorBoard events read back with TensorBoard's own reader (global steps
across tasks, a restarted attempt purging what it redoes), the report's curve figures, the sweep heatmap's grid,
and the quiet console's options."""

from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace

import pytest

from saefd_ray.eval.plots import objective_grid, objective_heatmap, sae_curves, task_boundaries
from saefd_ray.eval.report import write_report
from saefd_ray.eval.summary import summarize
from saefd_ray.observe.monitor import TaskMonitor
from saefd_ray.observe.tb import read_scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAE_FD = SimpleNamespace(method=SimpleNamespace(name="sae_fd", rho=0.2))


def write_two_tasks(tb) -> None:
    """Task 1: 10 steps. Task 2: 8 steps; its first attempt dies after step 6, the restart resumes after step 4."""
    first = TaskMonitor({"tb_dir": str(tb), "step_offset": 0}, SAE_FD, rank=0, total_steps=10)
    first.start(0)
    first.scores(["a", "b"], [20.0, 30.0], at_start=True)
    for k in range(1, 11):
        first.step(k, 5.0 - 0.25 * k, {"lambda": 1.0 + k, "fd_share": 0.02 * k}, 1e-3, 0.5, 0.01)
    first.scores(["a", "b"], [80.0, 25.0])
    first.close()
    for done, value, last in ((0, 9.0, 6), (4, 2.0, 8)):
        time.sleep(1.1)  # event file names carry whole seconds; the reader orders the attempts by them
        second = TaskMonitor({"tb_dir": str(tb), "step_offset": 10}, SAE_FD, rank=0, total_steps=8)
        second.start(done)
        for k in range(done + 1, last + 1):
            second.step(k, value, {"lambda": 3.0, "fd_share": 0.2}, 1e-3, None, 0.01)
        if last == 8:
            second.scores(["a", "b"], [60.0, 70.0])
        second.close()


@pytest.fixture(scope="module")
def two_task_tb(tmp_path_factory):
    tb = tmp_path_factory.mktemp("run") / "tb"
    write_two_tasks(tb)
    return tb


def test_events_use_global_steps_and_a_restart_replaces_what_it_redoes(two_task_tb):
    scalars = read_scalars(two_task_tb)
    loss = dict(scalars["train/loss"])
    assert sorted(loss) == list(range(1, 19))  # 10 + 8 steps on one axis
    assert loss[1] == pytest.approx(4.75) and loss[10] == pytest.approx(2.5)
    assert [loss[s] for s in range(11, 15)] == [9.0] * 4  # the lost attempt's steps before the resume point
    assert [loss[s] for s in range(15, 19)] == [2.0] * 4  # ... and the restart's from there on (15, 16 replaced)
    assert scalars["score/a"] == [(0, 20.0), (10, 80.0), (18, 60.0)]
    assert scalars["score/b"] == [(0, 30.0), (10, 25.0), (18, 70.0)]
    assert [v for _, v in scalars["method/rho"]] == pytest.approx([0.2] * 18)
    assert "train/grad_norm" in scalars and dict(scalars["train/grad_norm"]).keys() == set(range(1, 11))
    assert task_boundaries(scalars) == [10, 18]


def test_only_rank_zero_writes(tmp_path):
    other = TaskMonitor({"tb_dir": str(tmp_path / "tb"), "step_offset": 0}, SAE_FD, rank=1, total_steps=4)
    other.start(0)
    other.step(1, 1.0, {}, 1e-3, 0.1, 0.01)
    other.scores(["a"], [10.0])
    other.close()
    assert not (tmp_path / "tb").exists() and read_scalars(tmp_path / "tb") == {}


def test_report_links_curves_from_the_events(two_task_tb):
    run_dir = two_task_tb.parent
    rows = [[20.0, 30.0], [80.0, 25.0], [60.0, 70.0]]
    results = {"tasks": ["a", "b"], "r_matrix": rows, "summary": summarize(rows, ["a", "b"]), "method": "sae_fd",
               "config": {"method": {"name": "sae_fd", "rho": 0.2}}}
    paths = write_report(run_dir, results)
    for name in ("r_matrix.png", "score_lines.png", "loss_curves.png", "lambda_share.png"):
        assert paths[name].read_bytes().startswith(PNG_MAGIC), name
    md = (run_dir / "report.md").read_text()
    for link in ("![Task loss per task](loss_curves.png)", "![SAE-FD λ and realized share](lambda_share.png)",
                 "![Scores over the sequence](score_lines.png)", "tensorboard --logdir tb"):
        assert link in md, link
    assert md.index("## Figures") < md.index("## Summary")


def test_objective_grid_averages_completed_trials_per_cell():
    rows = [
        {"method.rho": 0.1, "method.anchor_size": 8, "status": "completed", "aa": 40.0},
        {"method.rho": 0.1, "method.anchor_size": 8, "status": "completed", "aa": 50.0},
        {"method.rho": 0.2, "method.anchor_size": 8, "status": "completed", "aa": 60.0},
        {"method.rho": 0.2, "method.anchor_size": 16, "status": "completed", "aa": 70.0},
        {"method.rho": 0.1, "method.anchor_size": 16, "status": "stopped", "aa": None, "running_aa": 99.0},
        {"method.rho": 0.3, "method.anchor_size": 16, "status": "error", "aa": 99.0},
    ]
    xs, ys, grid = objective_grid(rows, "aa")
    assert xs == [0.1, 0.2] and ys == [8, 16]
    assert grid[0] == [45.0, 60.0]
    assert math.isnan(grid[1][0]) and grid[1][1] == 70.0
    assert objective_heatmap(rows, "aa").startswith(PNG_MAGIC)
    assert objective_heatmap([r for r in rows if r["method.rho"] == 0.1], "aa") is None  # one ρ: no grid to draw


def test_sae_curves_from_history():
    history = [{"step": s, "tokens": 128 * s, "L1/loss": 1.0 / s, "L1/fvu": 0.5 / s, "L1/l0": 10.0 + s,
                "L1/dead_fraction": 0.0} for s in range(1, 6)]
    assert sae_curves(history, [1]).startswith(PNG_MAGIC)
    assert sae_curves([], [1]) is None


def test_quiet_console_silences_libraries_at_their_source(monkeypatch):
    from saefd_ray.observe import console

    monkeypatch.setenv(console.ENV, "0")
    levels = {name: logging.getLogger(name).level for name in console.QUIET_LOGGERS}
    try:
        console.configure(False)
        assert console.ray_init_options() == {"log_to_driver": False, "logging_level": logging.ERROR}
        assert logging.getLogger("deepspeed").level == logging.ERROR
        assert logging.getLogger("ray.train").level == logging.ERROR
        console.configure(True)
        assert console.verbose() and console.ray_init_options() == {}
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_off_a_terminal_progress_is_a_plain_line_at_most_once_a_heartbeat():
    """In a log file (ray job logs, nohup) the bars print only at the stage's end: the status comes as lines."""
    import io

    from rich.console import Console

    from saefd_ray.observe.console import StageProgress

    bar = StageProgress("task 2/4 amazon", console=Console(file=io.StringIO(), width=200))
    start = bar._began
    assert bar.heartbeat(start + 600) is None  # nothing reported yet
    bar.apply([{"kind": "score", "what": "test", "done": 1, "total": 4}])
    assert bar.heartbeat(start + 30) is None  # within the first heartbeat
    assert bar.heartbeat(start + 61) == "progress: task 2/4 amazon [61 s] scoring test: 1/4 tasks"
    assert bar.heartbeat(start + 200) is None  # unchanged: no repeated line
    bar.apply([{"kind": "train", "step": 40, "total": 100, "loss": 0.51234, "lambda": 1.5, "share": 0.2, "rho": 0.15}])
    assert bar.heartbeat(start + 230) == \
        "progress: task 2/4 amazon [230 s] 40/100 steps  loss 0.512  λ 1.50  share 0.20/ρ 0.15"
    bar.apply([{"kind": "train", "step": 41, "total": 100}])
    assert bar.heartbeat(start + 250) is None  # changed, but only 20 s after the last line
    assert bar.heartbeat(start + 290) == "progress: task 2/4 amazon [290 s] 41/100 steps"
