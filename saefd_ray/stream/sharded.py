"""Sharded SAE training on Ray Train: data parallel or latent sharded, both fed by the streamed activation rows.

Data layout (both modes). Each worker reads its shard of the activation dataset with
`get_dataset_shard("train").iter_torch_batches(...)`, splits the rows by layer and feeds one FAST mixing buffer per
layer (seeded by rank and layer). At every step each worker takes one local batch of `batch_size / world` tokens per
layer; the *global* batch is the concatenation of the workers' local batches in rank order. A single-process run
whose batch t is that concatenation is the reference both modes match (`tests/test_stream_sharded.py`).

(a) `sharding="data"`: every worker holds the whole SAE. Loss terms are token means, so averaging the workers'
gradients (one flat all-reduce) gives the gradient of the global batch; fired-latent masks are all-reduced (max)
and token counts summed before the update, so dead-latent counters, the LR schedule and the optimizer state stay
identical on every worker. Metrics are averaged.

(b) `sharding="latent"`: worker r holds latents [r·m, (r+1)·m) — those rows of `W_enc` and `W_dec` and the per-latent
biases — and a replica of `b_dec`. The local batches are all-gathered so every worker encodes the global batch with
its slice; the partial reconstructions `f_r W_dec,r` are summed with an all-reduce whose backward is the identity
(each partial affects the loss only through the sum), as are the additive loss terms (L1 / L0). TopK takes each
shard's top-k candidates, all-gathers their values and keeps the global top k. `b_dec`'s gradient is summed over
workers (it is added on rank 0 only, so its decoder-side term is counted once); gradient clipping uses the global
norm. The optimizer state of each slice lives on its worker only.

b_dec is initialised from the first global batch (gathered), as the single-process trainer does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from saefd_ray.sae import SAEConfig, SparseAutoencoder, build_sae
from saefd_ray.sae.base import ForwardOutput, mse_loss
from saefd_ray.sae.buffer import MixingBuffer
from saefd_ray.sae.trainer import SAETrainer, TrainerConfig

LATENT_PARAMS = ("W_enc", "W_dec", "b_enc", "b_gate", "r_mag", "b_mag", "log_threshold")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------- collectives


class _SumIdentityBackward(torch.autograd.Function):
    """Forward: all-reduce sum. Backward: identity (every rank computes the same loss from the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        if _world()[1] > 1:
            dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def sum_across(x: Tensor) -> Tensor:
    return _SumIdentityBackward.apply(x)


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order (no gradient)."""
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_(x: Tensor, op=None) -> Tensor:
    if _world()[1] > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


# ------------------------------------------------------------------------------------------- latent slices


def shard_bounds(d_sae: int, rank: int, world: int) -> tuple[int, int]:
    if d_sae % world:
        raise ValueError(f"latent sharding needs d_sae ({d_sae}) divisible by the number of workers ({world})")
    m = d_sae // world
    return rank * m, (rank + 1) * m


def slice_sae(full: SparseAutoencoder, rank: int, world: int) -> SparseAutoencoder:
    """This rank's latent slice of `full`, as an SAE of the same architecture with d_sae / world latents."""
    lo, hi = shard_bounds(full.cfg.d_sae, rank, world)
    cfg = full.cfg.replace(d_sae=hi - lo, k=min(full.cfg.k, hi - lo) if full.cfg.k else None,
                           aux_k=min(full.cfg.aux_k, hi - lo))
    part = build_sae(cfg).to(full.device)
    with torch.no_grad():
        for name, p in part.named_parameters():
            src = getattr(full, name)
            p.copy_(src[lo:hi] if name in LATENT_PARAMS else src)
    return part


@torch.no_grad()
def gather_full(part: SparseAutoencoder, full_cfg: SAEConfig) -> SparseAutoencoder:
    """The whole SAE from every rank's slice (a collective: all ranks call it)."""
    full = build_sae(full_cfg).to(part.device)
    for name, p in full.named_parameters():
        src = getattr(part, name)
        p.copy_(all_gather_cat(src.detach()) if name in LATENT_PARAMS else src)
    return full


def _global_topk_mask(vals: Tensor, k: int) -> Tensor:
    """vals [N, c] = this rank's candidates; True where a candidate is among the top k of all ranks' candidates."""
    rank, world = _world()
    c = vals.shape[1]
    gathered = [torch.empty_like(vals) for _ in range(world)] if world > 1 else [vals]
    if world > 1:
        dist.all_gather(gathered, vals.detach().contiguous())
    allv = torch.cat(gathered, dim=1)  # [N, world·c]
    picked = torch.zeros_like(allv, dtype=torch.bool)
    picked.scatter_(1, allv.topk(min(k, allv.shape[1]), dim=1).indices, True)
    return picked[:, rank * c : (rank + 1) * c]


class LatentShard(nn.Module):
    """Training forward of one latent slice over the global batch (see the module docstring).

    Returns a `ForwardOutput` whose `x_hat` and loss terms are global (identical on every rank) and whose `codes`
    are this slice's dense codes, so `SAETrainer.loss_and_metrics` counts this slice's fired latents and L0 share.
    """

    def __init__(self, part: SparseAutoencoder, full_cfg: SAEConfig):
        super().__init__()
        self.part, self.full_cfg = part, full_cfg
        arch = part.cfg.architecture
        if arch == "batchtopk":
            raise ValueError("latent sharding does not support batchtopk")
        self.arch = arch

    def _partial(self, f: Tensor, detach: bool = False) -> Tensor:
        W, b = (self.part.W_dec.detach(), self.part.b_dec.detach()) if detach else (self.part.W_dec, self.part.b_dec)
        out = f @ W
        if _world()[0] == 0:  # b_dec counted once
            out = out + b
        return sum_across(out)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        p, arch = self.part, self.arch
        x2 = x.reshape(-1, p.cfg.d_in).to(p.dtype)
        n = x2.shape[0]
        losses: dict[str, Tensor] = {}
        if arch == "standard":
            f = p.pre_acts(x2, p.b_enc).relu()
            x_hat = self._partial(f)
            mse = mse_loss(x_hat, x2)
            l1 = sum_across((f.sum(0) * p.decoder_norms()).sum() / n)
            losses = {"mse": mse, "l1": l1}
            loss = mse + p.sparsity_coefficient * l1
        elif arch == "gated":
            pi_gate, pi_mag = p.gate_paths(x2)
            gate_act = pi_gate.relu()
            f = pi_mag.relu() * (pi_gate > 0)
            x_hat = self._partial(f)
            mse = mse_loss(x_hat, x2)
            l1 = sum_across((gate_act.sum(0) * p.decoder_norms()).sum() / n)
            aux = mse_loss(self._partial(gate_act, detach=True), x2)
            losses = {"mse": mse, "l1": l1, "aux": aux}
            loss = mse + p.sparsity_coefficient * l1 + aux
        elif arch == "jumprelu":
            from saefd_ray.sae.kernels import jumprelu

            f, l0_part = jumprelu(p.pre_acts(x2, p.b_enc), p.log_threshold, p.cfg.jumprelu_bandwidth)
            x_hat = self._partial(f)
            mse = mse_loss(x_hat, x2)
            l0 = sum_across(l0_part)
            losses = {"mse": mse, "l0": l0}
            loss = mse + p.sparsity_coefficient * l0
        else:  # topk
            z = p.pre_acts(x2, p.b_enc).relu()
            vals, idx = z.topk(p.cfg.k, dim=1, sorted=False)
            keep = _global_topk_mask(vals, self.full_cfg.k)
            f = torch.zeros_like(z).scatter(1, idx, vals * keep)
            x_hat = self._partial(f)
            err = x_hat - x2
            mse = err.pow(2).sum(-1).mean()
            losses = {"mse": mse}
            loss = mse
            n_dead = all_reduce_(torch.tensor(float(dead_mask.sum()) if dead_mask is not None else 0.0))
            if dead_mask is not None and float(n_dead) > 0 and self.full_cfg.aux_k > 0:
                ka = min(self.full_cfg.aux_k, int(n_dead))
                zd = z.masked_fill(~dead_mask, float("-inf"))
                a_vals, a_idx = zd.topk(min(ka, zd.shape[1]), dim=1, sorted=False)
                a_keep = _global_topk_mask(a_vals, ka) & torch.isfinite(a_vals)
                fa = torch.zeros_like(z).scatter(1, a_idx, torch.where(a_keep, a_vals.relu(), 0.0))
                e_hat = sum_across(fa @ p.W_dec)
                auxk = mse_loss(e_hat, -err.detach())
                losses["auxk"] = auxk
                scale = min(float(n_dead) / self.full_cfg.aux_k, 1.0)
                loss = loss + self.full_cfg.aux_k_coefficient * scale * auxk
        return ForwardOutput(x_hat.reshape(x.shape), f.detach(), losses, loss)


# ------------------------------------------------------------------------------------------- the trainer


def trainer_config(training, total_steps: int) -> TrainerConfig:
    return TrainerConfig(
        total_steps=max(1, total_steps), lr=training.lr, lr_end=training.lr_end,
        lr_warmup_steps=training.lr_warmup_steps, lr_decay_steps=training.lr_decay_steps,
        sparsity_warmup_steps=training.sparsity_warmup_steps, grad_clip=training.grad_clip,
        dead_window_tokens=training.dead_window_tokens, b_dec_init=training.b_dec_init,
    )


class ShardedTrainer:
    """One SAE trained across the process group (or alone when world = 1), on top of `SAETrainer`'s two halves."""

    def __init__(self, full: SparseAutoencoder, cfg: TrainerConfig, sharding: str = "data"):
        self.rank, self.world = _world()
        self.sharding, self.full_cfg = sharding, full.cfg
        self.clip = cfg.grad_clip
        if sharding == "latent":
            self.sae = slice_sae(full, self.rank, self.world)
            cfg = TrainerConfig(**{**cfg.__dict__, "grad_clip": 0.0})  # global-norm clipping done here
            self.inner = SAETrainer(self.sae, cfg)
            self.inner.forward_module = LatentShard(self.sae, full.cfg)
        else:
            self.sae = full
            self.inner = SAETrainer(full, cfg)

    @property
    def step_count(self) -> int:
        return self.inner.step_count

    @property
    def tokens_seen(self) -> int:
        return self.inner.tokens_seen

    def step(self, local: Tensor) -> dict[str, float]:
        inner, world = self.inner, self.world
        local = local.reshape(-1, self.sae.cfg.d_in).to(self.sae.device, self.sae.dtype)
        x = all_gather_cat(local) if self.sharding == "latent" else local
        if not inner.b_dec_initialized and inner.cfg.b_dec_init != "none" and inner.step_count == 0:
            inner.init_b_dec(x if self.sharding == "latent" else all_gather_cat(local))
        res = inner.loss_and_metrics(x)
        fired, n = res.fired, res.n_tokens
        metrics = dict(res.metrics)
        if world > 1 and self.sharding == "data":
            grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            f = fired.to(torch.uint8)
            dist.all_reduce(f, op=dist.ReduceOp.MAX)
            fired, n = f.bool(), n * world
            keys = sorted(metrics)
            vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(vals)
            metrics = dict(zip(keys, (vals / world).tolist()))
        elif self.sharding == "latent":
            if world > 1 and self.sae.b_dec.grad is not None:
                dist.all_reduce(self.sae.b_dec.grad)
            metrics["l0"] = float(all_reduce_(torch.tensor(metrics["l0"], dtype=torch.float64)))
            if self.clip > 0:
                self._clip_global()
        upd = inner.apply_update(fired, n)
        if self.sharding == "latent" and world > 1:
            dead = all_reduce_(torch.tensor(upd["dead_fraction"], dtype=torch.float64))
            upd["dead_fraction"] = float(dead) / world
        return {**metrics, **upd}

    def _clip_global(self) -> None:
        """clip_grad_norm_ over the whole (sharded) SAE: slices' squares summed across ranks, b_dec counted once."""
        sae = self.sae
        sae.remove_parallel_decoder_grad_()  # what SAETrainer does before clipping (idempotent when repeated)
        sharded = [p.grad for n, p in sae.named_parameters() if n in LATENT_PARAMS and p.grad is not None]
        replicated = [p.grad for n, p in sae.named_parameters() if n not in LATENT_PARAMS and p.grad is not None]
        sq = torch.stack([g.double().pow(2).sum() for g in sharded]).sum()
        sq = all_reduce_(sq)
        if replicated:
            sq = sq + torch.stack([g.double().pow(2).sum() for g in replicated]).sum()
        total = float(sq.sqrt())
        coef = min(1.0, self.clip / (total + 1e-6))
        for g in sharded + replicated:
            g.mul_(coef)

    def dead_fraction(self) -> float:
        dead = self.inner.dead_mask().float().sum()
        if self.sharding == "latent":
            dead = all_reduce_(dead.double())
        return float(dead) / self.full_cfg.d_sae

    def full_sae(self) -> SparseAutoencoder:
        """The whole SAE (collective in latent mode)."""
        return gather_full(self.sae, self.full_cfg) if self.sharding == "latent" else self.sae

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "sharding": self.sharding, "world": self.world, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


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

    def _pull(self) -> None:
        try:
            batch = next(self.upstream)
        except StopIteration:
            self.exhausted = True
            return
        if self.on_batch is not None:
            self.on_batch(batch)
        acts, layer_col = batch["activation"], batch["layer"]
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

    trainers: dict[int, ShardedTrainer] = {}
    for layer in layers:
        full = build_sae(full_cfg(layer), seed=t.seed + layer)
        trainers[layer] = ShardedTrainer(full, trainer_config(t, total_steps), d.sharding)
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
        step_metrics = {layer: trainers[layer].step(batches[layer]) for layer in layers}
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
        _write_history(run_dir, history, loop.get("resume") is not None)
    metrics = {"steps": tr0.step_count, "tokens": tr0.tokens_seen, "elapsed_s": elapsed,
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
                         sparsity_coefficient=a.sparsity_coefficient,
                         metadata={"model_name": model_name or config.model.name_or_path,
                                   "hook_name": f"model.layers.{layer}", "hook_layer": layer,
                                   "context_size": config.data.max_len, "prepend_bos": True})
    return make


# ------------------------------------------------------------------------------------------- checkpoints

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
PROGRESS = "progress.json"
CONSUMED = "consumed_instances.npy"


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def save_distributed_checkpoint(run_dir: Path, trainers: dict[int, ShardedTrainer], consumed: np.ndarray,
                                rank: int, world: int, history_tail: dict | None = None, final: bool = False,
                                ran_out: bool = False) -> Path:
    """All ranks: SAELens folder per layer (rank 0) + trainer state (rank 0, or every rank's slice), consumed
    instances (union over ranks); staged in a temp folder and renamed, then `latest.json` is replaced atomically.
    Assumes `run_dir` is on a filesystem all workers see (local runs, NFS); elsewhere use Ray checkpoints."""
    from saefd_ray.io import atomic_write_text
    from saefd_ray.sae.formats import save_saelens, save_trainer_state

    tr0 = next(iter(trainers.values()))
    name = f"tok_{tr0.tokens_seen:012d}"
    root = run_dir / CKPT_DIR
    final_dir, staging = root / name, root / f".staging-{name}"
    union = torch.from_numpy(consumed.astype(np.uint8))
    if world > 1:
        dist.all_reduce(union, op=dist.ReduceOp.MAX)
    fulls = {layer: tr.full_sae() for layer, tr in trainers.items()}  # collective in latent mode
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    for layer, tr in trainers.items():
        folder = staging / f"layer_{layer}"
        if rank == 0:
            sparsity = None
            save_saelens(fulls[layer], folder, sparsity)
        if tr.sharding == "latent":
            save_trainer_state(tr.state_dict(), folder / f"rank{rank}")
        elif rank == 0:
            save_trainer_state(tr.state_dict(), folder)
    _barrier()
    if rank == 0:
        np.save(staging / CONSUMED, union.numpy().astype(bool))
        atomic_write_text(staging / PROGRESS, json.dumps({
            "tokens": tr0.tokens_seen, "steps": tr0.step_count, "world": world, "sharding": tr0.sharding,
            "layers": sorted(trainers), "final": final, "ran_out_of_data": ran_out, "last": history_tail}, indent=1))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(staging, final_dir)
        atomic_write_text(root / LATEST, json.dumps({"checkpoint": name}))
        print(f"[sae] checkpoint {final_dir}", flush=True)
    _barrier()
    return final_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / CKPT_DIR / json.loads(pointer.read_text())["checkpoint"]
    return path if (path / PROGRESS).is_file() else None


def load_checkpoint(path: Path, trainers: dict[int, ShardedTrainer], consumed: np.ndarray, rank: int, world: int,
                    sharding: str) -> None:
    from saefd_ray.errors import CheckpointError
    from saefd_ray.sae.formats import load_saelens, load_trainer_state

    progress = json.loads((path / PROGRESS).read_text())
    if sharding == "latent" and (progress["sharding"] != "latent" or progress["world"] != world):
        raise CheckpointError(f"{path}: saved with sharding={progress['sharding']} on {progress['world']} workers; "
                              f"a latent-sharded resume needs the same ({world} workers)")
    for layer, tr in trainers.items():
        folder = path / f"layer_{layer}"
        full = load_saelens(folder)
        part = slice_sae(full, rank, world) if tr.sharding == "latent" else full
        with torch.no_grad():
            for name, p in tr.sae.named_parameters():
                p.copy_(getattr(part, name))
        if progress["sharding"] == "latent":
            state = load_trainer_state(folder / f"rank{rank}")
            if sharding != "latent":
                raise CheckpointError(f"{path}: a latent-sharded checkpoint resumes with sharding=latent only")
        else:
            state = load_trainer_state(folder)
        tr.load_state_dict(state)
    saved = np.load(path / CONSUMED)
    consumed[: len(saved)] |= saved[: len(consumed)]


def _write_history(run_dir: Path, history: list[dict], append: bool) -> None:
    from saefd_ray.io import atomic_write_text

    path = run_dir / "history.jsonl"
    old = path.read_text() if append and path.is_file() else ""
    atomic_write_text(path, old + "".join(json.dumps(h) + "\n" for h in history))
