"""FAST's mixing buffer: fill, shuffle, serve half, keep half, refill — as a resumable generator.

Contract:
  * ``source`` yields activation chunks ``[n_i, d]`` (any leading shape; flattened to tokens). It may be an iterable
    or a callable ``source(start_chunk) -> iterable`` so a resumed buffer can restart the source where it stopped.
  * Iterating yields ``[batch_size, d]`` tensors. Every source token is yielded at most once; with
    ``drop_last=False`` exactly once. Until the source runs dry the buffer never serves from less than
    ``capacity`` tokens, and after each shuffle only the first half is served, so activations from one sequence are
    spread over many batches (no batch is dominated by one instance).
  * ``first_fill`` is the whole first fill (shuffled) of a fresh buffer, once its first batch is out — what the
    b_dec geometric-median init reads, as SAELens reads its storage buffer; the reader sets it to None to free it.
  * ``state_dict()`` at any point between yields captures: chunks consumed, the unserved tokens (in order), how many
    of them are in the current serve half, and the RNG. ``load_state_dict`` + iterating continues identically.
    ``include_data=False`` drops the unserved tokens (small state; a resume then skips them).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

Source = Iterable[Tensor] | Callable[[int], Iterable[Tensor]]


class MixingBuffer:
    def __init__(self, source: Source, *, capacity: int, batch_size: int, seed: int = 0, drop_last: bool = True):
        if capacity < 2 * batch_size:
            raise ValueError(f"capacity ({capacity}) must be at least 2 × batch_size ({batch_size})")
        self.source, self.capacity, self.batch_size, self.drop_last = source, capacity, batch_size, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.chunks_consumed = 0
        self.batches_served = 0
        self._buf: Tensor | None = None  # unserved tokens; the first ``_serve`` of them are the current serve half
        self._serve = 0
        self.first_fill: Tensor | None = None

    def _chunks(self) -> Iterator[Tensor]:
        src = self.source(self.chunks_consumed) if callable(self.source) else self.source
        return iter(src)

    def __iter__(self) -> Iterator[Tensor]:
        chunks = self._chunks()
        exhausted = False
        while True:
            if self._serve == 0:  # refill and shuffle
                parts = [] if self._buf is None else [self._buf]
                size = sum(p.shape[0] for p in parts)
                while size < self.capacity and not exhausted:
                    try:
                        c = next(chunks)
                    except StopIteration:
                        exhausted = True
                        break
                    self.chunks_consumed += 1
                    c = c.reshape(-1, c.shape[-1])
                    parts.append(c)
                    size += c.shape[0]
                if size == 0:
                    return
                buf = torch.cat(parts) if len(parts) > 1 else parts[0]
                buf = buf[torch.randperm(buf.shape[0], generator=self.generator).to(buf.device)]
                if self.batches_served == 0 and self._buf is None:  # a fresh buffer's first fill
                    self.first_fill = buf
                half = buf.shape[0] if exhausted else buf.shape[0] // 2
                serve = (half // self.batch_size) * self.batch_size
                if exhausted and not self.drop_last:
                    serve = half
                if serve == 0:
                    self._buf = None
                    return
                self._buf, self._serve = buf, serve
            b = min(self.batch_size, self._serve)
            batch, self._buf = self._buf[:b], self._buf[b:]
            self._serve -= b
            self.batches_served += 1
            yield batch

    def state_dict(self, include_data: bool = True) -> dict[str, Any]:
        return {
            "chunks_consumed": self.chunks_consumed,
            "batches_served": self.batches_served,
            "serve": self._serve if include_data else 0,
            "rng": self.generator.get_state(),
            "data": (self._buf.clone() if self._buf is not None else None) if include_data else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chunks_consumed = int(state["chunks_consumed"])
        self.batches_served = int(state["batches_served"])
        self._serve = int(state["serve"])
        self.generator.set_state(state["rng"])
        self._buf = state["data"]
