"""Sparse autoencoders: five architectures, sparse kernels, FAST training recipe, SAELens/sparsify formats, evals."""
from .base import (
    ARCHITECTURES,
    ForwardOutput,
    SAEConfig,
    SparseAutoencoder,
    SparseCodes,
    build_sae,
    fired_mask,
)
from .batchtopk import BatchTopKSAE
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .standard import StandardSAE
from .topk import TopKSAE

__all__ = [
    "ARCHITECTURES", "ForwardOutput", "SAEConfig", "SparseAutoencoder", "SparseCodes", "build_sae", "fired_mask",
    "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "StandardSAE", "TopKSAE",
]
