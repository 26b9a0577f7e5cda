"""The frozen SAE an SAE-based method reads the residual stream through: loading, checks, differentiable codes.

SAELens folders (`cfg.json` + `sae_weights.safetensors`) and sparsify folders (`cfg.json` + `sae.safetensors`)
are read by `saefd_ray.sae.formats`; this module adds what a method needs on top.

Checks run on the driver before any training (`check_against_model`): the SAE's d_in must equal the model's
hidden size and its layer must exist in the model and agree with the layer its metadata names (SAELens
`hook_name` such as `blocks.6.hook_resid_post`, sparsify's hookpoint folder `layers.6`); every mismatch is a
`ConfigError` naming both values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from saefd_ray.config import SaeSource
from saefd_ray.errors import ConfigError
from saefd_ray.sae import SparseAutoencoder

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
_LAYER = re.compile(r"(?:blocks|layers|layer|h)\.(\d+)")
# The one site the code applies an SAE at: the residual stream after decoder layer L (`models.loading.
# residual_stream`), named by SAELens/TransformerLens `blocks.L.hook_resid_post` or by the HF module path (sparsify).
_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post|(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)")


def sae_folder(source: SaeSource, where: str) -> Path:
    """The folder holding the SAE for `source.layer`. `source.path` may be an SAE folder (SAELens or sparsify),
    a sparsify run folder with one sub-folder per hookpoint (`layers.3/`, `layers.6/`: the one of the layer, as
    sparsify's own multi-layer loading picks it), or a `jobs/train_sae.py` run folder (its latest checkpoint,
    `checkpoints/tok_<n>/layer_<L>/`)."""
    if not source.path:
        raise ConfigError(f"{where}.path: not set; train an SAE with jobs/train_sae.py or give a SAELens/sparsify folder")
    folder = Path(source.path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{where}.path: {folder} not found")
    if (folder / "cfg.json").is_file():
        return folder
    pointer = folder / "checkpoints" / "latest.json"
    if pointer.is_file():  # a jobs/train_sae.py run folder (stream/sharded.py writes this layout)
        checkpoint = folder / "checkpoints" / json.loads(pointer.read_text())["checkpoint"]
        found = sorted(p.name for p in checkpoint.glob("layer_*") if (p / "cfg.json").is_file())
        if not (checkpoint / f"layer_{source.layer}" / "cfg.json").is_file():
            raise ConfigError(f"{where}.layer: {checkpoint} has no SAE for layer {source.layer} "
                              f"(has: {', '.join(found) or 'none'})")
        return checkpoint / f"layer_{source.layer}"
    hookpoints = sorted(p.name for p in folder.iterdir() if (p / "cfg.json").is_file())
    if hookpoints:  # a sparsify run folder: one sub-folder per hookpoint
        for name in hookpoints:
            match = _RESID_POST.fullmatch(name)
            if match and int(match.group(1) or match.group(2)) == source.layer:
                return folder / name
        raise ConfigError(f"{where}.layer: {folder} has no residual-stream hookpoint folder for layer "
                          f"{source.layer} (has: {', '.join(hookpoints)})")
    raise ConfigError(f"{where}.path: {folder} is not an SAE folder (no cfg.json), a sparsify run folder or a "
                      f"jobs/train_sae.py run folder")


def hook_layer(hook: str, fallback: int | None, where: str, folder: Path) -> int | None:
    """The decoder layer of a residual-stream-post hook name; any other site is refused (it would be applied
    to activations it was not trained on). No hook name at all: `fallback` (a bare layer number) or unknown."""
    if not hook:
        return fallback
    match = _RESID_POST.fullmatch(hook)
    if match:
        return int(match.group(1) or match.group(2))
    raise ConfigError(f"{where}.path: {folder} reads hook {hook!r}; only the residual stream after a decoder "
                      f"layer is supported (blocks.L.hook_resid_post, layers.L)")


def read_sae_header(source: SaeSource, where: str) -> tuple[int, int | None]:
    """(d_in, layer named by the SAE's own metadata or None) — from cfg.json only, cheap enough for the driver."""
    folder = sae_folder(source, where)
    cfg = json.loads((folder / "cfg.json").read_text())
    d_in = cfg.get("d_in")
    if (folder / SPARSIFY_WEIGHTS).is_file() and not (folder / SAELENS_WEIGHTS).is_file():
        hook = folder.name if _LAYER.search(folder.name) else ""  # sparsify names a hookpoint's folder after it
        layer = hook_layer(hook, None, where, folder)
    else:
        meta = cfg.get("metadata") or {}
        hook = str(meta.get("hook_name") or cfg.get("hook_name") or "")
        if meta.get("hook_head_index") is not None or cfg.get("hook_head_index") is not None:
            raise ConfigError(f"{where}.path: {folder} reads one attention head (hook_head_index); only the "
                              f"residual stream after a decoder layer is supported")
        fallback = meta.get("layer", meta.get("hook_layer", cfg.get("hook_layer")))
        layer = hook_layer(hook, fallback if isinstance(fallback, int) else None, where, folder)
    if not isinstance(d_in, int):
        raise ConfigError(f"{where}.path: {folder}/cfg.json has no integer d_in")
    return d_in, layer


def model_dims(model_path: str) -> tuple[int, int]:
    """(hidden size, number of decoder layers) from the model's config, without loading weights."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.hidden_size), int(cfg.num_hidden_layers)


def check_against_model(source: SaeSource, layer: int, hidden: int, n_layers: int, where: str) -> None:
    d_in, sae_layer = read_sae_header(source, where)
    if d_in != hidden:
        raise ConfigError(f"{where}: SAE d_in {d_in} does not match the model's hidden size {hidden}")
    if not 0 <= layer < n_layers:
        raise ConfigError(f"{where}.layer: layer {layer} is out of range for a model with {n_layers} decoder layers")
    if sae_layer is not None and sae_layer != layer:
        raise ConfigError(f"{where}.layer: config says layer {layer} but the SAE was trained on layer {sae_layer}")


def load_sae(source: SaeSource, where: str, device: torch.device | str = "cpu") -> SparseAutoencoder:
    """The SAE (SAELens or sparsify folder, `saefd_ray.sae.formats`) as a frozen module in eval mode."""
    from saefd_ray.sae import load_sae as load_folder

    sae = load_folder(sae_folder(source, where), device).eval()
    for param in sae.parameters():
        param.requires_grad_(False)
    return sae


def codes(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """Dense SAE codes [N, d_sae] of x [N, d_in], differentiable w.r.t. x (the SAE's own `encode` works in
    place for speed, which autograd cannot always follow). Gates, thresholds and top-k selections are treated
    as constants, as in the SAE's forward: gradients flow through the magnitudes of the active features."""
    arch = sae.cfg.architecture
    x = x.to(sae.dtype)
    if arch == "gated":
        pi_gate, pi_mag = sae.gate_paths(x)
        return pi_mag.relu() * (pi_gate > 0)
    if arch == "standard":
        return sae.pre_acts(x, sae.b_enc).relu()
    if arch == "jumprelu":
        z = sae.pre_acts(x, sae.b_enc)
        return z * (z > sae.threshold)
    if arch == "batchtopk":
        z = sae.pre_acts(x, sae.b_enc)
        return z * (z > sae.threshold.clamp_min(0))
    if arch == "topk":
        z = sae.pre_acts(x, sae.b_enc).relu()
        values, indices = z.topk(sae.cfg.k, dim=-1)
        return torch.zeros_like(z).scatter(-1, indices, values)
    raise ValueError(f"unknown SAE architecture {arch!r}")


def sae_sources(cfg) -> list[SaeSource]:
    return list(cfg.sae) if isinstance(cfg.sae, (list, tuple)) else [cfg.sae]


def validate_sources(cfg, model_path: str) -> None:
    """Driver-side check of every SAE in a method config against the model (d_in, layer)."""
    hidden, n_layers = model_dims(model_path)
    sources = sae_sources(cfg)
    for index, source in enumerate(sources):
        where = "method.sae" if len(sources) == 1 and not isinstance(cfg.sae, list) else f"method.sae.{index}"
        check_against_model(source, source.layer, hidden, n_layers, where)
        load_sae(source, where)  # reads the weights: missing keys, wrong shapes, corrupt files fail here, in one line

