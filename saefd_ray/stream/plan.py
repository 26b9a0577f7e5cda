"""The run's input plan (driver): file names, record counts, digests and the selection rules — never the records.

    plan_inputs(config)  → InputPlan: every source scanned once (sources.scan_source), instance ids
                           offset[source] + record index, max_instances and held-out by seeded bijections (select.py)

`InputPlan.digest` (file digests + fields + selection settings) is what resume and the activation cache key on.
The held-out instances (`data.eval_instances`, few) are the only ones the driver reads (`held_instances`);
`iter_instances` reads the others one shard at a time, for small runs, benches and tests (`load_instances`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import islice

import numpy as np

from saefd_ray.stream import select
from saefd_ray.stream.sources import SourcePlan, read_shard, scan_source


@dataclass
class InputPlan:
    sources: list[SourcePlan]
    offsets: np.ndarray  # first instance id of each source
    keeps: np.ndarray  # records kept per source (max_instances, or all)
    held: np.ndarray  # held-out instance ids, sorted
    seed: int
    settings: dict  # the selection settings the digest covers
    config_json: str  # the config, for task / hf readers inside Ray tasks

    def __post_init__(self) -> None:
        self.keys = [select.source_keys(self.seed, s.label) for s in self.sources]
        self.shard_offsets = np.cumsum([0] + [len(s.shard_first) for s in self.sources]).astype(np.int64)

    @property
    def total(self) -> int:
        """Records in all sources: instance ids are < total."""
        return int(self.offsets[-1] + self.sources[-1].count)

    @property
    def n_train(self) -> int:
        return int(self.keeps.sum()) - len(self.held)

    @property
    def n_shards(self) -> int:
        return int(self.shard_offsets[-1])

    @property
    def digest(self) -> str:
        parts = [[s.kind, s.count, s.digest, {k: v for k, v in s.spec.items() if k != "path"}] for s in self.sources]
        return hashlib.sha256(json.dumps([parts, self.settings], sort_keys=True).encode()).hexdigest()

    def counts(self) -> np.ndarray:
        return np.asarray([s.count for s in self.sources], np.int64)

    def selected(self, ids: np.ndarray) -> np.ndarray:
        return select.selected(ids, self.offsets, self.counts(), self.keeps, self.keys)

    def train_mask(self, ids: np.ndarray) -> np.ndarray:
        """Mask over `ids`: selected and not held out — the instances the SAE trains on."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.selected(ids) & ~np.isin(ids, self.held)

    def needed_mask(self, chunk: int = 1 << 20) -> np.ndarray:
        """A bool per instance id (1 byte each, no records): True for the training instances."""
        out = np.zeros(self.total, bool)
        for start in range(0, self.total, chunk):
            ids = np.arange(start, min(self.total, start + chunk))
            out[ids] = self.train_mask(ids)
        return out

    def shard(self, g: int) -> tuple[SourcePlan, int]:
        """Global shard number → (source, shard of that source)."""
        s = int(np.searchsorted(self.shard_offsets, g, side="right") - 1)
        return self.sources[s], g - int(self.shard_offsets[s])

    def read(self, g: int) -> list[dict]:
        """Every record of global shard `g` as an instance dict (selected or not)."""
        src, shard = self.shard(g)
        base = int(self.offsets[src.index])
        return [{"instance_id": base + r, "messages": json.dumps(m), "origin": f"{src.label} record {r}"}
                for r, m in read_shard(src, shard, self.config_json)]

    def first_instances(self) -> list[dict]:
        """Record 0 of every source (read by the scan): what the driver renders before Ray starts."""
        return [{"instance_id": int(self.offsets[s.index]), "messages": json.dumps(s.first),
                 "origin": f"{s.label} record 0"} for s in self.sources]

    def held_instances(self) -> list[dict]:
        """The held-out instances, in id order (the driver reads only the shards that hold them)."""
        out, held = [], set(self.held.tolist())
        for g in sorted({self._shard_of(i) for i in held}):
            out += [inst for inst in self.read(g) if inst["instance_id"] in held]
        return sorted(out, key=lambda inst: inst["instance_id"])

    def _shard_of(self, instance_id: int) -> int:
        s = int(np.searchsorted(self.offsets, instance_id, side="right") - 1)
        src = self.sources[s]
        shard = int(np.searchsorted(src.shard_first, instance_id - self.offsets[s], side="right") - 1)
        return int(self.shard_offsets[s]) + shard

    def shard_order(self, numbers: np.ndarray) -> np.ndarray:
        """The stream's seeded shard order: position → global shard number."""
        return select.permute(numbers, self.n_shards, select.round_keys(f"saefd-sae-shards:{self.seed}"))

    def read_training(self, g: int, shuffle_seed: int | None = None) -> list[dict]:
        """The training instances of global shard `g` (optionally in a seeded random order)."""
        block = self.read(g)
        mask = self.train_mask(np.asarray([i["instance_id"] for i in block], np.int64))
        block = [inst for inst, keep in zip(block, mask) if keep]
        if shuffle_seed is not None and block:
            block = [block[i] for i in np.random.default_rng([self.seed, shuffle_seed]).permutation(len(block))]
        return block

    def iter_instances(self):
        """The training instances, shard by shard in the stream's order (each shard shuffled), read on the
        caller's process: the first n are a seeded sample of the whole run."""
        for position in range(self.n_shards):
            yield from self.read_training(int(self.shard_order(np.asarray([position]))[0]), position)


def plan_inputs(config) -> InputPlan:
    """Scan every source (streamed; a bad file or first record is a DataError here) and fix the selection."""
    data = config.data
    sources = [scan_source(config, i, src) for i, src in enumerate(data.sources)]
    counts = np.asarray([s.count for s in sources], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    keeps = np.asarray([min(c, src.max_instances or c) for c, src in zip(counts, data.sources)], np.int64)
    n_eval = min(data.eval_instances, max(0, int(keeps.sum()) - 1))
    keys = [select.source_keys(data.seed, s.label) for s in sources]
    held = select.held_out_ids(offsets, counts, keeps, keys, n_eval, data.seed)
    settings = {"seed": data.seed, "max_instances": [s.max_instances for s in data.sources],
                "eval_instances": data.eval_instances}
    return InputPlan(sources, offsets, keeps, held, data.seed, settings, json.dumps(config.model_dump(mode="json")))


def load_instances(config, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) instances as lists (`limit`: the first training instances only) — for small runs,
    benches and tests; the SAE job itself streams them (`instances.instance_stream`)."""
    plan = plan_inputs(config)
    return list(islice(plan.iter_instances(), limit)), plan.held_instances()
