"""The two non-sequential references: multi-task training (upper bound) and one independent LoRA per task.

mtl      one stage on the union of all tasks' training data for `method.epochs` epochs (default: the largest of the
         tasks' epochs); its R matrix is the base row plus one row.
per_task a fresh LoRA for every task, trained from the base model. Each task is scored with its own adapter:
         row t holds, for task i ≤ t, the score of adapter i on task i (carried from the previous row, so
         nothing is re-evaluated) and, for i > t, the base model's score (no adapter for task i exists yet —
         a fresh LoRA is the base model). So BWT = 0 and FWT = 0 by construction and the final row is
         each task's own fine-tuned score.
"""

from __future__ import annotations

import json
from pathlib import Path

from saefd_ray.data.tasks import Example, Task
from saefd_ray.methods.base import Method, TaskContext

BASE_ROW = "per_task/base_row.json"


class Mtl(Method):
    name = "mtl"
    joint_training = True
    plain_first_task = False  # one stage over all tasks

    def training_examples(self, task_index: int, tasks: list[Task], state_dir: Path | None) -> list[Example]:
        return [example for task in tasks for example in task.train]

    def epochs(self, task_index: int, tasks: list[Task]) -> int:
        """method.epochs, else the largest of the tasks' epochs (not the first task's, not their sum)."""
        return self.cfg.epochs or max(Method.epochs(self, index, tasks) for index in range(len(tasks)))


class PerTask(Method):
    name = "per_task"
    fresh_adapter_per_task = True
    plain_first_task = False  # its rows are rewritten (adjust_row)

    def adjust_row(self, row: list[float], base_row: list[float] | None, ctx: TaskContext,
                   split: str = "test") -> list[float]:
        t = ctx.task_index
        suffix = "" if split == "test" else f"_{split}"  # row.json keys: row / row_validation
        base_file = BASE_ROW.replace(".json", f"{suffix}.json")
        if ctx.state_in is None:
            base = base_row
            previous: list[float] = []
        else:
            base = json.loads((ctx.state_in / base_file).read_text())
            previous = json.loads((ctx.state_in / "row.json").read_text())[f"row{suffix}"][:t]
        if ctx.rank == 0:
            (ctx.state_out / base_file).parent.mkdir(parents=True, exist_ok=True)
            (ctx.state_out / base_file).write_text(json.dumps(base))
        return previous + [row[t]] + list(base[t + 1 :])
