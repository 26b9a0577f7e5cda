"""Read/write SAEs in the SAELens and sparsify folder layouts (papers.md §5), plus our training state beside them.

SAELens:  ``cfg.json`` + ``sae_weights.safetensors`` — ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
          ``b_dec``; JumpReLU adds ``threshold``; Gated has ``W_enc, b_gate, r_mag, b_mag, W_dec, b_dec``. BatchTopK is
          written as JumpReLU with its running threshold broadcast to every latent.
sparsify: ``cfg.json`` + ``sae.safetensors`` — ``encoder.weight [n, d_in]``, ``encoder.bias``, ``W_dec [n, d_in]``,
          ``b_dec``; TopK (BatchTopK is written as TopK with its k) only.
Ours:     ``trainer_state.pt`` (optimizer, step, dead counters, buffer position) and ``saefd_cfg.json`` (our full
          SAEConfig, so a reload restores training-only fields); ``checksums.json`` holds the sha256 of each file.

Every write is atomic (temp file in the same folder, then ``os.replace``). Every load problem raises
:class:`SAEFormatError` with one line naming the file and the mismatch.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import UserError
from ..io import atomic_write_bytes
from .base import SAEConfig, SparseAutoencoder, build_sae

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CFG = "cfg.json"
OUR_CFG = "saefd_cfg.json"
TRAINER_STATE = "trainer_state.pt"
CHECKSUMS = "checksums.json"
SAELENS_LAYOUT_VERSION = "6.54.12"  # the SAELens release whose cfg.json layout save_saelens writes (tested against)


class SAEFormatError(UserError):
    """An SAE folder cannot be read: missing file or key, wrong shape, corrupt or mismatching file (one line)."""


# ---- atomic IO + checksums ------------------------------------------------------------------------------------------
def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write each file atomically, then the checksum manifest (merged with any existing entries) last."""
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    sums = _read_json(folder / CHECKSUMS) if (folder / CHECKSUMS).exists() else {}
    sums.update({name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    atomic_write_bytes(folder / CHECKSUMS, json.dumps(sums, indent=2, sort_keys=True).encode())


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found")
    data = path.read_bytes()
    sums_path = path.parent / CHECKSUMS
    if sums_path.is_file():
        want = _read_json(sums_path).get(path.name)
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise SAEFormatError(f"{path}: sha256 does not match {CHECKSUMS} (file corrupt or modified)")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SAEFormatError(f"{path}: expected a JSON object")
    return obj


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    data = _read_bytes(path)
    try:
        return st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt headers
        raise SAEFormatError(f"{path}: corrupt safetensors file ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _check(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    for key, shape in shapes.items():
        if key not in tensors:
            raise SAEFormatError(f"{path}: missing key {key!r} (has {sorted(tensors)})")
        if tuple(tensors[key].shape) != shape:
            raise SAEFormatError(f"{path}: {key!r} has shape {list(tensors[key].shape)}, cfg.json implies {list(shape)}")
        if not tensors[key].is_floating_point():
            raise SAEFormatError(f"{path}: {key!r} has dtype {tensors[key].dtype}, expected floating point")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _cfg_int(path: Path, cfg: dict[str, Any], key: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SAEFormatError(f"{path}: {key!r} must be a positive integer, got {v!r}")
    return v


# ---- SAELens ----------------------------------------------------------------------------------------------------------
def save_saelens(sae: SparseAutoencoder, folder: str | os.PathLike, sparsity: torch.Tensor | None = None) -> Path:
    """Write the SAELens layout. ``sparsity``: optional log10 feature density ``[d_sae]``."""
    folder, c = Path(folder), sae.cfg
    w: dict[str, torch.Tensor] = {"W_enc": _cpu(sae.W_enc.t()), "W_dec": _cpu(sae.W_dec), "b_dec": _cpu(sae.b_dec)}
    arch = c.architecture
    if arch == "gated":
        w.update(b_gate=_cpu(sae.b_gate), r_mag=_cpu(sae.r_mag), b_mag=_cpu(sae.b_mag))
    else:
        w["b_enc"] = _cpu(sae.b_enc)
    if arch == "jumprelu":
        w["threshold"] = _cpu(sae.log_threshold.exp())
    if arch == "batchtopk":  # SAELens convention: inference form is JumpReLU with the threshold broadcast
        w["threshold"] = _cpu(sae.threshold.expand(c.d_sae).clamp_min(0))
        arch = "jumprelu"
    # metadata.sae_lens_version marks the v6 layout: without it SAELens (6.x) reads the cfg as pre-6 and looks for
    # model_name / hook_name / context_size at the top level, so they would load as None.
    meta = {"sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None, "model_name": None,
            "hook_name": None, "hook_head_index": None, "context_size": None, "prepend_bos": None,
            "dataset_path": None, "model_from_pretrained_kwargs": {}, **c.metadata}
    cfg = {"architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype, "device": "cpu",
           "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta}
    if arch == "topk":
        cfg["k"] = c.k
    files = {SAELENS_WEIGHTS: st_save(w), CFG: json.dumps(cfg, indent=2).encode(),
             OUR_CFG: json.dumps(c.to_dict(), indent=2).encode()}
    if sparsity is not None:
        files["sparsity.safetensors"] = st_save({"sparsity": _cpu(sparsity)})
    _write_files(folder, files)
    return folder


def load_saelens(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load a SAELens folder (ours or SAELens's own). Architectures: standard, gated, jumprelu, topk."""
    folder = Path(folder)
    cpath, wpath = folder / CFG, folder / SAELENS_WEIGHTS
    raw = _read_json(cpath)
    arch = _legacy_activation(cpath, raw, raw.get("architecture", "standard"))
    if arch not in ("standard", "gated", "jumprelu", "topk"):
        raise SAEFormatError(f"{cpath}: unsupported architecture {arch!r} (standard, gated, jumprelu, topk)")
    d_in, d_sae = _cfg_int(cpath, raw, "d_in"), _cfg_int(cpath, raw, "d_sae")
    for key in ("normalize_activations", "reshape_activations"):
        if raw.get(key, "none") not in ("none", None):
            raise SAEFormatError(f"{cpath}: {key}={raw[key]!r} is not supported (only 'none')")
    ours = _read_json(folder / OUR_CFG) if (folder / OUR_CFG).is_file() else {}
    saved_as_jump = arch == "jumprelu" and ours.get("architecture") == "batchtopk"
    fields = {**ours} if ours.get("architecture") == arch or saved_as_jump else {}
    fields.update(architecture="batchtopk" if saved_as_jump else arch, d_in=d_in, d_sae=d_sae,
                  apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                  dtype=str(raw.get("dtype", "float32")).replace("torch.", ""),
                  metadata=raw.get("metadata") or {})
    rescale = bool(raw.get("rescale_acts_by_decoder_norm", False))
    if rescale and arch != "topk":
        raise SAEFormatError(f"{cpath}: rescale_acts_by_decoder_norm=true is only supported for topk, not {arch!r}")
    if arch == "topk":
        legacy_k = (raw.get("activation_fn_kwargs") or {}).get("k")
        fields["k"] = legacy_k if "k" not in raw and isinstance(legacy_k, int) else _cfg_int(cpath, raw, "k")
        if rescale:  # folded into the weights below; the decoder rows then are not unit norm
            fields["normalize_decoder"] = False
    try:
        cfg = SAEConfig.from_dict(fields)
    except (ValueError, TypeError, AttributeError) as e:
        raise SAEFormatError(f"{cpath}: {e}") from None
    t = _read_tensors(wpath)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes.update({"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)} if arch == "gated" else {"b_enc": (d_sae,)})
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    _check(wpath, t, shapes)
    if rescale:
        _fold_decoder_norm(wpath, t)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"].t())
        for name in ("W_dec", "b_dec", "b_enc", "b_gate", "r_mag", "b_mag"):
            if name in t and hasattr(sae, name):
                getattr(sae, name).copy_(t[name])
        if saved_as_jump:
            sae.threshold.copy_(t["threshold"].max())
            sae.threshold_initialized.fill_(True)
        elif arch == "jumprelu":
            if bool((t["threshold"] <= 0).any()):  # log θ needs θ > 0; SAELens allows 0 (= ReLU)
                t["threshold"] = t["threshold"].clamp_min(torch.finfo(t["threshold"].dtype).tiny)
            sae.log_threshold.copy_(t["threshold"].log())
    return sae.to(device)


def _legacy_activation(path: Path, raw: dict[str, Any], arch: str) -> str:
    """Pre-6 SAELens cfgs name TopK as ``architecture: standard`` + ``activation_fn_str: topk`` +
    ``activation_fn_kwargs: {k: ...}``; read that as TopK. Any activation other than relu / topk is refused
    (loading it as a ReLU SAE would give other codes)."""
    act = raw.get("activation_fn_str", raw.get("activation_fn"))
    if act in (None, "relu") or arch not in ("standard", "topk"):
        return arch
    if act == "topk":
        if not isinstance((raw.get("activation_fn_kwargs") or {}).get("k"), int) and "k" not in raw:
            raise SAEFormatError(f"{path}: activation_fn_str 'topk' needs activation_fn_kwargs.k (an integer)")
        return "topk"
    raise SAEFormatError(f"{path}: activation_fn_str {act!r} is not supported (relu, topk)")


def _fold_decoder_norm(path: Path, t: dict[str, torch.Tensor]) -> None:
    """SAELens TopK with ``rescale_acts_by_decoder_norm``: ``f = TopK(ReLU((x−b_dec)W_enc + b_enc) · ‖W_dec,i‖)``,
    ``x̂ = (f / ‖W_dec,i‖) W_dec + b_dec``. Scaling latent i's encoder column and bias by n_i = ‖W_dec,i‖ (n_i > 0
    keeps ReLU and the top-k choice) and its decoder row by 1/n_i gives a plain TopK SAE with the same codes and
    reconstructions."""
    norms = t["W_dec"].norm(dim=-1)
    if bool((norms <= 0).any()):
        raise SAEFormatError(f"{path}: rescale_acts_by_decoder_norm with a zero decoder row cannot be loaded")
    t["W_enc"] = t["W_enc"] * norms
    t["b_enc"] = t["b_enc"] * norms
    t["W_dec"] = t["W_dec"] / norms[:, None]


# ---- sparsify ---------------------------------------------------------------------------------------------------------
def save_sparsify(sae: SparseAutoencoder, folder: str | os.PathLike) -> Path:
    """Write the sparsify layout (TopK; BatchTopK is written as TopK with the same k)."""
    folder, c = Path(folder), sae.cfg
    if c.architecture not in ("topk", "batchtopk"):
        raise ValueError(f"sparsify layout holds TopK SAEs only, not {c.architecture!r}")
    if not c.apply_b_dec_to_input:
        raise ValueError("sparsify always subtracts b_dec from the input; this SAE has apply_b_dec_to_input=False")
    w = {"encoder.weight": _cpu(sae.W_enc), "encoder.bias": _cpu(sae.b_enc), "W_dec": _cpu(sae.W_dec),
         "b_dec": _cpu(sae.b_dec)}
    cfg = {"activation": "topk", "expansion_factor": max(1, c.d_sae // c.d_in), "normalize_decoder":
           c.normalize_decoder, "num_latents": c.d_sae, "k": c.k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": c.d_in}
    _write_files(folder, {SPARSIFY_WEIGHTS: st_save(w), CFG: json.dumps(cfg, indent=2).encode(),
                          OUR_CFG: json.dumps(c.to_dict(), indent=2).encode()})
    return folder


def load_sparsify(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    folder = Path(folder)
    cpath, wpath = folder / CFG, folder / SPARSIFY_WEIGHTS
    raw = _read_json(cpath)
    if raw.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{cpath}: activation {raw.get('activation')!r} is not supported (only 'topk')")
    for key in ("skip_connection", "transcode"):
        if raw.get(key):
            raise SAEFormatError(f"{cpath}: {key}=true is not supported")
    d_in, k = _cfg_int(cpath, raw, "d_in"), _cfg_int(cpath, raw, "k")
    d_sae = raw.get("num_latents") or d_in * _cfg_int(cpath, raw, "expansion_factor")
    ours = _read_json(folder / OUR_CFG) if (folder / OUR_CFG).is_file() else {}
    fields = {**ours} if ours.get("architecture") in ("topk", "batchtopk") else {}
    fields.update(architecture=fields.get("architecture", "topk"), d_in=d_in, d_sae=int(d_sae), k=k,
                  normalize_decoder=bool(raw.get("normalize_decoder", True)), apply_b_dec_to_input=True)
    t = _read_tensors(wpath)
    _check(wpath, t, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
                      "b_dec": (d_in,)})
    fields["dtype"] = str(t["W_dec"].dtype).replace("torch.", "")
    try:
        cfg = SAEConfig.from_dict(fields)
    except (ValueError, TypeError) as e:
        raise SAEFormatError(f"{cpath}: {e}") from None
    if cfg.architecture == "batchtopk":  # sparsify has no threshold; decode it as the TopK it was saved as
        cfg = cfg.replace(architecture="topk")
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(t["encoder.weight"])
        sae.b_enc.copy_(t["encoder.bias"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
    return sae.to(device)


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load either layout, chosen by which weight file the folder holds."""
    folder = Path(folder)
    if (folder / SAELENS_WEIGHTS).exists():
        return load_saelens(folder, device)
    if (folder / SPARSIFY_WEIGHTS).exists():
        return load_sparsify(folder, device)
    raise SAEFormatError(f"{folder}: neither {SAELENS_WEIGHTS} nor {SPARSIFY_WEIGHTS} found")


# ---- training state ---------------------------------------------------------------------------------------------------
def save_trainer_state(state: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``SAETrainer.state_dict()`` (plus e.g. ``{"buffer": buffer.state_dict()}``) as ``trainer_state.pt``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    _write_files(Path(folder), {TRAINER_STATE: buf.getvalue()})
    return Path(folder) / TRAINER_STATE


def load_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / TRAINER_STATE
    data = _read_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise SAEFormatError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def save_checkpoint(sae: SparseAutoencoder, trainer_state: dict[str, Any] | None, folder: str | os.PathLike,
                    layout: str = "saelens") -> Path:
    """SAE weights in ``layout`` ("saelens" | "sparsify") plus the training state beside them."""
    (save_saelens if layout == "saelens" else save_sparsify)(sae, folder)
    if trainer_state is not None:
        save_trainer_state(trainer_state, folder)
    return Path(folder)

