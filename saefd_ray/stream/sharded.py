"""Sharded SAE training on Ray Train: the worker loop that feeds the streamed activation rows to a data-parallel
(`data_parallel.py`) or latent-sharded (`latent_sharded.py`) trainer and checkpoints it (`checkpoint.py`).

Data layout (both modes). Each worker reads its shard of the activation dataset with
`get_dataset_shard("train").iter_torch_batches(...)`, splits the rows by layer and feeds one FAST mixing buffer per
layer (seeded by rank and layer). At every step each worker takes one local batch of `batch_size / world` tokens per
layer; the *global* batch is the concatenation of the workers' local batches in rank order. A single-process run
whose batch t is that concatenation is the reference both modes match (`tests/test_stream_sharded.py`).
b_dec is initialised from the first mixing-buffer fill of every worker (their union, by all-reduced Weiszfeld sums).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from saefd_ray.sae import SAEConfig, SparseAutoencoder, build_sae
from saefd_ray.sae.buffer import MixingBuffer
from saefd_ray.sae.sinks import METADATA_KEY as SINK_KEY
from saefd_ray.sae.trainer import TrainerConfig
from saefd_ray.stream.checkpoint import load_checkpoint, save_distributed_checkpoint, write_history
from saefd_ray.stream.data_parallel import DataParallelTrainer
from saefd_ray.stream.latent_sharded import LatentShardedTrainer
from saefd_ray.stream.shard_common import ShardedTrainerBase, all_reduce_

def trainer_config(training, total_steps: int) -> TrainerConfig:
    return TrainerConfig(
        total_steps=max(1, total_steps), lr=training.lr, lr_end=training.lr_end,
        lr_warmup_steps=training.lr_warmup_steps, lr_decay_steps=training.lr_decay_steps,
        sparsity_warmup_steps=training.sparsity_warmup_steps, grad_clip=training.grad_clip,
        dead_window_tokens=training.dead_window_tokens, b_dec_init=training.b_dec_init,
    )


def make_trainer(full: SparseAutoencoder, cfg: TrainerConfig, sharding: str = "data",
                 normalize_activations: str = "none") -> ShardedTrainerBase:
    """This rank's trainer for `full`: the whole SAE (`data`) or its latent slice (`latent`)."""
    kind = LatentShardedTrainer if sharding == "latent" else DataParallelTrainer
    return kind(full, cfg, normalize_activations)


# ------------------------------------------------------------------------------------------- the data side


class LayerFeeder:
    """Splits a stream of row batches by layer into per-layer chunk queues, pulled lazily by the buffers."""

    def __init__(self, upstream: Iterable[dict[str, Tensor]], layers: list[int],
                 on_batch: Callable[[dict[str, Tensor]], None] | None = None):
        self.upstream: Iterator = iter(upstream)
        self.layers = layers
        self.queues: dict[int, deque] = {layer: deque() for layer in layers}
        self.exhausted = False
        self.on_batch = on_batch
        self.sinks_dropped = 0  # attention-sink rows (is_sink) kept out of training

    def _pull(self) -> None:
        try:
            batch = next(self.upstream)
        except StopIteration:
            self.exhausted = True
            return
        if self.on_batch is not None:
            self.on_batch(batch)
        acts, layer_col = batch["activation"], batch["layer"]
        sink = batch.get("is_sink")
        if sink is not None and bool(sink.any()):
            keep = ~sink.bool()
            self.sinks_dropped += int((~keep).sum())
            acts, layer_col = acts[keep], layer_col[keep]
        if len(self.layers) == 1:
            self.queues[self.layers[0]].append(acts.float())
            return
        for layer in self.layers:
            sel = layer_col == layer
            if bool(sel.any()):
                self.queues[layer].append(acts[sel].float())

    def source(self, layer: int) -> Iterator[Tensor]:
        q = self.queues[layer]
        while True:
            if q:
                yield q.popleft()
            elif self.exhausted:
                return
            else:
                self._pull()


