"""SAE-FD: sparse-autoencoder feature distillation (papers.md §1).

After task t, `anchor_size` of its instances are run through the trained model and their per-token codes of a
frozen SAE at layer L are stored sparsely (anchors.py). While training every later task, each step samples
`anchor_batch` anchor instances from ALL earlier tasks, runs them through the model **truncated after layer L**
(`residual_stream`: no later layers, no LM head), encodes them with the frozen SAE and adds λ·L_FD:

    L_FD = (1/N) Σ_tokens [ 1[‖a‖≥ε ∧ ‖f‖≥ε] · (1 − cos(f, a))  +  β · ‖(f − a)_M‖² / |M| ]

f = the current code of the token, a = its anchor code, M = {i : a_i > 0} (the anchor's active features, so
the magnitude term touches only the stored sparse entries), N = anchor tokens in the micro-batch. Tokens whose
anchor or current code has norm below ε contribute nothing to the cosine term (it is undefined there) but keep
their magnitude term; a token with no active anchor feature (|M| = 0) has a zero magnitude term. At the
reference (the model that wrote the anchors) f = a, so L_FD = 0.

λ is adaptive (lambda_control.py): λ* = ρ/(1−ρ)·L_task/L_FD on detached, all-rank-averaged values, EMA α and
clip. λ restarts from `lambda_init` at each task (resume within a task restores it from the progress state);
λ, L_task, L_FD and the realized share are logged per step and saved to `sae_fd/log.json` with the task.

Distributed: anchor sampling is per rank (seeded by task, rank and step, so a resumed task draws the same
anchors), every rank runs exactly one anchor forward per step from task 2 on and none in task 1 — the lock-step
ZeRO-3 needs for its collective forwards. The anchor forward runs on the engine's module inside the engine
step, so its gradients are reduced by the same `engine.backward`.
"""

from __future__ import annotations

import json
import shutil

import torch
from torch import Tensor, nn

from saefd_ray.data.render import encode
from saefd_ray.methods.anchors import Anchors, anchor_file, build_anchors, load_all, sample_batch
from saefd_ray.methods.base import Method, TaskContext, dropout_off
from saefd_ray.methods.lambda_control import LambdaController
from saefd_ray.methods.sae_source import codes, load_sae, validate_sources
from saefd_ray.models.loading import check_layer, residual_stream


def fd_loss(f: Tensor, a_values: Tensor, a_indices: Tensor, beta: float, eps: float) -> Tensor:
    """L_FD over N tokens: f [N, d_sae] current codes (dense, with grad), anchors as sparse values/indices [N, w]."""
    f = f.float()
    a_values = a_values.to(f.device, torch.float32)
    f_m = f.gather(1, a_indices.to(f.device))  # current codes on the anchor's stored entries
    active = a_values > 0
    a_norm = a_values.norm(dim=1)
    f_norm = f.pow(2).sum(1).clamp_min(eps * eps).sqrt()  # clamp: zero gradient instead of NaN at f = 0
    usable = (a_norm >= eps) & (f_norm > eps)
    cos = (f_m * a_values).sum(1) / (f_norm * a_norm.clamp_min(eps))
    cos_term = torch.where(usable, 1 - cos, torch.zeros_like(cos))
    count = active.sum(1)
    mag = ((f_m - a_values).pow(2) * active).sum(1) / count.clamp_min(1)
    return (cos_term + beta * mag).mean()


class SaeFd(Method):
    name = "sae_fd"

    def __init__(self, config):
        super().__init__(config)
        cfg = self.cfg
        self.layer = cfg.sae.layer
        self.controller = LambdaController(cfg.rho, cfg.ema_alpha, cfg.lambda_init, tuple(cfg.lambda_clip))
        self.sae = None
        self.pool: list[Anchors] = []
        self.step = 0
        self.history: list[dict] = []
        self.ctx: TaskContext | None = None

    def validate(self, model_path: str) -> None:
        validate_sources(self.cfg, model_path)

    # ----------------------------------------------------------------------------------------- worker side
    def load_state(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        self.sae = load_sae(self.cfg.sae, "method.sae", ctx.device)
        self.pool = load_all(ctx.state_in)
        self.controller = LambdaController(self.cfg.rho, self.cfg.ema_alpha, self.cfg.lambda_init,
                                           tuple(self.cfg.lambda_clip))
        self.step, self.history = 0, []

    def prepare_model(self, model: nn.Module, ctx: TaskContext) -> nn.Module:
        check_layer(model, self.layer, "method.sae.layer")
        return super().prepare_model(model, ctx)

    def anchor_loss(self, model: nn.Module, ids: Tensor, mask: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        device = next(self.sae.parameters()).device
        with dropout_off(model):  # the anchors were written without dropout: at the reference, L_FD = 0 exactly
            hidden = residual_stream(model, ids.to(device), mask.to(device), [self.layer])[self.layer]
        f = codes(self.sae, hidden[mask.to(device).bool()])
        return fd_loss(f, values, indices, self.cfg.beta, self.cfg.eps)

    def regularizer(self, model: nn.Module, batch: dict, task_loss: Tensor) -> tuple[Tensor | None, dict]:
        if not self.pool:
            return None, {}
        ctx = self.ctx
        generator = torch.Generator().manual_seed(
            hash((self.config.training.seed, ctx.task_index, ctx.rank, self.step)) % 2**62)
        self.step += 1
        ids, mask, values, indices = sample_batch(self.pool, self.cfg.anchor_batch, generator,
                                                  ctx.tokenizer.pad_token_id)
        loss = self.anchor_loss(model, ids, mask, values, indices)
        scalars = ctx.all_reduce(torch.stack([task_loss.detach().float(), loss.detach().float().to(task_loss.device)]))
        l_task, l_fd = float(scalars[0]), float(scalars[1])
        lam = self.controller.update(l_task, l_fd)
        logs = {"lambda": lam, "l_task": l_task, "l_fd": l_fd, "fd_share": self.controller.share(l_task, l_fd)}
        self.history.append(logs)
        return lam * loss, logs

    def progress_state(self) -> dict:
        return {"controller": self.controller.state(), "step": self.step, "history": self.history}

    def load_progress_state(self, state: dict) -> None:
        self.controller.load(state["controller"])
        self.step, self.history = state["step"], list(state["history"])

    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        """Anchors of this task, from the trained model; all earlier anchors carried into this checkpoint."""
        cfg, t = self.config, ctx.task_index
        own = ctx.tasks[t].train if ctx.tasks else ctx.train_examples
        sequences = [torch.tensor(encode(ctx.tokenizer, e, cfg.training.max_prompt_len,
                                         cfg.training.max_answer_len).input_ids) for e in own]
        was_training = model.training
        model.eval()
        try:
            anchors = build_anchors(model, self.sae, self.layer, sequences, ctx.task_names[t], self.cfg.anchor_size,
                                    self.cfg.anchor_selection, cfg.training.seed * 1009 + t, ctx.tokenizer.pad_token_id,
                                    ctx.device, cfg.evaluation.batch_size)
        finally:
            model.train(was_training)
        if ctx.rank != 0:
            return
        if ctx.state_in is not None and (ctx.state_in / "sae_fd" / "anchors").is_dir():
            shutil.copytree(ctx.state_in / "sae_fd" / "anchors", ctx.state_out / "sae_fd" / "anchors", dirs_exist_ok=True)
        anchors.save(anchor_file(ctx.state_out, t, ctx.task_names[t]))
        (ctx.state_out / "sae_fd" / "log.json").write_text(json.dumps(self.history))
