"""O-LoRA: a new LoRA per task, orthogonal to the frozen LoRAs of earlier tasks (papers.md §4).

    L = CE + λ1 · Σ_old Σ_modules Σ |A_old A_newᵀ|  +  λ2 · Σ_tensors ‖θ_new‖₂

The L2 term follows O-LoRA's released code (`l2_loss += torch.norm(param, p=2)` over the new LoRA's A and B
tensors): a sum of plain (Frobenius) norms, one per tensor, not a squared norm as the paper's notation suggests.

Old adapters stay frozen and active. We **merge** them into the base weights before wrapping the model in the
new task's LoRA (W ← W + s·B_old A_old, in task order): the forward is the same as keeping them as frozen side
branches, costs nothing per step, and leaves only the new LoRA trainable. State: every task's adapter, in
`o_lora/adapters/NN-<task>.safetensors` (peft keys), carried forward so a checkpoint holds all of them. The
task checkpoint's `adapter/` is that task's LoRA alone: the model is base + all of `o_lora/adapters/` merged.
"""

from __future__ import annotations

import shutil

import torch
from torch import Tensor, nn

from saefd_ray.methods.base import Method, TaskContext, peft_key, trainable_params, trainable_state

ADAPTERS = "o_lora/adapters"


def orthogonality(model: nn.Module, old_a: dict[str, list[Tensor]]) -> Tensor:
    terms = [(old @ p.t()).abs().sum() for n, p in trainable_params(model) if "lora_A" in n
             for old in old_a.get(peft_key(n), [])]
    return torch.stack(terms).sum() if terms else None


class OLora(Method):
    name = "o_lora"
    plain_first_task = False  # its L2 term acts from task 1 on
    fresh_adapter_per_task = True

    def __init__(self, config):
        super().__init__(config)
        self.old_a: dict[str, list[Tensor]] = {}

    def _adapter_files(self, folder):
        if folder is None or not (folder / ADAPTERS).is_dir():
            return []
        return sorted((folder / ADAPTERS).glob("*.safetensors"))

    def prepare_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        lora = self.config.lora
        for path in self._adapter_files(ctx.state_in):
            peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                     task_type="CAUSAL_LM")
            wrapped = get_peft_model(model, peft_config)
            set_peft_model_state_dict(wrapped, load_file(str(path)))
            model = wrapped.merge_and_unload()
        return super().prepare_model(model, ctx)

    def load_state(self, ctx: TaskContext) -> None:
        from safetensors.torch import load_file

        self.old_a = {}
        for path in self._adapter_files(ctx.state_in):
            for key, value in load_file(str(path)).items():
                if "lora_A" in key:
                    self.old_a.setdefault(key, []).append(value.to(ctx.device))

    def regularizer(self, model: nn.Module, batch: dict, task_loss: Tensor) -> tuple[Tensor | None, dict]:
        extra, logs = None, {}
        if self.old_a and self.cfg.lambda_orth > 0:
            orth = orthogonality(model, self.old_a)
            if orth is not None:
                extra = self.cfg.lambda_orth * orth
                logs["orth"] = float(orth.detach())
        if self.cfg.lambda_l2 > 0:
            l2 = torch.stack([p.norm() for _, p in trainable_params(model)]).sum()  # O-LoRA's code: plain norms
            extra = self.cfg.lambda_l2 * l2 if extra is None else extra + self.cfg.lambda_l2 * l2
            logs["l2"] = float(l2.detach())
        return extra, logs

    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        from safetensors.torch import save_file

        state = trainable_state(model, self.config.distributed.zero_stage)  # collective under ZeRO-3
        if ctx.rank != 0:
            return
        if self._adapter_files(ctx.state_in):
            shutil.copytree(ctx.state_in / ADAPTERS, ctx.state_out / ADAPTERS, dirs_exist_ok=True)
        (ctx.state_out / ADAPTERS).mkdir(parents=True, exist_ok=True)
        name = f"{ctx.task_index + 1:02d}-{ctx.task_names[ctx.task_index]}.safetensors"
        save_file({peft_key(k): v.contiguous() for k, v in state.items()}, str(ctx.state_out / ADAPTERS / name))
