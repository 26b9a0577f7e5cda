"""The base row's scores, computed once per output root and reused by every later run that would compute the same.

R row 0 scores the untouched base model on every task's validation and test split. Each of those scores depends
only on the model files, the task's scored examples (whatever selected them: max_test, validation.size,
tasks.seed, the data files), the scoring settings (prompt / answer lengths, evaluation batch size, number of
workers — which examples share a padded batch moves float rounding — threads per worker, device, ZeRO stage),
the dtype, the library versions and the scoring code. It never depends on the method, the LoRA config, the lr or
the training seed: at stage 0 every method wraps the base model in a fresh LoRA whose B is zero, and
`base_out + 0` is `base_out` bit for bit (tests/test_base_rows.py scores each method's stage-0 model against the
bare base model). A suite — methods × orders × seeds on one `output.root` — re-scored it in every run.

So the driver looks each task up in `<output.root>/base_rows/<digest>.json` before stage 0 and hands the known
scores to the workers, which score only the rest (`score_row(known=...)`); after the stage is published it writes
the scores the run computed (atomic write: concurrent runs write the same bytes). The digest is a SHA-256 over
exactly the inputs above; the file keeps them readable next to the scores. One file per task, not per row: a
task's score does not depend on the other tasks, so a suite's task orders share them too.

Not cached (always scored): elastic `num_workers` (the world size is known only when the trainer starts) and a
model that is not a local folder (a hub id names no fixed files).
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from saefd_ray.config import RunConfig
from saefd_ray.data.tasks import Task
from saefd_ray.io import atomic_write_text, sha256_file

FOLDER = "base_rows"
SPLITS = ("validation", "test")
PACKAGE = Path(__file__).resolve().parent.parent
# how a score is computed: the scoring itself, the prompts, how the model is loaded and LoRA-wrapped, the worker's call
SCORING_CODE = ("eval/scoring.py", "eval/metrics.py", "data/render.py", "models/loading.py", "methods/base.py",
                "train/worker.py")
LIBRARIES = ("torch", "transformers", "peft", "deepspeed")


def cache_folder(config: RunConfig) -> Path:
    return Path(config.output.root).expanduser().resolve() / FOLDER


def scoring_inputs(config: RunConfig, model_digest: str | None) -> dict | None:
    """Everything a base score depends on besides the task's own examples; None when it cannot be pinned down."""
    workers = config.distributed.num_workers
    if not isinstance(workers, int) or model_digest is None:
        return None
    return {
        "model": model_digest,
        "dtype": config.model.dtype,
        "max_prompt_len": config.training.max_prompt_len,
        "max_answer_len": config.training.max_answer_len,
        "evaluation": config.evaluation.model_dump(mode="json"),
        "workers": workers,
        "threads_per_worker": config.distributed.threads_per_worker,
        "use_gpu": config.distributed.use_gpu,
        "zero_stage": config.distributed.zero_stage,
        "zero3_persistence_threshold": config.distributed.zero3_persistence_threshold,
        **environment(),
        "code": {name: sha256_file(PACKAGE / name) for name in SCORING_CODE},
    }


def environment() -> dict:
    """What seeded numbers depend on besides the config and the inputs: the library versions and the CPU's
    instruction set (torch's ATEN_CPU_CAPABILITY: the same batch's gradients differ between avx2 and default on one
    box). results.json records it, so R matrices from two machines can be told apart (README: Reproducibility)."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": {name: _version(name) for name in LIBRARIES}}


def task_inputs(task: Task) -> dict:
    """What of a task its base score depends on: its metric, label options and the scored examples."""
    data = json.dumps([task.metric, task.options, [[e.prompt, e.answer] for e in task.test],
                       [[e.prompt, e.answer] for e in task.validation]])
    return {"metric": task.metric, "test_size": len(task.test), "validation_size": len(task.validation),
            "data": hashlib.sha256(data.encode()).hexdigest()}


def entries(config: RunConfig, tasks: list[Task], model_digest: str | None) -> list[dict] | None:
    """Per task: its digest and inputs, and its cached scores (`known`, None if not cached yet)."""
    shared = scoring_inputs(config, model_digest)
    if shared is None:
        return None
    folder = cache_folder(config)
    out = []
    for task in tasks:
        inputs = {**shared, "task": task_inputs(task)}
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        out.append({"task": task.name, "digest": digest, "inputs": inputs, "known": _read(folder / f"{digest}.json")})
    return out


def _read(path: Path) -> dict | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or broken: scored again, and rewritten
        return None
    if not isinstance(saved, dict):
        return None
    scores = {split: saved.get(split) for split in SPLITS}
    return scores if all(isinstance(value, (int, float)) for value in scores.values()) else None


def store(config: RunConfig, cache: list[dict] | None, metrics: dict) -> None:
    """Write the base scores stage 0 computed (its row.json `metrics`) for the tasks that were not cached."""
    if cache is None or metrics.get("base_row") is None:
        return
    reported = {entry["task"]: entry for entry in metrics.get("base_cache") or []}
    for index, entry in enumerate(cache):
        scored = reported.get(entry["task"])
        # the digest the stage ran under must be this one (a task folder from an older call may predate it)
        if scored is None or scored["cached"] or scored["digest"] != entry["digest"]:
            continue
        path = cache_folder(config) / f"{entry['digest']}.json"
        if _read(path) is None:  # absent or broken
            atomic_write_text(path, json.dumps({
                "task": entry["task"], "test": metrics["base_row"][index],
                "validation": metrics["base_row_validation"][index], "inputs": entry["inputs"]}, indent=1))


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
