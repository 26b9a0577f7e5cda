"""The Ray Data activation stream: instance stream → actor pool holding the model → activation rows (→ Ray Train).

    InputPlan (plan.py: file names, counts, digests, selection — no records on the driver)
      → instance_stream (instances.py: range of shard numbers → read, converted and filtered in Ray tasks)
      → map_batches(Harvester, batch_size=window, compute=ActorPoolStrategy(size=harvest_actors),
                    num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)      # chat template, bucketing, forward
      → rows {activation, token_id, instance_id, position, is_special, layer, is_sink}

The dataset is lazy and streamed: Ray Train's `datasets={"train": ds}` splits it across the SAE workers with
`streaming_split`, and nothing holds more than the in-flight blocks. With `data.cache` the harvesting actors also tee
every window to a parquet shard under `cache_dir/<key>/`; once the shards cover every training instance, later runs
stream them instead of running the model. `key` hashes the model files, layers, max_len, activation dtype and the
plan's digest (source file digests + selection settings), so a stale cache never loads. A small explicit list of
instances (benches, tests) still goes in through `from_items`, keyed by its texts.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from saefd_ray.stream.harvest import Harvester, shard_to_numpy
from saefd_ray.stream.instances import instance_stream


def cache_key(model_path: str, layers: list[int], max_len: int, activation_dtype: str, data_digest: str,
              sink_ratio: float | None = None) -> str:
    h = hashlib.sha256()
    model_dir = Path(model_path).expanduser()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        f = model_dir / name
        if f.is_file():  # size + mtime, not a full hash of a multi-GB file
            st = f.stat()
            h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(json.dumps([model_path, layers, max_len, activation_dtype, "is_sink", sink_ratio, data_digest]).encode())
    return h.hexdigest()[:20]


def instances_digest(instances: list[dict]) -> str:
    """An explicit instance list's digest (its ids and texts)."""
    h = hashlib.sha256()
    for inst in instances:
        h.update(f"{inst['instance_id']}\0{inst['messages']}\0".encode())
    return h.hexdigest()


def cached_shards(folder: Path, needed: np.ndarray) -> list[Path] | None:
    """Shard files that together cover the instance ids marked in `needed` (a bool per id), each instance once;
    None if they don't. Reads one shard's `instance_id` column at a time."""
    import pyarrow.parquet as pq

    if not folder.is_dir():
        return None
    chosen, covered = [], np.zeros(len(needed), bool)
    for path in sorted(folder.glob("shard-*.parquet")):
        ids = pq.read_table(path, columns=["instance_id"]).column("instance_id").to_numpy()
        if len(ids) and ids.max() >= len(covered):
            covered = np.concatenate([covered, np.zeros(int(ids.max()) + 1 - len(covered), bool)])
        if covered[ids].any():  # written twice (an interrupted run): keep the first copy
            continue
        chosen.append(path)
        covered[ids] = True
    return chosen if chosen and not (needed & ~covered[: len(needed)]).any() else None


def instance_dataset(instances: list[dict], window: int):
    import ray.data

    return ray.data.from_items(instances, override_num_blocks=max(1, math.ceil(len(instances) / window)))


def id_mask(ids, size: int) -> np.ndarray:
    """A bool per instance id in [0, size) from ids (a set / list / array) or an existing mask."""
    arr = np.asarray(sorted(ids) if isinstance(ids, (set, frozenset)) else ids)
    if arr.dtype == bool:
        return np.concatenate([arr, np.zeros(max(0, size - len(arr)), bool)])[:size]
    arr = arr.astype(np.int64)
    out = np.zeros(size, bool)
    out[arr[arr < size]] = True
    return out


