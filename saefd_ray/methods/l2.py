"""L2: weight · Σ (θ − θ_prev)² over the LoRA parameters, θ_prev = the previous task's adapter (its checkpoint's
`adapter/`, so no extra state is needed). Nothing is added in the first task."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saefd_ray.methods.base import ADAPTER, Method, TaskContext, load_adapter_weights, peft_key, trainable_params


def l2_penalty(model: nn.Module, reference: dict[str, Tensor], weight: float) -> Tensor:
    named = [(n, p) for n, p in trainable_params(model) if peft_key(n) in reference]
    current = torch.cat([p.reshape(-1) for _, p in named])
    ref = torch.cat([reference[peft_key(n)].reshape(-1) for n, _ in named])
    return weight * (current - ref).pow(2).sum()


class L2(Method):
    name = "l2"

    def __init__(self, config):
        super().__init__(config)
        self.reference: dict[str, Tensor] = {}

    def load_state(self, ctx: TaskContext) -> None:
        self.reference = {}
        if ctx.state_in is not None:
            self.reference = {k: v.to(ctx.device) for k, v in load_adapter_weights(ctx.state_in / ADAPTER).items()}

    def regularizer(self, model: nn.Module, batch: dict, task_loss: Tensor) -> tuple[Tensor | None, dict]:
        if not self.reference:
            return None, {}
        penalty = l2_penalty(model, self.reference, self.cfg.weight)
        return penalty, {"l2": float(penalty.detach())}
