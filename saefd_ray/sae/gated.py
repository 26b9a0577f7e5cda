"""Gated SAE (Rajamanoharan et al. 2024) — SAE-FD's architecture.

The gate decides *which* latents fire, the magnitude path *how much*; both share ``W_enc`` (magnitude rows rescaled
by ``exp(r_mag)``), so the extra cost over a Standard SAE is one auxiliary decode.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ForwardOutput, SAEConfig, SparseAutoencoder, mse_loss, register
from .kernels import relu_decode_l1


@register("gated")
class GatedSAE(SparseAutoencoder):
    """``π_gate = W(x − b_dec) + b_gate``, ``π_mag = exp(r_mag)⊙W(x − b_dec) + b_mag``, ``f = 1[π_gate > 0]·ReLU(π_mag)``.

    Loss: ``‖x − x̂‖² + λ Σ_i ReLU(π_gate)_i ‖W_dec,i‖ + ‖x − x̂_aux‖²`` where ``x̂_aux`` decodes ``ReLU(π_gate)``
    through a *frozen* copy of the decoder (gradients reach the gate only through this auxiliary term and the L1).
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        dt = cfg.torch_dtype
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))

    def gate_paths(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        base = self.pre_acts(x2, torch.zeros_like(self.b_gate))
        return base + self.b_gate, torch.addcmul(self.b_mag, base, self.r_mag.exp())

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self.gate_paths(x.reshape(-1, self.cfg.d_in))
        f = pi_mag.relu_().mul_(pi_gate > 0)
        return f.reshape(*x.shape[:-1], self.cfg.d_sae)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        x2 = x.reshape(-1, self.cfg.d_in)
        pi_gate, pi_mag = self.gate_paths(x2)
        f = pi_mag.relu() * (pi_gate > 0)
        x_hat = self.decode_train(f)
        mse = mse_loss(x_hat, x2)
        # gate path: ReLU(π_gate) decoded by the frozen decoder, plus its norm-weighted L1, in one fused function
        aux_hat, _, l1 = relu_decode_l1(pi_gate, self.W_dec.detach(), self.b_dec.detach(), self.decoder_norms())
        aux = mse_loss(aux_hat, x2)
        loss = mse + self.sparsity_coefficient * l1 + aux
        return ForwardOutput(x_hat.reshape(x.shape), f, {"mse": mse, "l1": l1, "aux": aux}, loss)
