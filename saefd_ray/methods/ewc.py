"""EWC: 0.5·λ·Σ_i F_i (θ_i − θ*_i)² over the LoRA parameters (papers.md §4).

After each task the diagonal Fisher of the LoRA parameters is estimated as the mean squared gradient of the
task loss over `fisher_batches` mini-batches of the task's training data (each rank its own shard, averaged
over ranks) and ADDED to the Fisher of earlier tasks; θ* is the adapter at the end of the task. Both are saved
with the task (`ewc/fisher.safetensors`, `ewc/theta.safetensors`, keyed by parameter name).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saefd_ray.methods.base import Method, TaskContext, trainable_params

FISHER, THETA = "ewc/fisher.safetensors", "ewc/theta.safetensors"


def ewc_penalty(model: nn.Module, fisher: dict[str, Tensor], theta: dict[str, Tensor], weight: float) -> Tensor:
    """One flat vector instead of a loop over every LoRA tensor: 4 ops per step, whatever the model's depth."""
    named = [(n, p) for n, p in trainable_params(model) if n in fisher]
    current = torch.cat([p.reshape(-1) for _, p in named])
    f = torch.cat([fisher[n].reshape(-1) for n, _ in named])
    ref = torch.cat([theta[n].reshape(-1) for n, _ in named])
    return 0.5 * weight * (f * (current - ref).pow(2)).sum()


def diagonal_fisher(model: nn.Module, batches: list[dict], all_reduce=lambda t: t) -> dict[str, Tensor]:
    """Mean over batches of the squared gradient of the batch loss, per LoRA parameter (torch.autograd.grad:
    nothing is accumulated into .grad, so DeepSpeed's gradient hooks are not triggered)."""
    named = trainable_params(model)
    fisher = [torch.zeros_like(p) for _, p in named]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for acc, grad in zip(fisher, grads):
                if grad is not None:
                    acc += grad.detach().pow(2) / max(1, len(batches))
    finally:
        model.train(was_training)
    flat = all_reduce(torch.cat([f.flatten() for f in fisher])) if fisher else torch.zeros(0)
    out, offset = {}, 0
    for (name, param), acc in zip(named, fisher):
        out[name] = flat[offset : offset + acc.numel()].view_as(acc).clone()
        offset += acc.numel()
    return out


class Ewc(Method):
    name = "ewc"

    def __init__(self, config):
        super().__init__(config)
        self.fisher: dict[str, Tensor] = {}
        self.theta: dict[str, Tensor] = {}

    def load_state(self, ctx: TaskContext) -> None:
        from safetensors.torch import load_file

        self.fisher, self.theta = {}, {}
        if ctx.state_in is not None and (ctx.state_in / FISHER).is_file():
            self.fisher = {k: v.to(ctx.device) for k, v in load_file(str(ctx.state_in / FISHER)).items()}
            self.theta = {k: v.to(ctx.device) for k, v in load_file(str(ctx.state_in / THETA)).items()}

    def regularizer(self, model: nn.Module, batch: dict, task_loss: Tensor) -> tuple[Tensor | None, dict]:
        if not self.fisher:
            return None, {}
        penalty = ewc_penalty(model, self.fisher, self.theta, self.cfg.weight)
        return penalty, {"ewc": float(penalty.detach())}

    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        from safetensors.torch import save_file

        from saefd_ray.data.render import collate, encode, shard_batches

        cfg = self.config.training
        own = ctx.tasks[ctx.task_index].train if ctx.tasks else ctx.train_examples
        encoded = [encode(ctx.tokenizer, e, cfg.max_prompt_len, cfg.max_answer_len) for e in own]
        items = shard_batches(encoded, cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed + 17 * ctx.task_index)
        batches = [{k: v.to(ctx.device) for k, v in collate(b, ctx.tokenizer.pad_token_id).items()}
                   for b in items[: self.cfg.fisher_batches]]
        fisher = diagonal_fisher(model, batches, ctx.all_reduce)
        for name, old in self.fisher.items():
            fisher[name] = fisher[name] + old
        if ctx.rank == 0:
            (ctx.state_out / "ewc").mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in fisher.items()}, str(ctx.state_out / FISHER))
            theta = {n: p.detach().cpu().clone().contiguous() for n, p in trainable_params(model)}
            save_file(theta, str(ctx.state_out / THETA))
