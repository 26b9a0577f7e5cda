"""Latent-sharded SAE training: worker r holds latents [r·m, (r+1)·m) of the SAE and encodes the global batch.

Worker r holds those rows of `W_enc` and `W_dec` and the per-latent biases, and a replica of `b_dec`. The local
batches are all-gathered so every worker encodes the global batch with its slice; the partial reconstructions
`f_r W_dec,r` are summed with an all-reduce whose backward is the identity (each partial affects the loss only
through the sum), as are the additive loss terms (L1 / L0). TopK takes each shard's top-k candidates, all-gathers
their values and keeps the global top k. `b_dec`'s gradient is summed over workers (it is added on rank 0 only, so
its decoder-side term is counted once); gradient clipping uses the global norm. The optimizer state of each slice
lives on its worker only. This is the memory layout for SAEs too wide for one worker (FAST, §3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from saefd_ray.sae import SAEConfig, SparseAutoencoder, build_sae
from saefd_ray.sae.base import ForwardOutput, mse_loss
from saefd_ray.sae.trainer import TrainerConfig
from saefd_ray.stream.shard_common import ShardedTrainerBase, all_gather_cat, all_reduce_, rank_world, sum_across

LATENT_PARAMS = ("W_enc", "W_dec", "b_enc", "b_gate", "r_mag", "b_mag", "log_threshold")


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
    rank, size = rank_world()
    c = vals.shape[1]
    gathered = [torch.empty_like(vals) for _ in range(size)] if size > 1 else [vals]
    if size > 1:
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
        if rank_world()[0] == 0:  # b_dec counted once
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


class LatentShardedTrainer(ShardedTrainerBase):
    sharding = "latent"

    def __init__(self, full: SparseAutoencoder, cfg: TrainerConfig, normalize_activations: str = "none"):
        self.clip = cfg.grad_clip
        rank, size = rank_world()
        cfg = TrainerConfig(**{**cfg.__dict__, "grad_clip": 0.0})  # global-norm clipping done here
        super().__init__(slice_sae(full, rank, size), full.cfg, cfg, normalize_activations)
        self.inner.forward_module = LatentShard(self.sae, full.cfg)

    def step(self, local: Tensor, fill: Tensor | None = None) -> dict[str, float]:
        inner = self.inner
        local = self._prepare(local)
        x = all_gather_cat(local)
        self._init_b_dec(local, fill)
        res = inner.loss_and_metrics(x)
        metrics = dict(res.metrics)
        if self.world > 1:  # every rank joins: without apply_b_dec_to_input only rank 0's b_dec has a gradient
            if self.sae.b_dec.grad is None:
                self.sae.b_dec.grad = torch.zeros_like(self.sae.b_dec)
            dist.all_reduce(self.sae.b_dec.grad)
        metrics["l0"] = float(all_reduce_(torch.tensor(metrics["l0"], dtype=torch.float64)))
        if self.clip > 0:
            self._clip_global()
        upd = inner.apply_update(res.fired, res.n_tokens)
        if self.world > 1:
            dead = all_reduce_(torch.tensor(upd["dead_fraction"], dtype=torch.float64))
            upd["dead_fraction"] = float(dead) / self.world
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
        dead = all_reduce_(self.inner.dead_mask().float().sum().double())
        return float(dead) / self.full_cfg.d_sae

    def full_sae(self) -> SparseAutoencoder:
        return gather_full(self.sae, self.full_cfg)
