"""SAELens / sparsify folders: round trips, hand-written folders against the formulas, one-line errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from saefd_ray.sae import (ARCHITECTURES, SAEConfig, SAEFormatError, TopKSAE, build_sae, load_sae, load_saelens,
                           load_sparsify, save_saelens, save_sparsify)

D_IN, D_SAE = 12, 40


def _perturbed(arch):
    """A built SAE with every parameter randomised (so a swapped/transposed tensor cannot pass unnoticed)."""
    sae = build_sae(SAEConfig(arch, D_IN, D_SAE, k=5 if "topk" in arch else None,
                              metadata={"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"}), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "log_threshold":
                p.copy_(torch.log(torch.rand(D_SAE, generator=g) * 0.3 + 0.05))
            elif name not in ("W_dec", "W_enc"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if arch == "batchtopk":
            sae.threshold.fill_(0.25)
            sae.threshold_initialized.fill_(True)
    return sae.eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saelens_round_trip(arch, tmp_path):
    sae = _perturbed(arch)
    save_saelens(sae, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cfg.json", "checksums.json", "saefd_cfg.json",
                                                                 "sae_weights.safetensors"])
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu" if arch == "batchtopk" else arch)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    back = load_saelens(tmp_path)
    assert back.cfg.architecture == arch and type(back) is type(sae)
    x = torch.randn(30, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(back.decode(back.encode(x)), sae.decode(sae.encode(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparsify_round_trip(arch, tmp_path):
    sae = _perturbed(arch)
    save_sparsify(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert set(cfg) == {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                        "skip_connection", "transcode", "d_in"}
    back = load_sae(tmp_path)
    x = torch.randn(30, D_IN)
    with torch.no_grad():  # sparsify is TopK: compare against our TopK encoding of the same weights
        ref = TopKSAE.encode_sparse(sae, x).to_dense(D_SAE)  # BatchTopK is saved as plain TopK here
        torch.testing.assert_close(back.encode(x), ref)
    with pytest.raises(ValueError):
        save_sparsify(_perturbed("gated"), tmp_path / "nope")


def test_handwritten_sparsify_topk_folder(tmp_path):
    """Built from papers.md §5 with plain safetensors + json: forward = topk(relu((x − b_dec)Wᵀ + b)), x̂ = Σ a·W_dec + b_dec."""
    g = torch.Generator().manual_seed(7)
    n, d, k = 32, 8, 3
    enc_w, enc_b = torch.randn(n, d, generator=g), torch.randn(n, generator=g) * 0.1
    w_dec, b_dec = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                   "num_latents": n, "k": k, "multi_topk": False,
                                                   "skip_connection": False, "transcode": False, "d_in": d}))
    sae = load_sparsify(tmp_path)
    x = torch.randn(5, d, generator=g)
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    acts, idx = pre.topk(k, dim=-1)
    x_hat = torch.stack([(acts[i, :, None] * w_dec[idx[i]]).sum(0) for i in range(5)]) + b_dec
    with torch.no_grad():
        codes = sae.encode_sparse(x)
        torch.testing.assert_close(torch.sort(codes.indices, 1).values, torch.sort(idx, 1).values)
        torch.testing.assert_close(sae.decode(codes), x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat, rtol=1e-5, atol=1e-5)


def test_handwritten_saelens_jumprelu_folder(tmp_path):
    """SAELens JumpReLU: f = z·1[z > θ], z = (x − b_dec)W_enc + b_enc with W_enc [d_in, d_sae]; x̂ = f W_dec + b_dec."""
    g = torch.Generator().manual_seed(8)
    d, n = 8, 24
    w = {"W_enc": torch.randn(d, n, generator=g), "b_enc": torch.randn(n, generator=g) * 0.1,
         "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g),
         "threshold": torch.rand(n, generator=g) + 0.2}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": "m", "hook_name": "h", "context_size": 128, "prepend_bos": True}}))
    sae = load_saelens(tmp_path)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.metadata["context_size"] == 128
    x = torch.randn(6, d, generator=g)
    z = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = z * (z > w["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(sae.encode(x)), f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


def _one_line(err: Exception, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_missing_key_names_file_and_key(tmp_path):
    save_saelens(_perturbed("standard"), tmp_path)
    (tmp_path / "checksums.json").unlink()
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    del t["b_enc"]
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError) as e:
        load_saelens(tmp_path)
    _one_line(e.value, "sae_weights.safetensors", "b_enc", "missing")


def test_wrong_shape_names_file_key_and_shapes(tmp_path):
    save_sparsify(_perturbed("topk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_in"] = D_IN + 1
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "checksums.json").unlink()
    with pytest.raises(SAEFormatError) as e:
        load_sparsify(tmp_path)
    _one_line(e.value, "sae.safetensors", "encoder.weight", str([D_SAE, D_IN]), str([D_SAE, D_IN + 1]))


def test_corrupt_safetensors_and_checksum(tmp_path):
    save_saelens(_perturbed("gated"), tmp_path)
    p = tmp_path / "sae_weights.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # flip a weight byte: safetensors cannot notice, the checksum does
    p.write_bytes(bytes(data))
    with pytest.raises(SAEFormatError) as e:
        load_saelens(tmp_path)
    _one_line(e.value, "sae_weights.safetensors", "sha256")
    (tmp_path / "checksums.json").unlink()
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SAEFormatError) as e:
        load_saelens(tmp_path)
    _one_line(e.value, "sae_weights.safetensors", "corrupt")
    p.write_bytes(b"")
    with pytest.raises(SAEFormatError) as e:
        load_saelens(tmp_path)
    _one_line(e.value, "sae_weights.safetensors")


def test_bad_cfg_and_missing_files(tmp_path):
    with pytest.raises(SAEFormatError) as e:
        load_sae(tmp_path)
    _one_line(e.value, str(tmp_path))
    save_saelens(_perturbed("topk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matryoshka"}))
    with pytest.raises(SAEFormatError) as e:
        load_saelens(tmp_path)
    _one_line(e.value, "cfg.json", "matryoshka")
    (tmp_path / "cfg.json").write_text("{oops")
    with pytest.raises(SAEFormatError) as e:
        load_saelens(tmp_path)
    _one_line(e.value, "cfg.json", "JSON")
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "k": 0}))
    with pytest.raises(SAEFormatError) as e:
        load_saelens(tmp_path)
    _one_line(e.value, "cfg.json", "'k'")
    assert isinstance(e.value, ValueError)


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    sae = _perturbed("standard")
    save_saelens(sae, tmp_path)
    before = (tmp_path / "sae_weights.safetensors").read_bytes()
    import os
    real_replace = os.replace

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with torch.no_grad():
        sae.W_dec.add_(1.0)
    with pytest.raises(OSError):
        save_saelens(sae, tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "sae_weights.safetensors").read_bytes() == before  # old file intact
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    load_saelens(tmp_path)  # still loads, checksum still matches


def test_apply_b_dec_to_input_is_a_config_field_carried_into_saelens(tmp_path):
    """FAST trains with apply_b_dec_to_input False: the SAE job's default, written to SAELens's cfg, honoured on load."""
    from saefd_ray.stream.config import validate_sae
    from saefd_ray.stream.sharded import sae_config

    raw = {"data": {"sources": [{"kind": "file", "path": "x.json"}]}, "sae": {"architecture": "standard", "width": 32}}
    cfg = sae_config(validate_sae(raw), 8)(1)
    assert cfg.apply_b_dec_to_input is False
    raw["sae"]["apply_b_dec_to_input"] = True
    assert sae_config(validate_sae(raw), 8)(1).apply_b_dec_to_input is True
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():
        sae.b_dec.normal_()
    folder = save_saelens(sae, tmp_path / "fast")
    assert json.loads((folder / "cfg.json").read_text())["apply_b_dec_to_input"] is False
    loaded = load_saelens(folder)
    x = torch.randn(5, 8)
    assert loaded.cfg.apply_b_dec_to_input is False
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    centred = build_sae(cfg.replace(apply_b_dec_to_input=True), seed=0)
    centred.load_state_dict(sae.state_dict())
    assert not torch.allclose(centred.encode(x), sae.encode(x))  # the flag changes the encoder: it must round-trip
