"""What the data-parallel and the latent-sharded SAE trainers share: process-group collectives and the wrapper
around `SAETrainer` both build on. With no process group (world = 1) every collective is the identity."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saefd_ray.sae import SparseAutoencoder
from saefd_ray.sae.normalize import estimate_scale
from saefd_ray.sae.trainer import SAETrainer, TrainerConfig


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _SumIdentityBackward(torch.autograd.Function):
    """Forward: all-reduce sum. Backward: identity (every rank computes the same loss from the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        if rank_world()[1] > 1:
            dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def sum_across(x: Tensor) -> Tensor:
    return _SumIdentityBackward.apply(x)


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order (no gradient)."""
    _, size = rank_world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_(x: Tensor, op=None) -> Tensor:
    if rank_world()[1] > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


class ShardedTrainerBase:
    """One SAE trained across the process group: `self.sae` is what this rank holds (the whole SAE or a slice),
    `self.inner` the `SAETrainer` that owns its optimizer, schedules and dead-latent counters."""

    sharding: str = ""

    def __init__(self, sae: SparseAutoencoder, full_cfg, cfg: TrainerConfig, normalize_activations: str = "none"):
        self.rank, self.world = rank_world()
        self.full_cfg = full_cfg
        self.sae = sae
        self.inner = SAETrainer(sae, cfg)
        self.normalize, self.scale = normalize_activations, None  # sae/normalize.py: s, fixed at the first step

    def _prepare(self, local: Tensor) -> Tensor:
        """This rank's batch as [n, d_in] on the SAE's device, times the activation scale when normalizing (one s
        for every worker, estimated on the first global batch)."""
        local = local.reshape(-1, self.sae.cfg.d_in).to(self.sae.device, self.sae.dtype)
        if self.normalize == "none":
            return local
        if self.scale is None:
            self.scale = estimate_scale(all_gather_cat(local))
        return local * self.scale

    @property
    def step_count(self) -> int:
        return self.inner.step_count

    @property
    def tokens_seen(self) -> int:
        return self.inner.tokens_seen

    def step(self, local: Tensor, fill: Tensor | None = None) -> dict[str, float]:
        """One optimizer step on this rank's local batch [batch_size / world, d_in]; returns global metrics.
        `fill`, this rank's first mixing-buffer fill, initialises b_dec once (the union over ranks)."""
        raise NotImplementedError

    def _init_b_dec(self, local: Tensor, fill: Tensor | None) -> None:
        """b_dec from the union of every rank's first mixing-buffer fill (by all-reduced Weiszfeld sums), once."""
        inner = self.inner
        if inner.b_dec_initialized or inner.cfg.b_dec_init == "none" or inner.step_count != 0:
            return
        init = local if fill is None else fill.reshape(-1, self.sae.cfg.d_in).to(self.sae.device) * (self.scale or 1.0)
        inner.init_b_dec(init, all_reduce=all_reduce_)

    def full_sae(self) -> SparseAutoencoder:
        """The whole SAE (a collective when the SAE is sharded)."""
        raise NotImplementedError

    def dead_fraction(self) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "sharding": self.sharding, "world": self.world, "rank": self.rank,
                "activation_scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
        self.scale = state.get("activation_scale")
