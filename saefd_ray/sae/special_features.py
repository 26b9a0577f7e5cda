"""FAST §6: the SAE features of chat-template tokens, and steering the model with them.

`top_features`: for each target token (`<|im_start|>`, `<|im_end|>`, `user`, `assistant`; a word the vocabulary
splits counts at its last piece), every instance that contains it gives, per feature, its maximum activation over that token's positions; those maxima are averaged over
the instances, and the `top` features by that average are listed (FAST's "average max activation"). Attention sinks
(the SAE's own rule, sae/sinks.py — position 0 is the first `<|im_start|>`) are not counted.

`steered_generate`: greedy generation with α·d_k added to the residual stream after decoder layer L at every
position (prompt and generated), d_k = row k of the SAE's saved decoder — the residual-stream change one unit of
feature k's code makes. α = 0 adds exact zeros, so it equals plain greedy generation token for token.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "user", "assistant")


def target_ids(tokenizer, token: str) -> list[int]:
    """The ids that spell `token`: one id if the vocabulary has it whole (special tokens, `user` in SmolLM2),
    else its tokenization (SmolLM2 spells `assistant` as `ass` + `istant`)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tid) == token:
        return [tid]
    return list(tokenizer(token, add_special_tokens=False)["input_ids"])


def match_ends(seq: Tensor, target: list[int]) -> Tensor:
    """Bool [T]: positions where `target` ends in `seq` (the last token of a multi-token target has seen all of it)."""
    n, k = len(seq), len(target)
    hit = torch.zeros(n, dtype=torch.bool)
    if k == 0 or k > n:
        return hit
    windows = seq.unfold(0, k, 1)  # [T-k+1, k]
    hit[k - 1 :] = (windows == torch.tensor(target, dtype=seq.dtype)).all(1)
    return hit


@torch.no_grad()
def top_features(model: nn.Module, tokenizer, sae, layer: int, sequences: Sequence[list[int]],
                 tokens: Sequence[str] = CHAT_TOKENS, top: int = 5, device: str | torch.device = "cpu") -> dict:
    """{token: {"ids", "instances", "features": [{"feature", "mean_max_activation"}, ...top]}} over `sequences`
    (token ids, one instance each; run alone, so no padding). A multi-token target counts at its last token."""
    from saefd_ray.models.loading import residual_stream
    from saefd_ray.sae.sinks import sae_sink_ratio, sink_mask

    ratio = sae_sink_ratio(sae)
    ids = {t: target_ids(tokenizer, t) for t in tokens}
    sums = {t: torch.zeros(sae.cfg.d_sae, dtype=torch.float64) for t in tokens}
    counts = {t: 0 for t in tokens}
    for seq in sequences:
        x = torch.tensor([seq], device=device)
        hidden = residual_stream(model, x, None, [layer])[layer][0]
        keep = ~sink_mask(hidden, None, ratio).cpu()
        codes = sae.encode(hidden.to(sae.dtype)).float().cpu()
        for t, target in ids.items():
            where = match_ends(x[0].cpu(), target) & keep
            if not bool(where.any()):
                continue
            sums[t] += codes[where].max(0).values.double()
            counts[t] += 1
    out = {}
    for t in tokens:
        if counts[t] == 0:
            out[t] = {"ids": ids[t], "instances": 0, "features": []}
            continue
        mean = sums[t] / counts[t]
        vals, idx = mean.topk(min(top, len(mean)))
        out[t] = {"ids": ids[t], "instances": counts[t],
                  "features": [{"feature": int(i), "mean_max_activation": float(v)} for v, i in zip(vals, idx)]}
    return out


@contextlib.contextmanager
def steering(model: nn.Module, layer: int, direction: Tensor, alpha: float) -> Iterator[None]:
    """Within the block, decoder layer `layer` outputs h + alpha·direction (every position)."""
    from saefd_ray.sae.evaluate import splice

    delta = (alpha * direction.float())

    def add(h: Tensor) -> Tensor:
        return h + delta.to(h.device, h.dtype)

    with splice(model, layer, add):
        yield


@torch.no_grad()
def steered_generate(model: nn.Module, tokenizer, prompt_ids: list[int], layer: int, direction: Tensor,
                     alphas: Sequence[float], max_new_tokens: int = 48) -> dict[float, list[int]]:
    """Greedy continuations (new token ids) of one prompt for each α; the model is left unchanged."""
    x = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    out = {}
    for alpha in alphas:
        with steering(model, layer, direction, alpha):
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out[alpha] = gen[0, x.shape[1]:].tolist()
    return out


def plain_generate(model: nn.Module, tokenizer, prompt_ids: list[int], max_new_tokens: int = 48) -> list[int]:
    x = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return gen[0, x.shape[1]:].tolist()