def layer_buffers(feeder: LayerFeeder, layers: list[int], capacity: int, local_batch: int, seed: int,
                  rank: int) -> dict[int, MixingBuffer]:
    return {layer: MixingBuffer(feeder.source(layer), capacity=capacity, batch_size=local_batch,
                                seed=buffer_seed(seed, rank, layer)) for layer in layers}


def buffer_seed(seed: int, rank: int, layer: int) -> int:
    return seed * 1_000_003 + rank * 1009 + layer


def stride(batches: Iterable, rank: int, world: int) -> Iterator:
    """Deterministic sharding of an unsplit stream: batch i goes to rank i mod world."""
    for i, b in enumerate(batches):
        if i % world == rank:
            yield b


# ------------------------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(loop: dict) -> None:
    """Ray Train entry point. `loop`: config (SaeTrainConfig dump), d_in, n_instances, run_dir, resume (path|None),
    chunk_rows, deterministic (bool: every worker reads the full stream and keeps every world-th batch)."""
    import ray.train

    from saefd_ray.stream.config import SaeTrainConfig

    config = SaeTrainConfig.model_validate(loop["config"])
    t, d = config.training, config.distributed
    torch.set_num_threads(d.threads_per_worker or max(1, int(d.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed)
    layers = config.layers
    d_in = int(loop["d_in"])
    full_cfg = sae_config(config, d_in, loop.get("model_name"))
    total_steps = t.tokens // t.batch_size
    run_dir = Path(loop["run_dir"])

    trainers: dict[int, ShardedTrainerBase] = {}
    for layer in layers:
        full = build_sae(full_cfg(layer), seed=t.seed + layer)
        trainers[layer] = make_trainer(full, trainer_config(t, total_steps), d.sharding,
                                       config.sae.normalize_activations)
    consumed = np.zeros(int(loop["n_instances"]), dtype=bool)
    if loop.get("resume"):
        load_checkpoint(Path(loop["resume"]), trainers, consumed, rank, world, d.sharding)

    def on_batch(batch: dict[str, Tensor]) -> None:
        consumed[batch["instance_id"].numpy()] = True

    shard = ray.train.get_dataset_shard("train")
    upstream = shard.iter_torch_batches(batch_size=loop["chunk_rows"], prefetch_batches=2)
    if loop.get("deterministic"):
        upstream = stride(upstream, rank, world)
    local_batch = t.batch_size // world
    feeder = LayerFeeder(upstream, layers, on_batch)
    buffers = layer_buffers(feeder, layers, t.buffer_tokens, local_batch, t.seed, rank)
    iters = {layer: iter(buf) for layer, buf in buffers.items()}

    every = t.checkpoint_every_tokens
    next_ckpt = (trainers[layers[0]].tokens_seen // every + 1) * every if every else None
    history: list[dict] = []
    began, tokens_at_start = time.perf_counter(), trainers[layers[0]].tokens_seen
    from saefd_ray.observe.monitor import SaeMonitor

    monitor = SaeMonitor(loop.get("observe"), rank, total_steps, trainers[layers[0]].step_count)
    last = began
    ran_out, first_step = False, None
    while trainers[layers[0]].tokens_seen < t.tokens:
        batches = {}
        for layer in layers:
            batches[layer] = next(iters[layer], None)
        ok = torch.tensor(int(all(b is not None and b.shape[0] == local_batch for b in batches.values())))
        all_reduce_(ok, dist.ReduceOp.MIN if world > 1 else None)
        if not int(ok):
            ran_out = True
            break
        step_metrics = {layer: trainers[layer].step(batches[layer], buffers[layer].first_fill) for layer in layers}
        for buffer in buffers.values():
            buffer.first_fill = None  # read once (b_dec init): free it
        tr0 = trainers[layers[0]]
        if not all(math.isfinite(m["loss"]) for m in step_metrics.values()):
            from saefd_ray.errors import NonFiniteLossError

            raise NonFiniteLossError(f"SAE step {tr0.step_count}: non-finite loss {step_metrics}")
        if first_step is None:  # the steady rate starts after the first step (buffer filled, stream running)
            first_step = (time.perf_counter(), tr0.tokens_seen)
        history.append({"step": tr0.step_count, "tokens": tr0.tokens_seen,
                        **{f"L{layer}/{k}": v for layer, m in step_metrics.items() for k, v in m.items()}})
        now = time.perf_counter()
        monitor.step(tr0.step_count, step_metrics, (tr0.tokens_seen - tokens_at_start) / max(now - began, 1e-9),
                     now - last)
        last = now
        if tr0.step_count % t.log_every_steps == 0:
            now = time.perf_counter()
            rate = (tr0.tokens_seen - tokens_at_start) / max(now - began, 1e-9)
            if rank == 0:
                parts = [f"L{layer} mse {m['mse']:.4g} l0 {m['l0']:.1f} dead {100 * m['dead_fraction']:.1f}%"
                         for layer, m in step_metrics.items()]
                print(f"[sae] step {tr0.step_count} tokens {tr0.tokens_seen:,} ({rate:,.0f} tok/s) "
                      + " | ".join(parts), flush=True)
        if next_ckpt and tr0.tokens_seen >= next_ckpt and tr0.tokens_seen < t.tokens:
            save_distributed_checkpoint(run_dir, trainers, consumed, rank, world, history_tail=history[-1])
            next_ckpt += every
    elapsed = time.perf_counter() - began
    tr0 = trainers[layers[0]]
    path = save_distributed_checkpoint(run_dir, trainers, consumed, rank, world, history_tail=history[-1] if
                                       history else None, final=True, ran_out=ran_out)
    monitor.close()
    if rank == 0:
        write_history(run_dir, history, loop.get("resume") is not None)
    sinks = int(all_reduce_(torch.tensor(feeder.sinks_dropped, dtype=torch.int64)))
    metrics = {"steps": tr0.step_count, "tokens": tr0.tokens_seen, "elapsed_s": elapsed, "sink_tokens": sinks,
               "activation_scale": {str(layer): tr.scale for layer, tr in trainers.items()},
               "tokens_per_s": (tr0.tokens_seen - tokens_at_start) / max(elapsed, 1e-9),
               "steady_tokens_per_s": _steady_rate(first_step, tr0.tokens_seen),
               "ran_out_of_data": ran_out, "checkpoint": str(path),
               "losses": [h[f"L{layers[0]}/loss"] for h in history]}
    # Train V2 hands the driver the metrics of the last report that carried a checkpoint: rank 0 attaches a tiny
    # one (the real checkpoint lives in run_dir, see save_distributed_checkpoint).
    if rank == 0:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="saefd-sae-result-"))
        (folder / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    else:
        ray.train.report(metrics)


def _steady_rate(first_step: tuple[float, int] | None, tokens: int) -> float | None:
    """Tokens/s after the first step: start-up, stream warm-up and the first buffer fill excluded."""
    if first_step is None or tokens <= first_step[1]:
        return None
    return (tokens - first_step[1]) / max(time.perf_counter() - first_step[0], 1e-9)


def sae_config(config, d_in: int, model_name: str | None = None) -> Callable[[int], SAEConfig]:
    a = config.sae

    def make(layer: int) -> SAEConfig:
        return SAEConfig(a.architecture, d_in, a.width or a.expansion * d_in, k=a.k,
                         sparsity_coefficient=a.sparsity_coefficient, apply_b_dec_to_input=a.apply_b_dec_to_input,
                         metadata={"model_name": model_name or config.model.name_or_path,
                                   "hook_name": f"model.layers.{layer}", "hook_layer": layer,
                                   "context_size": config.data.max_len, "prepend_bos": True,
                                   **({SINK_KEY: ratio} if (ratio := config.data.sink_norm_ratio) else {})})
    return make
