"""SAE training checkpoints on a filesystem every worker sees: one SAELens folder per layer, trainer state (rank 0,
or every rank's slice when latent-sharded), the consumed-instance mask and `progress.json`, published by an atomic
rename and a `latest.json` pointer, so a re-run resumes from the last complete one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from saefd_ray.sae.normalize import fold_scale, read_scaler, unfold_scale_, write_scaler
from saefd_ray.stream.latent_sharded import slice_sae
from saefd_ray.stream.shard_common import ShardedTrainerBase, barrier

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
PROGRESS = "progress.json"
CONSUMED = "consumed_instances.npy"


def save_distributed_checkpoint(run_dir: Path, trainers: dict[int, ShardedTrainerBase], consumed: np.ndarray,
                                rank: int, world: int, history_tail: dict | None = None, final: bool = False,
                                ran_out: bool = False) -> Path:
    """All ranks: SAELens folder per layer (rank 0) + trainer state (rank 0, or every rank's slice), consumed
    instances (union over ranks); staged in a temp folder and renamed, then `latest.json` is replaced atomically.
    Assumes `run_dir` is on a filesystem all workers see (local runs, NFS); elsewhere use Ray checkpoints."""
    from saefd_ray.io import atomic_write_text
    from saefd_ray.sae.formats import save_saelens, save_trainer_state

    tr0 = next(iter(trainers.values()))
    name = f"tok_{tr0.tokens_seen:012d}"
    root = run_dir / CKPT_DIR
    final_dir, staging = root / name, root / f".staging-{name}"
    union = torch.from_numpy(consumed.astype(np.uint8))
    if world > 1:
        dist.all_reduce(union, op=dist.ReduceOp.MAX)
    fulls = {layer: tr.full_sae() for layer, tr in trainers.items()}  # collective in latent mode
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    for layer, tr in trainers.items():
        folder = staging / f"layer_{layer}"
        if rank == 0:
            save_saelens(fold_scale(fulls[layer], tr.scale) if tr.scale else fulls[layer], folder, None)
            if tr.scale:  # saved folded (reads raw activations); the scale beside it, as SAELens writes it
                write_scaler(folder, tr.scale)
        if tr.sharding == "latent":
            save_trainer_state(tr.state_dict(), folder / f"rank{rank}")
        elif rank == 0:
            save_trainer_state(tr.state_dict(), folder)
    barrier()
    if rank == 0:
        np.save(staging / CONSUMED, union.numpy().astype(bool))
        atomic_write_text(staging / PROGRESS, json.dumps({
            "tokens": tr0.tokens_seen, "steps": tr0.step_count, "world": world, "sharding": tr0.sharding,
            "layers": sorted(trainers), "final": final, "ran_out_of_data": ran_out, "last": history_tail}, indent=1))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(staging, final_dir)
        atomic_write_text(root / LATEST, json.dumps({"checkpoint": name}))
        print(f"[sae] checkpoint {final_dir}", flush=True)
    barrier()
    return final_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / CKPT_DIR / json.loads(pointer.read_text())["checkpoint"]
    return path if (path / PROGRESS).is_file() else None


def load_checkpoint(path: Path, trainers: dict[int, ShardedTrainerBase], consumed: np.ndarray, rank: int, world: int,
                    sharding: str) -> None:
    from saefd_ray.errors import CheckpointError
    from saefd_ray.sae.formats import load_saelens, load_trainer_state

    progress = json.loads((path / PROGRESS).read_text())
    if sharding == "latent" and (progress["sharding"] != "latent" or progress["world"] != world):
        raise CheckpointError(f"{path}: saved with sharding={progress['sharding']} on {progress['world']} workers; "
                              f"a latent-sharded resume needs the same ({world} workers)")
    for layer, tr in trainers.items():
        folder = path / f"layer_{layer}"
        full = load_saelens(folder)
        scale = read_scaler(folder)
        if scale:  # saved folded (reads raw activations); training continues on scaled ones
            unfold_scale_(full, scale)
        part = slice_sae(full, rank, world) if tr.sharding == "latent" else full
        with torch.no_grad():
            for name, p in tr.sae.named_parameters():
                p.copy_(getattr(part, name))
        if progress["sharding"] == "latent":
            state = load_trainer_state(folder / f"rank{rank}")
            if sharding != "latent":
                raise CheckpointError(f"{path}: a latent-sharded checkpoint resumes with sharding=latent only")
        else:
            state = load_trainer_state(folder)
        tr.load_state_dict(state)
    saved = np.load(path / CONSUMED)
    consumed[: len(saved)] |= saved[: len(consumed)]


def write_history(run_dir: Path, history: list[dict], append: bool) -> None:
    from saefd_ray.io import atomic_write_text

    path = run_dir / "history.jsonl"
    old = path.read_text() if append and path.is_file() else ""
    atomic_write_text(path, old + "".join(json.dumps(h) + "\n" for h in history))
