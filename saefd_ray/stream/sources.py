"""Instance sources, streamed: a planning scan on the driver and a shard reader that runs inside Ray Data tasks.

`scan_source` (driver, before Ray starts) reads a source once as a stream and keeps O(1) records: the record count,
a sha256 of the file bytes, the first record (checked, so a bad file is one `error:` line at once), and the byte
offset of every `SHARD_RECORDS`-th record. `read_shard` (inside a Ray Data task) seeks to one of those offsets and
parses `SHARD_RECORDS` records. Parquet shards are its row groups (row counts from the footer, no scan).

Why not `ray.data.read_json` / `read_parquet`: an instance is named by (source, record index) — resume's consumed
mask, the activation cache, held-out and `max_instances` selection all key on it — and Ray's readers give no
record index (their blocks are not numbered per file). `read_json` also parses a JSON array with one `json.load`
of the whole file into one block, and infers one Arrow schema across records (a field that is a number in one
record and a string in another fails or is coerced; `lines=True` goes through pandas, which converts date-like
strings). So the reader is this file: seek + `json.loads` / `raw_decode` per record, or `read_row_group`.

`task` / `hf` sources (registry tasks, Hugging Face datasets) are loaded by their own loaders: transiently on the
driver to plan, and once per Ray worker process (cached) to read.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from saefd_ray.errors import DataError
from saefd_ray.io import sha256_file

SHARD_RECORDS = 256  # records per shard of a JSON / JSONL / task source; the unit the stream is shuffled in
_CHUNK = 1 << 18
_MAX_RECORD = 1 << 28  # a JSON-array element that does not parse within 256 MB of text is an error
_WS = re.compile(r"[ \t\n\r]*")


@dataclass
class SourcePlan:
    """One source as the run sees it: no records, only where they are."""

    index: int
    kind: str  # json | jsonl | parquet | task | hf
    label: str  # "source <path>" / "source task '<name>'": error messages and instance origins
    path: str | None
    count: int
    digest: str
    shard_first: np.ndarray  # first record index of each shard
    shard_loc: np.ndarray  # byte offset (json/jsonl), row group (parquet), record index (task/hf)
    first: list[dict] = field(default_factory=list)  # record 0 as chat messages (checked on the driver)
    spec: dict = field(default_factory=dict)  # the SourceConfig (fields, task spec)

    def shard_size(self, shard: int) -> int:
        end = self.shard_first[shard + 1] if shard + 1 < len(self.shard_first) else self.count
        return int(end - self.shard_first[shard])


def source_label(source) -> str:
    return f"source {source.path}" if source.kind != "task" else f"source task {source.task.name!r}"


def to_messages(record, prompt_field: str, answer_field: str, messages_field: str, where: str) -> list[dict]:
    """A record as chat messages: its `messages` list, else prompt (user) + answer (assistant)."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is {type(record).__name__}, expected an object")
    if messages_field in record:
        messages = record[messages_field]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise DataError(f"{where}: {messages_field!r} must be a non-empty list of {{role, content}} objects")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if prompt_field not in record:
        raise DataError(f"{where}: no field {prompt_field!r} (or {messages_field!r})")
    messages = [{"role": "user", "content": str(record[prompt_field])}]
    if record.get(answer_field) not in (None, ""):
        messages.append({"role": "assistant", "content": str(record[answer_field])})
    return messages


def record_messages(spec: dict, record, where: str) -> list[dict]:
    return to_messages(record, spec["prompt_field"], spec["answer_field"], spec["messages_field"], where)


# --------------------------------------------------------------------------------------------- JSON arrays


