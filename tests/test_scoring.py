"""Option ranking with a shared prompt cache equals scoring every prompt+option sequence on its own."""

from __future__ import annotations

import random

import torch

from saefd_ray.config import RunConfig
from saefd_ray.data.render import answer_ids, prompt_ids
from saefd_ray.data.tasks import Example
from saefd_ray.eval.scoring import option_predictions, option_scores
from saefd_ray.models.loading import load_model, load_tokenizer

OPTIONS = ["north", "south", "south by south west", "kalo mitu"]  # options of 2 to 5+ tokens


def lora_model(path: str):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 would make the adapter a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


@torch.no_grad()
def reference_scores(model, tokenizer, examples, options, cfg) -> torch.Tensor:
    """The definition: one forward per (example, option) over prompt + option, no padding, no cache."""
    rows = []
    for example in examples:
        prompt = prompt_ids(tokenizer, example.prompt, cfg.training.max_prompt_len)
        row = []
        for option in options:
            answer = answer_ids(tokenizer, option, cfg.training.max_answer_len)
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
            row.append(logprobs.gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_cached_option_scores_equal_per_option_forwards(tiny_model_path, one_thread):
    tokenizer = load_tokenizer(tiny_model_path)
    model = lora_model(tiny_model_path)
    rng = random.Random(0)
    words = ["kalo", "mitu", "rezo", "pani", "suve", "dobi"]
    # prompt lengths 1-40 words, some cut to max_prompt_len: batches mix very different left padding
    examples = [Example(" ".join(rng.choices(words, k=rng.randint(1, 40))), "north") for _ in range(11)]
    cfg = RunConfig.model_validate({
        "tasks": {"sequence": [{"name": "a", "format": "synthetic", "generator": "rule_a"}]},
        "training": {"max_prompt_len": 48, "max_answer_len": 4},
        "evaluation": {"batch_size": 4},  # 11 examples: batches of 4, 4, 3
    })
    lengths = {len(prompt_ids(tokenizer, e.prompt, 48)) for e in examples}
    assert len(lengths) > 3 and max(lengths) == 48

    fast = option_scores(model, tokenizer, examples, OPTIONS, cfg, torch.device("cpu"))
    slow = reference_scores(model, tokenizer, examples, OPTIONS, cfg)
    assert fast.shape == (11, 4)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert option_predictions(model, tokenizer, examples, OPTIONS, cfg, torch.device("cpu")) == [
        OPTIONS[i] for i in slow.argmax(-1).tolist()
    ]
    # a truncated option (max_answer_len 4 keeps 3 tokens + EOS) is scored on what is kept
    assert len(answer_ids(tokenizer, OPTIONS[2], 4)) == 4


class FullLogits(torch.nn.Module):
    """The model with `logits_to_keep` forced to 0 (logits at every position): scoring as it was before the
    prompt pass kept only the last position. Records what the scorer asked for."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.asked: list = []

    def forward(self, **kwargs):
        self.asked.append(kwargs.get("logits_to_keep"))
        return self.model(**{**kwargs, "logits_to_keep": 0})


def test_prompt_pass_computes_last_logits_only_and_scores_the_same(tiny_model_path, one_thread):
    tokenizer = load_tokenizer(tiny_model_path)
    model = lora_model(tiny_model_path)
    rng = random.Random(1)
    words = ["kalo", "mitu", "rezo", "pani", "suve", "dobi"]
    examples = [Example(" ".join(rng.choices(words, k=rng.randint(1, 40))), "north") for _ in range(10)]
    cfg = RunConfig.model_validate({
        "tasks": {"sequence": [{"name": "a", "format": "synthetic", "generator": "rule_a"}]},
        "training": {"max_prompt_len": 48, "max_answer_len": 4},
        "evaluation": {"batch_size": 4},  # batches of 4, 4, 2 with different left padding
    })
    head_shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: head_shapes.append(out.shape))
    try:
        kept = option_scores(model, tokenizer, examples, OPTIONS, cfg, torch.device("cpu"))
    finally:
        handle.remove()
    assert len(head_shapes) == 6  # 3 batches x (prompt pass, options pass)
    assert all(shape[1] == 1 for shape in head_shapes[0::2])  # the prompt pass: the LM head at one position
    assert all(shape[1] > 1 for shape in head_shapes[1::2])  # the options pass: every option position

    wrapped = FullLogits(model)
    full = option_scores(wrapped, tokenizer, examples, OPTIONS, cfg, torch.device("cpu"))
    assert all(index.tolist() == [index.item()] for index in wrapped.asked[0::2])  # one column: the last
    # float32 rounding only (the LM head's matmul over B rows blocks differently from B x width rows): ulps
    assert torch.allclose(kept, full, rtol=1e-6, atol=1e-6), (kept - full).abs().max()
    assert torch.equal(kept.argmax(-1), full.argmax(-1))


def test_generation_prefill_keeps_one_position(tiny_model_path, one_thread):
    """Every generate step, the prefill included, computes the LM head at the last position only (through peft)."""
    from saefd_ray.eval.scoring import generated_predictions

    tokenizer = load_tokenizer(tiny_model_path)
    model = lora_model(tiny_model_path)
    cfg = RunConfig.model_validate({
        "tasks": {"sequence": [{"name": "a", "format": "synthetic", "generator": "rule_a"}]},
        "training": {"max_prompt_len": 48}, "evaluation": {"batch_size": 2, "max_new_tokens": 3},
    })
    head_shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: head_shapes.append(out.shape))
    try:
        generated_predictions(model, tokenizer, [Example("kalo mitu rezo pani", "x"), Example("suve", "x")], cfg,
                              torch.device("cpu"), synced=False)
    finally:
        handle.remove()
    assert head_shapes and all(shape[1] == 1 for shape in head_shapes), head_shapes
