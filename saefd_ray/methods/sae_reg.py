"""SAE-guided activation regularization ("From Weights to Features", papers.md §2).

Frozen SAE(s) at one or several residual layers. For each task a continuous feature mask is computed at the
task's start from the base model (adapter disabled) on up to `mask_examples` of its instances:

    m_i  = mean over content tokens (non-pad, non-special) of |f_i|, divided by its max        (in [0, 1])
    m̃_i  = max(m_i, (1/k) Σ_{j ∈ kNN(i)} max(s_ij, 0)·m_j)   s = cosine of decoder rows, k = knn_k

so a feature inherits importance from features that write in nearly the same direction. Only masks are kept
(`sae_reg/masks/NN-<task>.safetensors`, one tensor per layer); no old data.

Every step, on the current batch's content tokens, the drift of each feature between the current model and the
frozen base model, both encoded by the frozen SAE, relative to the feature's base magnitude:

    d_i = mean_tok |f_i(current) − f_i(base)| / (mean_tok |f_i(base)| + mean_{i,tok} |f(base)| + 1e-6)

(the global mean in the denominator keeps d finite for features silent on the base model). With H the task's
features — the top 1 − high_mask_quantile share of features by m̃ rank, among those with m̃ > 0 (a threshold
`m̃ ≥ quantile(m̃, q)` would put every feature in H once ≥ q of the mask is 0, a narrow task with knn_k 0, and
L_protect would vanish) — and protection weights p_i = max(1 − m̃_i, max_{s<t} m̃^s_i) (low for this task's
features, high for anything earlier tasks relied on):

    L_protect = mean_{i ∉ H} p_i · max(0, d_i − stability_budget)²
    L_guide   = mean_{i ∈ H} max(0, plasticity_threshold − d_i)²
    loss      = CE + weight_protect · L_protect + weight_guide · L_guide        (averaged over layers)

The current model's layer activations are taken from the training forward itself (a forward hook), so the only
extra compute is the base model's forward truncated after the deepest SAE layer, without gradients.
"""

from __future__ import annotations

import random
import shutil

import torch
from torch import Tensor, nn

from saefd_ray.data.render import encode
from saefd_ray.methods.anchors import pad_batch
from saefd_ray.methods.base import Method, OutputCapture, TaskContext, dropout_off
from saefd_ray.methods.sae_source import codes, load_sae, sae_sources, validate_sources
from saefd_ray.models.loading import check_layer, decoder_stack, residual_stream
from saefd_ray.sae.sinks import sae_sink_ratio, sink_mask

MASK_DIR = "sae_reg/masks"


def knn_spread(mask: Tensor, decoder: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """m̃ = max(m, mean over the k nearest decoder rows of max(cos, 0)·m), chunked so no d_sae² matrix exists."""
    if k <= 0:
        return mask
    unit = nn.functional.normalize(decoder.float(), dim=1)
    k = min(k, unit.shape[0] - 1)
    spread = torch.empty_like(mask)
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start : start + chunk] @ unit.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + start] = -2.0  # exclude self
        values, index = sims.topk(k, dim=1)
        spread[start : start + chunk] = (values.clamp_min(0) * mask[index]).mean(1)
    return torch.maximum(mask, spread)


def drift(f_cur: Tensor, f_base: Tensor) -> Tensor:
    base_mag = f_base.abs().mean(0)
    return (f_cur - f_base).abs().mean(0) / (base_mag + base_mag.mean() + 1e-6)


def high_features(mask: Tensor, quantile: float) -> Tensor:
    """H as a bool [d_sae]: the top round((1 − quantile)·d_sae) features by mask rank (at least 1, never all),
    keeping only those with mask > 0. Selection by rank, so ties at 0 can never make every feature "high"."""
    d = mask.numel()
    k = min(d - 1, max(1, round((1 - quantile) * d)))
    high = torch.zeros(d, dtype=torch.bool, device=mask.device)
    high[mask.float().topk(k).indices] = True
    return high & (mask > 0)


def hinge_losses(d: Tensor, protect: Tensor, high: Tensor, budget: float, threshold: float) -> tuple[Tensor, Tensor]:
    low = ~high
    l_protect = (protect[low] * (d[low] - budget).clamp_min(0).pow(2)).mean() if low.any() else d.sum() * 0
    l_guide = (threshold - d[high]).clamp_min(0).pow(2).mean() if high.any() else d.sum() * 0
    return l_protect, l_guide


