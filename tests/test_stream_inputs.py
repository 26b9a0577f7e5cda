"""The SAE job's input plan: ids, selection and digests come from file names, counts and digests; the Ray Data
instance stream yields exactly the records the old in-memory reader gave; bad files fail on the driver."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saefd_ray.errors import DataError
from saefd_ray.stream import select
from saefd_ray.stream.config import validate_sae
from saefd_ray.stream.plan import load_instances, plan_inputs
from saefd_ray.stream.sources import SHARD_RECORDS, read_shard, to_messages


def _files(root, n_json=600, n_jsonl=300, n_parquet=60):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # non-ASCII text and indentation: the JSON-array scan's byte offsets must land on element starts
    (root / "a.json").write_text(json.dumps([{"prompt": f"p{i} é {'x' * (i % 7)}", "answer": f"a{i}" if i % 5 else ""}
                                             for i in range(n_json)], ensure_ascii=False, indent=1))
    lines = [json.dumps({"messages": [{"role": "user", "content": f"m{i}"}, {"role": "assistant", "content": "ok"}]})
             for i in range(n_jsonl)]
    (root / "b.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(n_parquet)], "answer": ["z"] * n_parquet}),
                   root / "c.parquet", row_group_size=25)


def _config(root, eval_instances=6, seed=0, **caps):
    return validate_sae({"data": {"data_root": str(root), "eval_instances": eval_instances, "seed": seed, "sources": [
        {"kind": "file", "path": "a.json", "max_instances": caps.get("a")},
        {"kind": "file", "path": "b.jsonl", "max_instances": caps.get("b")},
        {"kind": "file", "path": "c.parquet", "max_instances": caps.get("c")},
        {"kind": "task", "max_instances": caps.get("t"), "task": {"name": "a", "format": "synthetic",
                                                                   "generator": "rule_a"}}]}})


def _reference(root) -> list[list[dict]]:
    """The old in-memory reading: every record of every file, parsed whole, as chat messages, in source order."""
    import pyarrow.parquet as pq

    from saefd_ray.data.synthetic import load_synthetic
    from saefd_ray.data.tasks import carve_out
    from saefd_ray.config import TaskConfig, ValidationConfig

    out = [to_messages(r, "prompt", "answer", "messages", "a") for r in json.loads((root / "a.json").read_text())]
    out += [to_messages(json.loads(line), "prompt", "answer", "messages", "b")
            for line in (root / "b.jsonl").read_text().splitlines() if line.strip()]
    out += [to_messages(r, "prompt", "answer", "messages", "c") for r in pq.read_table(root / "c.parquet").to_pylist()]
    task = load_synthetic(TaskConfig(name="a", format="synthetic", generator="rule_a"))
    train, _ = carve_out(task.train, ValidationConfig().size, 0, "a")
    return out + [[{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}] for e in train]


def test_permute_is_a_seeded_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        got = select.permute(np.arange(n), n, select.round_keys("k"))
        assert sorted(got.tolist()) == list(range(n)), n
    a = select.permute(np.arange(100), 100, select.round_keys("k"))
    assert not np.array_equal(a, select.permute(np.arange(100), 100, select.round_keys("other")))
    assert not np.array_equal(a, np.arange(100))


def test_plan_ids_selection_and_digest_are_deterministic(tmp_path):
    _files(tmp_path)
    config = _config(tmp_path, a=100, c=30)
    plan, again = plan_inputs(config), plan_inputs(config)
    assert [s.count for s in plan.sources] == [600, 300, 60, 352]
    assert plan.offsets.tolist() == [0, 600, 900, 960] and plan.total == 1312
    assert plan.keeps.tolist() == [100, 300, 30, 352]
    assert plan.digest == again.digest and np.array_equal(plan.held, again.held) and len(plan.held) == 6
    needed = plan.needed_mask()
    assert np.array_equal(needed, again.needed_mask())
    assert needed[:600].sum() + np.isin(plan.held, np.arange(600)).sum() == 100  # exactly max_instances
    assert needed[900:960].sum() + np.isin(plan.held, np.arange(900, 960)).sum() == 30
    assert not needed[plan.held].any() and plan.selected(plan.held).all()
    assert needed.sum() == plan.n_train == 100 + 300 + 30 + 352 - 6
    train, held = load_instances(config)
    assert sorted(i["instance_id"] for i in train) == np.flatnonzero(needed).tolist()
    assert [i["instance_id"] for i in held] == plan.held.tolist()
    assert load_instances(config) == (train, held)
    # another seed: another subset and held-out set; other content: another digest
    other = plan_inputs(_config(tmp_path, a=100, c=30, seed=1))
    assert not np.array_equal(other.needed_mask(), needed) and other.digest != plan.digest
    (tmp_path / "b.jsonl").write_text((tmp_path / "b.jsonl").read_text().replace("m7", "m7!"))
    changed = plan_inputs(config)
    assert changed.digest != plan.digest and np.array_equal(changed.held, plan.held)


def test_cache_key_comes_from_the_plan_not_the_texts(tmp_path):
    from saefd_ray.stream.pipeline import cache_key

    _files(tmp_path)
    key = lambda cfg: cache_key("tiny", [1], 64, "float32", plan_inputs(cfg).digest)  # noqa: E731
    assert key(_config(tmp_path)) == key(_config(tmp_path))
    assert key(_config(tmp_path)) != key(_config(tmp_path, a=10))
    assert key(_config(tmp_path)) != key(_config(tmp_path, eval_instances=5))


def test_planned_instances_equal_the_old_in_memory_reading(tmp_path):
    _files(tmp_path)
    reference = _reference(tmp_path)
    plan = plan_inputs(_config(tmp_path))
    got = {}
    for g in range(plan.n_shards):
        for inst in plan.read(g):
            got[inst["instance_id"]] = json.loads(inst["messages"])
    assert [got[i] for i in range(plan.total)] == reference
    assert [len(s.shard_first) for s in plan.sources] == [3, 2, 3, 2]  # 256-record shards; parquet: row groups
    assert SHARD_RECORDS == 256
    train, held = load_instances(_config(tmp_path))
    assert sorted([i["instance_id"] for i in train + held]) == list(range(plan.total))  # nothing capped: all


@pytest.mark.ray
def test_instance_stream_yields_the_planned_training_instances(ray_cluster, tmp_path):
    from saefd_ray.stream.instances import instance_stream, read_tasks

    _files(tmp_path)
    config = _config(tmp_path, a=100, c=30)
    plan = plan_inputs(config)
    train, _ = load_instances(config)
    ds = instance_stream(plan)
    rows = list(ds.iter_rows())
    assert sorted((r["instance_id"], r["messages"], r["origin"]) for r in rows) == \
        sorted((i["instance_id"], i["messages"], i["origin"]) for i in train)
    windows = ds.map_batches(lambda b: {"n": np.asarray([len(b["instance_id"])])}, batch_size=16,
                             batch_format="numpy")
    sizes = [int(r["n"]) for r in windows.iter_rows()]  # the windows a harvesting actor would get
    assert sum(sizes) == len(train) and sum(s != 16 for s in sizes) <= read_tasks(plan)  # full but one per task
    ids = [r["instance_id"] for r in rows]
    assert ids != sorted(ids)  # sources interleave (seeded shard order, shuffled within a read task)
    skip = np.zeros(plan.total, bool)
    skip[ids[:50]] = True
    rest = [r["instance_id"] for r in instance_stream(plan, skip).iter_rows()]
    assert sorted(rest) == sorted(ids[50:])


def test_bad_files_fail_on_the_driver_or_name_the_record(tmp_path):
    _files(tmp_path)
    cfg = _config(tmp_path)
    (tmp_path / "b.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(DataError, match=r"b.jsonl: record 0: invalid JSON"):
        plan_inputs(cfg)
    (tmp_path / "b.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"b.jsonl: record 0: no field 'prompt'"):
        plan_inputs(cfg)
    (tmp_path / "b.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"b.jsonl: no records"):
        plan_inputs(cfg)
    _files(tmp_path)
    records = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps(records[:300]) + "]")
    with pytest.raises(DataError, match=r"a.json: invalid JSON after the closing"):
        plan_inputs(cfg)
    (tmp_path / "a.json").write_text(json.dumps(records[:300] + [7]))
    with pytest.raises(DataError, match=r"a.json: record 300 is int, expected an object"):
        plan_inputs(cfg)
    (tmp_path / "a.json").write_text(json.dumps({"prompt": "not a list"}))
    with pytest.raises(DataError, match=r"a.json: expected a JSON list of records"):
        plan_inputs(cfg)
    # a bad line deep in a JSONL file is found by the Ray task that reads it, named by file and record index
    _files(tmp_path)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    lines[270] = "{broken"
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    plan = plan_inputs(cfg)
    with pytest.raises(DataError, match=r"b.jsonl: record 269: invalid JSON"):  # line 271: one blank line above
        read_shard(plan.sources[1], 1, plan.config_json)
