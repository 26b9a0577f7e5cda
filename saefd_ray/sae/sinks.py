"""Attention-sink tokens: positions whose residual norm dwarfs the rest of their sequence, kept out of SAEs.

Real LLMs park attention on a few tokens (usually position 0, here the first `<|im_start|>`), and their residual
norm is huge: on SmolLM2-135M-Instruct at layer 12, 25,094 against a median of ~141 (178×). One such token's squared
error dominates an MSE and the total variance of an FVU, so an SAE trained or evaluated with them learns / reports
mostly the sink (FVU 0.004 that means nothing). Like SAELens's `exclude_special_tokens` / BOS exclusion, but detected
by value: a token is a sink when its norm exceeds `ratio` × the median norm of its own sequence (pads excluded).

Every consumer uses this one rule with the ratio the SAE was trained with (`cfg.metadata["sink_norm_ratio"]`):
SAE training (dropped from the stream, counted), SAE evaluation (left out of FVU / MSE / L0, passed through
unchanged in the CE splice), SAE-FD anchors (their codes zeroed) and sae_reg masks (not counted).
"""

from __future__ import annotations

import torch
from torch import Tensor

METADATA_KEY = "sink_norm_ratio"


def sink_mask(hidden: Tensor, attention: Tensor | None = None, ratio: float | None = None) -> Tensor:
    """Bool mask of sink tokens. hidden [..., T, d] (one sequence per row), attention [..., T] (1 = real token);
    ratio None or <= 0 disables detection (all False). The median is over each row's real tokens."""
    norms = hidden.detach().float().norm(dim=-1)
    if ratio is None or ratio <= 0:
        return torch.zeros_like(norms, dtype=torch.bool)
    real = torch.ones_like(norms, dtype=torch.bool) if attention is None else attention.to(norms.device).bool()
    median = norms.masked_fill(~real, float("nan")).nanmedian(dim=-1, keepdim=True).values
    return real & (norms > ratio * median)


def sae_sink_ratio(sae) -> float | None:
    """The sink rule an SAE was trained with (None: it was trained on every token)."""
    value = (getattr(sae.cfg, "metadata", None) or {}).get(METADATA_KEY)
    return float(value) if value else None
