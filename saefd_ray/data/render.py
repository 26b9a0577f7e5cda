"""Rendering instances into token ids: the chat template when the tokenizer has one, loss on the answer only.

Every instance is rendered on its own (FAST's rule, and the natural unit for SFT): the prompt as a user
turn with the generation prompt appended, then the answer and the end-of-turn token. Labels are -100 on the
prompt, so the loss is the answer's alone. `shard_batches` cuts the encoded instances into each rank's batches
(used by the training loop and by methods that re-read the task, e.g. EWC's Fisher pass).
"""

from __future__ import annotations

import random
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


def shard_batches(items: list, batch_size: int, rank: int, world: int, seed: int) -> list[list]:
    """This rank's batches for one epoch: a seeded shuffle, an equal share per rank, length-sorted windows.

    Every rank gets the same number of batches (the remainder is dropped), since ZeRO's collectives need
    lock-step. Sorting by length inside windows of 16 batches keeps padding small without losing randomness.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    per_rank = len(order) // world
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    window = batch_size * 16
    batches = []
    for start in range(0, len(mine) - batch_size + 1, window):
        chunk = sorted(mine[start : start + window], key=lambda i: len(items[i].input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    random.Random(seed + 1).shuffle(batches)
    return [[items[i] for i in batch] for batch in batches]
