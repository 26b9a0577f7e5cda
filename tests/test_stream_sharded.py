"""Sharded SAE training on Ray Train (2 workers, gloo, CPU) matches a single-process run on the same stream.

The stream is a deterministic activation dataset read whole by every worker, which keeps every 2nd chunk
(`deterministic=True`), so the test can rebuild each worker's mixing buffer locally. The reference is the plain
single-process `SAETrainer` fed, at step t, the concatenation of the two workers' batch t — the global batch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saefd_ray.sae import build_sae
from saefd_ray.sae.buffer import MixingBuffer
from saefd_ray.sae.formats import load_saelens
from saefd_ray.sae.trainer import SAETrainer
from saefd_ray.stream.config import validate_sae
from saefd_ray.stream.pipeline import synthetic_activation_dataset, synthetic_activations
from saefd_ray.stream.sharded import buffer_seed, sae_config, trainer_config

D, N_ROWS, CHUNK, LAYER = 16, 2048, 128, 1
pytestmark = pytest.mark.ray


def activations(ids: np.ndarray) -> np.ndarray:
    return synthetic_activations(ids, D)


def make_config(tmp_path, sharding: str, arch: str, workers: int = 2):
    raw = {
        "layers": [LAYER],
        "data": {"sources": [{"kind": "file", "path": "unused.json"}]},
        "sae": {"architecture": arch, "width": 64, "k": 6 if arch == "topk" else None,
                "sparsity_coefficient": 0.05 if arch == "gated" else None},
        "training": {"tokens": 128 * 7, "batch_size": 128, "buffer_tokens": 256, "lr": 3e-3, "lr_end": 3e-4,
                     "lr_warmup_steps": 2, "lr_decay_steps": 2, "sparsity_warmup_steps": 3, "grad_clip": 1.0,
                     "seed": 3, "checkpoint_every_tokens": 128 * 4, "log_every_steps": 100},
        "distributed": {"num_workers": workers, "sharding": sharding},
        "output": {"root": str(tmp_path), "run_name": f"{sharding}-{arch}"},
    }
    return validate_sae(raw)


def reference(config):
    """Single-process run on the global batches the 2 workers see; returns (losses, final SAE)."""
    world, t = config.distributed.num_workers, config.training
    acts = torch.from_numpy(activations(np.arange(N_ROWS)))
    chunks = list(acts.split(CHUNK))
    local = t.batch_size // world
    mixing = [MixingBuffer(chunks[r::world], capacity=t.buffer_tokens, batch_size=local,
                           seed=buffer_seed(t.seed, r, LAYER)) for r in range(world)]
    buffers = [iter(b) for b in mixing]
    sae = build_sae(sae_config(config, D)(LAYER), seed=t.seed + LAYER)
    trainer = SAETrainer(sae, trainer_config(t, t.tokens // t.batch_size))
    losses = []
    while trainer.tokens_seen < t.tokens:
        batch = torch.cat([next(b) for b in buffers])
        if trainer.step_count == 0:  # b_dec from the union of the workers' first buffer fills, not the first batch
            trainer.init_b_dec(torch.cat([b.first_fill for b in mixing]))
        losses.append(trainer.step(batch)["loss"])
    return losses, sae


def run_sharded(ray_cluster, config):
    from saefd_ray.stream.run import fit

    ds = synthetic_activation_dataset(N_ROWS, D, layer=LAYER, blocks=4)
    return fit(config, ds, d_in=D, n_instances=N_ROWS // 16, run_dir=config.run_dir, deterministic=True,
               chunk_rows=CHUNK)


@pytest.mark.parametrize("sharding,arch", [("data", "gated"), ("latent", "gated"), ("latent", "topk")])
def test_sharded_matches_single_process(ray_cluster, tmp_path, sharding, arch):
    config = make_config(tmp_path, sharding, arch)
    ref_losses, ref_sae = reference(config)
    metrics = run_sharded(ray_cluster, config)

    assert metrics["steps"] == len(ref_losses) == 7
    assert metrics["tokens"] == 7 * 128
    assert 0 < metrics["tokens_per_s"] and 0 < metrics["steady_tokens_per_s"]  # the rate after step 1 exists
    np.testing.assert_allclose(metrics["losses"], ref_losses, rtol=2e-4, atol=1e-5)
    if arch == "gated":
        assert ref_losses[-1] < ref_losses[0]  # it trains

    ckpt = config.run_dir / "checkpoints" / "tok_000000000896"
    assert json.loads((config.run_dir / "checkpoints" / "latest.json").read_text())["checkpoint"] == ckpt.name
    got = load_saelens(ckpt / f"layer_{LAYER}")
    for name, p in ref_sae.named_parameters():
        torch.testing.assert_close(getattr(got, name), p.detach(), rtol=1e-3, atol=1e-4, msg=name)
    # the mid-run checkpoint (every 512 tokens) exists, with the union of consumed instances
    mid = config.run_dir / "checkpoints" / "tok_000000000512"
    progress = json.loads((mid / "progress.json").read_text())
    assert (progress["steps"], progress["world"], progress["sharding"]) == (4, 2, sharding)
    consumed = np.load(mid / "consumed_instances.npy")
    assert consumed.sum() > 0 and consumed.dtype == bool
    if sharding == "latent":  # each worker saved its own slice's optimizer state
        assert {p.name for p in (ckpt / f"layer_{LAYER}").glob("rank*")} == {"rank0", "rank1"}
