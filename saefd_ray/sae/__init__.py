"""Sparse autoencoders: five architectures, sparse kernels, FAST training recipe, SAELens/sparsify formats, evals.

    from saefd_ray.sae import SAEConfig, build_sae, SAETrainer, TrainerConfig, load_sae, save_saelens
    sae = build_sae(SAEConfig("gated", d_in=4096, d_sae=32768), seed=0)
"""
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
from .buffer import MixingBuffer
from .evaluate import decoder_layers, fast_mse, reconstruction_metrics, splice, sae_splice_fn, spliced_metrics
from .formats import (
    SAEFormatError,
    load_sae,
    load_saelens,
    load_sparsify,
    load_trainer_state,
    save_checkpoint,
    save_saelens,
    save_sparsify,
    save_trainer_state,
)
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .recipe import fast_lr, fit_schedule, geometric_median, sparsity_warmup
from .standard import StandardSAE
from .topk import TopKSAE
from .trainer import SAETrainer, StepResult, TrainerConfig

__all__ = [
    "ARCHITECTURES", "ForwardOutput", "SAEConfig", "SparseAutoencoder", "SparseCodes", "build_sae", "fired_mask",
    "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "StandardSAE", "TopKSAE",
    "MixingBuffer", "SAETrainer", "StepResult", "TrainerConfig", "fast_lr", "fit_schedule", "geometric_median",
    "sparsity_warmup",
    "SAEFormatError", "load_sae", "load_saelens", "load_sparsify", "load_trainer_state", "save_checkpoint",
    "save_saelens", "save_sparsify", "save_trainer_state",
    "decoder_layers", "fast_mse", "reconstruction_metrics", "splice", "sae_splice_fn", "spliced_metrics",
]
