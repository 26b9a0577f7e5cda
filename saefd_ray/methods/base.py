"""The interface every continual-learning method implements, and the default (SeqLoRA) behaviour.

The training loop knows nothing about methods beyond these hooks, called in this order for task t:

    driver   validate(model_path)                     check method inputs against the model before any training
    driver   training_examples(t, tasks, state_dir)  which examples train task t (replay, multi-task)
    worker   epochs(t, tasks)                         how many epochs stage t trains (mtl: its own setting)
    worker   prepare_model(model, ctx)                 wrap the base model in LoRA (o_lora, per_task differ)
             load_state(ctx)                          read what earlier tasks left in ctx.state_in
             regularizer(model, batch, task_loss)     extra loss term + scalars to log, every step
             after_task(model, ctx)                   compute and write this task's state into ctx.state_out
             adjust_row(row, base_row, ctx, split)    the R-matrix row to record, per split (per_task rewrites it)
             progress_state() / load_progress_state  optional: method state inside mid-task checkpoints

State lives in plain files under the task's checkpoint (safetensors / JSON), so a resumed sequence continues
exactly. A method that adds nothing (seq_lora) is this class as is.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from saefd_ray.config import RunConfig
from saefd_ray.data.tasks import Example, Task

ADAPTER = "adapter"


@dataclass
class TaskContext:
    """What a worker knows about the task being trained."""

    config: RunConfig
    task_index: int  # 0-based position in the sequence
    task_names: list[str]
    model_path: str
    tokenizer: Any
    state_in: Path | None  # previous task's checkpoint folder (None for the first task)
    state_out: Path  # this task's checkpoint folder being written (rank 0 writes)
    train_examples: list[Example] = field(default_factory=list)
    past_tasks: list[Task] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)  # the whole sequence (task_index indexes it)
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # mean over workers


class Method:
    """SeqLoRA: one LoRA adapter trained through the sequence with nothing added."""

    name = "seq_lora"
    fresh_adapter_per_task = False  # per_task / o_lora start each task from a new adapter
    joint_training = False  # mtl trains once on all tasks
    # trains task 1 exactly as seq_lora does (nothing to regularize yet), so it may adopt a stored task 1
    # (train/first_task.py); a method that adds anything on task 1 says False
    plain_first_task = True

    def __init__(self, config: RunConfig):
        self.config = config
        self.cfg = config.method

    # ---------------------------------------------------------------- driver side
    def validate(self, model_path: str) -> None:
        """Fail before any worker starts when the method's inputs (an SAE...) do not fit the model."""

    def training_examples(self, task_index: int, tasks: list[Task], state_dir: Path | None) -> list[Example]:
        return tasks[task_index].train

    def epochs(self, task_index: int, tasks: list[Task]) -> int:
        """Epochs of stage `task_index`: training.epochs_per_task of its task, else training.epochs."""
        training = self.config.training
        return training.epochs_per_task.get(tasks[task_index].name, training.epochs)

    def sae_folders(self) -> list[Path]:
        """The SAE folders this method reads (their files are part of what a resume compares)."""
        if not hasattr(self.cfg, "sae"):
            return []
        from saefd_ray.methods.sae_source import sae_folder, sae_sources

        return [sae_folder(source, "method.sae") for source in sae_sources(self.cfg)]

    # ---------------------------------------------------------------- worker side
    def prepare_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        """LoRA-wrap the base model; continue from the previous task's adapter unless told otherwise."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        lora = self.config.lora
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):  # the same LoRA init for every method, whatever RNG it used before
            torch.manual_seed(self.config.training.seed + 1000 * ctx.task_index)
            model = get_peft_model(model, peft_config)
        if ctx.state_in is not None and not self.fresh_adapter_per_task:
            set_peft_model_state_dict(model, load_adapter_weights(ctx.state_in / ADAPTER))
        return model

    def load_state(self, ctx: TaskContext) -> None:
        """Read state written by earlier tasks (nothing for SeqLoRA)."""

    def regularizer(self, model: nn.Module, batch: dict, task_loss: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """Extra loss for this step (None for none) and scalars to log."""
        return None, {}

    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        """Compute this task's state (Fisher, anchors, masks...) and write it into ctx.state_out on rank 0."""

    def adjust_row(self, row: list[float], base_row: list[float] | None, ctx: TaskContext,
                   split: str = "test") -> list[float]:
        """The R-matrix row recorded for this task, given the trained model's scores on every task's `split`."""
        return row


@contextmanager
def dropout_off(model: nn.Module):
    """Reference forwards (SAE-FD's anchor pass, LwF's teacher, sae_reg's base pass) run without dropout, LoRA's
    included, so they are deterministic: with `lora.dropout` 0.05, a dropped-out anchor pass would put a noise floor
    under L_FD at the reference (and into λ*). Gradients still flow; every module's train flag is restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def load_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def peft_key(name: str) -> str:
    """peft's on-disk key: the parameter name without the adapter name (what save_pretrained writes)."""
    return name.replace(".default.weight", ".weight").replace(".default.bias", ".bias")


@contextmanager
def gathered(params, zero_stage: int):
    """Full values of ZeRO-3 partitioned parameters inside the block (a no-op for ZeRO-2)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def trainable_state(model: nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Copies of the trainable (LoRA) parameters by name, gathered under ZeRO-3 (a collective there: every rank
    calls it). The worker saves these as the task's adapter; o_lora keeps each task's."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named], zero_stage):
        return {n: p.detach().clone().cpu() for n, p in named}


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable (LoRA) parameters by name, in a stable order.

    Weight-space methods (ewc, l2, o_lora) read these directly. Under ZeRO-3 that needs the LoRA tensors
    unpartitioned, which DeepSpeed's default `stage3_param_persistence_threshold` (1e5 elements) gives any
    LoRA matrix of r * d < 1e5; a partitioned one is reported instead of silently read as empty.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, param in named:
        if param.numel() == 0:
            raise RuntimeError(
                f"{name}: parameter is partitioned by ZeRO-3; raise zero_optimization.stage3_param_persistence_"
                f"threshold above its size or use zero_stage 2 for weight-space methods"
            )
    return named


class OutputCapture:
    """Keeps the output of one module from the last forward that ran with gradients enabled (training).

    Lets a regularizer reuse what the training forward already computed — the logits (lwf) or a layer's
    residual stream (sae_reg) — instead of running the model again. Forwards under no_grad (evaluation,
    reference passes) are ignored, so they never overwrite the training forward's tensor.
    """

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output) -> None:
        if torch.is_grad_enabled():
            self.value = output[0] if isinstance(output, tuple) else output

    def pop(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()
