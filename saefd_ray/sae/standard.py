"""Standard (ReLU) SAE with the L1 penalty weighted by decoder row norms (FAST §3, Anthropic's April-2024 update)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ForwardOutput, SAEConfig, SparseAutoencoder, mse_loss, register
from .kernels import relu_decode_l1


@register("standard")
class StandardSAE(SparseAutoencoder):
    """``f = ReLU(W_enc(x − b_dec) + b_enc)``, ``x̂ = f W_dec + b_dec``, ``L = ‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖``."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))

    def encode(self, x: Tensor) -> Tensor:
        f = self.pre_acts(x, self.b_enc).relu_()
        return f.reshape(*x.shape[:-1], self.cfg.d_sae)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        x2 = x.reshape(-1, self.cfg.d_in)
        pre = self.pre_acts(x2, self.b_enc)
        if self.codes_are_sparse(pre.detach().relu()[:256]):
            f = pre.relu()
            x_hat = self.decode_train(f)
            # f >= 0, so the L1 is a column sum: one read of f, then a [d_sae] dot product.
            l1 = (f.sum(0) * self.decoder_norms()).sum() / x2.shape[0]
        else:  # dense codes: fused ReLU + decode + L1 (kernels.ReLUDecodeL1)
            x_hat, f, l1 = relu_decode_l1(pre, self.W_dec, self.b_dec, self.decoder_norms())
        mse = mse_loss(x_hat, x2)
        loss = mse + self.sparsity_coefficient * l1
        return ForwardOutput(x_hat.reshape(x.shape), f, {"mse": mse, "l1": l1}, loss)