class _JsonArray:
    """Elements of a JSON array read from a binary file in chunks: `raw_decode` one element at a time."""

    def __init__(self, f, path: Path, base: int, digest=None) -> None:
        self.f, self.path, self.base, self.digest = f, path, base, digest
        self.buf, self.pos, self.eof = "", 0, False
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(_CHUNK)
        if self.digest is not None:
            self.digest.update(chunk)
        try:
            self.buf += self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as err:
            raise DataError(f"{self.path}: not UTF-8 text ({err.reason})") from None
        self.eof = not chunk
        return True

    def peek(self) -> str | None:
        """The next non-blank character (not consumed), None at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return None

    def offset(self) -> int:
        """The byte offset of `pos`; drops the text before it (each character is encoded once at most)."""
        head = self.buf[: self.pos]
        self.base += self.pos if self.buf.isascii() else len(head.encode())
        self.buf, self.pos = self.buf[self.pos :], 0
        return self.base

    def element(self, index: int):
        """The next element (records are objects: one cut at a chunk's end never parses, so read on and retry)."""
        if self.peek() is None:
            raise DataError(f"{self.path}: record {index}: invalid JSON (the file ends inside the list)")
        decoder = json.JSONDecoder()
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if len(self.buf) - self.pos < _MAX_RECORD and self._more():
                    continue
                raise DataError(f"{self.path}: record {index}: invalid JSON ({err.msg})") from None
            self.pos = end
            return value

    def after_element(self, index: int) -> bool:
        """Past one element: True if another follows (consumes the comma), False at the closing bracket."""
        c = self.peek()
        if c == ",":
            self.pos += 1
            return True
        if c == "]":
            self.pos += 1
            if self.peek() is not None:
                raise DataError(f"{self.path}: invalid JSON after the closing ']' (extra data)")
            return False
        raise DataError(f"{self.path}: record {index}: invalid JSON (expected ',' or ']' after it)")


def _scan_json(path: Path):
    """(count, sha256, shard offsets, record 0) of a JSON array file, holding one element at a time."""
    digest, offsets, first = hashlib.sha256(), [], None
    with open(path, "rb") as f:
        arr = _JsonArray(f, path, 0, digest)
        c = arr.peek()
        if c != "[":
            raise DataError(f"{path}: expected a JSON list of records" + (", got an empty file" if c is None else ""))
        arr.pos += 1
        count = 0
        if arr.peek() == "]":
            arr.pos += 1
        else:
            while True:
                if count % SHARD_RECORDS == 0:
                    arr.peek()
                    offsets.append(arr.offset())
                value = arr.element(count)
                if not isinstance(value, dict):
                    raise DataError(f"{path}: record {count} is {type(value).__name__}, expected an object")
                first = value if count == 0 else first
                count += 1
                if not arr.after_element(count - 1):
                    break
        while arr._more():  # hash the rest (blank space after the array)
            pass
    return count, digest.hexdigest(), offsets, first


def _scan_jsonl(path: Path):
    """(count, sha256, shard offsets, record 0) of a JSONL file: lines counted, only the first one parsed."""
    digest, offsets, first, count, at = hashlib.sha256(), [], None, 0, 0
    with open(path, "rb") as f:
        for line in f:
            digest.update(line)
            if line.strip():
                if count % SHARD_RECORDS == 0:
                    offsets.append(at)
                if count == 0:
                    first = _jsonl_record(path, line, 0)
                count += 1
            at += len(line)
    return count, digest.hexdigest(), offsets, first


def _jsonl_record(path: Path, line: bytes, index: int):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: record {index}: invalid JSON ({getattr(err, 'msg', err)})") from None


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - any pyarrow failure is a bad file
        raise DataError(f"{path}: cannot read parquet ({str(err).splitlines()[0]})") from None


# --------------------------------------------------------------------------------------------- plan / read


def scan_source(config, index: int, source) -> SourcePlan:
    """Plan one source (driver): counts, digest, shard starts, its first record checked as chat messages."""
    spec = source.model_dump(mode="json")
    label = source_label(source)
    if source.kind == "file":
        path = config.data_path(source.path)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        kind = path.suffix.lstrip(".")
        if kind == "parquet":
            pf = _parquet(path)
            rows = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            groups = [g for g, n in enumerate(rows) if n]
            count, digest = int(sum(rows)), sha256_file(path)
            starts = np.cumsum([0] + rows)[:-1]
            shard_first, shard_loc = starts[groups], np.asarray(groups)
            first = next(pf.iter_batches(batch_size=1)).to_pylist()[0] if count else None
        else:
            count, digest, offsets, first = (_scan_jsonl if kind == "jsonl" else _scan_json)(path)
            shard_first, shard_loc = np.arange(len(offsets)) * SHARD_RECORDS, np.asarray(offsets)
        if not count:
            raise DataError(f"{path}: no records")
        plan = SourcePlan(index, kind, label, str(path), count, digest, shard_first.astype(np.int64),
                          shard_loc.astype(np.int64), spec=spec)
        plan.first = record_messages(spec, first, f"{path}: record 0")
        return plan
    messages = _loaded(json.dumps(config.model_dump(mode="json")), index)
    digest = hashlib.sha256()
    for m in messages:
        digest.update(json.dumps(m).encode() + b"\0")
    count = len(messages)
    if not count:
        raise DataError(f"{label}: no records")
    starts = np.arange(0, count, SHARD_RECORDS, dtype=np.int64)
    plan = SourcePlan(index, source.kind, label, None, count, digest.hexdigest(), starts, starts.copy(),
                      first=messages[0], spec=spec)
    _loaded.cache_clear()  # the driver keeps nothing
    return plan


@lru_cache(maxsize=4)
def _loaded(config_json: str, index: int) -> list[list[dict]]:
    """Every record of a task / hf source as messages (the loader's own reading; cached per worker process)."""
    from saefd_ray.stream.config import SaeTrainConfig

    config = SaeTrainConfig.model_validate(json.loads(config_json))
    source = config.data.sources[index]
    if source.kind == "task":
        from saefd_ray.data.tasks import load_task

        task = load_task(source.task, TaskShim(config))
        return [[{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}] for e in task.train]
    try:
        import datasets
    except ImportError:
        raise DataError(f"source {source.path!r}: kind 'hf' needs the `datasets` package") from None
    try:
        ds = datasets.load_dataset(source.path, source.hf_config, split=source.split)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, ...
        raise DataError(f"source {source.path!r}: cannot load ({str(err).splitlines()[0]})") from None
    spec = source.model_dump(mode="json")
    return [record_messages(spec, dict(r), f"{source.path}: record {i}") for i, r in enumerate(ds)]


def read_shard(src: SourcePlan, shard: int, config_json: str) -> list[tuple[int, list[dict]]]:
    """(record index, chat messages) of every record of one shard (inside a Ray Data task)."""
    first, n = int(src.shard_first[shard]), src.shard_size(shard)
    loc = int(src.shard_loc[shard])
    if src.kind in ("task", "hf"):
        return list(enumerate(_loaded(config_json, src.index)[first : first + n], first))
    path = Path(src.path)
    if src.kind == "parquet":
        rows = _parquet(path).read_row_group(loc).to_pylist()
    elif src.kind == "jsonl":
        rows = []
        with open(path, "rb") as f:
            f.seek(loc)
            while len(rows) < n:
                line = f.readline()
                if not line:
                    raise DataError(f"{path}: ends before record {first + len(rows)}; was it changed during the run?")
                if line.strip():
                    rows.append(_jsonl_record(path, line, first + len(rows)))
    else:
        rows = []
        with open(path, "rb") as f:
            f.seek(loc)
            arr = _JsonArray(f, path, loc)
            for i in range(n):
                rows.append(arr.element(first + i))
                if i + 1 < n and not arr.after_element(first + i):
                    raise DataError(f"{path}: ends before record {first + i + 1}; was it changed during the run?")
    return [(first + i, record_messages(src.spec, r, f"{path}: record {first + i}")) for i, r in enumerate(rows)]


class TaskShim:
    """What `load_task` needs from a run config: path resolution, the tasks' seed and validation size (a run's
    default, so an SAE harvested from a task's train split leaves out the instances the run validates on)."""

    def __init__(self, config) -> None:
        from saefd_ray.config import ValidationConfig

        self._config = config
        self.tasks = type("T", (), {"seed": config.data.seed, "validation": ValidationConfig()})()

    def data_path(self, relative: str) -> Path:
        return self._config.data_path(relative)
