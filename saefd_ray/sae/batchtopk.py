"""BatchTopK SAE (Bussmann et al. 2024): top ``k·N`` activations over the whole batch, so ``k`` is an average.

Only the selection differs from TopK. At inference a per-batch rule would make a token's code depend on its
neighbours, so we keep a running threshold (EMA of the smallest selected activation) and encode/save as JumpReLU
with that threshold broadcast to every latent — the SAELens convention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import SAEConfig, SparseCodes, register
from .topk import TopKSAE


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    batch_topk = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=cfg.torch_dtype))
        self.register_buffer("threshold_initialized", torch.zeros((), dtype=torch.bool))

    def encode(self, x: Tensor) -> Tensor:
        z = self.pre_acts(x, self.b_enc)
        f = z.mul_(z > self.threshold.clamp_min(0))
        return f.reshape(*x.shape[:-1], self.cfg.d_sae)

    def encode_sparse(self, x: Tensor, width: int | None = None) -> SparseCodes:
        return SparseCodes.from_dense(self.encode(x).reshape(-1, self.cfg.d_sae), width)

    @torch.no_grad()
    def _after_forward(self, vals: Tensor, rows: Tensor, n: int) -> None:
        if not self.training:
            return
        pos = vals.detach()[vals > 0]
        if pos.numel() == 0:
            return
        m = self.cfg.batchtopk_threshold_momentum
        cur = pos.min().to(self.threshold.dtype)
        if bool(self.threshold_initialized):
            self.threshold.mul_(m).add_(cur, alpha=1 - m)
        else:
            self.threshold.copy_(cur)
            self.threshold_initialized.fill_(True)

    def _codes(self, vals: Tensor, rows: Tensor, cols: Tensor, n: int) -> SparseCodes:
        """Variable-width rows padded with zeros to the widest row of the batch."""
        counts = torch.bincount(rows, minlength=n)
        width = max(1, int(counts.max())) if rows.numel() else 1
        starts = torch.zeros(n, dtype=torch.long, device=rows.device)
        torch.cumsum(counts[:-1], 0, out=starts[1:])
        slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
        v = vals.new_zeros(n, width)
        i = cols.new_zeros(n, width)
        v[rows, slot] = vals.detach()
        i[rows, slot] = cols
        return SparseCodes(v, i)
