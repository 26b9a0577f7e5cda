"""Per-instance activation harvesting (FAST): render, truncate, one truncated forward, one row per token and layer.

An instance is one dialogue (a chat `messages` list; a prompt/answer pair is a user turn and an assistant turn). It
is rendered through the model's own chat template with its special tokens, truncated at `max_len`, and run through
the model *on its own*: instances are never concatenated into blocks. Several instances may share a forward pass
as rows of a right-padded batch with an attention mask, which is the same computation (causal attention, positions
from 0, pad keys masked) — pad positions are dropped from the output, and `plan_batches` sorts a window of instances
by length so that padding wastes at most `max_padding` of the computed tokens.

`residual_stream` stops after the deepest requested layer: later layers and the LM head are never run.

Output rows (a dict of numpy columns, the Ray Data batch format): `activation [n, d]`, `token_id`, `instance_id`,
`position`, `is_special`, `layer`, `is_sink` (sae/sinks.py; all False without a sink ratio) — layer-major within a
window.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saefd_ray.errors import DataError

ROW_COLUMNS = ("activation", "token_id", "instance_id", "position", "is_special", "layer", "is_sink")
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}  # bf16 has no numpy dtype


def render_checked(tokenizer, messages_json: str, max_len: int, origin: str) -> list[int]:
    """`render_instance`, with a template or tokenizer failure turned into a DataError naming the record."""
    try:
        return render_instance(tokenizer, messages_json, max_len)
    except Exception as err:  # noqa: BLE001 - jinja2 TemplateError (e.g. a role the template rejects), ...
        text = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{origin}: cannot be rendered with the model's chat template ({type(err).__name__}: "
                        f"{text})") from None


# --------------------------------------------------------------------------------------------- rendering


def render(tokenizer, messages: list[dict], max_len: int) -> list[int]:
    """Token ids of one dialogue through the chat template (special tokens kept), truncated at `max_len`."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    else:
        text = "\n".join(m["content"] for m in messages)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
    return list(ids[:max_len])


def render_instance(tokenizer, messages_json: str, max_len: int) -> list[int]:
    """An instance's `messages` field: a chat (rendered), or `{"input_ids": [...]}` — an already tokenized block
    (the block-training baselines of bench/fast_vs_bt.py), taken as is up to `max_len`."""
    obj = json.loads(messages_json)
    if isinstance(obj, dict) and "input_ids" in obj:
        return [int(t) for t in obj["input_ids"][:max_len]]
    return render(tokenizer, obj, max_len)


def plan_batches(lengths: list[int], max_batch_tokens: int, max_padding: float = 0.1) -> list[list[int]]:
    """Forward batches (lists of indices into `lengths`) for one window: sorted by length, then cut greedily so
    that each batch's padded size stays within `max_batch_tokens` and its padding share within `max_padding`.

    A single instance longer than `max_batch_tokens` runs alone. Because every batch obeys the padding bound, so does
    the window as a whole.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        if current:
            width = max(n, lengths[current[-1]])
            count = len(current) + 1
            waste = 1.0 - (real + n) / (width * count)
            if width * count > max_batch_tokens or waste > max_padding:
                batches.append(current)
                current, real = [], 0
        current.append(i)
        real += n
    if current:
        batches.append(current)
    return batches


def padding_waste(lengths: list[int], batches: list[list[int]]) -> tuple[int, int]:
    """(real tokens, padded tokens computed) of a batch plan."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return real, padded


def padding_of_window(lengths: list[int], max_batch_tokens: int, max_padding: float) -> tuple[int, int, int]:
    """(real, padded, unsorted padded) tokens of one window: the bucketing plan the actors use, and the same
    number of forward passes over consecutive instances in arrival order."""
    plan = plan_batches(lengths, max_batch_tokens, max_padding)
    real, padded = padding_waste(lengths, plan)
    per = max(1, math.ceil(len(lengths) / max(1, len(plan))))
    naive = sum(max(lengths[s : s + per]) * len(lengths[s : s + per]) for s in range(0, len(lengths), per))
    return real, padded, naive


# --------------------------------------------------------------------------------------------- forward


