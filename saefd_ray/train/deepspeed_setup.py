"""DeepSpeed ZeRO configuration and engine creation for LoRA training, identical on CPU (gloo) and GPU (nccl).

Ray Train has already initialised torch.distributed (gloo on CPU, nccl on GPU); DeepSpeed reuses that process
group. The optimizer is plain torch AdamW over the trainable (LoRA) parameters: DeepSpeed's fused Adam needs
CUDA, and for a few MB of adapter weights the difference is nil.
"""

from __future__ import annotations

import math
import os

import torch


def select_accelerator(use_gpu: bool) -> None:
    """Must run before `import deepspeed`: it picks its accelerator at import time."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")


def deepspeed_config(config, steps: int) -> dict:
    t = config.training
    use_gpu = config.distributed.use_gpu
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": config.distributed.zero_stage,
                              **({"stage3_param_persistence_threshold": config.distributed.zero3_persistence_threshold}
                                 if config.distributed.zero_stage == 3 else {})},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": use_gpu and config.model.dtype == "bfloat16"},
        "fp16": {"enabled": use_gpu and config.model.dtype == "float16"},
        "steps_per_print": max(steps, 1) * 10,
        "wall_clock_breakdown": False,
    }


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warm-up then cosine to 10 % of the peak: a steady default for short LoRA runs."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def create_engine(model, config, optimizer_steps: int):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.training.lr, weight_decay=config.training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optimizer_steps, config.training.warmup_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, optimizer_steps),
    )
    return engine
