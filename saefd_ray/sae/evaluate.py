"""SAE evaluations: FAST eq. 7 MSE (also on special tokens only), FVU, L0, dead fraction, and — with the SAE spliced
into a Hugging Face causal LM — CE-loss recovered and KL to the clean model.

The splice is a forward hook on ``model.model.layers[L]`` replacing that decoder layer's output hidden states (the
residual stream after layer L) by the SAE reconstruction, so any Llama/Qwen/Mistral-style model works; no
TransformerLens.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import SparseAutoencoder


@torch.no_grad()
def reconstruct(sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂, dense codes) at inference (BatchTopK uses its threshold), in the SAE's dtype."""
    codes = sae.encode(x.to(sae.dtype))
    return sae.decode(codes), codes


def fast_mse(per_seq_sq_err: Sequence[Tensor], hidden: int) -> float:
    """FAST eq. 7: (1/(N·H)) Σ_i (1/L_i) Σ_j ‖y_ij − ŷ_ij‖², from per-token squared errors of each sequence.

    Sequences with no tokens (e.g. no special token) are left out of N.
    """
    means = [e.sum() / e.numel() for e in per_seq_sq_err if e.numel() > 0]
    if not means:
        return float("nan")
    return float(torch.stack(means).sum() / (len(means) * hidden))


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, sequences: Sequence[Tensor],
                           special_masks: Sequence[Tensor] | None = None) -> dict[str, float]:
    """Metrics over held-out sequences (each ``[L_i, H]`` activations of one instance).

    ``special_masks``: per sequence a bool ``[L_i]`` marking special / chat-template tokens, for FAST's "MSE on
    special tokens only". Returns mse (eq. 7), log2_mse, fvu, explained_variance, l0, dead_fraction, and with masks
    mse_special, log2_mse_special.
    """
    d_sae, hidden = sae.cfg.d_sae, sae.cfg.d_in
    sq, sq_special = [], []
    err_sum, tok, l0_sum = 0.0, 0, 0.0
    s1 = torch.zeros(hidden, dtype=torch.float64)
    s2 = 0.0
    fired = torch.zeros(d_sae, dtype=torch.bool, device=sae.device)
    for i, seq in enumerate(sequences):
        x = seq.reshape(-1, hidden).to(device=sae.device, dtype=sae.dtype)
        x_hat, codes = reconstruct(sae, x)
        e = (x_hat - x).double().pow(2).sum(-1)  # [L_i]
        sq.append(e.cpu())
        if special_masks is not None:
            sq_special.append(e[special_masks[i].to(e.device).reshape(-1).bool()].cpu())
        err_sum += float(e.sum())
        tok += x.shape[0]
        xd = x.double().cpu()
        s1 += xd.sum(0)
        s2 += float(xd.pow(2).sum())
        nz = codes != 0
        l0_sum += float(nz.sum())
        fired |= nz.any(0)
    total_var = s2 - float(s1.pow(2).sum()) / max(tok, 1)  # Σ‖x − x̄‖²
    fvu = err_sum / total_var if total_var > 0 else float("nan")
    mse = fast_mse(sq, hidden)
    out = {"mse": mse, "log2_mse": math.log2(mse) if mse > 0 else float("-inf"), "fvu": fvu,
           "explained_variance": 1.0 - fvu, "l0": l0_sum / max(tok, 1),
           "dead_fraction": float((~fired).float().mean()), "tokens": float(tok)}
    if special_masks is not None:
        ms = fast_mse(sq_special, hidden)
        out.update(mse_special=ms, log2_mse_special=math.log2(ms) if ms > 0 else float("nan"))
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM, through peft / DeepSpeed wrappers (see models.loading)."""
    from saefd_ray.models.loading import decoder_stack

    return decoder_stack(model)[1]


@contextlib.contextmanager
def splice(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the output hidden states of decoder layer ``layer`` are replaced by ``fn(hidden)``."""

    def hook(_mod, _inp, output):
        if isinstance(output, tuple):
            return (fn(output[0]).to(output[0].dtype), *output[1:])
        return fn(output).to(output.dtype)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_splice_fn(sae: SparseAutoencoder) -> Callable[[Tensor], Tensor]:
    def fn(h: Tensor) -> Tensor:
        x_hat, _ = reconstruct(sae, h.reshape(-1, h.shape[-1]))
        return x_hat.reshape(h.shape)

    return fn


def _token_logprobs_and_ce(logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs of next-token predictions [B, T-1, V], summed CE, number of predicted tokens)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = input_ids[:, 1:]
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return logp, (nll * valid).sum(), valid.sum()


@torch.no_grad()
def spliced_metrics(model: nn.Module, sae: SparseAutoencoder, layer: int, batches: Sequence[dict[str, Tensor]],
                    splice_fn: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """CE clean / with SAE / with the layer output zeroed, CE-loss recovered, and KL(clean ‖ SAE) per token.

    ``batches``: dicts with ``input_ids`` and optionally ``attention_mask``; ``splice_fn``: replaces
    ``sae_splice_fn(sae)`` (e.g. one that passes attention sinks through). Recovered =
    (CE_zero − CE_sae) / (CE_zero − CE_clean): 1 means the SAE is as good as the real activations, 0 as bad as zeros.
    """
    was_training = model.training
    model.eval()
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl_sum, n = 0.0, 0
    for b in batches:
        ids = b["input_ids"]
        mask = b.get("attention_mask", torch.ones_like(ids))
        kw = {"input_ids": ids, "attention_mask": mask}
        clean_lp, c, cnt = _token_logprobs_and_ce(model(**kw).logits, ids, mask)
        ce["clean"] += float(c)
        with splice(model, layer, splice_fn or sae_splice_fn(sae)):
            sae_lp, c, _ = _token_logprobs_and_ce(model(**kw).logits, ids, mask)
        ce["sae"] += float(c)
        with splice(model, layer, torch.zeros_like):
            _, c, _ = _token_logprobs_and_ce(model(**kw).logits, ids, mask)
        ce["zero"] += float(c)
        valid = (mask[:, 1:].bool() & mask[:, :-1].bool())
        kl = (clean_lp.exp() * (clean_lp - sae_lp)).sum(-1)
        kl_sum += float((kl * valid).sum())
        n += int(cnt)
    model.train(was_training)
    n = max(n, 1)
    ce_clean, ce_sae, ce_zero = ce["clean"] / n, ce["sae"] / n, ce["zero"] / n
    denom = ce_zero - ce_clean
    return {"ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero,
            "ce_loss_recovered": (ce_zero - ce_sae) / denom if abs(denom) > 1e-12 else float("nan"),
            "kl": kl_sum / n, "tokens": float(n)}
