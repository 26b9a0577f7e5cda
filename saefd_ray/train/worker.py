"""The Ray Train worker loop: train one task with DeepSpeed ZeRO + LoRA, then score the R-matrix rows.

One call trains one task of the sequence. It rebuilds the model from the base weights plus the previous
task's checkpoint (so any worker, on any node, can run any task), asks the method for its extra loss every
step, and ends by writing the task checkpoint — adapter, method state, the validation and test R rows — through
`ray.train.report`. Mid-task checkpoints (every `training.checkpoint_every` steps) let Ray restart a killed
worker group from the last one instead of from the task's start.
"""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch

from saefd_ray.config import RunConfig
from saefd_ray.data.render import collate, encode, shard_batches
from saefd_ray.data.tasks import Task
from saefd_ray.methods.base import ADAPTER, TaskContext, load_adapter_weights, trainable_state
from saefd_ray.observe.monitor import TaskMonitor
from saefd_ray.train.deepspeed_setup import create_engine, select_accelerator

ROW_FILE = "row.json"
NONFINITE_FILE = "NONFINITE.txt"  # a marker checkpoint: the driver raises its message and publishes nothing
PROGRESS_FILE = "progress.pt"
TRAINED = ("base_cache", "base_scoring_s", "train_loss", "first_loss", "epoch_losses", "median_step_s", "steps",
           "resumed_from")  # row.json fields a stored task 1 (train/first_task.py) carries over
