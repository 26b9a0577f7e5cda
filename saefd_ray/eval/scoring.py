"""Scoring a model on a task's test split, sharded over the Ray Train workers.

Classification tasks rank their label options by log-likelihood (one forward per batch, no generation: fast
on CPU and not fooled by formatting); other tasks generate greedily and score the text. Each worker takes
every world_size-th example and the predictions are gathered; all ranks run the same number of forward
passes (padding batches are scored and dropped), which ZeRO-3 needs because its forward is collective.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from saefd_ray.data.render import IGNORE, Encoded, answer_ids, collate, prompt_ids
from saefd_ray.data.tasks import Example, Task


@torch.no_grad()
def option_predictions(model, tokenizer, examples: list[Example], options: list[str], cfg, device) -> list[str]:
    """argmax over options of Σ log p(option tokens | prompt)."""
    items: list[Encoded] = []
    for example in examples:
        prompt = prompt_ids(tokenizer, example.prompt, cfg.training.max_prompt_len)
        for option in options:
            answer = answer_ids(tokenizer, option, cfg.training.max_answer_len)
            items.append(Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, len(prompt)))
    scores = []
    step = max(1, cfg.evaluation.batch_size) * len(options)
    for start in range(0, len(items), step):
        batch = {k: v.to(device) for k, v in collate(items[start : start + step], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = targets != IGNORE
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append((picked * mask).sum(-1).cpu())
    if not scores:
        return []
    best = torch.cat(scores).view(len(examples), len(options)).argmax(-1)
    return [options[i] for i in best.tolist()]


@torch.no_grad()
def generated_predictions(model, tokenizer, examples: list[Example], cfg, device, synced: bool) -> list[str]:
    predictions = []
    bs = cfg.evaluation.batch_size
    for start in range(0, len(examples), bs):
        prompts = [prompt_ids(tokenizer, e.prompt, cfg.training.max_prompt_len) for e in examples[start : start + bs]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding for generation
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=cfg.evaluation.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        predictions += [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return predictions


def score_task(model, tokenizer, task: Task, cfg, device) -> float:
    """The task's metric (0-100) over its full test split; identical on every rank."""
    from saefd_ray.eval.metrics import score

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per_rank = math.ceil(len(task.test) / world)
    shard = task.test[rank::world]
    padded = shard + [task.test[0]] * (per_rank - len(shard))  # equal forward counts on all ranks
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
    ordered = [None] * len(task.test)
    for r, preds in enumerate(gathered):
        ordered[r::world] = preds
    references = [e.answer for e in task.test]
    return score(task.metric, ordered, references, sources=task.sources)


def score_row(model, tokenizer, tasks: list[Task], cfg, device) -> list[float]:
    model.eval()
    row = [score_task(model, tokenizer, task, cfg, device) for task in tasks]
    model.train()
    return row
