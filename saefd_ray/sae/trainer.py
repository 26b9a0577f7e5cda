"""Single-process, device-agnostic SAE training loop (FAST recipe); the distributed wrapper reuses its two halves.

One step = ``loss_and_metrics(batch)`` (forward + backward, gradients left on the parameters) then
``apply_update(fired, n_tokens)`` (decoder-gradient projection, clipping, Adam at the scheduled LR, decoder
renormalisation, dead-latent counters). A DDP wrapper sets ``trainer.forward_module`` to its wrapped module (the
backward then all-reduces grads) and all-reduces ``fired`` (max/or) and ``n_tokens`` (sum) before ``apply_update``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor, nn

from .base import SparseAutoencoder, SparseCodes
from .recipe import fast_lr, fit_schedule, geometric_median, sparsity_warmup


@dataclass
class TrainerConfig:
    """FAST defaults (lr 7e-5, 16k warm-up, cosine to 7e-6, 64k linear decay, λ warm-up 10k); lengths that do not fit
    ``total_steps`` are scaled to it (``recipe.fit_schedule``; the trainer's ``schedule`` holds what is used)."""

    total_steps: int = 100_000
    lr: float = 7e-5
    lr_end: float = 7e-6
    lr_warmup_steps: int = 16_000
    lr_decay_steps: int = 64_000
    sparsity_warmup_steps: int = 10_000
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables
    dead_window_tokens: int = 10_000_000  # a latent is dead if it has not fired for this many tokens
    b_dec_init: str = "geometric_median"  # | "mean" | "none"
    gm_max_iter: int = 100


class StepResult(NamedTuple):
    """What ``loss_and_metrics`` hands to ``apply_update`` (and what a wrapper all-reduces)."""

    metrics: dict[str, float]
    fired: Tensor  # bool [d_sae]: latents active on at least one token of this (local) batch
    n_tokens: int


class SAETrainer:
    def __init__(self, sae: SparseAutoencoder, cfg: TrainerConfig | None = None):
        self.sae = sae
        self.cfg = cfg or TrainerConfig()
        self.forward_module: nn.Module = sae  # a distributed wrapper may replace this (e.g. DDP(sae))
        fused = sae.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=self.cfg.lr, betas=self.cfg.adam_betas,
                                          eps=self.cfg.adam_eps, fused=fused)
        self.schedule = fit_schedule(self.cfg.total_steps, self.cfg.lr_warmup_steps, self.cfg.lr_decay_steps,
                                     self.cfg.sparsity_warmup_steps)
        self.step_count = 0
        self.tokens_seen = 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
        self.b_dec_initialized = False

    # ---- recipe pieces ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_b_dec(self, acts: Tensor, all_reduce=None) -> None:
        """b_dec ← geometric median (or mean) of ``acts``; once per run. The streamed job passes the first mixing-buffer
        fill (FAST / SAELens: a whole buffer, not one batch), and ``all_reduce`` (in-place sum across ranks) to take
        the union of every rank's fill; called with neither, ``loss_and_metrics`` falls back to the first batch."""
        how = self.cfg.b_dec_init
        reduce = all_reduce or (lambda t: t)
        if how == "geometric_median":
            self.sae.b_dec.copy_(geometric_median(acts.to(self.sae.dtype), max_iter=self.cfg.gm_max_iter,
                                                  all_reduce=all_reduce))
        elif how == "mean":
            flat = acts.reshape(-1, acts.shape[-1]).double()
            count = reduce(torch.tensor([float(flat.shape[0])], dtype=torch.float64, device=flat.device))
            self.sae.b_dec.copy_(reduce(flat.sum(0)) / count)
        elif how != "none":
            raise ValueError(f"unknown b_dec_init {how!r}")
        self.b_dec_initialized = True

    def lr_at(self, step: int) -> float:
        c, used = self.cfg, self.schedule
        return fast_lr(step, lr=c.lr, total_steps=c.total_steps, warmup_steps=used["lr_warmup_steps"], lr_end=c.lr_end,
                       decay_steps=used["lr_decay_steps"])

    def sparsity_scale_at(self, step: int) -> float:
        return sparsity_warmup(step, self.schedule["sparsity_warmup_steps"])

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_window_tokens

    # ---- one step, in two halves ------------------------------------------------------------------------------------
    def loss_and_metrics(self, batch: Tensor) -> StepResult:
        """Forward + backward on ``batch`` ``[N, d_in]``; grads stay on the parameters (not yet applied)."""
        sae = self.sae
        x = batch.reshape(-1, sae.cfg.d_in).to(device=sae.device, dtype=sae.dtype)
        if not self.b_dec_initialized and self.cfg.b_dec_init != "none" and self.step_count == 0:
            self.init_b_dec(x)
        sae.train()
        sae.set_sparsity_scale(self.sparsity_scale_at(self.step_count))
        out = self.forward_module(x, dead_mask=self.dead_mask())
        out.loss.backward()
        with torch.no_grad():
            n = x.shape[0]
            if isinstance(out.codes, SparseCodes):
                nz = out.codes.values != 0
                l0 = nz.sum() / n
                fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
                fired[out.codes.indices[nz]] = True
            else:
                per_latent = torch.count_nonzero(out.codes, dim=0)
                l0, fired = per_latent.sum() / n, per_latent > 0
            err = (out.x_hat.reshape(n, -1) - x).pow(2).sum()
            fvu = err / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
            names = ["loss", *out.losses.keys(), "l0", "fvu"]
            vals = torch.stack([out.loss.detach(), *[v.detach() for v in out.losses.values()], l0.float(), fvu])
        metrics = dict(zip(names, vals.tolist()))
        return StepResult(metrics, fired, n)

    def apply_update(self, fired: Tensor, n_tokens: int) -> dict[str, float]:
        """Project decoder grads, clip, Adam at the scheduled LR, renormalise the decoder, update dead counters."""
        sae = self.sae
        sae.remove_parallel_decoder_grad_()
        metrics: dict[str, float] = {}
        if self.cfg.grad_clip > 0:
            metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip))
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        self.update_dead(fired, n_tokens)
        self.step_count += 1
        metrics.update(lr=lr, sparsity_scale=self.sparsity_scale_at(self.step_count - 1),
                       dead_fraction=float(self.dead_mask().float().mean()))
        return metrics

    @torch.no_grad()
    def update_dead(self, fired: Tensor, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0
        self.tokens_seen += n_tokens

    def step(self, batch: Tensor) -> dict[str, float]:
        res = self.loss_and_metrics(batch)
        return {**res.metrics, **self.apply_update(res.fired, res.n_tokens)}

    def train(self, batches: Iterable[Tensor], max_steps: int | None = None) -> list[dict[str, float]]:
        """Convenience loop (tests, small jobs): step over ``batches`` until exhausted or ``max_steps``."""
        history: list[dict[str, float]] = []
        it = iter(batches)
        while max_steps is None or len(history) < max_steps:  # check first: never pull a batch we won't use
            try:
                batch = next(it)
            except StopIteration:
                break
            history.append(self.step(batch))
        return history

    # ---- resumable state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the SAE weights (saved in SAELens/sparsify layout by ``formats``)."""
        return {
            "config": asdict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "b_dec_initialized": self.b_dec_initialized,
            # BatchTopK's running threshold is a buffer; kept here too since the sparsify layout cannot hold it
            "batchtopk_threshold": self.sae.threshold.cpu() if hasattr(self.sae, "threshold_initialized") else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.sae.device)
        self.b_dec_initialized = bool(state["b_dec_initialized"])
        thr = state.get("batchtopk_threshold")
        if thr is not None and hasattr(self.sae, "threshold_initialized"):
            with torch.no_grad():
                self.sae.threshold.copy_(thr)
                self.sae.threshold_initialized.fill_(True)
