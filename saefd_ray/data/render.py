"""Rendering instances into token ids: the chat template when the tokenizer has one, loss on the answer only.

Every instance is rendered on its own (FAST's rule, and the natural unit for SFT): the prompt as a user
turn with the generation prompt appended, then the answer and the end-of-turn token. Labels are -100 on the
prompt, so the loss is the answer's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saefd_ray.data.tasks import Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int


def prompt_ids(tokenizer, prompt: str, max_prompt_len: int) -> list[int]:
    """Token ids of the prompt up to the point where the answer starts; long prompts keep their end."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
    return ids[-max_prompt_len:] if len(ids) > max_prompt_len else ids


def answer_ids(tokenizer, answer: str, max_answer_len: int) -> list[int]:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_answer_len - 1]
    return ids + [tokenizer.eos_token_id]


def encode(tokenizer, example: Example, max_prompt_len: int, max_answer_len: int) -> Encoded:
    prompt = prompt_ids(tokenizer, example.prompt, max_prompt_len)
    answer = answer_ids(tokenizer, example.answer, max_answer_len)
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, len(prompt))


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item of the batch (batches are built from length-sorted windows)."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
