"""SAELens's `normalize_activations: expected_average_only_in`: train on activations scaled to mean norm √d_in.

The residual stream's scale differs by orders of magnitude between models and layers, and with it the meaning of
a sparsity coefficient (an L1 on codes that must rebuild a norm-25,000 vector is not the L1 of a norm-1 one). So
the trainer multiplies every activation by one constant s = √d_in / E‖x‖, estimated once on the first global batch
(a random sample of the first mixing buffer), and coefficients carry across models (SAELens's ActivationScaler).

At save the scale is folded into the weights, as SAELens does after training: the encoder sees s·x, so
W_enc ← s·W_enc, and the decoder must return x̂/s, so W_dec ← W_dec/s, b_dec ← b_dec/s. Every pre-activation
(and so every code, threshold, gate) is unchanged; the saved SAE reads raw activations and its cfg.json says
`normalize_activations: none`. The scale itself is written beside it as `activation_scaler.json`
(`{"scaling_factor": s}`, SAELens's checkpoint file) so a resume can unfold the weights exactly as trained.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import Tensor

SCALER_FILE = "activation_scaler.json"
MODES = ("none", "expected_average_only_in")


@torch.no_grad()
def estimate_scale(x: Tensor) -> float:
    """s = √d_in / mean_n ‖x_n‖ for activations x [n, d_in]; ValueError on an empty or all-zero sample."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    mean_norm = float(x2.norm(dim=-1).mean()) if x2.shape[0] else 0.0
    if not mean_norm > 0 or not math.isfinite(mean_norm):
        raise ValueError(f"cannot estimate the activation scale: mean norm {mean_norm} over {x2.shape[0]} rows")
    return math.sqrt(x2.shape[-1]) / mean_norm


@torch.no_grad()
def fold_scale(sae, scale: float):
    """A copy of `sae` (trained on scale·x) that reads raw x and returns raw x̂ with identical codes."""
    out = copy.deepcopy(sae)
    out.W_enc.mul_(scale)
    out.W_dec.div_(scale)
    out.b_dec.div_(scale)
    return out


@torch.no_grad()
def unfold_scale_(sae, scale: float) -> None:
    """In place, the inverse of `fold_scale`: back to the weights that read scale·x (for resuming training)."""
    sae.W_enc.div_(scale)
    sae.W_dec.mul_(scale)
    sae.b_dec.mul_(scale)


def write_scaler(folder: Path, scale: float) -> None:
    from saefd_ray.io import atomic_write_text

    atomic_write_text(Path(folder) / SCALER_FILE, json.dumps({"scaling_factor": scale}))


def read_scaler(folder: Path) -> float | None:
    path = Path(folder) / SCALER_FILE
    return float(json.loads(path.read_text())["scaling_factor"]) if path.is_file() else None
