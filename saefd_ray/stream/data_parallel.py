"""Data-parallel SAE training: every worker holds the whole SAE and trains it on its local batch.

Loss terms are token means, so averaging the workers' gradients (one flat all-reduce) gives the gradient of the
global batch; fired-latent masks are all-reduced (max) and token counts summed before the update, so dead-latent
counters, the LR schedule and the optimizer state stay identical on every worker. Metrics are averaged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from saefd_ray.sae import SparseAutoencoder
from saefd_ray.sae.trainer import TrainerConfig
from saefd_ray.stream.shard_common import ShardedTrainerBase


class DataParallelTrainer(ShardedTrainerBase):
    sharding = "data"

    def __init__(self, full: SparseAutoencoder, cfg: TrainerConfig, normalize_activations: str = "none"):
        super().__init__(full, full.cfg, cfg, normalize_activations)

    def step(self, local: Tensor, fill: Tensor | None = None) -> dict[str, float]:
        inner, world = self.inner, self.world
        local = self._prepare(local)
        self._init_b_dec(local, fill)
        res = inner.loss_and_metrics(local)
        fired, n = res.fired, res.n_tokens
        metrics = dict(res.metrics)
        if world > 1:
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
        return {**metrics, **inner.apply_update(fired, n)}

    def dead_fraction(self) -> float:
        return float(self.inner.dead_mask().float().sum()) / self.full_cfg.d_sae

    def full_sae(self) -> SparseAutoencoder:
        return self.sae
