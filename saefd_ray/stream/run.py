"""The SAE training driver: instances → Ray Data activation stream → Ray Train sharded SAE trainer → report.

Re-running the same config resumes: the workers reload the last checkpoint (weights, optimizer, dead counters,
step) and the stream skips every instance some worker had already read (their unserved buffer tokens are dropped,
as FAST's buffer does on a restart without its contents). A run that already reached its token budget only
re-evaluates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from saefd_ray.errors import CheckpointError
from saefd_ray.io import atomic_write_text, tree_digest
from saefd_ray.stream.config import SaeTrainConfig

CONFIG_FILE = "sae_config.json"


def fingerprint(config: SaeTrainConfig) -> str:
    """What a checkpoint depends on (budget, logging and worker count may change between runs; latent-sharded
    resumes check the worker count themselves)."""
    keep = config.model_dump(mode="json", include={"model", "layers", "data", "sae"})
    for key in ("harvest_actors", "cpus_per_actor", "gpus_per_actor", "cache", "cache_dir", "window",
                "max_batch_tokens", "max_padding"):
        keep["data"].pop(key, None)
    keep["sharding"] = config.distributed.sharding
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def input_digests(plan, model_path: str) -> dict[str, str]:
    """What defines the SAE besides the config: the input plan's digest (source file digests + selection) and the
    model files (`io.tree_digest`)."""
    model = tree_digest(model_path) if Path(model_path).expanduser().exists() else model_path
    return {"data": plan.digest, "model": model}


def prepare_run_dir(config: SaeTrainConfig, inputs: dict[str, str] | None = None) -> Path:
    """Claim the run folder. One holding a checkpoint is protected against another config or other inputs; one
    without (a start that failed before the first checkpoint) is taken over, its Ray Train state removed."""
    from saefd_ray.stream.checkpoint import CKPT_DIR, latest_checkpoint

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    fp, inputs = fingerprint(config), inputs or {}
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [] if saved.get("fingerprint") == fp else ["config"]
        old = saved.get("inputs", inputs)  # folders from before inputs were recorded: config only
        changed += [key for key in sorted(set(inputs) | set(old)) if inputs.get(key) != old.get(key)]
        if changed and latest_checkpoint(run_dir) is not None:
            raise CheckpointError(f"{run_dir}: holds an SAE run with a different {' / '.join(changed)}; "
                                  f"use another output.run_name or delete the folder")
        if changed:
            print(f"[sae] {run_dir}: no checkpoint yet; starting it over with the new {', '.join(changed)}", flush=True)
            shutil.rmtree(run_dir / "ray", ignore_errors=True)
            shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
    atomic_write_text(path, json.dumps({"fingerprint": fp, "inputs": inputs,
                                        "config": config.model_dump(mode="json")}, indent=1))
    return run_dir


def tokenizer_texts(config: SaeTrainConfig, per_task: int = 200) -> list[str]:
    """For the offline tiny model: the texts run_sequence trains its tokenizer on, from the task sources."""
    from saefd_ray.data.tasks import load_task
    from saefd_ray.stream.sources import TaskShim

    texts = []
    for src in config.data.sources:
        if src.kind == "task":
            task = load_task(src.task, TaskShim(config))
            texts += [t for e in task.train[:per_task] for t in (e.prompt, e.answer)]
    return texts


def init_ray(config: SaeTrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.distributed.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # a cluster or a submitted job: join it as run_sequence does
        # ("local" asks for a fresh local Ray: started below with the CPUs trainer + harvest actors + reader need)
        from saefd_ray.train.sequence import init_ray as join_cluster

        join_cluster(address)
        return
    d, data = config.distributed, config.data
    # + 1: the instance stream's read tasks (stream/instances.py) take a CPU each; sized to trainer + actors alone,
    # Ray never schedules them once both hold their CPUs, and the harvest waits forever for its first window
    need = d.num_workers * d.cpus_per_worker + data.harvest_actors * data.cpus_per_actor + 1
    from saefd_ray.observe.console import ray_init_options
    from saefd_ray.train.sequence import pin_state_api

    pin_state_api()
    ray.init(address=address, num_cpus=max(os.cpu_count() or 1, int(np.ceil(need))), include_dashboard=False,
             **ray_init_options())


def model_dims(model_path: str) -> tuple[int, int]:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    return int(cfg.hidden_size), int(cfg.num_hidden_layers)


def fit(config: SaeTrainConfig, dataset, *, d_in: int, n_instances: int, run_dir: Path, resume: Path | None = None,
        deterministic: bool = False, chunk_rows: int = 1024, model_name: str | None = None,
        observe: dict | None = None) -> dict:
    """One Ray Train run of the sharded SAE trainer over the activation-row `dataset`.

    `deterministic`: the dataset is not split; every worker reads it whole, in order, and keeps every world-th
    chunk of `chunk_rows` rows (shards a test can rebuild, at the cost of reading it `world` times). Otherwise Ray
    Train's streaming_split gives each worker a disjoint share (the stream in input order, each block to the worker
    with the fewest rows so far), so a run is reproducible either way.
    """
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from saefd_ray.stream.sharded import train_loop_per_worker
    from saefd_ray.train.failures import fit_with_retries

    d = config.distributed
    # preserve_order: blocks leave each operator in input order, not in the order parallel read tasks and harvest
    # actors happen to finish, and streaming_split deals them out by a fixed rule — the same seed trains the same SAE
    ordered = ExecutionOptions(preserve_order=True)  # not default_ingest_options(): it sets a deprecated field
    data_config = DataConfig(datasets_to_split=[] if deterministic else "all", execution_options=ordered)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "d_in": d_in, "n_instances": n_instances,
                           "run_dir": str(run_dir), "resume": str(resume) if resume else None,
                           "chunk_rows": chunk_rows, "deterministic": deterministic, "model_name": model_name,
                           "observe": observe or {"tb_dir": str(run_dir / "tb")}},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker}),
        datasets={"train": dataset},
        dataset_config=data_config,
        run_config=RunConfig(name=f"{config.output.run_name}-sae", storage_path=str(run_dir / "ray")),
    )
    result = fit_with_retries(lambda: trainer, 0, "SAE training")  # a UserError in a worker: one line, exit 2
    return dict(result.metrics or {})


def schedule_used(config: SaeTrainConfig) -> dict:
    """The LR / sparsity schedule the trainer runs (FAST's lengths scaled to the run when they do not fit it)."""
    from saefd_ray.sae.recipe import fit_schedule

    t = config.training
    return fit_schedule(t.tokens // t.batch_size, t.lr_warmup_steps, t.lr_decay_steps, t.sparsity_warmup_steps)


PADDING_FILE = "padding.json"


def padding_report(config: SaeTrainConfig, plan, model_path: str, run_dir: Path) -> dict:
    """The bucketing's padding waste over the training stream, computed once in Ray Data (`stream_padding`) and
    kept in the run folder for later re-evaluations."""
    from saefd_ray.stream.instances import instance_stream, stream_padding

    path = run_dir / PADDING_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("data") == plan.digest:
            return saved["padding"]
    init_ray(config)
    padding = stream_padding(instance_stream(plan), model_path, config)
    atomic_write_text(path, json.dumps({"data": plan.digest, "padding": padding}))
    return padding


def train_sae(config: SaeTrainConfig) -> dict:
    from saefd_ray.models.loading import load_tokenizer, resolve_model_path
    from saefd_ray.stream.plan import plan_inputs
    from saefd_ray.stream.report import evaluate_checkpoint, write_report
    from saefd_ray.stream.checkpoint import PROGRESS, latest_checkpoint
    from saefd_ray.errors import ConfigError

    from saefd_ray.preflight import check_sae_run
    from saefd_ray.train.deepspeed_setup import select_accelerator

    select_accelerator(config.distributed.use_gpu)  # transformers imports DeepSpeed: tell it, don't let it guess
    plan = plan_inputs(config)  # every source scanned (counts, digests, first records) before anything is written
    held = plan.held_instances()
    model_path = resolve_model_path(config.model, tokenizer_texts(config))
    d_in, n_layers = model_dims(model_path)
    for layer in config.layers:
        if layer >= n_layers:
            raise ConfigError(f"layers: layer {layer} is out of range for a model with {n_layers} decoder layers")
    tokenizer = load_tokenizer(model_path, config.model.require_chat_template)
    check_sae_run(config, plan.first_instances(), tokenizer, d_in)
    run_dir = prepare_run_dir(config, input_digests(plan, model_path))
    print(f"[sae] {plan.n_train} training instances, {len(held)} held out ({plan.total} records in "
          f"{len(plan.sources)} sources); model {model_path} (d={d_in})", flush=True)
    from saefd_ray.stream.report import describe_schedule

    print(f"[sae] {describe_schedule(schedule_used(config))}", flush=True)
    resume = latest_checkpoint(run_dir)
    progress = json.loads((resume / PROGRESS).read_text()) if resume else None
    fit_metrics: dict = {}
    if progress and (progress["tokens"] >= config.training.tokens or progress.get("ran_out_of_data")):
        print(f"[sae] {resume} already reached the budget; evaluating only", flush=True)
    else:
        if resume:
            print(f"[sae] resuming from {resume} ({progress['tokens']:,} tokens)", flush=True)
        init_ray(config)
        from saefd_ray.stream.pipeline import activation_dataset
        from saefd_ray.stream.checkpoint import CONSUMED

        skip = np.load(resume / CONSUMED) if resume else None  # a bool per instance id
        dataset, source = activation_dataset(config, model_path, plan, skip=skip)
        from saefd_ray.observe.console import StageProgress, verbose

        stage = f"[sae] training {config.sae.architecture} SAE on layers {config.layers}"
        with StageProgress(stage, enabled=not verbose()) as bar:
            fit_metrics = fit(config, dataset, d_in=d_in, n_instances=plan.total,
                              run_dir=run_dir, resume=resume, model_name=model_path,
                              observe={"tb_dir": str(run_dir / "tb"), "progress": bar.channel})
        fit_metrics.update(source=source, skipped_instances=int(skip.sum()) if skip is not None else 0)
        resume = latest_checkpoint(run_dir)
        progress = json.loads((resume / PROGRESS).read_text())
    padding = padding_report(config, plan, model_path, run_dir)
    evaluation = evaluate_checkpoint(resume, model_path, held, config.layers, config.data.max_len,
                                     config.model.dtype, config.data.max_batch_tokens, config.data.sink_norm_ratio)
    report = {
        "run_name": config.output.run_name, "model": model_path, "layers": config.layers,
        "architecture": config.sae.architecture, "checkpoint": str(resume), "source": fit_metrics.get("source"),
        "padding": padding,
        "training": {"tokens": progress["tokens"], "steps": progress["steps"], "workers": progress["world"],
                     "sharding": progress["sharding"], "ran_out_of_data": progress.get("ran_out_of_data"),
                     "tokens_per_s": fit_metrics.get("tokens_per_s"), "last": progress.get("last"),
                     "schedule": schedule_used(config),
                     "sink_tokens": fit_metrics.get("sink_tokens"), "activation_scale": fit_metrics.get("activation_scale"),
                     "normalize_activations": config.sae.normalize_activations},
        "eval": evaluation,
    }
    write_report(run_dir, report)
    for layer, m in evaluation["layers"].items():
        special = "n/a" if m["log2_mse_special"] is None else f"{m['log2_mse_special']:.2f}"
        print(f"[sae] layer {layer}: FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  dead {100 * (m['dead_fraction_train'] or 0):.1f}%"
              f"  log2 MSE special {special}  CE recovered {m['ce_loss_recovered']:.3f}", flush=True)
    print(f"[sae] report: {run_dir / 'sae_report.md'}   curves: tensorboard --logdir {run_dir / 'tb'}", flush=True)
    return report
