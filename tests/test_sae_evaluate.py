"""Evaluation metrics against hand computations, and the HF splice on a tiny random Llama."""
import math

import pytest
import torch

from saefd_ray.sae import SAEConfig, build_sae, fast_mse, reconstruction_metrics, splice, sae_splice_fn, spliced_metrics


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_sae(d):
    """Standard SAE with W_enc = W_dec = [I; −I], no centring: relu(x) − relu(−x) = x, so x̂ = x exactly."""
    sae = build_sae(SAEConfig("standard", d, 2 * d, apply_b_dec_to_input=False), seed=0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_fast_mse_eq7_and_metrics_by_hand():
    torch.manual_seed(0)
    d = 6
    sae = build_sae(SAEConfig("topk", d, 24, k=2), seed=0).eval()
    seqs = [torch.randn(5, d), torch.randn(9, d), torch.randn(2, d)]
    masks = [torch.tensor([1, 0, 0, 0, 1]).bool(), torch.zeros(9).bool(), torch.tensor([0, 1]).bool()]
    m = reconstruction_metrics(sae, seqs, masks)
    with torch.no_grad():
        errs = [(sae.decode(sae.encode(s)) - s).pow(2).sum(-1) for s in seqs]
    want = sum(float(e.mean()) for e in errs) / (3 * d)  # (1/(N·H)) Σ_i (1/L_i) Σ_j ‖·‖²
    assert m["mse"] == pytest.approx(want, rel=1e-5)
    assert m["log2_mse"] == pytest.approx(math.log2(want), rel=1e-5)
    # special tokens only: sequence 2 has none and is left out of N
    want_sp = (float(errs[0][masks[0]].mean()) + float(errs[2][masks[2]].mean())) / (2 * d)
    assert m["mse_special"] == pytest.approx(want_sp, rel=1e-5)
    allx = torch.cat(seqs)
    fvu = float(torch.cat(errs).sum() / (allx - allx.mean(0)).pow(2).sum())
    assert m["fvu"] == pytest.approx(fvu, rel=1e-5) and m["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5)
    assert m["l0"] == pytest.approx(2.0)  # TopK
    with torch.no_grad():
        fired = torch.cat([sae.encode(s) for s in seqs]).ne(0).any(0)
    assert m["dead_fraction"] == pytest.approx(1 - float(fired.float().mean()))
    assert fast_mse([torch.tensor([2.0, 4.0]), torch.tensor([])], hidden=3) == pytest.approx(1.0)


def test_exact_sae_has_zero_error():
    sae = exact_sae(5)
    m = reconstruction_metrics(sae, [torch.randn(7, 5)])
    assert m["mse"] < 1e-12 and m["fvu"] < 1e-12


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_splice_replaces_layer_output(tiny_llama):
    ids = torch.randint(0, 128, (2, 10))
    seen = {}

    def grab(h):
        seen["h"] = h.clone()
        return h * 0

    with torch.no_grad():
        clean = tiny_llama(input_ids=ids).logits
        with splice(tiny_llama, 0, grab):
            zeroed = tiny_llama(input_ids=ids).logits
        again = tiny_llama(input_ids=ids).logits  # hook removed on exit
    assert seen["h"].shape == (2, 10, 64)
    assert not torch.allclose(clean, zeroed)
    torch.testing.assert_close(clean, again)


def test_spliced_metrics_exact_and_random_sae(tiny_llama):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # padding is ignored
    batches = [{"input_ids": ids, "attention_mask": mask}]
    m = spliced_metrics(tiny_llama, exact_sae(64), layer=1, batches=batches)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert abs(m["kl"]) < 1e-5
    assert m["tokens"] == 2 * 11 + 7
    # by hand: CE of the clean model on valid next-token predictions
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids, attention_mask=mask).logits[:, :-1]
    valid = mask[:, 1:].bool()
    ce = torch.nn.functional.cross_entropy(logits[valid], ids[:, 1:][valid])
    assert m["ce_clean"] == pytest.approx(float(ce), rel=1e-4)
    # a random SAE changes the predictions (random-init LM: CE itself may go either way)
    bad = build_sae(SAEConfig("topk", 64, 256, k=4), seed=0).eval()
    mb = spliced_metrics(tiny_llama, bad, layer=1, batches=batches)
    assert mb["ce_sae"] != pytest.approx(mb["ce_clean"], abs=1e-4) and mb["kl"] > 1e-4
    want = (mb["ce_zero"] - mb["ce_sae"]) / (mb["ce_zero"] - mb["ce_clean"])
    assert mb["ce_loss_recovered"] == pytest.approx(want)
    assert mb["ce_zero"] == pytest.approx(m["ce_zero"])
    with torch.no_grad():
        h = torch.randn(2, 3, 64)
        assert sae_splice_fn(exact_sae(64))(h).shape == h.shape
