"""A few seconds of full-parameter pre-training that turn the random tiny model into a usable base model.

LoRA adapts features a model already has; on a purely random network it barely moves the loss. So the
offline tiny model is first trained, all weights, on two held-out synthetic rules (rule_e, rule_f). It
learns the generic skill (read the words, give a direction) but none of the rules the demo sequence uses,
much as a pretrained LLM can follow instructions but does not know your tasks.
"""

from __future__ import annotations

import random

import torch

from saefd_ray.config import TaskConfig
from saefd_ray.data.render import collate, encode
from saefd_ray.data.synthetic import load_synthetic

PRETRAIN_RULES = ("rule_e", "rule_f")


def pretrain_on_synthetic(model, tokenizer, epochs: int, seed: int, lr: float = 1e-3, batch_size: int = 16) -> float:
    """Full fine-tuning on the held-out rules; returns the last epoch's mean loss."""
    examples = [
        e for rule in PRETRAIN_RULES for e in load_synthetic(TaskConfig(name=rule, format="synthetic", generator=rule)).train
    ]
    items = [encode(tokenizer, e, 64, 4) for e in examples]
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss_mean = float("nan")
    for _ in range(epochs):
        rng.shuffle(items)
        losses = []
        for start in range(0, len(items) - batch_size + 1, batch_size):
            loss = model(**collate(items[start : start + batch_size], tokenizer.pad_token_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        loss_mean = sum(losses) / len(losses)
    return loss_mean