class SaeReg(Method):
    name = "sae_reg"
    plain_first_task = False  # its guide and protect terms act from task 1 on

    def __init__(self, config):
        super().__init__(config)
        self.sources = sae_sources(self.cfg)
        self.layers = [s.layer for s in self.sources]
        self.saes: dict[int, nn.Module] = {}
        self.captures: dict[int, OutputCapture] = {}
        self.previous: list[dict[int, Tensor]] = []
        self.mask: dict[int, Tensor] | None = None
        self.protect: dict[int, Tensor] = {}
        self.high: dict[int, Tensor] = {}
        self.ctx: TaskContext | None = None

    def validate(self, model_path: str) -> None:
        validate_sources(self.cfg, model_path)

    def prepare_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        for layer in self.layers:
            check_layer(model, layer, "method.sae.layer")
        model = super().prepare_model(model, ctx)
        stack = decoder_stack(model)[1]
        self.captures = {layer: OutputCapture(stack[layer]) for layer in self.layers}
        return model

    def load_state(self, ctx: TaskContext) -> None:
        from safetensors.torch import load_file

        self.ctx = ctx
        self.saes = {s.layer: load_sae(s, "method.sae", ctx.device) for s in self.sources}
        self.previous = []
        if ctx.state_in is not None and (ctx.state_in / MASK_DIR).is_dir():
            for path in sorted((ctx.state_in / MASK_DIR).glob("*.safetensors")):
                saved = load_file(str(path))
                self.previous.append({layer: saved[f"layer_{layer}"].to(ctx.device) for layer in self.layers})
        self.mask = None

    # ---------------------------------------------------------------------------------------------- masks
    def content_mask(self, ids: Tensor, attention: Tensor) -> Tensor:
        special = torch.tensor(sorted(set(self.ctx.tokenizer.all_special_ids)), device=ids.device)
        return attention.bool() & ~torch.isin(ids, special)

    @torch.no_grad()
    def compute_mask(self, model: nn.Module) -> dict[int, Tensor]:
        """Mean |code| per feature over this task's content tokens on the base model, all ranks together."""
        ctx, cfg = self.ctx, self.config
        examples = list(ctx.tasks[ctx.task_index].train) if ctx.tasks else list(ctx.train_examples)
        chosen = random.Random(cfg.training.seed + ctx.task_index).sample(
            examples, min(self.cfg.mask_examples, len(examples)))
        per_rank = -(-len(chosen) // ctx.world_size)
        mine = chosen[ctx.rank :: ctx.world_size]
        mine += chosen[:1] * (per_rank - len(mine))  # equal forward counts on every rank (ZeRO-3)
        weights = torch.ones(len(mine), device=ctx.device)
        weights[len(chosen[ctx.rank :: ctx.world_size]):] = 0
        sums = {layer: torch.zeros(self.saes[layer].cfg.d_sae, device=ctx.device) for layer in self.layers}
        count = {layer: torch.zeros((), device=ctx.device) for layer in self.layers}
        bs = cfg.evaluation.batch_size
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(mine), bs):
                seqs = [torch.tensor(encode(ctx.tokenizer, e, cfg.training.max_prompt_len,
                                            cfg.training.max_answer_len).input_ids) for e in mine[start : start + bs]]
                ids, attention = (t.to(ctx.device) for t in pad_batch(seqs, ctx.tokenizer.pad_token_id))
                content = self.content_mask(ids, attention) & (weights[start : start + bs, None] > 0)
                with model.disable_adapter():
                    hidden = residual_stream(model, ids, attention, self.layers)
                for layer in self.layers:  # attention sinks (the SAE's own rule) never enter the mask
                    keep = content & ~sink_mask(hidden[layer], attention, sae_sink_ratio(self.saes[layer]))
                    sums[layer] += self.saes[layer].encode(hidden[layer][keep].to(self.saes[layer].dtype)).abs().sum(0)
                    count[layer] += keep.sum()
        finally:
            model.train(was_training)
        masks = {}
        for layer in self.layers:
            mean = ctx.all_reduce(sums[layer]) / ctx.all_reduce(count[layer]).clamp_min(1)
            mean = mean / mean.max().clamp_min(1e-12)
            masks[layer] = knn_spread(mean, self.saes[layer].W_dec, self.cfg.knn_k)
        return masks

    def _ensure_mask(self, model: nn.Module) -> None:
        if self.mask is not None:
            return
        self.mask = self.compute_mask(model)
        for layer, mask in self.mask.items():
            protect = 1 - mask
            for old in self.previous:
                protect = torch.maximum(protect, old[layer])
            self.protect[layer] = protect
            self.high[layer] = high_features(mask, self.cfg.high_mask_quantile)

    # ---------------------------------------------------------------------------------------------- loss
    def regularizer(self, model: nn.Module, batch: dict, task_loss: Tensor) -> tuple[Tensor | None, dict]:
        self._ensure_mask(model)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        current = {layer: capture.pop() for layer, capture in self.captures.items()}
        if any(v is None for v in current.values()):  # called outside the training forward: compute it
            current = residual_stream(model, ids, attention, self.layers)
        with torch.no_grad(), model.disable_adapter(), dropout_off(model):  # the base pass is deterministic
            base = residual_stream(model, ids, attention, self.layers)
        content = self.content_mask(ids, attention)
        protect_total, guide_total, drift_mean = 0.0, 0.0, 0.0
        for layer in self.layers:
            sae = self.saes[layer]
            f_cur = codes(sae, current[layer][content])
            with torch.no_grad():
                f_base = sae.encode(base[layer][content].to(sae.dtype))
            d = drift(f_cur.float(), f_base.float())
            l_protect, l_guide = hinge_losses(d, self.protect[layer], self.high[layer],
                                              self.cfg.stability_budget, self.cfg.plasticity_threshold)
            protect_total = protect_total + l_protect / len(self.layers)
            guide_total = guide_total + l_guide / len(self.layers)
            drift_mean += float(d.detach().mean()) / len(self.layers)
        extra = self.cfg.weight_protect * protect_total + self.cfg.weight_guide * guide_total
        return extra, {"l_protect": float(protect_total.detach()), "l_guide": float(guide_total.detach()),
                       "drift": drift_mean}

    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        from safetensors.torch import save_file

        self._ensure_mask(model)  # collective: every rank, same condition
        if ctx.rank != 0:
            return
        if ctx.state_in is not None and (ctx.state_in / MASK_DIR).is_dir():
            shutil.copytree(ctx.state_in / MASK_DIR, ctx.state_out / MASK_DIR, dirs_exist_ok=True)
        (ctx.state_out / MASK_DIR).mkdir(parents=True, exist_ok=True)
        name = f"{ctx.task_index + 1:02d}-{ctx.task_names[ctx.task_index]}.safetensors"
        save_file({f"layer_{layer}": m.float().cpu().contiguous() for layer, m in self.mask.items()},
                  str(ctx.state_out / MASK_DIR / name))
