"""The driver: train a task sequence with one Ray Train `TorchTrainer` per task, and build the R matrix.

The driver holds no model. For each task it starts a trainer whose workers rebuild the model from the base
weights and the previous task's checkpoint, train, score every task's validation and test splits and report a
checkpoint.
Finished tasks live under `<run_dir>/tasks/<NN>-<name>/`, published by an atomic rename once complete, so
re-running the same command resumes after the last finished task and a half-written folder is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from saefd_ray.config import RunConfig
from saefd_ray.data.tasks import Task, load_tasks
from saefd_ray.errors import CheckpointError, NonFiniteLossError
from saefd_ray.io import atomic_write_text, sha256_file, tree_digest
from saefd_ray.methods import build_method
from saefd_ray.models.loading import resolve_model_path
from saefd_ray.train import base_rows, first_task
from saefd_ray.train.failures import fit_with_retries
from saefd_ray.train.deepspeed_setup import select_accelerator
from saefd_ray.train.worker import NONFINITE_FILE, ROW_FILE, train_task

CONFIG_FILE = "config.json"
MANIFEST = "MANIFEST.json"  # written last into a task folder: its presence means "complete"


def fingerprint(config: RunConfig) -> str:
    """What must not change between a run and its resume: everything but the output location and workers."""
    data = config.model_dump(mode="json", exclude={"output": True, "distributed": {"ray_address", "max_failures"}})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def input_digests(tasks: list[Task], model_path: str, sae_folders: list[Path]) -> dict[str, str]:
    """What defines the results besides the config: the loaded examples (so an edited data file counts), the
    model files and the SAE files (`io.tree_digest`). A hub id not on disk is compared by name."""
    data = hashlib.sha256()
    for task in tasks:
        data.update(json.dumps([task.name, task.metric, task.options, [[e.prompt, e.answer] for e in task.train],
                                [[e.prompt, e.answer] for e in task.test]]).encode())
    digests = {"data": data.hexdigest()}
    digests["model"] = tree_digest(model_path) if Path(model_path).expanduser().exists() else model_path
    for index, folder in enumerate(sae_folders):
        digests[f"sae.{index}" if len(sae_folders) > 1 else "sae"] = tree_digest(folder)
    return digests


def prepare_run_dir(config: RunConfig, inputs: dict[str, str] | None = None) -> Path:
    """Claim the run folder for this config and these inputs.

    A folder holding a finished task is protected: a different config or different inputs (data, model, SAE) are
    refused, so old results are never reported for new inputs. A folder with no finished task holds nothing to
    protect (a start that failed early): it is taken over, its Ray Train state (mid-task checkpoints of the old
    config) removed.
    """
    run_dir = config.run_dir
    saved = run_dir / CONFIG_FILE
    inputs = inputs or {}
    if saved.exists():
        previous = json.loads(saved.read_text())
        changed = [] if previous.get("fingerprint") == fingerprint(config) else ["config"]
        old_inputs = previous.get("inputs", inputs)  # folders from before inputs were recorded: config only
        changed += [key for key in sorted(set(inputs) | set(old_inputs)) if inputs.get(key) != old_inputs.get(key)]
        if changed and finished_tasks(run_dir):
            raise CheckpointError(
                f"{run_dir}: written by a different {' / '.join(changed)}; refusing to resume. Start fresh with "
                f"--set output.run_name=<new name>, or delete {run_dir}"
            )
        if changed:
            print(f"{run_dir}: no finished task; starting it over with the new {', '.join(changed)}")
            shutil.rmtree(run_dir / "ray", ignore_errors=True)
            shutil.rmtree(run_dir / "tasks", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps({"fingerprint": fingerprint(config), "inputs": inputs,
                                         "config": config.model_dump(mode="json")}))
    return run_dir


def finished_tasks(run_dir: Path) -> list[Path]:
    folder = run_dir / "tasks"
    return [t for t in sorted(folder.iterdir()) if is_complete(t)] if folder.is_dir() else []


def task_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "tasks" / f"{index + 1:02d}-{name}"


def is_complete(folder: Path) -> bool:
    """A task folder counts only if its manifest exists and every listed file matches its checksum."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((folder / name).exists() and sha256_file(folder / name) == digest for name, digest in files.items())


