"""FAST's training recipe as plain functions of the step (no state, so a resumed or distributed run agrees)."""
from __future__ import annotations

import math
from typing import Callable

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


def fit_schedule(total_steps: int, lr_warmup_steps: int, lr_decay_steps: int, sparsity_warmup_steps: int) -> dict:
    """The schedule actually used by a run of ``total_steps``: the configured lengths when they fit, else scaled to it.

    FAST's lengths (LR warm-up 16k, decay 64k, sparsity warm-up 10k steps) assume a long run; 1M tokens at batch 4096
    is 244 steps, which would never leave warm-up. When LR warm-up + decay exceed the run, all three lengths are
    scaled by one factor so that warm-up + decay take half the run (FAST's proportions kept, a cosine phase left in
    between); a sparsity warm-up still longer than the run then becomes half of it. Returns the lengths used, the
    configured ones, the factor and ``scaled`` (whether anything changed).
    """
    configured = {"lr_warmup_steps": lr_warmup_steps, "lr_decay_steps": lr_decay_steps,
                  "sparsity_warmup_steps": sparsity_warmup_steps}
    total = max(1, total_steps)
    factor = 1.0
    if lr_warmup_steps + lr_decay_steps > total:
        factor = 0.5 * total / (lr_warmup_steps + lr_decay_steps)

    def scale(steps: int) -> int:
        return steps if factor == 1.0 or steps == 0 else max(1, round(steps * factor))

    used = {name: scale(steps) for name, steps in configured.items()}
    if used["sparsity_warmup_steps"] > total:
        used["sparsity_warmup_steps"] = max(1, total // 2)
    return {"total_steps": total, **used, "configured": configured, "factor": factor, "scaled": used != configured}


def sparsity_warmup(step: int, warmup_steps: int) -> float:
    """Multiplier on λ: linear ramp 0 → 1 over ``warmup_steps`` (FAST: 10k), then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8,
                     all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Weiszfeld iterations: the point minimising Σ‖p − y‖ — a b_dec init robust to outlier activations.

    Each step re-weights points by 1/distance; stops when the move is below ``tol`` relative to the estimate's norm.
    With ``all_reduce`` (an in-place sum across ranks) the points are the union of every rank's ``points``: each
    step's two sums are reduced, so every rank gets the same median without gathering the points.
    """
    reduce = all_reduce or (lambda t: t)
    pts = points.reshape(-1, points.shape[-1]).double()
    count = reduce(torch.tensor([float(pts.shape[0])], dtype=torch.float64, device=pts.device))
    y = reduce(pts.sum(0)) / count
    for _ in range(max_iter):
        w = 1.0 / (pts - y).norm(dim=1).clamp_min(eps)
        y_new = reduce((w[:, None] * pts).sum(0)) / reduce(w.sum().reshape(1))
        moved = (y_new - y).norm()
        y = y_new
        if moved <= tol * (y.norm() + eps):
            break
    return y.to(points.dtype)
