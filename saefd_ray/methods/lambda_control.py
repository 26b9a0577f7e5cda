"""SAE-FD's adaptive weight λ: keep λ·L_FD a fixed share ρ of the total loss.

    λ* = ρ/(1−ρ) · L_task / L_FD             (detached scalars: λ is a schedule, not a parameter)
    λ  ← clip((1−α)·λ + α·λ*, λ_min, λ_max)  (EMA, α = 0.05; clip [0.2, 10]; ρ = 0.15 by default)

With λ = λ*, λ·L_FD / (L_task + λ·L_FD) = ρ exactly; the EMA tracks it smoothly and the clip bounds it when
L_FD is tiny (right after a task begins the model still equals its anchors, so λ* is huge) or huge. Steps where
L_FD is zero or non-finite leave λ unchanged (λ* is undefined there). The update runs before λ is applied, so
the step's loss already uses the new λ.
"""

from __future__ import annotations

import math


class LambdaController:
    def __init__(self, rho: float = 0.15, alpha: float = 0.05, init: float = 1.0, clip: tuple[float, float] = (0.2, 10.0)):
        if not 0 < rho < 1:
            raise ValueError(f"rho must be in (0, 1), got {rho}")
        self.rho, self.alpha = rho, alpha
        self.low, self.high = clip
        self.value = min(max(init, self.low), self.high)

    def target(self, task_loss: float, fd_loss: float) -> float | None:
        if not (math.isfinite(task_loss) and math.isfinite(fd_loss)) or fd_loss <= 1e-12:
            return None
        return self.rho / (1 - self.rho) * task_loss / fd_loss

    def update(self, task_loss: float, fd_loss: float) -> float:
        target = self.target(task_loss, fd_loss)
        if target is not None:
            self.value = min(max((1 - self.alpha) * self.value + self.alpha * target, self.low), self.high)
        return self.value

    def share(self, task_loss: float, fd_loss: float) -> float:
        """Realized share λ·L_FD / (L_task + λ·L_FD) of the current λ."""
        weighted = self.value * fd_loss
        total = task_loss + weighted
        return weighted / total if total > 0 else 0.0

    def state(self) -> dict:
        return {"lambda": self.value}

    def load(self, state: dict) -> None:
        self.value = float(state["lambda"])