KILL_GRACE_S = 10  # fault injection: seconds between the last report and the kill (five of the controller's polls)
SPLITS = ("validation", "test")  # every stage scores both: validation chooses, test reports


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_task(loop: dict) -> None:
    """Ray Train entry point. `loop` holds the run config, the task index and the examples (see sequence.py)."""
    config = RunConfig.model_validate(loop["config"])
    select_accelerator(config.distributed.use_gpu)
    torch.set_num_threads(config.distributed.threads_per_worker)  # not Ray's OMP_NUM_THREADS: see the config
    from saefd_ray.eval.scoring import score_row
    from saefd_ray.methods import build_method
    from saefd_ray.models.loading import load_model, load_tokenizer

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = torch.device(f"cuda:{context.get_local_rank()}" if config.distributed.use_gpu else "cpu")
    if config.distributed.use_gpu:
        torch.cuda.set_device(device)
    task_index: int = loop["task_index"]
    tasks: list[Task] = loop["tasks"]
    seed_everything(config.training.seed + 1000 * task_index)

    tokenizer = load_tokenizer(loop["model_path"])
    model = load_model(loop["model_path"], config.model.dtype)
    method = build_method(config)
    workdir = Path(tempfile.mkdtemp(prefix="saefd-task-"))
    ctx = TaskContext(
        config=config,
        task_index=task_index,
        task_names=[t.name for t in tasks],
        model_path=loop["model_path"],
        tokenizer=tokenizer,
        state_in=Path(loop["state_in"]) if loop["state_in"] else None,
        state_out=workdir,
        train_examples=loop["train_examples"],
        past_tasks=tasks[:task_index],
        tasks=tasks,
        rank=rank,
        world_size=world,
        device=device,
        all_reduce=_mean_all_reduce,
    )
    model = method.prepare_model(model, ctx)
    method.load_state(ctx)
    # a task 1 another plain method trained on this root (train/first_task.py): adopt it, train nothing, and run
    # only this method's after_task on it
    shared = json.loads((Path(loop["first_task"]) / ROW_FILE).read_text()) if loop.get("first_task") else None
    if shared is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_adapter_weights(Path(loop["first_task"]) / ADAPTER))
    model.to(device)

    encoded = [
        encode(tokenizer, e, config.training.max_prompt_len, config.training.max_answer_len)
        for e in ctx.train_examples
    ]
    epochs = method.epochs(task_index, tasks)
    steps_per_epoch = len(shard_batches(encoded, config.training.batch_size, rank, world, 0))
    if steps_per_epoch == 0:
        raise ValueError(f"task {tasks[task_index].name!r}: too few examples for batch size and {world} workers")
    engine = create_engine(model, config, max(1, epochs * steps_per_epoch // config.training.grad_accum))
    monitor = TaskMonitor(loop.get("observe"), config, rank, epochs * steps_per_epoch)
    names = [t.name for t in tasks]

    base_rows, base_seconds = dict.fromkeys(SPLITS), None
    base_cache = loop.get("base_cache")  # per task: its cached base scores or None (train/base_rows.py)
    if shared is not None:
        base_rows = {"test": shared["base_row"], "validation": shared["base_row_validation"]}
    elif loop["score_base"]:  # LoRA B starts at zero, so the model equals the base model here
        began = time.perf_counter()
        base_rows = {split: score_row(engine.module, tokenizer, tasks, config, device, split,
                                      on_task=lambda done, n, s=split: monitor.scoring(done, n, s),
                                      known=_known(base_cache, split)) for split in SPLITS}
        base_seconds = round(time.perf_counter() - began, 3)

    start_epoch, start_step = _restore(engine, method)
    monitor.start(start_epoch * steps_per_epoch + start_step)
    if base_rows["test"] is not None:
        monitor.scores(names, base_rows["test"], at_start=True)
    restored = (start_epoch, start_step) != (0, 0)
    # the same random stream (LoRA dropout) for every method, whatever its setup drew (building an SAE draws its
    # init): task 1, which no method regularizes, is then the same run for all of them
    seed_everything(config.training.seed + 1000 * task_index)
    kill_at = tuple(loop["kill_at"]) if loop.get("kill_at") else None  # fault-injection for the resilience tests
    who = (rank, ray.get_runtime_context().get_node_id())  # a kill names a rank, or a node by its id
    step_time, losses, epoch_losses = [], [], []
    for epoch in range(start_epoch, epochs if shared is None else 0):
        batches = shard_batches(encoded, config.training.batch_size, rank, world, config.training.seed * 7919 + epoch)
        epoch_start = len(losses)
        for step, items in enumerate(batches):
            if epoch == start_epoch and step < start_step:
                continue
            began = time.perf_counter()
            batch = {k: v.to(device) for k, v in collate(items, tokenizer.pad_token_id).items()}
            task_loss = engine(**batch).loss
            extra, logs = method.regularizer(engine.module, batch, task_loss)
            total = task_loss if extra is None else task_loss + extra
            if _any_rank(not torch.isfinite(total.detach()).item(), device):  # all ranks agree: no hang
                message = _nonfinite(config, tasks[task_index].name, epoch, step, task_loss, extra)
                if message is None:
                    continue
                _report_nonfinite(message, rank)
                return
            engine.backward(total)
            engine.step()
            step_time.append(time.perf_counter() - began)
            losses.append(float(task_loss.detach()))
            monitor.step(epoch * steps_per_epoch + step + 1, float(_mean_all_reduce(task_loss.detach().float())), logs,
                         engine.get_lr()[0], engine.get_global_grad_norm(), step_time[-1])
            every = config.training.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < len(batches):
                _report_progress(engine, method, epoch, step + 1, rank, config, logs, losses)
            if kill_at and kill_at[:3] == (task_index, epoch, step + 1) and kill_at[3] in who:
                # Ray Train's controller collects reports when it polls the workers (every 2 s): without this wait a
                # kill right after a report can lose every checkpoint of the attempt, and the retry starts the task over
                time.sleep(KILL_GRACE_S)
                os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, as an OOM kill or a lost node would be
        if len(losses) > epoch_start:
            epoch_losses.append(float(np.mean(losses[epoch_start:])))
            if rank == 0:  # in the Ray worker log; the driver's console shows the progress bar instead
                print(f"[{tasks[task_index].name}] epoch {epoch + 1}/{epochs} loss {epoch_losses[-1]:.4f}")

    method.after_task(engine.module, ctx)
    rows = {"test": shared["row"], "validation": shared["row_validation"]} if shared else {
        split: method.adjust_row(score_row(engine.module, tokenizer, tasks, config, device, split,
                                           on_task=lambda done, n, s=split: monitor.scoring(done, n, s)),
                                 base_rows[split], ctx, split) for split in SPLITS}
    monitor.scores(names, rows["test"])
    monitor.close()
    adapter = trainable_state(engine.module, config.distributed.zero_stage)
    metrics = {
        "row": rows["test"],  # the report's R matrix
        "base_row": base_rows["test"],
        "row_validation": rows["validation"],  # the R matrix that Tune and any selection read
        "base_row_validation": base_rows["validation"],
        # per task of the base row: its base-row cache digest and whether it came from there (train/base_rows.py)
        "base_cache": [{"task": e["task"], "digest": e["digest"], "cached": e["known"] is not None}
                       for e in base_cache] if loop["score_base"] and base_cache else None,
        "base_scoring_s": base_seconds,
        "train_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "first_loss": float(losses[0]) if losses else None,
        "epoch_losses": epoch_losses,  # rank 0's mean task loss per epoch (this process's steps, after a resume)
        "median_step_s": float(np.median(step_time)) if step_time else None,
        "steps": len(losses),
        "planned_steps": epochs * steps_per_epoch,  # the driver's TensorBoard step offset of the next task
        "resumed_from": [start_epoch, start_step] if restored else None,  # set after a worker-group restart
    }
    if shared is not None:  # the training the stored task 1 did, and where it came from
        metrics.update({k: shared[k] for k in TRAINED if k in shared},
                       first_task={"key": shared["key"], "trained_by": shared["trained_by"]})
    checkpoint = None
    if rank == 0:
        _write_task_checkpoint(engine.module, adapter, workdir, metrics)
        checkpoint = ray.train.Checkpoint.from_directory(str(workdir))
    ray.train.report(metrics, checkpoint=checkpoint)


def _known(base_cache: list[dict] | None, split: str) -> list[float | None] | None:
    """The base scores of `split` the driver found cached (None: score that task), for score_row."""
    return [(entry["known"] or {}).get(split) for entry in base_cache] if base_cache else None


def _mean_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def _report_nonfinite(message: str, rank: int) -> None:
    """Hand the message to the driver (Ray Train V2 returns the metrics of the latest checkpoint only)."""
    checkpoint = None
    if rank == 0:
        folder = Path(tempfile.mkdtemp(prefix="saefd-nonfinite-"))
        (folder / NONFINITE_FILE).write_text(message)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report({"nonfinite": message}, checkpoint=checkpoint)


def _any_rank(flag: bool, device) -> bool:
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _nonfinite(config: RunConfig, task: str, epoch: int, step: int, task_loss, extra) -> str | None:
    """None: skip this step (configured). Otherwise the one-line message naming task, step and loss term."""
    bad_task = not torch.isfinite(task_loss.detach()).item()
    term = "task loss" if bad_task else "regularizer"
    if config.training.on_nonfinite == "skip":
        print(f"warning: task {task!r} epoch {epoch + 1} step {step}: non-finite {term}, step skipped", flush=True)
        return None
    value = float(task_loss) if bad_task else float(extra) if extra is not None else float("nan")
    return f"task {task!r} epoch {epoch + 1} step {step}: {term} is {value}; stopped, last good checkpoint kept"


def _write_task_checkpoint(model, adapter: dict, folder: Path, metrics: dict) -> None:
    """adapter/ as a peft folder (safetensors), plus the row; method state was written by after_task."""
    from safetensors.torch import save_file

    (folder / ADAPTER).mkdir(parents=True, exist_ok=True)
    peft_names = {_peft_key(name): tensor for name, tensor in adapter.items()}
    save_file(peft_names, str(folder / ADAPTER / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(folder / ADAPTER))
    (folder / ROW_FILE).write_text(json.dumps(metrics))


def _peft_key(name: str) -> str:
    """peft's on-disk key: the parameter name without the adapter name (what save_pretrained writes)."""
    return name.replace(".default.weight", ".weight").replace(".default.bias", ".bias")


def _report_progress(engine, method, epoch: int, step: int, rank: int, config, logs: dict, losses: list) -> None:
    """A mid-task checkpoint: DeepSpeed's own (per-rank ZeRO optimizer shards, LoRA weights only) + position.

    Every rank writes its shard into a folder of the same name and reports it; Ray merges the ranks' files
    into one checkpoint, so this works across nodes too.
    """
    folder = Path(tempfile.mkdtemp(prefix="saefd-progress-"))
    engine.save_checkpoint(str(folder), tag="ds", exclude_frozen_parameters=True)
    if rank == 0:
        position = {"epoch": epoch, "step": step, "method": getattr(method, "progress_state", lambda: None)()}
        torch.save(position, folder / PROGRESS_FILE)
    checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report({"epoch": epoch, "step": step, "loss": losses[-1], **logs}, checkpoint=checkpoint)


def _restore(engine, method) -> tuple[int, int]:
    """Continue from Ray's latest mid-task checkpoint after a worker failure; (0, 0) on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as folder:
        if not (Path(folder) / PROGRESS_FILE).exists():
            return 0, 0
        position = torch.load(Path(folder) / PROGRESS_FILE, weights_only=False)
        engine.load_checkpoint(folder, tag="ds", load_module_strict=False)
    if position.get("method") is not None and hasattr(method, "load_progress_state"):
        method.load_progress_state(position["method"])
    print(f"resumed from mid-task checkpoint: epoch {position['epoch'] + 1} step {position['step']}", flush=True)
    return position["epoch"], position["step"]