def activation_dataset(config, model_path: str, instances, *, skip=None, threads: int | None = None):
    """The lazy activation-row dataset of `instances` — an `InputPlan` (streamed from the files) or a list of
    instance dicts — minus `skip` (ids, or a bool per id), and where it comes from ("model"/"cache")."""
    import ray.data

    from saefd_ray.stream.plan import InputPlan

    data = config.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    streamed = isinstance(instances, InputPlan)
    size = instances.total if streamed else 1 + max((i["instance_id"] for i in instances), default=-1)
    skip_mask = id_mask(skip if skip is not None else [], size)
    cache_folder = None
    if data.cache:
        digest = instances.digest if streamed else instances_digest(instances)
        key = cache_key(model_path, config.layers, data.max_len, data.activation_dtype, digest, data.sink_norm_ratio)
        cache_folder = Path(data.cache_dir).expanduser().resolve() / key
        needed = instances.needed_mask() if streamed else id_mask([i["instance_id"] for i in instances], size)
        shards = cached_shards(cache_folder, needed)
        if shards is not None:
            # one task per shard file, read whole with pyarrow (streamed; a shard is one window)
            ds = ray.data.from_items([{"path": str(p)} for p in shards], override_num_blocks=len(shards))
            ds = ds.map_batches(_read_shards, batch_size=1, batch_format="numpy",
                                fn_kwargs={"want": needed & ~skip_mask})
            return ds, "cache"
    if streamed:
        source = instance_stream(instances, skip_mask if skip_mask.any() else None)
    else:
        source = instance_dataset([i for i in instances if not skip_mask[i["instance_id"]]], data.window)
    ds = source.map_batches(
        Harvester,
        batch_size=data.window,
        compute=ray.data.ActorPoolStrategy(size=data.harvest_actors),
        num_cpus=data.cpus_per_actor,
        num_gpus=data.gpus_per_actor or None,
        batch_format="numpy",
        fn_constructor_kwargs=dict(
            model_path=model_path, layers=config.layers, max_len=data.max_len,
            max_batch_tokens=data.max_batch_tokens, max_padding=data.max_padding, dtype=config.model.dtype,
            activation_dtype=data.activation_dtype, threads=threads or max(1, int(data.cpus_per_actor)),
            use_gpu=data.gpus_per_actor > 0, cache_dir=str(cache_folder) if cache_folder else None,
            sink_ratio=data.sink_norm_ratio,
        ),
    )
    return ds, "model"


def _read_shards(batch: dict, want: np.ndarray) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    parts = [_from_shard(pq.read_table(str(path)), want) for path in batch["path"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _from_shard(table, want: np.ndarray) -> dict[str, np.ndarray]:
    """A cache shard's rows of the wanted instances (training, not yet consumed)."""
    rows = shard_to_numpy(table)
    ids = rows["instance_id"]
    keep = np.zeros(len(ids), bool)
    inside = ids < len(want)
    keep[inside] = want[ids[inside]]
    return {k: v[keep] for k, v in rows.items()}


def window_padding(tokenizer, instances: list[dict], config) -> dict:
    """Padding waste of the bucketing plan over consecutive windows of an explicit instance list (benches; the
    SAE job computes it in Ray Data: `instances.stream_padding`)."""
    from saefd_ray.stream.harvest import padding_of_window, render

    data = config.data
    real = padded = naive = 0
    for start in range(0, len(instances), data.window):
        window = instances[start : start + data.window]
        lengths = [len(render(tokenizer, json.loads(i["messages"]), data.max_len)) for i in window]
        r, p, n = padding_of_window(lengths, data.max_batch_tokens, data.max_padding)
        real, padded, naive = real + r, padded + p, naive + n
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_waste": 1 - real / padded if padded else 0.0,
        "unsorted_padding_waste": 1 - real / naive if naive else 0.0,
    }


# --------------------------------------------------------------------------------------------- synthetic rows


def synthetic_activations(ids: np.ndarray, d: int, n_features: int = 24, density: float = 0.15) -> np.ndarray:
    """Deterministic activation rows (a function of the row id only): sparse combinations of `n_features` fixed
    directions plus noise and an offset — SAE-learnable data for tests and the trainer benchmark, no model needed."""
    dirs = np.random.default_rng(0).normal(size=(n_features, d)).astype(np.float32)
    out = np.empty((len(ids), d), np.float32)
    for j, i in enumerate(ids):
        r = np.random.default_rng(int(i) + 1)
        codes = np.where(r.random(n_features) < density, r.exponential(1.0, n_features), 0.0).astype(np.float32)
        out[j] = codes @ dirs + 0.05 * r.normal(size=d).astype(np.float32) + 0.5
    return out


def _synthetic_rows(batch: dict, d: int, layer: int, tokens_per_instance: int) -> dict:
    ids = batch["id"].astype(np.int64)
    return {"activation": synthetic_activations(ids, d), "token_id": ids % 97,
            "instance_id": ids // tokens_per_instance, "position": ids % tokens_per_instance,
            "is_special": ids % tokens_per_instance == 0, "layer": np.full(len(ids), layer, np.int64),
            "is_sink": np.zeros(len(ids), bool)}


def synthetic_activation_dataset(n_rows: int, d: int, layer: int = 0, blocks: int = 4, tokens_per_instance: int = 16):
    """A lazy Ray dataset of `n_rows` synthetic activation rows in the harvester's row format."""
    import ray.data

    return ray.data.range(n_rows, override_num_blocks=blocks).map_batches(
        _synthetic_rows, batch_format="numpy",
        fn_kwargs={"d": d, "layer": layer, "tokens_per_instance": tokens_per_instance})
