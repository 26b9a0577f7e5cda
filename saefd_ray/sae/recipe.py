"""FAST's training recipe as plain functions of the step (no state, so a resumed or distributed run agrees)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def fast_lr(step: int, *, lr: float, total_steps: int, warmup_steps: int, lr_end: float, decay_steps: int) -> float:
    """Linear warm-up to ``lr``, cosine from ``lr`` to ``lr_end``, then a final linear decay from ``lr_end`` to 0.

    FAST: lr 7e-5, warm-up 16k, cosine to 7e-6, last 64k steps linear to 0. On short runs the warm-up and decay are
    clipped so the three phases never overlap. ``step`` is the 0-based index of the update about to be applied.
    """
    warmup = min(warmup_steps, total_steps)
    decay_start = max(warmup, total_steps - decay_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < decay_start:
        t = (step - warmup) / max(1, decay_start - warmup)
        return lr_end + 0.5 * (lr - lr_end) * (1.0 + math.cos(math.pi * t))
    t = (step - decay_start) / max(1, total_steps - decay_start)
    return max(0.0, lr_end * (1.0 - t))


def sparsity_warmup(step: int, warmup_steps: int) -> float:
    """Multiplier on λ: linear ramp 0 → 1 over ``warmup_steps`` (FAST: 10k), then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations: the point minimising Σ‖p − y‖ — a b_dec init robust to outlier activations.

    Each step re-weights points by 1/distance; stops when the move is below ``tol`` relative to the estimate's norm.
    """
    pts = points.reshape(-1, points.shape[-1]).double()
    y = pts.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (pts - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * pts).sum(0) / w.sum()
        moved = (y_new - y).norm()
        y = y_new
        if moved <= tol * (y.norm() + eps):
            break
    return y.to(points.dtype)
