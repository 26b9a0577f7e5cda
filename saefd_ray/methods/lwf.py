"""LwF: KL from the previous model's token distribution to the current one's, on the current inputs.

    L = weight · T² · mean over non-pad positions of KL( softmax(z_prev / T) ‖ softmax(z / T) )

The previous model is the same network with the previous task's LoRA weights (its `adapter/`). Its logits are
computed by **swapping weights**: under no_grad the LoRA tensors are overwritten in place with the previous
adapter's values, one forward runs, and the current values are copied back — bit-exact, no second model in
memory, and the same parameters DeepSpeed manages (nothing is read between its step and the next forward). The
current logits come from the training forward itself (a hook on the LM head), so LwF costs one extra
gradient-free forward per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saefd_ray.methods.base import (ADAPTER, Method, OutputCapture, TaskContext, dropout_off, load_adapter_weights,
                                    peft_key, trainable_params)


def distill_kl(logits: Tensor, teacher: Tensor, mask: Tensor, temperature: float) -> Tensor:
    t = temperature
    log_p = torch.log_softmax(logits.float() / t, dim=-1)
    log_q = torch.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    mask = mask.bool()
    return t * t * kl[mask].mean()


@torch.no_grad()
def logits_with(model: nn.Module, weights: dict[str, Tensor], batch: dict) -> Tensor:
    """Logits of the model with its LoRA parameters temporarily replaced by `weights` (peft keys)."""
    named = [(n, p) for n, p in trainable_params(model) if peft_key(n) in weights]
    saved = [p.detach().clone() for _, p in named]
    try:
        for name, param in named:
            param.data.copy_(weights[peft_key(name)])
        with dropout_off(model):  # the teacher is deterministic
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for (_, param), value in zip(named, saved):
            param.data.copy_(value)


class Lwf(Method):
    name = "lwf"

    def __init__(self, config):
        super().__init__(config)
        self.previous: dict[str, Tensor] = {}
        self.capture: OutputCapture | None = None

    def prepare_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        model = super().prepare_model(model, ctx)
        if ctx.state_in is not None:  # the first task has no previous model: nothing to keep
            self.capture = OutputCapture(model.get_output_embeddings())
        return model

    def load_state(self, ctx: TaskContext) -> None:
        self.previous = {}
        if ctx.state_in is not None:
            self.previous = {k: v.to(ctx.device) for k, v in load_adapter_weights(ctx.state_in / ADAPTER).items()}

    def regularizer(self, model: nn.Module, batch: dict, task_loss: Tensor) -> tuple[Tensor | None, dict]:
        if not self.previous:
            return None, {}
        current = self.capture.pop() if self.capture else None
        if current is None:
            current = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = logits_with(model, self.previous, batch)
        kl = distill_kl(current, teacher, batch["attention_mask"], self.cfg.temperature)
        return self.cfg.weight * kl, {"lwf_kl": float(kl.detach())}
