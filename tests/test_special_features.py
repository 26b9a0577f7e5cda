"""FAST §6 on the tiny model: steering adds exactly α·d_k at the layer, α = 0 is plain greedy generation, and the
special-token feature table matches a direct computation."""

from __future__ import annotations

import pytest
import torch

from saefd_ray.sae import SAEConfig, build_sae
from saefd_ray.sae.special_features import plain_generate, steered_generate, steering, top_features

LAYER = 0


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from saefd_ray.models.loading import load_model, load_tokenizer

    return load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def sae(tiny):
    model, _ = tiny
    return build_sae(SAEConfig("standard", model.config.hidden_size, 4 * model.config.hidden_size), seed=0).eval()


def _prompt(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return ids if isinstance(ids, list) else ids["input_ids"]


def test_alpha_zero_is_plain_greedy_generation(tiny, sae, one_thread):
    model, tok = tiny
    ids = _prompt(tok, "rule a: kalo mitu")
    plain = plain_generate(model, tok, ids, max_new_tokens=12)
    steered = steered_generate(model, tok, ids, LAYER, sae.W_dec[3].detach() * 50, [0.0, 1.0], max_new_tokens=12)
    assert steered[0.0] == plain and len(plain) > 0
    again = plain_generate(model, tok, ids, max_new_tokens=12)
    assert again == plain  # the steering hook was removed


def test_steering_adds_exactly_alpha_d_at_the_layer(tiny, sae, one_thread):
    from saefd_ray.models.loading import residual_stream

    model, tok = tiny
    x = torch.tensor([_prompt(tok, "rule b: mitu rezo")])
    d = sae.W_dec[5].detach()
    alpha = 3.5
    with torch.no_grad():
        clean = residual_stream(model, x, None, [LAYER, 1])
        with steering(model, LAYER, d, alpha):
            steered = residual_stream(model, x, None, [LAYER, 1])
            logits = model(x).logits
        plain_logits = model(x).logits
    torch.testing.assert_close(steered[LAYER] - clean[LAYER], (alpha * d).expand_as(clean[LAYER]),
                               rtol=0, atol=1e-5)
    assert not torch.allclose(steered[1], clean[1])  # and it propagates to the next layer and the logits
    assert not torch.allclose(logits, plain_logits)


def test_top_features_matches_a_direct_computation(tiny, sae, one_thread):
    from saefd_ray.models.loading import residual_stream
    from saefd_ray.stream.harvest import render

    model, tok = tiny
    seqs = [render(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": a}], 64)
            for p, a in [("rule a: kalo", "north"), ("rule c: dobi", "south"), ("x", "y")]]
    table = top_features(model, tok, sae, LAYER, seqs, tokens=("<|im_end|>", "rule a", "no-such-token-xyz"), top=3)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    maxima = []
    with torch.no_grad():
        for s in seqs:
            codes = sae.encode(residual_stream(model, torch.tensor([s]), None, [LAYER])[LAYER][0])
            maxima.append(codes[torch.tensor(s) == end].max(0).values)
    mean = torch.stack(maxima).mean(0)
    want = mean.topk(3)
    row = table["<|im_end|>"]
    assert row["ids"] == [end] and row["instances"] == 3
    assert [f["feature"] for f in row["features"]] == want.indices.tolist()
    assert [f["mean_max_activation"] for f in row["features"]] == pytest.approx(want.values.tolist(), rel=1e-5)
    assert table["no-such-token-xyz"]["instances"] == 0 and table["no-such-token-xyz"]["features"] == []
    # a multi-token target counts at the position of its last piece, in the one instance that contains it
    pieces = tok("rule a", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1 and table["rule a"]["ids"] == pieces and table["rule a"]["instances"] == 1
    s = torch.tensor(seqs[0])
    ends = [j + len(pieces) - 1 for j in range(len(s) - len(pieces) + 1) if s[j : j + len(pieces)].tolist() == pieces]
    with torch.no_grad():
        codes = sae.encode(residual_stream(model, s[None], None, [LAYER])[LAYER][0])
    top1 = codes[ends].max(0).values.topk(1)
    assert table["rule a"]["features"][0]["feature"] == int(top1.indices[0])
