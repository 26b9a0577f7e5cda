"""The offline tiny model: a Llama-architecture causal LM with random init and a locally trained BPE tokenizer.

No weights can be downloaded in CI or on an air-gapped box, yet the whole pipeline (LoRA, DeepSpeed, SAEs,
activation hooks) must run on a real HF architecture. So we build one and save it with `save_pretrained`;
from then on it is an ordinary HF folder and goes through the same loading code as a hub model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from saefd_ray.config import TinyModelConfig

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model_dir(cfg: TinyModelConfig, texts: list[str], cache_dir: str | Path) -> Path:
    """Where the model for this config and tokenizer corpus lives: a content hash, so stale caches never load."""
    digest = hashlib.sha256(json.dumps([cfg.model_dump(), texts], sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "models" / f"tiny-llama-{digest}"


def build_tiny_model(cfg: TinyModelConfig, texts: list[str], cache_dir: str | Path) -> Path:
    """Build (once) and return the folder of a tiny HF model; concurrent builders race safely via rename."""
    target = tiny_model_dir(cfg, texts, cache_dir)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for messages that matter

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine: CPU reduction order depends on the thread count
    try:
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        tokenizer.save_pretrained(staging)
        torch.manual_seed(cfg.seed)
        model_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(model_config)
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=cfg.embedding_std)
        if cfg.pretrain_epochs:
            from saefd_ray.models.pretrain import pretrain_on_synthetic

            pretrain_on_synthetic(model, tokenizer, cfg.pretrain_epochs, cfg.seed)
        model.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first: theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return target


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (any text encodes, nothing is <unk>) trained with `tokenizers`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
