"""Shared pieces of every sparse autoencoder: config, output type, sparse codes, the base class.

Conventions (all architectures):
  * ``W_enc`` is ``[d_sae, d_in]`` — one row per latent, like ``nn.Linear`` and sparsify's ``encoder.weight``; the
    SAELens files store its transpose (``formats.py`` converts). Row-per-latent keeps the sparse backward contiguous.
  * ``W_dec`` is ``[d_sae, d_in]`` — row i is latent i's direction (what steering adds to the residual stream).
  * ``encode(x)`` returns dense codes ``[..., d_sae]``; ``encode_sparse(x)`` returns :class:`SparseCodes`; ``decode``
    takes either. Training uses ``forward(x)`` which returns a :class:`ForwardOutput` with the named loss terms.
  * Encoder input is ``x - b_dec`` when ``apply_b_dec_to_input``; we fold that into the bias
    (``x W^T - b_dec W^T + b``) so autograd never forms a gradient for the ``[N, d_in]`` input (the data).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

ARCHITECTURES = ("standard", "gated", "jumprelu", "topk", "batchtopk")

# Default sparsity coefficient λ per architecture (FAST: λ=5 for the L1 of Standard, 0.01 for JumpReLU's L0).
# Below this firing density the training decoder uses the sparse kernel instead of a dense matmul.
SPARSE_DECODE_DENSITY = 0.05

_DEFAULT_SPARSITY = {"standard": 5.0, "gated": 5.0, "jumprelu": 0.01, "topk": 0.0, "batchtopk": 0.0}


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE (weights excluded). JSON-serialisable via :meth:`to_dict`."""

    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None  # topk / batchtopk: active latents per token (batchtopk: on average)
    sparsity_coefficient: float | None = None  # λ of the L1 (standard, gated) or L0 (jumprelu); None -> default
    apply_b_dec_to_input: bool = True
    normalize_decoder: bool = True  # keep decoder rows unit norm (trainer projects grads + renormalises)
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    aux_k: int | None = None  # topk / batchtopk AuxK: dead latents used; None -> d_in // 2
    aux_k_coefficient: float = 1.0 / 32.0
    batchtopk_threshold_momentum: float = 0.99  # EMA of the per-batch minimum active value
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)  # model_name, hook_name, layer, context_size, ...

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.architecture in ("topk", "batchtopk"):
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"{self.architecture} needs 0 < k <= d_sae, got k={self.k}")
        if self.sparsity_coefficient is None:
            self.sparsity_coefficient = _DEFAULT_SPARSITY[self.architecture]
        if self.aux_k is None:
            self.aux_k = min(self.d_sae, max(1, self.d_in // 2))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.replace("torch.", ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw: Any) -> "SAEConfig":
        return dataclasses.replace(self, **kw)


class SparseCodes(NamedTuple):
    """Fixed-width sparse codes: ``values[..., w]`` at latent ``indices[..., w]``.

    Rows with fewer than ``w`` active latents are padded with value 0 (index arbitrary but valid), so padding is inert
    in :func:`decode`. This is also the per-token storage format of SAE-FD anchor codes.
    """

    values: Tensor
    indices: Tensor

    def to_dense(self, d_sae: int) -> Tensor:
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return out.scatter_add_(-1, self.indices, self.values)  # add: zero padding may repeat an index

    @staticmethod
    def from_dense(dense: Tensor, width: int | None = None) -> "SparseCodes":
        """Keep the ``width`` largest entries per row (default: the largest row count of nonzeros)."""
        if width is None:
            width = int((dense != 0).sum(-1).max().item()) if dense.numel() else 0
        width = max(1, min(width, dense.shape[-1]))
        values, indices = dense.topk(width, dim=-1, sorted=False)
        return SparseCodes(values, indices)


class ForwardOutput(NamedTuple):
    """Training forward: reconstruction, codes (dense tensor or :class:`SparseCodes`), named loss terms, total loss."""

    x_hat: Tensor
    codes: Tensor | SparseCodes
    losses: dict[str, Tensor]
    loss: Tensor


def fired_mask(codes: Tensor | SparseCodes, d_sae: int) -> Tensor:
    """Boolean ``[d_sae]``: which latents were active on at least one token of this batch."""
    if isinstance(codes, SparseCodes):
        fired = torch.zeros(d_sae, dtype=torch.bool, device=codes.values.device)
        idx = codes.indices[codes.values != 0]
        fired[idx] = True
        return fired
    return (codes.reshape(-1, d_sae) != 0).any(0)


def mse_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """FAST's training reconstruction term ‖x − x̂‖²: summed over d_in, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


class SparseAutoencoder(nn.Module):
    """Abstract SAE. Subclasses set their parameters and implement ``encode`` and ``forward``."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dt = cfg.torch_dtype
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt))
        self.W_enc = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dt))

    # ---- init -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose (the usual, well-conditioned start)."""
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32).to(self.W_dec)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        self.b_dec.zero_()

    # ---- interface --------------------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_sparse(self, x: Tensor, width: int | None = None) -> SparseCodes:
        return SparseCodes.from_dense(self.encode(x).reshape(-1, self.cfg.d_sae), width)

    def decode(self, codes: Tensor | SparseCodes) -> Tensor:
        if isinstance(codes, SparseCodes):
            lead = codes.values.shape[:-1]
            v = codes.values.reshape(-1, codes.values.shape[-1])
            i = codes.indices.reshape(-1, codes.indices.shape[-1])
            out = nn.functional.embedding_bag(i, self.W_dec, per_sample_weights=v.to(self.W_dec.dtype), mode="sum")
            return (out + self.b_dec).reshape(*lead, self.cfg.d_in)
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:  # pragma: no cover
        raise NotImplementedError

    # ---- helpers ----------------------------------------------------------------------------------------------------
    def _encoder_bias(self, b: Tensor) -> Tensor:
        """Bias with the input centring folded in: (x − b_dec)Wᵀ + b = xWᵀ + (b − W b_dec)."""
        if self.cfg.apply_b_dec_to_input:
            return b - self.W_enc @ self.b_dec
        return b

    def pre_acts(self, x: Tensor, bias: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype)
        return torch.addmm(self._encoder_bias(bias), x2, self.W_enc.t())

    def decode_train(self, f: Tensor) -> Tensor:
        """Decode dense training codes ``[N, d_sae]``; switches to the sparse kernel once codes are sparse enough."""
        from .kernels import dense_to_coo, sparse_decode

        if self.codes_are_sparse(f):
            vals, rows, cols = dense_to_coo(f)
            return sparse_decode(vals, rows, cols, self.W_dec, f.shape[0]) + self.b_dec
        return torch.addmm(self.b_dec, f, self.W_dec)

    @staticmethod
    def codes_are_sparse(f: Tensor) -> bool:
        """Firing density estimated on the first rows (a full count would cost one more pass over ``[N, d_sae]``)."""
        head = f[: min(f.shape[0], 256)]
        return bool(torch.count_nonzero(head) < SPARSE_DECODE_DENSITY * head.numel())

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (no-op when ``normalize_decoder`` is off)."""
        if self.cfg.normalize_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the gradient component along each (unit) decoder row so Adam cannot grow/shrink its norm."""
        g = self.W_dec.grad
        if g is None or not self.cfg.normalize_decoder:
            return
        w = self.W_dec
        g -= (g * w).sum(1, keepdim=True) * w / w.pow(2).sum(1, keepdim=True).clamp_min(1e-8)

    def set_sparsity_scale(self, scale: float) -> None:
        """Sparsity warm-up multiplier on λ (the trainer sets it each step)."""
        self._sparsity_scale = float(scale)

    @property
    def sparsity_coefficient(self) -> float:
        return float(self.cfg.sparsity_coefficient) * getattr(self, "_sparsity_scale", 1.0)

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype


_REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def register(name: str):
    def deco(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        _REGISTRY[name] = cls
        return cls

    return deco


def build_sae(cfg: SAEConfig, *, seed: int | None = None, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Construct and initialise the SAE named by ``cfg.architecture``."""
    from . import batchtopk, gated, jumprelu, standard, topk  # noqa: F401  (registration)

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    sae = _REGISTRY[cfg.architecture](cfg)
    sae.reset_parameters(gen)
    return sae.to(device) if device is not None else sae
