"""Which records an SAE run uses, decided from record ids alone: no list of instances anywhere.

An instance is named by its global id `offset[source] + record index`. Two seeded bijections decide everything:

* `max_instances` of a source with n records keeps record r iff `permute(r, n, key) < max_instances` — exactly
  max_instances records, a seeded uniform subset, answered per record inside the Ray Data read tasks;
* the held-out set is the first `eval_instances` selected ids met along a seeded permutation of all ids: the driver
  walks that permutation in chunks (O(chunk) memory, usually one chunk) and keeps only the few ids it needs.

`permute` is a keyed Feistel network on the next even power of two ≥ n, cycle-walked back into [0, n) (a
bijection on [0, n) for any n; at most ~4 rounds of walking on average), vectorized over numpy arrays.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def round_keys(text: str) -> np.ndarray:
    digest = hashlib.sha256(text.encode()).digest()
    return np.frombuffer(digest, dtype="<u8").copy()  # 4 × 64-bit round keys


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half) - 1)
    h = np.uint64(half)
    left, right = x >> h, x & mask
    for k in keys[:_ROUNDS]:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << h) | right


def permute(x, n: int, keys: np.ndarray) -> np.ndarray:
    """A seeded bijection of [0, n), applied to the ids in `x`."""
    x = np.asarray(x, dtype=np.uint64).copy()
    if n <= 1:
        return x.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())
    half = (bits + 1) // 2
    with np.errstate(over="ignore"):
        x = _feistel(x, half, keys)
        out = x >= np.uint64(n)
        while out.any():  # cycle walking: values beyond n step on until they land inside
            x[out] = _feistel(x[out], half, keys)
            out[out] = x[out] >= np.uint64(n)
    return x.astype(np.int64)


def source_keys(seed: int, label: str) -> np.ndarray:
    return round_keys(f"saefd-sae-subset:{seed}:{label}")


def kept(records: np.ndarray, n: int, keep: int, keys: np.ndarray) -> np.ndarray:
    """Mask over `records` (record indices of one source with n records): selected by max_instances (`keep`)."""
    records = np.asarray(records, dtype=np.int64)
    if keep >= n:
        return np.ones(len(records), bool)
    return permute(records, n, keys) < keep


def held_out_ids(offsets: np.ndarray, counts: np.ndarray, keeps: np.ndarray, source_key_list: list[np.ndarray],
                 n_eval: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """The `n_eval` held-out instance ids (sorted): the first selected ids along a seeded permutation of all ids."""
    total = int(counts.sum())
    found: list[np.ndarray] = []
    have = 0
    keys = round_keys(f"saefd-sae-heldout:{seed}")
    for start in range(0, total, chunk):
        if have >= n_eval:
            break
        ids = permute(np.arange(start, min(total, start + chunk)), total, keys)
        mask = selected(ids, offsets, counts, keeps, source_key_list)
        take = ids[mask][: n_eval - have]
        found.append(take)
        have += len(take)
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)


def selected(ids: np.ndarray, offsets: np.ndarray, counts: np.ndarray, keeps: np.ndarray,
             source_key_list: list[np.ndarray]) -> np.ndarray:
    """Mask over global ids: kept by their source's max_instances."""
    ids = np.asarray(ids, dtype=np.int64)
    source = np.searchsorted(offsets, ids, side="right") - 1
    mask = np.zeros(len(ids), bool)
    for s in np.unique(source):
        rows = source == s
        mask[rows] = kept(ids[rows] - offsets[s], int(counts[s]), int(keeps[s]), source_key_list[s])
    return mask
