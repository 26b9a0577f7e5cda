"""TopK SAE (Gao et al. 2024; sparsify): exactly k active latents per token, AuxK loss revives dead latents."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ForwardOutput, SAEConfig, SparseAutoencoder, SparseCodes, mse_loss, register
from .kernels import sparse_decode, sparse_encode


@register("topk")
class TopKSAE(SparseAutoencoder):
    """``f = TopK(ReLU(W_enc(x − b_dec) + b_enc))``; ``L = ‖x − x̂‖² + α·min(n_dead/k_aux, 1)·‖e − ê_aux‖²`` where
    ``e = x − x̂`` (detached) and ``ê_aux`` decodes the top-``aux_k`` pre-activations among dead latents.

    The training forward runs on the fused sparse kernels (``kernels.py``): the dense ``[N, d_sae]`` matrix exists only
    inside the encoder's forward, the decode and all backward work touch the ``k`` active rows per token.
    """

    batch_topk = False  # BatchTopK flips this

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))

    def encode_sparse(self, x: Tensor, width: int | None = None) -> SparseCodes:
        z = self.pre_acts(x, self.b_enc).relu_()
        vals, idx = z.topk(self.cfg.k if width is None else width, dim=-1, sorted=False)
        lead = x.shape[:-1]
        return SparseCodes(vals.reshape(*lead, -1), idx.reshape(*lead, -1))

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_sparse(x).to_dense(self.cfg.d_sae)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        cfg = self.cfg
        x2 = x.reshape(-1, cfg.d_in).to(self.dtype)
        n = x2.shape[0]
        vals, rows, cols, a_vals, a_rows, a_cols = sparse_encode(
            x2, self.W_enc, self._encoder_bias(self.b_enc), cfg.k, batch=self.batch_topk,
            dead=dead_mask if self.training else None, aux_k=cfg.aux_k)
        width = None if self.batch_topk else cfg.k
        x_hat = sparse_decode(vals, rows, cols, self.W_dec, n, width) + self.b_dec
        err = x_hat - x2
        mse = err.pow(2).sum(-1).mean()
        losses = {"mse": mse}
        loss = mse
        if a_vals.numel():
            ka = a_vals.numel() // n
            e_hat = sparse_decode(a_vals, a_rows, a_cols, self.W_dec, n, ka)
            scale = min(float(dead_mask.sum()) / cfg.aux_k, 1.0)
            auxk = mse_loss(e_hat, -err.detach())
            losses["auxk"] = auxk
            loss = loss + cfg.aux_k_coefficient * scale * auxk
        self._after_forward(vals, rows, n)
        return ForwardOutput(x_hat.reshape(x.shape), self._codes(vals, rows, cols, n), losses, loss)

    def _codes(self, vals: Tensor, rows: Tensor, cols: Tensor, n: int) -> SparseCodes:
        return SparseCodes(vals.detach().view(n, self.cfg.k), cols.view(n, self.cfg.k))

    def _after_forward(self, vals: Tensor, rows: Tensor, n: int) -> None:
        """Hook for subclasses (BatchTopK updates its threshold)."""
