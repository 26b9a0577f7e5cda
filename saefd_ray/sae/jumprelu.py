"""JumpReLU SAE (Rajamanoharan et al. 2024; FAST §3): learnable per-latent threshold, direct L0 penalty."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ForwardOutput, SAEConfig, SparseAutoencoder, mse_loss, register
from .kernels import jumprelu


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """``z = W_enc(x − b_dec) + b_enc``, ``f = z·H(z − θ)``, ``L = ‖x − x̂‖² + λ‖f‖₀``; θ stored as ``log_threshold``.

    The step function has no gradient; :func:`kernels.jumprelu` supplies the rectangle-kernel straight-through
    estimator (bandwidth ``cfg.jumprelu_bandwidth``) for θ.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        dt = cfg.torch_dtype
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold), dtype=dt))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        self.b_enc.zero_()
        self.log_threshold.fill_(math.log(self.cfg.jumprelu_init_threshold))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        z = self.pre_acts(x, self.b_enc)
        f = z.mul_(z > self.threshold)
        return f.reshape(*x.shape[:-1], self.cfg.d_sae)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        x2 = x.reshape(-1, self.cfg.d_in)
        f, l0 = jumprelu(self.pre_acts(x2, self.b_enc), self.log_threshold, self.cfg.jumprelu_bandwidth)
        x_hat = self.decode_train(f)
        mse = mse_loss(x_hat, x2)
        loss = mse + self.sparsity_coefficient * l0
        return ForwardOutput(x_hat.reshape(x.shape), f, {"mse": mse, "l0": l0}, loss)