def publish(checkpoint_dir: Path, target: Path) -> None:
    """Copy a reported checkpoint into the run dir: stage, checksum, manifest, then one atomic rename."""
    staging = target.with_name(f".staging-{target.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint_dir, staging)
    files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    atomic_write_text(staging / MANIFEST, json.dumps({"files": files}, indent=1))
    if target.exists():  # an incomplete leftover from a crash: never loaded, replaced now
        shutil.rmtree(target)
    os.rename(staging, target)


def tokenizer_corpus(tasks: list[Task], per_task: int = 200) -> list[str]:
    """Texts the offline tiny model's tokenizer is trained on (ignored for real models)."""
    return [text for task in tasks for e in task.train[:per_task] for text in (e.prompt, e.answer)]


STATE_API_PIN = "http://127.0.0.1:9"  # serves nothing: every State API query fails at once


def pin_state_api() -> None:
    """Before a local Ray starts: the State API address every process it spawns inherits (`RAY_API_SERVER_ADDRESS`).

    Ray Train V2's PlacementGroupCleaner asks the State API whether the train controller is alive. Unpinned, it
    auto-detects "the" Ray of the machine; a local Ray without a dashboard has no State API, so it asked another
    Ray on the same machine (a test session, another job) when there was one, was told the controller did not
    exist, and removed our placement group mid-task (2026-12-01: a 20-minute SmolLM2 stage lost). Pinned, every
    query fails (`ServerUnavailable`), which the cleaner logs and ignores. A value already set is kept.
    """
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", STATE_API_PIN)


def init_ray(address: str | None = None) -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS / distributed.ray_address; with none of them, Ray's own
    rule: the last `ray start` cluster of this machine if it lives, else a new local Ray (RAY_ADDRESS=local: always
    a new one).

    Uploads (working_dir and its excludes) are the submitter's business: see runtime_env.yaml. Quiet unless
    --verbose (saefd_ray.observe.console).
    """
    import ray

    from saefd_ray.observe.console import ray_init_options

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address in (None, "local"):
            pin_state_api()
        ray.init(address=address, **ray_init_options())


def run_task(config: RunConfig, index: int, tasks: list[Task], model_path: str, state_in: Path | None,
             examples, score_base: bool, observe: dict | None = None, base_cache: list[dict] | None = None,
             shared_first_task: Path | None = None) -> Path:
    """Train task `index` on Ray Train; returns the local folder of its reported checkpoint. `score_base`: also
    score the base row, taking the scores `base_cache` knows (train/base_rows.py). `shared_first_task`: a stored
    task 1 to adopt instead of training it (train/first_task.py)."""
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    dist = config.distributed
    workers = dist.num_workers if isinstance(dist.num_workers, int) else tuple(dist.num_workers)

    attempts = []  # fit_with_retries calls make_trainer once per attempt

    def make_trainer() -> TorchTrainer:
        attempts.append(len(attempts))
        kill_at = os.environ.get("SAEFD_KILL_WORKER_AT") if len(attempts) == 1 else None
        return TorchTrainer(
            train_task,
            train_loop_config={
                "config": config.model_dump(mode="json"),
                "task_index": index,
                "tasks": tasks,
                "model_path": model_path,
                "state_in": str(state_in) if state_in else None,
                "train_examples": examples,
                "score_base": score_base,
                "base_cache": base_cache,
                "first_task": str(shared_first_task) if shared_first_task else None,
                "observe": observe,  # TensorBoard folder, progress channel, step offset (saefd_ray.observe.monitor)
                # SAEFD_KILL_WORKER_AT="task,epoch,step,rank" (0-based task/epoch/rank; or a Ray node id in place of
                # the rank: the worker on that node): SIGKILL that worker, in the first attempt only.
                "kill_at": [int(x) if x.isdigit() else x for x in kill_at.split(",")] if kill_at else None,
            },
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=dist.use_gpu, resources_per_worker={"CPU": dist.cpus_per_worker}
            ),
            run_config=RayRunConfig(
                name=f"{config.output.run_name}-task{index + 1:02d}",
                storage_path=str(config.run_dir / "ray"),
                failure_config=FailureConfig(max_failures=0),  # retries: train/failures.py (lost workers only)
            ),
        )

    result = fit_with_retries(make_trainer, dist.max_failures, f"task {tasks[index].name!r}")
    if result.checkpoint is None:
        raise RuntimeError(f"task {tasks[index].name!r}: training finished without a checkpoint")
    marker = Path(result.checkpoint.path) / NONFINITE_FILE
    if marker.exists():
        raise NonFiniteLossError(marker.read_text())
    return Path(result.checkpoint.path)


def _earlier_timings(run_dir: Path) -> list[dict]:
    """The timings of every earlier call on this run dir, newest first, from the results.json it wrote."""
    try:
        previous = json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [previous.get("timings", {}), *previous.get("timings_earlier_calls", [])]


def run_sequence(config: RunConfig, on_task_end: Callable[[int, list[list[float]]], None] | None = None,
                 progress: bool = True) -> dict:
    """Train every task in order (resuming after the last finished one) and write the report.

    Every stage scores each task's validation and test splits. `on_task_end(index, rows)`, if given, is called after
    every stage (also one finished earlier and only loaded) with the 0-based stage index and the **validation**
    R-matrix rows so far (base row first): Tune trials report from it, so nothing is ever chosen on test.
    results.json holds both matrices: `r_matrix` (test, the report) and `r_matrix_validation`.
    The base row's scores are computed once per `output.root` (train/base_rows.py): `base_row_cache` in
    results.json says, per task, under which digest and whether this run took them from there.
    `progress`: live progress bars on the console (off in --verbose mode and in Tune trials).
    """
    from saefd_ray.observe.console import StageProgress, verbose
    from saefd_ray.eval.report import print_r_matrix, write_report
    from saefd_ray.eval.summary import summarize

    from saefd_ray.models.loading import load_tokenizer
    from saefd_ray.preflight import check_run

    started = time.time()
    select_accelerator(config.distributed.use_gpu)  # transformers imports DeepSpeed: tell it, not let it guess
    tasks = load_tasks(config)  # every input is checked before anything is written or any worker starts
    method = build_method(config)
    sae_folders = method.sae_folders()  # an SAE path unset or wrong fails here, before a model is fetched (minutes)
    model_path = resolve_model_path(config.model, tokenizer_corpus(tasks))
    tokenizer = load_tokenizer(model_path, config.model.require_chat_template)
    method.validate(model_path)  # e.g. an SAE that does not fit the model fails here, before any training
    check_run(config, tasks, model_path, tokenizer, method.joint_training)  # what every worker would build
    inputs = input_digests(tasks, model_path, sae_folders)
    run_dir = prepare_run_dir(config, inputs)
    init_ray(config.distributed.ray_address)

    names = [t.name for t in tasks]
    stages = [0] if method.joint_training else list(range(len(tasks)))
    rows: list[list[float]] = []  # test: the report
    rows_validation: list[list[float]] = []  # validation: what selection reads
    base_row_cache = adopted = None
    timings: dict[str, float] = {}
    state_in: Path | None = None
    step_offset = 0  # optimizer steps of the earlier stages: the TensorBoard x axis runs over the whole sequence
    model_digest = inputs["model"] if Path(model_path).expanduser().exists() else None
    base_cache = base_rows.entries(config, tasks, model_digest)  # base scores earlier runs on this root computed
    first_key = first_task.key(config, tasks, model_digest) if method.plain_first_task else None
    show = progress and not verbose()
    for index in stages:
        label = "all" if method.joint_training else names[index]
        folder = task_dir(run_dir, index, label)
        if is_complete(folder):
            print(f"task {index + 1}/{len(tasks)} {label}: finished earlier, not trained again")
        else:
            began = time.time()
            examples = method.training_examples(index, tasks, state_in)
            stage = f"task {index + 1}/{len(tasks)} {label}: training on {len(examples)} examples"
            shared = first_task.lookup(config, first_key) if index == 0 else None
            if shared is not None:
                trained_by = json.loads((shared / ROW_FILE).read_text())["trained_by"]
                stage = f"task 1/{len(tasks)} {label}: the task 1 that run {trained_by!r} trained (train/first_task.py)"
            if not show:
                print(stage, flush=True)
            with StageProgress(stage, enabled=show) as bar:
                observe = {"tb_dir": str(run_dir / "tb"), "progress": bar.channel, "step_offset": step_offset}
                checkpoint = run_task(config, index, tasks, model_path, state_in, examples, score_base=index == 0,
                                      observe=observe, base_cache=base_cache if index == 0 else None,
                                      shared_first_task=shared)
            publish(checkpoint, folder)
            if index == 0 and shared is None:
                first_task.store(config, first_key, folder, config.output.run_name)
            timings[f"task_{label}_s"] = round(time.time() - began, 2)
        metrics = json.loads((folder / ROW_FILE).read_text())
        step_offset += metrics.get("planned_steps") or metrics.get("steps") or 0
        if index == 0:
            adopted = metrics.get("first_task")  # task 1 another run on this root trained (train/first_task.py)
            rows.append(metrics["base_row"])
            rows_validation.append(metrics["base_row_validation"])
            base_rows.store(config, base_cache, metrics)
            base_row_cache = {"folder": str(base_rows.cache_folder(config)), "tasks": metrics.get("base_cache"),
                              "scoring_s": metrics.get("base_scoring_s")}
        rows.append(metrics["row"])
        rows_validation.append(metrics["row_validation"])
        state_in = folder
        if on_task_end is not None:
            on_task_end(index, [list(row) for row in rows_validation])

    results = {
        "method": config.method.name,
        "model": config.model.name_or_path,
        "tasks": names,
        "r_matrix": rows,
        "summary": summarize(rows, names),
        "r_matrix_validation": rows_validation,
        "summary_validation": summarize(rows_validation, names),
        "validation": {t.name: {"source": t.validation_source, "size": len(t.validation)} for t in tasks},
        "base_row_cache": base_row_cache,  # per task: digest, and whether its base scores came from the cache
        "first_task": adopted,  # None, or the key and run name of the stored task 1 this run adopted
        "environment": base_rows.environment(),  # library versions and CPU instruction set (the driver's)
        "timings": {"total_s": round(time.time() - started, 2), **timings},  # this call's
        "timings_earlier_calls": _earlier_timings(run_dir),  # a resumed or re-run sequence keeps what came before
        "config": config.model_dump(mode="json"),
    }
    write_report(run_dir, results)
    print_r_matrix(results)
    print(f"report: {run_dir / 'report.md'}   curves: tensorboard --logdir {run_dir / 'tb'}")
    return results
