"""SAELens-style activation normalization (estimate, fold at save, unfold on resume) and attention-sink detection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saefd_ray.sae import SAEConfig, build_sae
from saefd_ray.sae.formats import load_saelens
from saefd_ray.sae.normalize import SCALER_FILE, estimate_scale, fold_scale, read_scaler, unfold_scale_
from saefd_ray.sae.sinks import sae_sink_ratio, sink_mask

D = 16


def test_estimate_scale_gives_mean_norm_sqrt_d():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, D, generator=g) * 37.0 + 5.0
    s = estimate_scale(x)
    assert s == pytest.approx(math.sqrt(D) / float(x.double().norm(dim=1).mean()), rel=1e-12)
    assert float((s * x).double().norm(dim=1).mean()) == pytest.approx(math.sqrt(D), rel=1e-6)  # s·x in float32
    with pytest.raises(ValueError, match="mean norm 0.0"):
        estimate_scale(torch.zeros(4, D))


def _random_sae(arch: str):
    sae = build_sae(SAEConfig(arch, D, 4 * D, k=6 if arch == "topk" else None), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return sae


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
def test_folded_sae_reads_raw_activations_with_identical_codes(arch, tmp_path):
    from saefd_ray.sae.formats import save_saelens

    sae = _random_sae(arch)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(3)) * 300.0  # raw scale, far from √d
    s = estimate_scale(x)
    codes = sae.encode(s * x)
    folded = fold_scale(sae, s)
    torch.testing.assert_close(folded.encode(x), codes, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.decode(codes), sae.decode(codes) / s, rtol=1e-4, atol=1e-4)
    save_saelens(folded, tmp_path / "sae")
    loaded = load_saelens(tmp_path / "sae")
    assert torch.equal(loaded.encode(x), folded.encode(x))  # save/load is exact
    assert (codes != 0).any()
    unfold_scale_(loaded, s)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(getattr(loaded, name), p, rtol=1e-5, atol=1e-6)


def test_checkpoint_is_folded_and_resume_unfolds(tmp_path):
    """The trainer scales its batches, the checkpoint reads raw activations (codes identical), resume restores."""
    from saefd_ray.sae.trainer import TrainerConfig
    from saefd_ray.stream.checkpoint import load_checkpoint, save_distributed_checkpoint
    from saefd_ray.stream.sharded import make_trainer

    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(32, D, generator=g) * 200.0 + 50.0 for _ in range(3)]
    cfg = TrainerConfig(total_steps=3, lr=1e-3, lr_warmup_steps=0, lr_decay_steps=0, sparsity_warmup_steps=0)
    trainer = make_trainer(build_sae(SAEConfig("gated", D, 4 * D), seed=0), cfg, "data", "expected_average_only_in")
    for b in batches:
        trainer.step(b)
    assert trainer.scale == pytest.approx(estimate_scale(batches[0]), rel=1e-12)
    path = save_distributed_checkpoint(tmp_path, {0: trainer}, np.zeros(4, bool), 0, 1, final=True)
    folder = path / "layer_0"
    assert read_scaler(folder) == pytest.approx(trainer.scale) and (folder / SCALER_FILE).is_file()
    saved = load_saelens(folder)
    x = batches[1]
    torch.testing.assert_close(saved.encode(x), trainer.sae.encode(trainer.scale * x), rtol=1e-4, atol=1e-4)

    fresh = make_trainer(build_sae(SAEConfig("gated", D, 4 * D), seed=9), cfg, "data", "expected_average_only_in")
    load_checkpoint(path, {0: fresh}, np.zeros(4, bool), 0, 1, "data")
    assert fresh.scale == trainer.scale
    for name, p in trainer.sae.named_parameters():
        torch.testing.assert_close(getattr(fresh.sae, name), p, rtol=1e-5, atol=1e-6)


def test_sink_mask_flags_huge_norm_tokens_and_ignores_pads():
    h = torch.ones(2, 6, 4)
    h[0, 0] *= 200.0  # a sink at position 0
    h[1, 3] *= 5.0  # large, but not a sink at ratio 10
    h[1, 5] *= 1000.0  # a pad: never a sink, and not part of the median
    attention = torch.tensor([[1] * 6, [1] * 5 + [0]])
    mask = sink_mask(h, attention, 10.0)
    assert mask.tolist() == [[True] + [False] * 5, [False] * 6]
    assert not sink_mask(h, attention, None).any()
    assert sink_mask(h[0], None, 10.0).tolist() == [True] + [False] * 5  # one sequence [T, d]


def test_harvest_marks_sinks_by_the_same_rule(tiny_model_path):
    from saefd_ray.models.loading import load_model, load_tokenizer, residual_stream
    from saefd_ray.stream.harvest import harvest_batch, render

    model, tok = load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    ids = [render(tok, [{"role": "user", "content": t}, {"role": "assistant", "content": "north"}], 64)
           for t in ("rule a: kalo mitu", "rule b: x")]
    ratio = 1.05  # low enough that the tiny model has "sinks": this checks the rule, not the model
    rows = harvest_batch(model, ids, [0, 1], [1], set(), tok.pad_token_id, sink_ratio=ratio)
    for inst, x in enumerate(ids):
        h = residual_stream(model, torch.tensor([x]), None, [1])[1][0]
        norms = h.norm(dim=-1)
        want = (norms > ratio * norms.median()).numpy()
        np.testing.assert_array_equal(rows["is_sink"][rows["instance_id"] == inst], want)
    assert 0 < rows["is_sink"].sum() < len(rows["is_sink"])
    none = harvest_batch(model, ids, [0, 1], [1], set(), tok.pad_token_id)
    assert not none["is_sink"].any()


def test_feeder_drops_and_counts_sinks():
    from saefd_ray.stream.sharded import LayerFeeder

    acts = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    batch = {"activation": acts, "layer": torch.zeros(6, dtype=torch.long),
             "instance_id": torch.zeros(6, dtype=torch.long),
             "is_sink": torch.tensor([True, False, False, True, False, False])}
    feeder = LayerFeeder([batch], [0])
    got = torch.cat(list(feeder.source(0)))
    torch.testing.assert_close(got, acts[[1, 2, 4, 5]])
    assert feeder.sinks_dropped == 2


def test_sae_carries_its_sink_rule():
    cfg = SAEConfig("standard", D, 2 * D, metadata={"sink_norm_ratio": 20.0})
    assert sae_sink_ratio(build_sae(cfg)) == 20.0
    assert sae_sink_ratio(build_sae(SAEConfig("standard", D, 2 * D))) is None


def test_anchor_codes_are_zero_at_sinks(tiny_model_path):
    """SAE-FD anchors use the SAE's own sink rule: no FD target at a sink, the ordinary code everywhere else."""
    from saefd_ray.methods.anchors import token_codes
    from saefd_ray.models.loading import load_model, load_tokenizer, residual_stream
    from saefd_ray.stream.harvest import render

    model, tok = load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    d = model.config.hidden_size
    plain = build_sae(SAEConfig("standard", d, 2 * d), seed=0)
    ruled = build_sae(SAEConfig("standard", d, 2 * d, metadata={"sink_norm_ratio": 1.05}), seed=0)
    seqs = [torch.tensor(render(tok, [{"role": "user", "content": t}, {"role": "assistant", "content": "north"}], 64))
            for t in ("rule a: kalo mitu", "rule b: x")]
    with torch.no_grad():
        got = token_codes(model, ruled, 1, seqs, tok.pad_token_id, "cpu", batch_size=2)
        ref = token_codes(model, plain, 1, seqs, tok.pad_token_id, "cpu", batch_size=2)
        for seq, g, r in zip(seqs, got, ref):
            sinks = sink_mask(residual_stream(model, seq[None], None, [1])[1][0], None, 1.05)
            assert sinks.any() and not sinks.all()
            assert (g[sinks] == 0).all()
            torch.testing.assert_close(g[~sinks], r[~sinks])
