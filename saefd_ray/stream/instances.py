"""The instance stream: a Ray Data dataset of training instances built from the input plan, read in Ray tasks.

    range(n_shards)                                   # shard numbers only: the driver ships the plan, no records
      → map_batches(_read_shards)                     # each task: a group of shards (seeded order), read, chat
                                                      # messages, kept by max_instances / not held out / not done,
                                                      # shuffled within the group (seeded)
      → rows {instance_id, messages (chat JSON), origin}, one block per read task

The harvesting actors' `map_batches(batch_size=window)` cuts each block into windows: all full but the last of each
read task. (`repartition(target_num_rows_per_block=window, strict=True)` would make every window full, but in Ray
2.60 it made a 1 M-instance pass 7× slower and the driver's peak RSS grow with the instance count:
bench/harvest_input.py.)

Mixing: a run reads its shards (`sources.SHARD_RECORDS` consecutive records each) in a seeded random order, and
each read task shuffles the `SHARDS_PER_TASK` shards it reads together, so sources interleave in the stream — the
in-memory path shuffled every instance globally, which a stream cannot do without an all-to-all shuffle.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np

from saefd_ray.stream.plan import InputPlan

SHARDS_PER_TASK = 8


def instance_stream(plan: InputPlan, skip: np.ndarray | None = None):
    """The lazy dataset of `plan`'s training instances minus `skip` (None, or a bool per instance id: plan.total)."""
    import ray.data

    n = plan.n_shards
    ds = ray.data.range(n, override_num_blocks=read_tasks(plan))
    return ds.map_batches(_read_shards, batch_size=None, batch_format="numpy", fn_kwargs={"plan": plan, "skip": skip})


def read_tasks(plan: InputPlan) -> int:
    return max(1, math.ceil(plan.n_shards / SHARDS_PER_TASK))


def _read_shards(batch: dict, plan: InputPlan, skip: np.ndarray | None) -> dict[str, np.ndarray]:
    numbers = np.asarray(batch["id"], np.int64)
    rows = [inst for g in plan.shard_order(numbers) for inst in plan.read_training(int(g))]
    if skip is not None:
        rows = [r for r in rows if not skip[r["instance_id"]]]
    if rows:  # within the task's shards: a seeded shuffle, so a window mixes its shards
        perm = np.random.default_rng([plan.seed, int(numbers[0])]).permutation(len(rows))
        rows = [rows[i] for i in perm]
    return {"instance_id": np.asarray([r["instance_id"] for r in rows], np.int64),
            "messages": np.asarray([r["messages"] for r in rows], dtype=object),
            "origin": np.asarray([r["origin"] for r in rows], dtype=object)}


# --------------------------------------------------------------------------------------------- padding report


def stream_padding(dataset, model_path: str, config) -> dict:
    """Padding waste of the actors' bucketing plan, computed in Ray Data over the instance stream's windows
    (tokenized again in Ray tasks; the driver only adds up one row per task)."""
    data = config.data
    stats = dataset.map_batches(_window_padding, batch_size=data.window, batch_format="numpy", fn_kwargs={
        "model_path": model_path, "max_len": data.max_len, "max_batch_tokens": data.max_batch_tokens,
        "max_padding": data.max_padding}).sum(["real", "padded", "naive"]) or {}
    real, padded, naive = (int(stats.get(f"sum({k})") or 0) for k in ("real", "padded", "naive"))
    return {"real_tokens": real, "padded_tokens": padded,
            "padding_waste": 1 - real / padded if padded else 0.0,
            "unsorted_padding_waste": 1 - real / naive if naive else 0.0}


@lru_cache(maxsize=2)
def _tokenizer(model_path: str):
    from saefd_ray.models.loading import load_tokenizer

    return load_tokenizer(model_path)


def _window_padding(batch: dict, model_path: str, max_len: int, max_batch_tokens: int,
                    max_padding: float) -> dict[str, np.ndarray]:
    from saefd_ray.stream.harvest import padding_of_window, render

    tokenizer = _tokenizer(model_path)
    lengths = [len(render(tokenizer, json.loads(m), max_len)) for m in batch["messages"]]
    real, padded, naive = padding_of_window(lengths, max_batch_tokens, max_padding)
    return {"real": np.asarray([real]), "padded": np.asarray([padded]), "naive": np.asarray([naive])}