@torch.no_grad()
def harvest_batch(model, ids: list[list[int]], instance_ids: list[int], layers: list[int], special_ids: set[int],
                  pad_id: int, device: torch.device | str = "cpu", out_dtype=np.float32,
                  sink_ratio: float | None = None) -> dict[str, np.ndarray]:
    """One right-padded forward over `ids` (already a planned batch) → rows for every real token and layer."""
    from saefd_ray.models.loading import residual_stream
    from saefd_ray.sae.sinks import sink_mask

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    # an unpadded batch needs no mask: the causal fast path of SDPA is the same computation, and cheaper
    padded = any(len(x) != width for x in ids)
    acts = residual_stream(model, input_ids.to(device), mask.to(device) if padded else None, layers)
    keep = mask.bool()
    tokens = input_ids[keep].numpy()
    positions = torch.arange(width).expand(len(ids), width)[keep].numpy()
    inst = torch.tensor(instance_ids).unsqueeze(1).expand(len(ids), width)[keep].numpy()
    special = np.isin(tokens, np.fromiter(special_ids, dtype=np.int64)) if special_ids else np.zeros_like(tokens, bool)
    n = len(tokens)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ROW_COLUMNS}
    for layer in layers:
        a = acts[layer][keep.to(acts[layer].device)].float().cpu().numpy().astype(out_dtype, copy=False)
        sinks = sink_mask(acts[layer], mask, sink_ratio)[keep.to(acts[layer].device)].cpu().numpy()
        cols["is_sink"].append(sinks)
        cols["activation"].append(a)
        cols["token_id"].append(tokens.astype(np.int64))
        cols["instance_id"].append(inst.astype(np.int64))
        cols["position"].append(positions.astype(np.int64))
        cols["is_special"].append(special)
        cols["layer"].append(np.full(n, layer, dtype=np.int64))
    return {c: np.concatenate(v) for c, v in cols.items()}


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate row batches and order them layer-major (stable within a layer)."""
    if not parts:
        return empty_rows(0)
    out = {c: np.concatenate([p[c] for p in parts]) for c in ROW_COLUMNS}
    order = np.argsort(out["layer"], kind="stable")
    return {c: v[order] for c, v in out.items()}


def empty_rows(d: int) -> dict[str, np.ndarray]:
    return {"activation": np.zeros((0, d), np.float32), **{c: np.zeros(0, np.int64) for c in ROW_COLUMNS[1:]},
            "is_special": np.zeros(0, bool), "is_sink": np.zeros(0, bool)}


class Harvester:
    """The Ray Data UDF (one per pool actor): holds the model; a window of instances in, activation rows out."""

    def __init__(self, model_path: str, layers: list[int], max_len: int, max_batch_tokens: int,
                 max_padding: float = 0.1, dtype: str = "float32", activation_dtype: str = "float32",
                 threads: int | None = None, use_gpu: bool = False, cache_dir: str | None = None,
                 sink_ratio: float | None = None) -> None:
        from saefd_ray.models.loading import check_layer, load_model, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype).to(self.device).eval()
        for layer in layers:
            check_layer(self.model, layer, "layers")
        self.layers, self.max_len = list(layers), max_len
        self.max_batch_tokens, self.max_padding = max_batch_tokens, max_padding
        self.special = set(self.tokenizer.all_special_ids)
        self.out_dtype = NP_DTYPES[activation_dtype]
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.real_tokens = self.padded_tokens = 0
        self.sink_ratio = sink_ratio

    def render_window(self, messages_json, origins=None) -> list[list[int]]:
        origins = origins if origins is not None else [f"instance {i}" for i in range(len(messages_json))]
        return [render_checked(self.tokenizer, m, self.max_len, str(o)) for m, o in zip(messages_json, origins)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = self.render_window(batch["messages"], batch.get("origin"))
        instance_ids = [int(i) for i in batch["instance_id"]]
        lengths = [len(x) for x in ids]
        plan = plan_batches(lengths, self.max_batch_tokens, self.max_padding)
        real, padded = padding_waste(lengths, plan)
        self.real_tokens += real
        self.padded_tokens += padded
        parts = [
            harvest_batch(self.model, [ids[i] for i in b], [instance_ids[i] for i in b], self.layers, self.special,
                          self.tokenizer.pad_token_id, self.device, self.out_dtype, self.sink_ratio)
            for b in plan
        ]
        rows = concat_rows(parts)
        if self.cache_dir is not None:
            write_shard(self.cache_dir, rows)
        return rows


# --------------------------------------------------------------------------------------------- cache shards


def write_shard(folder: Path, rows: dict[str, np.ndarray]) -> Path | None:
    """Write one window's rows as a parquet shard, atomically (temp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = rows["activation"].shape
    if n == 0:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    flat = pa.array(np.ascontiguousarray(rows["activation"]).reshape(-1))
    table = pa.table({"activation": pa.FixedSizeListArray.from_arrays(flat, d),
                      **{c: pa.array(rows[c]) for c in ROW_COLUMNS[1:]}})
    ids = np.unique(rows["instance_id"])
    digest = hashlib.sha256(ids.astype(np.int64).tobytes()).hexdigest()[:12]
    path = folder / f"shard-{int(ids[0]):09d}-{digest}.parquet"  # the same window always gets the same name
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def shard_to_numpy(table) -> dict[str, np.ndarray]:
    """A pyarrow batch of a cache shard → the row dict (activation back to a 2-D array)."""
    col = table.column("activation").combine_chunks()
    d = col.type.list_size
    acts = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    out: dict[str, Any] = {"activation": acts}
    for c in ROW_COLUMNS[1:]:
        out[c] = table.column(c).to_numpy()
    return out
