"""SAE folders from other libraries mean exactly what they say (issue 17 §4).

Older SAELens TopK cfgs, TopK with `rescale_acts_by_decoder_norm`, the cfg we write as SAELens 6 reads it, sparsify
run folders with several hookpoints, and the run folder `jobs/train_sae.py` writes as `method.sae.path`. Expected
codes are computed from the raw tensors with the formulas the other library implements, never by our loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saefd_ray.config import SaeSource
from saefd_ray.methods.sae_source import load_sae as load_source, read_sae_header, sae_folder
from saefd_ray.sae import SAEConfig, SAEFormatError, build_sae, load_saelens, save_saelens, save_sparsify

D_IN, D_SAE, K = 8, 32, 4


def _raw_saelens(folder: Path, cfg: dict, seed: int = 0, dec_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A SAELens folder written by hand: random weights, decoder rows of norm != 1 when `dec_scale` != 1."""
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g) * dec_scale * (torch.rand(D_SAE, 1, generator=g) + 0.5),
         "b_dec": torch.randn(D_IN, generator=g) * 0.1}
    folder.mkdir(parents=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", **cfg}))
    return w


def _topk(z: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, indices, values.relu())


def test_pre6_topk_layout_loads_as_topk(tmp_path):
    """SAELens < 6: `architecture: standard` + `activation_fn_str: topk` + `activation_fn_kwargs.k` is a TopK SAE."""
    w = _raw_saelens(tmp_path / "old", {"architecture": "standard", "activation_fn_str": "topk",
                                         "activation_fn_kwargs": {"k": K}, "hook_name": "blocks.1.hook_resid_post",
                                         "hook_layer": 1, "apply_b_dec_to_input": True})
    sae = load_saelens(tmp_path / "old")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K
    x = torch.randn(50, D_IN)
    expected = _topk((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K)
    with torch.no_grad():
        codes = sae.encode(x)
    torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-5)
    assert ((codes != 0).sum(-1) <= K).all() and (codes != 0).sum(-1).float().mean() > K - 1  # L0 is k, not ~d/2


def test_unknown_activation_fn_is_refused(tmp_path):
    _raw_saelens(tmp_path / "old", {"architecture": "standard", "activation_fn_str": "tanh-relu"})
    with pytest.raises(SAEFormatError, match="activation_fn_str 'tanh-relu' is not supported"):
        load_saelens(tmp_path / "old")


def test_rescale_acts_by_decoder_norm_matches_saelens_formula(tmp_path):
    """f = TopK(((x − b_dec) W_enc + b_enc) · ‖W_dec,i‖), x̂ = (f / ‖W_dec,i‖) W_dec + b_dec (SAELens TopK)."""
    w = _raw_saelens(tmp_path / "t", {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True,
                                       "apply_b_dec_to_input": True}, dec_scale=3.0)
    sae = load_saelens(tmp_path / "t")
    x = torch.randn(50, D_IN)
    norms = w["W_dec"].norm(dim=-1)
    codes = _topk(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms, K)
    recon = (codes / norms) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        ours = sae.encode(x)
        torch.testing.assert_close(ours, codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(ours), recon, rtol=1e-5, atol=1e-5)


def test_rescale_on_other_architecture_is_refused(tmp_path):
    _raw_saelens(tmp_path / "s", {"architecture": "standard", "rescale_acts_by_decoder_norm": True})
    with pytest.raises(SAEFormatError, match="rescale_acts_by_decoder_norm=true is only supported for topk"):
        load_saelens(tmp_path / "s")


def test_our_cfg_is_a_saelens6_cfg(tmp_path):
    sae = build_sae(SAEConfig("topk", D_IN, D_SAE, k=K, metadata={"model_name": "tiny", "hook_name":
                                                                  "model.layers.1", "context_size": 128}), seed=0)
    save_saelens(sae, tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / "cfg.json").read_text())["metadata"]
    assert meta["sae_lens_version"].split(".")[0] == "6"
    assert (meta["hook_name"], meta["model_name"], meta["context_size"]) == ("model.layers.1", "tiny", 128)


def test_our_folder_loads_in_saelens(tmp_path):
    """Interop with sae-lens itself (the `bench` extra); hook, model and context size must survive."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = build_sae(SAEConfig("topk", D_IN, D_SAE, k=K, metadata={"model_name": "tiny", "hook_name":
                                                                  "model.layers.1", "context_size": 128}), seed=0)
    save_saelens(sae, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"), device="cpu")
    meta = theirs.cfg.metadata
    assert (meta.hook_name, meta.model_name, meta.context_size) == ("model.layers.1", "tiny", 128)
    x = torch.randn(20, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


def _topk_sae(seed: int):
    return build_sae(SAEConfig("topk", D_IN, D_SAE, k=K), seed=seed)


def test_sparsify_run_folder_picks_the_layer(tmp_path):
    """A sparsify run folder holds one folder per hookpoint; method.sae.layer picks `layers.<L>`."""
    run = tmp_path / "sparsify-run"
    saes = {3: _topk_sae(3), 6: _topk_sae(6)}
    for layer, sae in saes.items():
        save_sparsify(sae, run / f"layers.{layer}")
    for layer, sae in saes.items():
        source = SaeSource(path=str(run), layer=layer)
        assert sae_folder(source, "method.sae") == run / f"layers.{layer}"
        assert read_sae_header(source, "method.sae") == (D_IN, layer)
        torch.testing.assert_close(load_source(source, "method.sae").W_dec, sae.W_dec)
    with pytest.raises(Exception, match=r"no residual-stream hookpoint folder for layer 4 \(has: layers.3, layers.6\)"):
        sae_folder(SaeSource(path=str(run), layer=4), "method.sae")


def test_train_sae_run_folder_is_accepted(tmp_path):
    """`jobs/train_sae.py` writes checkpoints/tok_<n>/layer_<L>/ and latest.json: the latest checkpoint's layer."""
    from saefd_ray.stream.checkpoint import CKPT_DIR, LATEST

    run = tmp_path / "sae_run"
    old, new = _topk_sae(1), _topk_sae(2)
    for name, sae in (("tok_000000000100", old), ("tok_000000000200", new)):
        for layer in (0, 1):
            sae.cfg.metadata = {"hook_name": f"model.layers.{layer}"}
            save_saelens(sae, run / CKPT_DIR / name / f"layer_{layer}")
    (run / CKPT_DIR / LATEST).write_text(json.dumps({"checkpoint": "tok_000000000200"}))
    source = SaeSource(path=str(run), layer=1)
    assert sae_folder(source, "method.sae") == run / CKPT_DIR / "tok_000000000200" / "layer_1"
    assert read_sae_header(source, "method.sae") == (D_IN, 1)
    torch.testing.assert_close(load_source(source, "method.sae").W_dec, new.W_dec)
    with pytest.raises(Exception, match="has no SAE for layer 5 \\(has: layer_0, layer_1\\)"):
        sae_folder(SaeSource(path=str(run), layer=5), "method.sae")
