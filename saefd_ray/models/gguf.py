"""GGUF files → plain Hugging Face folders (safetensors + tokenizer + chat template), once, cached.

transformers reads GGUF (`from_pretrained(folder, gguf_file=name)`, needs the `gguf` package) and de-quantizes
every tensor to float, but the model it returns refuses `save_pretrained` and its loading is slow (de-quantization
on every load). So we copy its state dict into a plain `LlamaForCausalLM` of the same config and save that: from then
on it is an ordinary HF folder and goes through the same loading code as a hub model (Ray workers, peft, DeepSpeed).

The folder is built in a temporary sibling and renamed into place (atomic; concurrent builders race safely). The
chat template comes from the GGUF metadata (`tokenizer.chat_template`), written with the tokenizer.
Errors (unreadable file, unsupported architecture) are one-line `ModelError`s naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from saefd_ray.errors import UserError

SOURCE_FILE = "saefd_source.json"  # provenance written beside the weights: which GGUF, its sha256, its quantization


class ModelError(UserError):
    """A model file or download cannot be used (one line naming it)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_metadata(path: Path) -> dict:
    """The GGUF header fields we need: architecture, chat template, file type (quantization), tensor count."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(f"{path}: reading GGUF files needs the `gguf` package (pip install gguf)") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - the reader raises ValueError, struct errors, ... on a bad file
        raise ModelError(f"{path}: not a readable GGUF file ({type(err).__name__}: {_first_line(err)})") from None

    def field(name: str):
        f = reader.fields.get(name)
        if f is None or not f.data:
            return None
        value = f.parts[f.data[0]]
        if f.types and f.types[0].name == "STRING":
            return bytes(value).decode("utf-8")
        return value.tolist()[0] if hasattr(value, "tolist") else value

    return {"architecture": field("general.architecture"), "chat_template": field("tokenizer.chat_template"),
            "file_type": field("general.file_type"), "name": field("general.name"), "tensors": len(reader.tensors)}


def convert_gguf(gguf_path: str | Path, target: str | Path, provenance: dict | None = None) -> Path:
    """De-quantize `gguf_path` into an HF folder at `target` (returned; reused when it already exists).

    Supports the Llama architecture (SmolLM2, Llama 2/3, ...), the one `LlamaForCausalLM` can hold.
    Raises ModelError on an unreadable file or another architecture.
    """
    gguf_path, target = Path(gguf_path).expanduser().resolve(), Path(target).expanduser()
    if (target / "config.json").is_file():
        return target
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: GGUF file not found")
    meta = gguf_metadata(gguf_path)
    if meta["architecture"] != "llama":
        raise ModelError(f"{gguf_path}: GGUF architecture {meta['architecture']!r} is not supported (expected 'llama')")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any HF folder
    began = time.perf_counter()
    try:
        kw = {"gguf_file": gguf_path.name}
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
        except Exception as err:  # noqa: BLE001 - transformers' GGUF loader raises many types on bad input
            raise ModelError(f"{gguf_path}: cannot de-quantize ({type(err).__name__}: {_first_line(err)})") from None
        plain = LlamaForCausalLM(loaded.config)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and loaded.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelError(f"{gguf_path}: de-quantized weights do not fit LlamaForCausalLM "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if plain.config.tie_word_embeddings:
            plain.tie_weights()
        if meta["chat_template"] and not tokenizer.chat_template:
            tokenizer.chat_template = meta["chat_template"]
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {"gguf": gguf_path.name, "gguf_sha256": sha256_file(gguf_path), "gguf_file_type": meta["file_type"],
                "gguf_name": meta["name"], "parameters": sum(p.numel() for p in plain.parameters()),
                "convert_seconds": round(time.perf_counter() - began, 1), **(provenance or {})}
        (staging / SOURCE_FILE).write_text(json.dumps(info, indent=1))
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first: theirs is the same conversion
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def gguf_folder(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """Where a generic `.gguf` file's conversion lives: keyed by the file's sha256, so an edited file reconverts."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file not found")
    return Path(cache_dir).expanduser() / "models" / f"gguf-{path.stem}-{sha256_file(path)[:12]}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"
