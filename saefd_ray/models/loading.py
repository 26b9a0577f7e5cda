"""Loading HF causal LMs, and reading the residual stream without running the rest of the model.

`residual_stream` is shared by SAE harvesting and the SAE-FD anchor pass: both need layer-L activations and
nothing after. It runs the model's own decoder stack truncated to layers[:L+1] (a temporary, shorter
ModuleList) on the base model without the LM head, so later layers and logits are never computed. That works
for any HF decoder whose base model iterates `self.layers` (Llama, Qwen, Mistral, Gemma, ...), under peft and
inside a DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from saefd_ray.config import ModelConfig
from saefd_ray.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: ModelConfig, tokenizer_texts: list[str] | None = None) -> str:
    """An HF folder or hub id for `model.name_or_path`, resolved once on the driver (workers get the result):
    `tiny` builds (or reuses) the offline model; a named real model (`models/registry.py`, e.g.
    `smollm2-135m-instruct`) is fetched and converted once; a `.gguf` file is de-quantized once into
    `cache_dir`; anything else is a hub id or local folder, as given."""
    from saefd_ray.models.registry import NAMED_MODELS, resolve_named

    name = model.name_or_path
    if name in NAMED_MODELS:
        return str(resolve_named(name, model.cache_dir))
    if name.endswith(".gguf"):
        from saefd_ray.models.gguf import convert_gguf, gguf_folder

        return str(convert_gguf(name, gguf_folder(name, model.cache_dir)))
    if name != "tiny":
        return name if Path(name).expanduser().exists() else _hub_model(name)
    from saefd_ray.data.synthetic import corpus_text
    from saefd_ray.models.tiny import build_tiny_model

    texts = corpus_text() + list(tokenizer_texts or [])
    return str(build_tiny_model(model.tiny, texts, model.cache_dir))


def _hub_model(name: str) -> str:
    """A hub id, checked with one request (or found in the local HF cache) before transformers asks for it: an
    unknown id or an unreachable hub would otherwise surface after transformers' retries, a minute later."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ConfigError(f"model.name_or_path: {name!r} is not a local folder, a named model (tiny, "
                          f"smollm2-135m-instruct), a .gguf file or a model on the HF hub") from None
    except Exception as err:  # noqa: BLE001 - network errors come from several libraries; each is the same answer
        raise ConfigError(f"model.name_or_path: {name!r} is not a local folder or in the HF cache, and the HF hub "
                          f"cannot be asked for it ({' '.join(str(err).split())[:200]})") from None
    return name


def load_tokenizer(path: str, require_chat_template: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # ValueError: a folder with a config but no usable tokenizer files
        raise ConfigError(f"model.name_or_path: cannot load a tokenizer from {path!r} ({str(err).splitlines()[0]})")
    if require_chat_template and not tokenizer.chat_template:
        raise ConfigError(f"model.name_or_path: tokenizer of {path!r} has no chat template, but one is required")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as err:
        raise ConfigError(f"model.name_or_path: cannot load a model from {path!r} ({str(err).splitlines()[0]})")


def decoder_stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(base model without LM head, its list of decoder layers), found through peft / DeepSpeed wrappers."""
    for _, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(module, "embed_tokens"):
            return module, layers
    raise ValueError(f"{type(model).__name__}: no decoder stack (a module with embed_tokens and layers) found")


def num_layers(model: nn.Module) -> int:
    return len(decoder_stack(model)[1])


def check_layer(model: nn.Module, layer: int, what: str) -> None:
    count = num_layers(model)
    if not 0 <= layer < count:
        raise ConfigError(f"{what}: layer {layer} is out of range for a model with {count} decoder layers")


@contextlib.contextmanager
def truncated(base: nn.Module, depth: int):
    """Temporarily keep only the first `depth` decoder layers (restored even if the forward raises)."""
    full = base.layers
    base.layers = nn.ModuleList(list(full)[:depth])
    try:
        yield
    finally:
        base.layers = full


def residual_stream(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: list[int]
) -> dict[int, torch.Tensor]:
    """Residual-stream activations [batch, seq, d] after each decoder layer in `layers`, one truncated forward."""
    base, stack = decoder_stack(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in sorted(set(layers)):
        if not 0 <= layer < len(stack):
            raise ConfigError(f"layer {layer} is out of range for a model with {len(stack)} decoder layers")

        def hook(_module, _inputs, output, layer=layer):
            captured[layer] = output[0] if isinstance(output, tuple) else output

        handles.append(stack[layer].register_forward_hook(hook))
    try:
        with truncated(base, max(layers) + 1):
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def model_dir_exists(path: str) -> bool:
    return Path(path).expanduser().exists()
