"""SAE-FD anchors: a few instances of a finished task with the per-token SAE codes the trained model gave them.

One safetensors file per task, `sae_fd/anchors/NN-<task>.safetensors`:

    input_ids  int32 [T]      the anchor instances' token ids (prompt + answer), concatenated
    lengths    int32 [n]      tokens per instance (sum = T)
    values     f32   [T, w]   the largest w codes of each token, zero-padded (w = most active features of any token)
    indices    int32 [T, w]   their feature ids (padding: value 0, index arbitrary)

so a later task can re-run exactly these tokens through the truncated model and compare codes on the same tokens.
The file's metadata names the task, the layer and d_sae.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saefd_ray.models.loading import residual_stream
from saefd_ray.sae import SparseAutoencoder, SparseCodes


@dataclass
class Anchors:
    """The anchors of one task; instance i covers tokens offsets[i]:offsets[i+1] of the flat tensors."""

    task: str
    layer: int
    d_sae: int
    input_ids: Tensor  # [T] long
    lengths: Tensor  # [n] long
    values: Tensor  # [T, w]
    indices: Tensor  # [T, w] long

    def __post_init__(self) -> None:
        self.offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.long)
        torch.cumsum(self.lengths.long(), 0, out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.lengths)

    def instance(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[lo:hi], self.values[lo:hi], self.indices[lo:hi]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "input_ids": self.input_ids.to(torch.int32).contiguous(),
            "lengths": self.lengths.to(torch.int32).contiguous(),
            "values": self.values.float().contiguous(),
            "indices": self.indices.to(torch.int32).contiguous(),
        }
        save_file(tensors, str(path), metadata={"task": self.task, "layer": str(self.layer), "d_sae": str(self.d_sae)})

    @classmethod
    def load(cls, path: Path) -> "Anchors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            t = {key: handle.get_tensor(key) for key in handle.keys()}
        return cls(meta["task"], int(meta["layer"]), int(meta["d_sae"]), t["input_ids"].long(), t["lengths"].long(),
                   t["values"].float(), t["indices"].long())


def anchor_file(folder: Path, index: int, task: str) -> Path:
    return folder / "sae_fd" / "anchors" / f"{index + 1:02d}-{task}.safetensors"


def load_all(folder: Path | None) -> list[Anchors]:
    if folder is None or not (folder / "sae_fd" / "anchors").is_dir():
        return []
    return [Anchors.load(path) for path in sorted((folder / "sae_fd" / "anchors").glob("*.safetensors"))]


def pad_batch(sequences: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids and attention mask; right padding keeps each token's causal context unchanged."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def token_codes(model, sae: SparseAutoencoder, layer: int, sequences: list[Tensor], pad_id: int, device,
                batch_size: int) -> list[Tensor]:
    """Dense codes [len_i, d_sae] per sequence, through the model truncated after `layer` (no later layers, no head).
    Attention sinks (the SAE's own rule, sae/sinks.py) get all-zero codes: no FD term is ever computed there."""
    from saefd_ray.sae.sinks import sae_sink_ratio, sink_mask

    ratio = sae_sink_ratio(sae)
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad_id)
        hidden = residual_stream(model, ids.to(device), mask.to(device), [layer])[layer]
        real = mask.to(device).bool()
        flat = sae.encode(hidden[real].to(sae.dtype))
        if ratio:
            flat = flat * ~sink_mask(hidden, real, ratio)[real].unsqueeze(-1)
        out += list(flat.split([len(s) for s in chunk]))
    return out


def select(num: int, size: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(num), min(size, num)))


def farthest_point(features: Tensor, size: int) -> list[int]:
    """k-center greedy on cosine distance: start at the instance nearest the mean, then repeatedly add the one
    farthest from everything chosen so far — anchors that cover the task's feature space, not its mode."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    center = torch.nn.functional.normalize(unit.mean(0, keepdim=True), dim=1)
    chosen = [int((unit @ center.T).squeeze(1).argmax())]
    distance = 1 - unit @ unit[chosen[0]]
    while len(chosen) < min(size, len(unit)):
        distance[chosen] = -1
        pick = int(distance.argmax())
        chosen.append(pick)
        distance = torch.minimum(distance, 1 - unit @ unit[pick])
    return sorted(chosen)


def build_anchors(model, sae: SparseAutoencoder, layer: int, sequences: list[Tensor], task: str, size: int,
                  selection: str, seed: int, pad_id: int, device, batch_size: int = 16) -> Anchors:
    """Choose `size` of the task's instances (random, or diverse by k-center greedy over a pool of 4·size on
    mean-pooled SAE codes) and record their per-token codes. Deterministic given the seed, so every rank
    computes the same anchors (and runs the same number of forwards, as ZeRO-3 needs)."""
    rng = random.Random(seed)
    if selection == "diverse" and len(sequences) > size:
        pool = select(len(sequences), 4 * size, rng)
        pool_codes = token_codes(model, sae, layer, [sequences[i] for i in pool], pad_id, device, batch_size)
        picked = farthest_point(torch.stack([c.mean(0) for c in pool_codes]), size)
        chosen = [pool[i] for i in picked]
        dense = [pool_codes[i] for i in picked]
    else:
        chosen = select(len(sequences), size, rng)
        dense = token_codes(model, sae, layer, [sequences[i] for i in chosen], pad_id, device, batch_size)
    flat = torch.cat(dense).float().cpu()
    sparse = SparseCodes.from_dense(flat)
    ids = [sequences[i] for i in chosen]
    return Anchors(task, layer, sae.cfg.d_sae, torch.cat(ids).long(), torch.tensor([len(s) for s in ids]),
                   sparse.values, sparse.indices)


def sample_batch(pool: list[Anchors], count: int, generator: torch.Generator, pad_id: int):
    """`count` instances drawn uniformly from the anchors of all previous tasks: padded ids, mask, and the
    anchor codes of the valid tokens in row-major order (the order of `hidden[mask.bool()]`), width-padded."""
    sizes = [len(a) for a in pool]
    total = sum(sizes)
    picks = torch.randint(total, (count,), generator=generator).tolist()
    seqs, values, indices = [], [], []
    for pick in picks:
        for anchors in pool:
            if pick < len(anchors):
                ids, vals, idx = anchors.instance(pick)
                break
            pick -= len(anchors)
        seqs.append(ids)
        values.append(vals)
        indices.append(idx)
    width = max(v.shape[1] for v in values)
    values = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values])
    indices = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1])) for i in indices])
    ids, mask = pad_batch(seqs, pad_id)
    return ids, mask, values, indices
