"""Scoring a model on a task's test (or validation) split, sharded over the Ray Train workers.

Classification tasks rank their label options by log-likelihood (no generation: fast on CPU and not fooled
by formatting); other tasks generate greedily and score the text. Each worker takes
every world_size-th example and the predictions are gathered; all ranks run the same number of forward
passes (padding batches are scored and dropped), which ZeRO-3 needs because its forward is collective.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from saefd_ray.data.render import answer_ids, prompt_ids
from saefd_ray.data.tasks import Example, Task


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left, so every row's next token goes in the same column (generation, caching)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def last_position(device) -> torch.Tensor:
    """`logits_to_keep` for the last position only, as an index tensor rather than the int 1.

    With the int, transformers slices the hidden states to a strided view, and the CPU matmul of the LM head
    over that view rounded differently for the base model and the same model freshly LoRA-wrapped (logits
    ~2e-6 apart, also in HF generate's prefill, which passes the int by default). With an index tensor it
    gathers them into a fresh contiguous tensor, and the two agree bit for bit: the base-row cache relies on
    that (train/base_rows.py, tests/test_base_rows.py).
    """
    return torch.tensor([-1], device=device)


@torch.no_grad()
def option_scores(model, tokenizer, examples: list[Example], options: list[str], cfg, device) -> torch.Tensor:
    """Σ log p(option tokens | prompt) for every (example, option): a (len(examples), len(options)) tensor.

    Each batch of prompts runs once; its KV cache is repeated for the options, which then run as one short
    batch. With 14 labels and 100-token prompts that is ~10x fewer tokens than scoring prompt+option per
    option. The prompt pass needs only its last position's logits: the LM head is the largest matmul of a
    small model's forward (SmolLM2: vocab 49,152 x 576, 28 M of its 135 M weights), and over every prompt
    position it would be computed to be thrown away (`last_position`). Both passes run on every batch, so
    ranks keep equal forward counts (ZeRO-3).
    """
    n = len(options)
    encoded = [answer_ids(tokenizer, option, cfg.training.max_answer_len) for option in options]
    width = max(len(tokens) for tokens in encoded)  # >= 2: every option ends with EOS
    option_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    option_mask = torch.zeros_like(option_ids)
    for row, tokens in enumerate(encoded):
        option_ids[row, : len(tokens)] = torch.tensor(tokens)
        option_mask[row, : len(tokens)] = 1
    option_ids, option_mask = option_ids.to(device), option_mask.to(device)
    steps = torch.arange(width - 1, device=device)
    scores = []
    bs = max(1, cfg.evaluation.batch_size)
    for start in range(0, len(examples), bs):
        prompts = [prompt_ids(tokenizer, e.prompt, cfg.training.max_prompt_len) for e in examples[start : start + bs]]
        ids, mask = (t.to(device) for t in left_padded(prompts, tokenizer.pad_token_id))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=last_position(device))  # left padding: every prompt ends in the last column
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)  # rows: example 0 option 0..n-1, example 1 option 0..n-1, ...
        rows = len(prompts) * n
        targets = option_ids.repeat(len(prompts), 1)
        targets_mask = option_mask.repeat(len(prompts), 1)
        # The prompt's last logits score each option's first token; the options' own pass scores the rest.
        first = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(n, 0)
        first = first.gather(-1, targets[:, :1]).squeeze(-1)
        rest = model(
            input_ids=targets[:, :-1],
            attention_mask=torch.cat([mask.repeat_interleave(n, 0), targets_mask[:, :-1]], -1),
            position_ids=positions[:, -1:].repeat_interleave(n, 0) + 1 + steps.expand(rows, -1),
            past_key_values=cache,
            use_cache=False,
        ).logits.float()
        picked = torch.log_softmax(rest, -1).gather(-1, targets[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores.append((first + (picked * targets_mask[:, 1:]).sum(-1)).view(len(prompts), n).cpu())
    return torch.cat(scores) if scores else torch.empty(0, n)


def option_predictions(model, tokenizer, examples: list[Example], options: list[str], cfg, device) -> list[str]:
    """The most likely option of each example."""
    best = option_scores(model, tokenizer, examples, options, cfg, device).argmax(-1)
    return [options[i] for i in best.tolist()]


@torch.no_grad()
def generated_predictions(model, tokenizer, examples: list[Example], cfg, device, synced: bool) -> list[str]:
    predictions = []
    bs = cfg.evaluation.batch_size
    for start in range(0, len(examples), bs):
        prompts = [prompt_ids(tokenizer, e.prompt, cfg.training.max_prompt_len) for e in examples[start : start + bs]]
        ids, mask = left_padded(prompts, tokenizer.pad_token_id)
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=cfg.evaluation.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
            logits_to_keep=last_position(device),  # every step's LM head at one position (prefill included)
        )
        predictions += [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return predictions


def score_task(model, tokenizer, task: Task, cfg, device, split: str = "test") -> float:
    """The task's metric (0-100) over its full `split` ("test" or "validation"); identical on every rank."""
    from saefd_ray.eval.metrics import score

    examples: list[Example] = getattr(task, split)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per_rank = math.ceil(len(examples) / world)
    shard = examples[rank::world]
    padded = shard + [examples[0]] * (per_rank - len(shard))  # equal forward counts on all ranks
    if task.options:
        predictions = option_predictions(model, tokenizer, padded, task.options, cfg, device)
    else:
        synced = world > 1 and cfg.distributed.zero_stage == 3
        predictions = generated_predictions(model, tokenizer, padded, cfg, device, synced)
    predictions = predictions[: len(shard)]
    if world > 1:
        gathered: list[list[str]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, predictions)
    else:
        gathered = [predictions]
    ordered = [None] * len(examples)
    for r, preds in enumerate(gathered):
        ordered[r::world] = preds
    references = [e.answer for e in examples]
    sources = [e.prompt for e in examples] if task.metric == "sari" else None  # SARI scores against the inputs
    return score(task.metric, ordered, references, sources=sources)


def score_row(model, tokenizer, tasks: list[Task], cfg, device, split: str = "test", on_task=None,
              known: list[float | None] | None = None) -> list[float]:
    """One R-matrix row: every task's score on its `split`; `on_task(done, total)` after each task (progress).

    `known`: scores already known per task (the base row's cache, train/base_rows.py), taken as they are; the
    tasks whose entry is None are scored. Every rank gets the same list, so all skip the same forwards."""
    model.eval()
    row = []
    for index, task in enumerate(tasks):
        cached = known[index] if known is not None else None
        row.append(cached if cached is not None else score_task(model, tokenizer, task, cfg, device, split))
        if on_task is not None:
            on_task(len(row), len(tasks))
    model.train()
    return row
