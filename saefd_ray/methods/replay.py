"""Replay: a share `fraction` of the training examples comes from earlier tasks.

After each task, `buffer_per_task` of its training instances (a seeded sample) are appended to a buffer saved
with the task (`replay/buffer.json`: task, prompt, answer). Training task t then uses its own examples plus
n = round(len(own) · fraction / (1 − fraction)) examples drawn from the buffer (without replacement while the
buffer suffices, then with), so earlier tasks make `fraction` of the examples — and, as the worker shuffles
them, of every batch in expectation. `fraction = 1` trains on the buffer alone (len(own) draws).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from saefd_ray.data.tasks import Example, Task
from saefd_ray.methods.base import Method, TaskContext

BUFFER = "replay/buffer.json"


def read_buffer(folder: Path | None) -> list[dict]:
    if folder is None or not (folder / BUFFER).is_file():
        return []
    return json.loads((folder / BUFFER).read_text())


class Replay(Method):
    name = "replay"

    def training_examples(self, task_index: int, tasks: list[Task], state_dir: Path | None) -> list[Example]:
        own = list(tasks[task_index].train)
        buffer = [Example(r["prompt"], r["answer"]) for r in read_buffer(state_dir)]
        if not buffer:
            return own
        f = self.cfg.fraction
        n = len(own) if f >= 1 else round(len(own) * f / (1 - f))
        rng = random.Random(self.config.training.seed * 7919 + task_index)
        drawn = rng.sample(buffer, n) if n <= len(buffer) else [rng.choice(buffer) for _ in range(n)]
        return drawn if f >= 1 else own + drawn

    def after_task(self, model, ctx: TaskContext) -> None:
        if ctx.rank != 0:
            return
        task = ctx.tasks[ctx.task_index]
        rng = random.Random(self.config.training.seed * 104729 + ctx.task_index)
        chosen = rng.sample(task.train, min(self.cfg.buffer_per_task, len(task.train)))
        buffer = read_buffer(ctx.state_in) + [{"task": task.name, "prompt": e.prompt, "answer": e.answer}
                                               for e in chosen]
        (ctx.state_out / BUFFER).parent.mkdir(parents=True, exist_ok=True)
        (ctx.state_out / BUFFER).write_text(json.dumps(buffer))
