"""Continual-learning methods on a plain torch + peft tiny model (no Ray): every regularizer is zero (or at its
minimum) at its reference and grows when the model moves; λ control; anchors; the truncated forward; state."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from saefd_ray.config import RunConfig
from saefd_ray.data.render import collate, encode
from saefd_ray.data.tasks import Example, Task
from saefd_ray.errors import ConfigError
from saefd_ray.methods import build_method
from saefd_ray.methods.anchors import build_anchors, load_all, sample_batch
from saefd_ray.methods.base import TaskContext, peft_key, trainable_params
from saefd_ray.methods.lambda_control import LambdaController
from saefd_ray.methods.sae_fd import fd_loss
from saefd_ray.models.loading import decoder_stack, load_model, load_tokenizer, residual_stream
from saefd_ray.sae import SAEConfig, build_sae, save_saelens

LAYER = 1


def make_config(method: dict, sae_dir: Path | None = None, **training) -> RunConfig:
    if sae_dir is not None and method["name"] in ("sae_fd", "sae_reg"):
        method = {**method, "sae": {"path": str(sae_dir), "layer": LAYER}}
    return RunConfig.model_validate({
        "tasks": {"sequence": [{"name": "a", "format": "synthetic", "generator": "rule_a"},
                               {"name": "b", "format": "synthetic", "generator": "rule_b"}]},
        "lora": {"r": 4, "alpha": 8},
        "training": {"batch_size": 4, "max_prompt_len": 48, "max_answer_len": 4, **training},
        "evaluation": {"batch_size": 8},
        "method": method,
    })


def make_sae(d_in: int = 64, d_sae: int = 256, layer: int = LAYER, arch: str = "gated"):
    sae = build_sae(SAEConfig(arch, d_in, d_sae, metadata={"hook_name": f"blocks.{layer}.hook_resid_post"}), seed=0)
    with torch.no_grad():  # a random SAE whose features fire on a good share of tokens
        if arch == "gated":
            sae.b_gate.fill_(0.05)
    return sae


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    return save_saelens(make_sae(), tmp_path_factory.mktemp("sae") / "gated")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return load_tokenizer(tiny_model_path)


def examples(n: int = 24, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    words = ["kalo", "mitu", "rezo", "pani", "suve", "dobi"]
    return [Example(f"rule a: {' '.join(rng.choices(words, k=5))}", rng.choice(["north", "south"])) for _ in range(n)]


def lora_model(path: str, seed: int = 0, config: RunConfig | None = None, ctx: TaskContext | None = None,
               method=None):
    torch.manual_seed(seed)
    model = load_model(path)
    config = config or make_config({"name": "seq_lora"})
    method = method or build_method(config)
    model = method.prepare_model(model, ctx or context(config, path, None, None))
    with torch.no_grad():  # a LoRA that already moved the model (B = 0 would make every check trivial)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def context(config, path, tokenizer, state_in, state_out=None, index=0, train=None) -> TaskContext:
    tasks = [Task("a", "options", examples(24, 0), examples(8, 1), ["north", "south"]),
             Task("b", "options", examples(24, 2), examples(8, 3), ["north", "south"])]
    return TaskContext(config=config, task_index=index, task_names=["a", "b"], model_path=path, tokenizer=tokenizer,
                       state_in=state_in, state_out=state_out or Path("/nonexistent"),
                       train_examples=train if train is not None else tasks[index].train, past_tasks=tasks[:index],
                       tasks=tasks)


def batch_of(tokenizer, config, items=None) -> dict:
    items = items or examples(4, 5)
    enc = [encode(tokenizer, e, config.training.max_prompt_len, config.training.max_answer_len) for e in items]
    return collate(enc, tokenizer.pad_token_id)


@torch.no_grad()
def perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, param in trainable_params(model):
        param.add_(torch.randn(param.shape, generator=gen) * scale)


# ------------------------------------------------------------------------------------------------ forward / anchors


def test_truncated_forward_equals_full_forward(tiny_model_path, tokenizer):
    model = lora_model(tiny_model_path)
    batch = batch_of(tokenizer, make_config({"name": "seq_lora"}))
    _, stack = decoder_stack(model)
    full, calls = {}, []
    hooks = [stack[i].register_forward_hook(lambda m, a, o, i=i: full.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i in range(len(stack))]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    head = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("head"))
    later = stack[1].register_forward_hook(lambda *a: calls.append("layer1"))
    with torch.no_grad():
        short = residual_stream(model, batch["input_ids"], batch["attention_mask"], [0])
        both = residual_stream(model, batch["input_ids"], batch["attention_mask"], [0, 1])
    head.remove()
    later.remove()
    assert calls == ["layer1"]  # the layer-0 pass ran neither layer 1 nor the LM head; the [0, 1] pass no head
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(short[0][mask], full[0][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1][mask], full[1][mask], rtol=1e-5, atol=1e-5)


def test_lora_init_is_the_same_for_every_method_whatever_rng_it_used(tiny_model_path, tokenizer, sae_dir):
    """Methods differ in what they draw before wrapping (an SAE, old adapters); the new LoRA must not."""
    inits = []
    for method, noise in (({"name": "seq_lora"}, 0), ({"name": "sae_fd"}, 3)):
        config = make_config(method, sae_dir)
        torch.manual_seed(0)
        torch.randn(noise)  # RNG used by the method before the LoRA is made
        ctx = context(config, tiny_model_path, tokenizer, None)
        model = build_method(config).prepare_model(load_model(tiny_model_path), ctx)
        inits.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert inits[0].keys() == inits[1].keys() and len(inits[0]) > 0
    assert all(torch.equal(inits[0][n], inits[1][n]) for n in inits[0])
    later = make_config({"name": "seq_lora"})  # another task of the same run starts from another draw
    model = build_method(later).prepare_model(load_model(tiny_model_path),
                                             context(later, tiny_model_path, tokenizer, None, index=1))
    assert not all(torch.equal(p, inits[0][n]) for n, p in model.named_parameters() if "lora_A" in n)


def test_anchors_round_trip_and_batch_order(tiny_model_path, tokenizer, tmp_path):
    model = lora_model(tiny_model_path).eval()
    sae = make_sae()
    seqs = [torch.tensor(encode(tokenizer, e, 48, 4).input_ids) for e in examples(20)]
    for selection in ("random", "diverse"):
        anchors = build_anchors(model, sae, LAYER, seqs, "a", 5, selection, 0, tokenizer.pad_token_id, "cpu", 4)
        assert len(anchors) == 5 and int(anchors.lengths.sum()) == len(anchors.input_ids) == len(anchors.values)
        assert (anchors.values >= 0).all() and (anchors.values > 0).any()
        anchors.save(tmp_path / selection / "sae_fd" / "anchors" / "01-a.safetensors")
        loaded = load_all(tmp_path / selection)[0]
        for key in ("input_ids", "lengths", "values", "indices"):
            assert torch.equal(getattr(loaded, key), getattr(anchors, key)), key
        assert (loaded.task, loaded.layer, loaded.d_sae) == ("a", LAYER, 256)
    # sparse codes reproduce the dense codes; a sampled batch lines anchors up with hidden[mask] order
    ids, mask, values, indices = sample_batch([loaded], 3, torch.Generator().manual_seed(0), tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = residual_stream(model, ids, mask, [LAYER])[LAYER][mask.bool()]
        dense = sae.encode(hidden)
    rebuilt = torch.zeros_like(dense).scatter_(1, indices, values)
    torch.testing.assert_close(rebuilt, dense, rtol=1e-5, atol=1e-6)


def test_fd_loss_zero_at_reference_and_grows_when_perturbed(tiny_model_path, tokenizer, sae_dir):
    config = make_config({"name": "sae_fd", "anchor_size": 6, "anchor_batch": 3}, sae_dir)
    method = build_method(config)
    ctx = context(config, tiny_model_path, tokenizer, None)
    model = lora_model(tiny_model_path, config=config, ctx=ctx, method=method)
    method.load_state(ctx)
    seqs = [torch.tensor(encode(tokenizer, e, 48, 4).input_ids) for e in examples(20)]
    anchors = build_anchors(model.eval(), method.sae, LAYER, seqs, "a", 6, "random", 0, tokenizer.pad_token_id, "cpu")
    batch = sample_batch([anchors], 6, torch.Generator().manual_seed(0), tokenizer.pad_token_id)
    at_ref = method.anchor_loss(model, *batch)
    assert float(at_ref) < 1e-6
    perturb(model, 0.1)
    moved = method.anchor_loss(model, *batch)
    assert float(moved) > 1e-3
    moved.backward()  # gradients reach the LoRA weights through the truncated forward, and nothing else
    assert_grads_on_lora_only(model, method.sae)


def assert_grads_on_lora_only(model, *saes) -> None:
    """Every LoRA tensor of the layers up to the SAE's got a non-zero gradient; the base model and the frozen
    SAE got none (and an SAE parameter never asks for one)."""
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n and layer_of(n) <= LAYER]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora), \
        [n for n, p in lora if p.grad is None or not p.grad.abs().sum() > 0]
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    for sae in saes:
        assert all(not p.requires_grad and p.grad is None for p in sae.parameters())


def layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1


def test_fd_loss_formula_on_hand_made_codes():
    a_vals = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    a_idx = torch.tensor([[0, 2], [1, 3]])
    f = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 5.0, 0.0, 0.0]])  # token 2: anchor ≈ 0 -> no cosine, no magnitude
    assert float(fd_loss(f, a_vals, a_idx, beta=1.0, eps=1e-6)) == pytest.approx(0.0, abs=1e-7)
    f2 = torch.tensor([[0.0, 0.0, 1.0, 3.0], [0.0, 5.0, 0.0, 0.0]])
    cos = 1.0 / (10**0.5 * 5**0.5)
    expected = ((1 - cos) + 0.5 * (4.0 + 0.0) / 2) / 2
    assert float(fd_loss(f2, a_vals, a_idx, beta=0.5, eps=1e-6)) == pytest.approx(expected, rel=1e-5)
    zero = torch.zeros(2, 4, requires_grad=True)  # ‖f‖ = 0: cosine skipped, gradient finite
    fd_loss(zero, a_vals, a_idx, 1.0, 1e-6).backward()
    assert torch.isfinite(zero.grad).all()


# ------------------------------------------------------------------------------------------------ λ control


def test_lambda_controller_holds_share_near_rho():
    ctl = LambdaController(rho=0.15, alpha=0.05, init=1.0, clip=(0.2, 10.0))
    rng = random.Random(0)
    shares = []
    for step in range(600):
        l_task = 2.0 * (0.995**step) + 0.3 + rng.uniform(-0.05, 0.05)
        l_fd = 0.4 + rng.uniform(-0.05, 0.05)
        ctl.update(l_task, l_fd)
        shares.append(ctl.share(l_task, l_fd))
    assert abs(sum(shares[-200:]) / 200 - 0.15) < 0.02
    assert all(abs(s - 0.15) < 0.05 for s in shares[-200:])


def test_lambda_controller_respects_clip_and_ignores_zero_fd():
    ctl = LambdaController(0.15, 0.05, 1.0, (0.2, 10.0))
    for _ in range(500):
        ctl.update(5.0, 1e-6)  # λ* = 8.8e5
    assert ctl.value == 10.0
    for _ in range(500):
        ctl.update(0.01, 100.0)
    assert ctl.value == pytest.approx(0.2)
    ctl.update(1.0, 0.0)
    assert ctl.value == pytest.approx(0.2)
    first = LambdaController(0.15, 0.05, 1.0, (0.2, 10.0)).update(1.7, 1.0)  # one EMA step, by hand
    assert first == pytest.approx(0.95 * 1.0 + 0.05 * (0.15 / 0.85 * 1.7))


# ------------------------------------------------------------------------------------------------ baselines


def test_ewc_zero_at_reference_grows_and_state_accumulates(tiny_model_path, tokenizer, tmp_path):
    config = make_config({"name": "ewc", "fisher_batches": 2, "weight": 100.0})
    method = build_method(config)
    out = tmp_path / "t1"
    out.mkdir()
    ctx = context(config, tiny_model_path, tokenizer, None, out)
    model = lora_model(tiny_model_path, config=config, ctx=ctx, method=method)
    method.load_state(ctx)
    method.after_task(model, ctx)
    fisher = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "ewc/fisher.safetensors"))
    assert all((f >= 0).all() for f in fisher.values()) and sum(float(f.sum()) for f in fisher.values()) > 0
    second = build_method(config)
    second.load_state(context(config, tiny_model_path, tokenizer, out, index=1))
    batch = batch_of(tokenizer, config)
    extra, _ = second.regularizer(model, batch, torch.tensor(1.0))
    assert float(extra) == pytest.approx(0.0, abs=1e-12)
    perturb(model)
    extra, logs = second.regularizer(model, batch, torch.tensor(1.0))
    assert float(extra) > 0 and logs["ewc"] > 0
    out2 = tmp_path / "t2"
    out2.mkdir()
    second.after_task(model, context(config, tiny_model_path, tokenizer, out, out2, index=1))
    fisher2 = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out2 / "ewc/fisher.safetensors"))
    assert all((fisher2[k] >= fisher[k]).all() for k in fisher)  # accumulated, never replaced


def _adapter_folder(model, folder: Path) -> Path:
    from safetensors.torch import save_file

    from saefd_ray.methods.base import peft_key

    (folder / "adapter").mkdir(parents=True)
    save_file({peft_key(n): p.detach().clone() for n, p in trainable_params(model)},
              str(folder / "adapter" / "adapter_model.safetensors"))
    return folder


def test_l2_zero_at_previous_adapter_and_grows(tiny_model_path, tokenizer, tmp_path):
    config = make_config({"name": "l2", "weight": 1.0})
    model = lora_model(tiny_model_path, config=config)
    state = _adapter_folder(model, tmp_path / "t1")
    method = build_method(config)
    method.load_state(context(config, tiny_model_path, tokenizer, state, index=1))
    batch = batch_of(tokenizer, config)
    assert float(method.regularizer(model, batch, torch.tensor(1.0))[0]) == 0.0
    perturb(model)
    assert float(method.regularizer(model, batch, torch.tensor(1.0))[0]) > 0


def test_lwf_zero_for_same_model_grows_and_restores_weights(tiny_model_path, tokenizer, tmp_path):
    config = make_config({"name": "lwf", "temperature": 2.0})
    model = lora_model(tiny_model_path, config=config)
    state = _adapter_folder(model, tmp_path / "t1")
    method = build_method(config)
    ctx = context(config, tiny_model_path, tokenizer, state, index=1)
    model = lora_model(tiny_model_path, config=config, ctx=ctx, method=method)  # capture hook registered
    from saefd_ray.methods.base import load_adapter_weights, peft_key
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_adapter_weights(state / "adapter"))
    method.load_state(ctx)
    batch = batch_of(tokenizer, config)
    model(**batch)  # the training forward, captured
    kl, _ = method.regularizer(model, batch, torch.tensor(1.0))
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    perturb(model, 0.2)
    before = {n: p.detach().clone() for n, p in trainable_params(model)}
    model(**batch)
    kl, logs = method.regularizer(model, batch, torch.tensor(1.0))
    assert float(kl) > 1e-4
    kl.backward()
    assert all(torch.equal(before[n], p) for n, p in trainable_params(model))  # swap restored bit-exactly
    assert any(p.grad is not None for _, p in trainable_params(model))
    assert peft_key  # imported for readers


def test_o_lora_merge_equals_active_adapter_and_orthogonality(tiny_model_path, tokenizer, tmp_path):
    from safetensors.torch import save_file

    from saefd_ray.methods.base import peft_key

    config = make_config({"name": "o_lora", "lambda_orth": 1.0})
    old = lora_model(tiny_model_path, config=config)
    batch = batch_of(tokenizer, config)
    with torch.no_grad():
        expected = old(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    state = tmp_path / "t1"
    (state / "o_lora/adapters").mkdir(parents=True)
    save_file({peft_key(n): p.detach().clone() for n, p in trainable_params(old)},
              str(state / "o_lora/adapters/01-a.safetensors"))
    method = build_method(config)
    ctx = context(config, tiny_model_path, tokenizer, state, index=1)
    model = method.prepare_model(load_model(tiny_model_path), ctx)  # old merged, fresh LoRA (B = 0)
    method.load_state(ctx)
    with torch.no_grad():
        merged = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    extra, logs = method.regularizer(model, batch, torch.tensor(1.0))
    assert float(extra) > 0
    with torch.no_grad():  # make every new A orthogonal to its old A: the loss reaches its minimum, 0
        for name, param in trainable_params(model):
            if "lora_A" in name:
                a_old = method.old_a[peft_key(name)][0]
                q, _ = torch.linalg.qr(a_old.T)  # [d, r] orthonormal basis of old rows
                param.sub_(param @ q @ q.T)
    assert float(method.regularizer(model, batch, torch.tensor(1.0))[0]) == pytest.approx(0.0, abs=1e-5)


def test_sae_reg_protect_zero_at_base_guide_at_minimum_when_moving(tiny_model_path, tokenizer, sae_dir, tmp_path):
    config = make_config({"name": "sae_reg", "knn_k": 4, "stability_budget": 0.0, "plasticity_threshold": 0.01,
                          "mask_examples": 16}, sae_dir)
    method = build_method(config)
    out = tmp_path / "t1"
    out.mkdir()
    ctx = context(config, tiny_model_path, tokenizer, None, out)
    model = lora_model(tiny_model_path, config=config, ctx=ctx, method=method)
    with torch.no_grad():
        for name, param in trainable_params(model):
            if "lora_B" in name:
                param.zero_()  # the model equals the frozen base model
    method.load_state(ctx)
    batch = batch_of(tokenizer, config)
    model(**batch)
    _, logs = method.regularizer(model, batch, torch.tensor(1.0))
    assert logs["l_protect"] == pytest.approx(0.0, abs=1e-12)
    assert logs["l_guide"] == pytest.approx(0.01**2, rel=1e-4)  # nothing moved: the full plasticity hinge
    perturb(model, 0.3)
    model(**batch)
    extra, logs = method.regularizer(model, batch, torch.tensor(1.0))
    assert logs["l_protect"] > 0 and logs["l_guide"] < 0.01**2
    extra.backward()
    assert_grads_on_lora_only(model, *method.saes.values())
    method.after_task(model, ctx)
    mask = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "sae_reg/masks/01-a.safetensors"))
    m = mask[f"layer_{LAYER}"]
    assert m.shape == (256,) and float(m.max()) == pytest.approx(1.0) and (m >= 0).all()
    second = build_method(config)
    second.load_state(context(config, tiny_model_path, tokenizer, out, index=1))
    assert len(second.previous) == 1 and torch.equal(second.previous[0][LAYER], m)


def test_knn_spread_lifts_neighbours_only():
    from saefd_ray.methods.sae_reg import knn_spread

    dec = torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0, 0, 1.0], [0, 1.0, 0]])
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0])
    out = knn_spread(mask, dec, k=1)
    assert out[0] == 1.0 and out[1] > 0.9 and out[2] == 0 and out[3] < 0.11


def test_replay_mixes_fraction_and_buffer_is_saved(tiny_model_path, tokenizer, tmp_path):
    config = make_config({"name": "replay", "fraction": 0.25, "buffer_per_task": 10})
    method = build_method(config)
    ctx = context(config, tiny_model_path, tokenizer, None, tmp_path)
    method.after_task(None, ctx)
    buffer = json.loads((tmp_path / "replay/buffer.json").read_text())
    assert len(buffer) == 10 and {r["task"] for r in buffer} == {"a"}
    mixed = method.training_examples(1, ctx.tasks, tmp_path)
    assert len(mixed) == 24 + 8 and mixed[:24] == ctx.tasks[1].train
    assert method.training_examples(1, ctx.tasks, tmp_path) == mixed  # deterministic: resumes identically
    assert method.training_examples(0, ctx.tasks, None) == ctx.tasks[0].train


def test_per_task_row_uses_each_tasks_own_adapter(tmp_path):
    config = make_config({"name": "per_task"})
    method = build_method(config)
    t1 = tmp_path / "t1"
    t1.mkdir()
    ctx = TaskContext(config, 0, ["a", "b", "c"], "", None, None, t1)
    row1 = method.adjust_row([80.0, 30.0, 20.0], [25.0, 26.0, 27.0], ctx)
    assert row1 == [80.0, 26.0, 27.0]
    (t1 / "row.json").write_text(json.dumps({"row": row1}))
    t2 = tmp_path / "t2"
    t2.mkdir()
    row2 = method.adjust_row([10.0, 90.0, 40.0], None, TaskContext(config, 1, ["a", "b", "c"], "", None, t1, t2))
    assert row2 == [80.0, 90.0, 27.0]
    assert json.loads((t2 / "per_task/base_row.json").read_text()) == [25.0, 26.0, 27.0]


def test_mtl_trains_all_tasks_in_one_stage(tiny_model_path, tokenizer):
    config = make_config({"name": "mtl"})
    method = build_method(config)
    ctx = context(config, tiny_model_path, tokenizer, None)
    assert method.joint_training and len(method.training_examples(0, ctx.tasks, None)) == 48


# ------------------------------------------------------------------------------------------------ SAE checks


def test_sae_mismatch_fails_before_training_naming_both(tiny_model_path, tmp_path):
    wide = save_saelens(make_sae(d_in=32), tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"d_in 32 .*hidden size 64"):
        build_method(make_config({"name": "sae_fd"}, wide)).validate(tiny_model_path)
    other_layer = save_saelens(make_sae(layer=0), tmp_path / "l0")
    with pytest.raises(ConfigError, match=r"layer 1 .*layer 0"):
        build_method(make_config({"name": "sae_reg"}, other_layer)).validate(tiny_model_path)
    deep = make_config({"name": "sae_fd", "sae": {"path": str(other_layer), "layer": 5}})
    with pytest.raises(ConfigError, match=r"layer 5 is out of range .* 2 decoder layers"):
        build_method(deep).validate(tiny_model_path)
    with pytest.raises(ConfigError, match="method.sae.path"):
        build_method(make_config({"name": "sae_fd"})).validate(tiny_model_path)


def test_config_validation_of_method_fields():
    with pytest.raises(Exception, match="rho"):
        make_config({"name": "sae_fd", "rho": 1.0})
    with pytest.raises(Exception, match="lambda_clip"):
        make_config({"name": "sae_fd", "lambda_clip": [5, 1]})
    with pytest.raises(Exception, match="one SAE per layer"):
        make_config({"name": "sae_reg", "sae": [{"path": "x", "layer": 1}, {"path": "y", "layer": 1}]})


# ------------------------------------------------------------------------------------------------ method details


def test_sae_fd_anchor_pass_has_no_dropout_l_fd_zero_at_reference(tiny_model_path, tokenizer, sae_dir):
    config = make_config({"name": "sae_fd", "anchor_size": 6, "anchor_batch": 3}, sae_dir)
    config.lora.dropout = 0.05  # configs/trace.yaml's value
    method = build_method(config)
    ctx = context(config, tiny_model_path, tokenizer, None)
    model = lora_model(tiny_model_path, config=config, ctx=ctx, method=method)
    method.load_state(ctx)
    seqs = [torch.tensor(encode(tokenizer, e, 48, 4).input_ids) for e in examples(20)]
    anchors = build_anchors(model.eval(), method.sae, LAYER, seqs, "a", 6, "random", 0, tokenizer.pad_token_id, "cpu")
    batch = sample_batch([anchors], 6, torch.Generator().manual_seed(0), tokenizer.pad_token_id)
    model.train()  # as in training: LoRA dropout active in the task forward
    torch.manual_seed(0)
    assert float(method.anchor_loss(model, *batch)) < 1e-6  # no dropout noise floor under L_FD at the reference
    assert model.training and all(m.training for m in model.modules())  # train flags restored
    perturb(model, 0.1)
    moved = method.anchor_loss(model, *batch)
    moved.backward()
    assert float(moved) > 1e-3
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable_params(model))


def test_lwf_teacher_is_deterministic_under_lora_dropout(tiny_model_path, tokenizer):
    from saefd_ray.methods.lwf import logits_with

    config = make_config({"name": "lwf"})
    config.lora.dropout = 0.05
    model = lora_model(tiny_model_path, config=config).train()
    weights = {peft_key(n): p.detach().clone() * 1.5 for n, p in trainable_params(model)}
    batch = batch_of(tokenizer, config)
    torch.manual_seed(0)
    first = logits_with(model, weights, batch)
    second = logits_with(model, weights, batch)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(logits_with(model, weights, batch), first, rtol=0, atol=0)


def test_sae_reg_task_features_are_a_top_share_of_a_mostly_zero_mask(sae_dir):
    from saefd_ray.methods.sae_reg import hinge_losses

    config = make_config({"name": "sae_reg", "knn_k": 0, "high_mask_quantile": 0.9}, sae_dir)
    method = build_method(config)
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(1000)
    dense = torch.randperm(1000, generator=gen)[:50]  # a 5 % dense mask: a narrow task, no kNN spread
    mask[dense] = torch.rand(50, generator=gen) + 0.01
    method.compute_mask = lambda model: {LAYER: mask}
    method._ensure_mask(None)
    high = method.high[LAYER]
    assert int(high.sum()) == 50 and bool(high[dense].all())  # this task's features only, never all 1000
    l_protect, _ = hinge_losses(torch.full((1000,), 0.5), method.protect[LAYER], high, 0.05, 0.05)
    assert float(l_protect) == pytest.approx(0.45**2)  # the 950 others are protected (p = 1 - 0 = 1)
    wide = torch.rand(1000, generator=gen)  # a dense mask: exactly the top 10 % by rank
    method.mask, method.compute_mask = None, lambda model: {LAYER: wide}
    method._ensure_mask(None)
    assert torch.equal(method.high[LAYER].nonzero().flatten().sort().values, wide.topk(100).indices.sort().values)


def test_mtl_epochs_are_its_own_setting():
    tasks = [Task(n, "options", examples(4), examples(2), ["north", "south"]) for n in ("a", "b", "c")]
    config = make_config({"name": "mtl"}, epochs=2, epochs_per_task={"a": 1, "b": 3})
    assert build_method(config).epochs(0, tasks) == 3  # the largest of the tasks' epochs, not the first task's 1
    assert build_method(make_config({"name": "mtl", "epochs": 5}, epochs_per_task={"a": 1})).epochs(0, tasks) == 5
    sequential = build_method(make_config({"name": "seq_lora"}, epochs=2, epochs_per_task={"a": 1, "b": 3}))
    assert [sequential.epochs(i, tasks) for i in range(3)] == [1, 3, 2]


def test_o_lora_l2_is_the_sum_of_plain_norms_as_in_its_code(tiny_model_path, tokenizer):
    config = make_config({"name": "o_lora", "lambda_orth": 0.0, "lambda_l2": 0.5})
    method = build_method(config)
    model = lora_model(tiny_model_path, config=config)
    extra, logs = method.regularizer(model, batch_of(tokenizer, config), torch.tensor(1.0))
    norms = [float(p.detach().norm()) for _, p in trainable_params(model)]
    assert logs["l2"] == pytest.approx(sum(norms), rel=1e-5)
    assert float(extra) == pytest.approx(0.5 * sum(norms), rel=1e-5)
