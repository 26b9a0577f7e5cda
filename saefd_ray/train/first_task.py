"""Task 1 trained once per output root, shared by every method that trains it as SeqLoRA does.

No regularizer has anything to hold on task 1 — SAE-FD has no anchors yet, LwF no teacher, EWC no Fisher, L2 no
reference, replay no buffer — so with the same seed those methods train task 1 step for step as seq_lora does
(`Method.plain_first_task`; tests/test_first_task.py checks each claim and the training).
A suite of methods × seeds on one root trained it again in every run: about a third of a SmolLM2 run.

So the first plain run on a root stores its trained task-1 adapter and row (`<output.root>/first_task/<key>/`),
and a later plain run with the same key adopts them: its task-1 stage loads that adapter, runs only its own
`after_task` (anchors, Fisher, teacher...) and records the stored row, with `first_task` in its row.json naming
where it came from. The key is a SHA-256 over what task-1 training and its scores depend on: the whole config but
the method and output sections, the model files, every task's examples (task 1's training set, every task's
scored splits), the library versions and CPU instruction set, and the training code.

Not shared: elastic `num_workers` and a model that is not a local folder (as for the base row).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from saefd_ray.config import RunConfig
from saefd_ray.data.tasks import Task
from saefd_ray.io import atomic_write_text, sha256_file
from saefd_ray.methods.base import ADAPTER
from saefd_ray.train.base_rows import PACKAGE, environment
from saefd_ray.train.worker import ROW_FILE

FOLDER = "first_task"
# what trains and scores task 1: the loop, the engine, the data and prompts, the model and its LoRA wrap, scoring
TRAINING_CODE = ("train/worker.py", "train/deepspeed_setup.py", "methods/base.py", "data/render.py",
                 "data/tasks.py", "models/loading.py", "eval/scoring.py", "eval/metrics.py")


def key(config: RunConfig, tasks: list[Task], model_digest: str | None) -> str | None:
    """The cache key of this run's task 1; None when it cannot be pinned down."""
    if not isinstance(config.distributed.num_workers, int) or model_digest is None:
        return None
    examples = [[t.name, t.metric, t.options, [[e.prompt, e.answer] for e in split]]
                for i, t in enumerate(tasks) for split in ((t.train,) if i == 0 else ()) + (t.validation, t.test)]
    inputs = {
        "config": config.model_dump(mode="json", exclude={"method", "output"}),
        "model": model_digest,
        "examples": hashlib.sha256(json.dumps(examples).encode()).hexdigest(),
        **environment(),
        "code": {name: sha256_file(PACKAGE / name) for name in TRAINING_CODE},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def folder(config: RunConfig, cache_key: str) -> Path:
    return Path(config.output.root).expanduser().resolve() / FOLDER / cache_key


def lookup(config: RunConfig, cache_key: str | None) -> Path | None:
    """The stored task 1 under this key, or None (none stored, or a broken one: trained again, and rewritten)."""
    if cache_key is None:
        return None
    stored = folder(config, cache_key)
    try:
        row = json.loads((stored / ROW_FILE).read_text())
    except (OSError, ValueError):
        return None
    complete = isinstance(row, dict) and row.get("key") == cache_key and (stored / ADAPTER).is_dir()
    return stored if complete else None


def store(config: RunConfig, cache_key: str | None, task_folder: Path, run_name: str) -> None:
    """Keep a published task-1 folder's adapter and row under the key (staged, then one atomic rename)."""
    if cache_key is None or lookup(config, cache_key) is not None:
        return
    target = folder(config, cache_key)
    staging = target.with_name(f".staging-{cache_key}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(task_folder / ADAPTER, staging / ADAPTER)
    row = json.loads((task_folder / ROW_FILE).read_text())
    atomic_write_text(staging / ROW_FILE, json.dumps({**row, "key": cache_key, "trained_by": run_name}))
    if target.exists():  # a broken leftover (lookup refused it)
        shutil.rmtree(target)
    try:
        os.rename(staging, target)
    except OSError:  # another run stored the same key first: the same bytes
        shutil.rmtree(staging, ignore_errors=True)
