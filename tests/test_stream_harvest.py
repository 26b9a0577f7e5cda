"""Per-instance harvesting: rendering, truncation, length bucketing, padded batches equal lone forwards; the config."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from saefd_ray.errors import ConfigError
from saefd_ray.stream.config import load_sae_config, validate_sae
from saefd_ray.stream.harvest import harvest_batch, padding_waste, plan_batches, render
from saefd_ray.stream.plan import load_instances


def test_plan_batches_bounds_padding_and_covers_every_instance():
    rng = random.Random(0)
    lengths = [rng.randint(5, 900) for _ in range(500)]
    plan = plan_batches(lengths, max_batch_tokens=4096, max_padding=0.1)
    assert sorted(i for b in plan for i in b) == list(range(500))
    for b in plan:
        width = max(lengths[i] for i in b)
        assert width * len(b) <= 4096 or len(b) == 1
        assert 1 - sum(lengths[i] for i in b) / (width * len(b)) <= 0.1 + 1e-12
    real, padded = padding_waste(lengths, plan)
    assert real == sum(lengths) and 1 - real / padded <= 0.1
    assert len(plan) < 250  # it does batch (not one instance per forward)


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from saefd_ray.models.loading import load_model, load_tokenizer

    return load_model(tiny_model_path).eval(), load_tokenizer(tiny_model_path)


def test_render_uses_chat_template_truncates_and_keeps_special_tokens(tiny):
    _, tok = tiny
    messages = [{"role": "user", "content": "rule a: kalo mitu"}, {"role": "assistant", "content": "north"}]
    ids = render(tok, messages, 10_000)
    assert ids[0] == tok.bos_token_id and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ids[-2] == tok.convert_tokens_to_ids("<|im_end|>")
    assert render(tok, messages, 5) == ids[:5]


def test_padded_batch_equals_each_instance_alone(tiny):
    model, tok = tiny
    texts = [("rule a: kalo", "north"), ("rule b: mitu rezo pani suve dobi", "south east west"), ("x", "y")]
    ids = [render(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": a}], 64) for p, a in texts]
    special = set(tok.all_special_ids)
    rows = harvest_batch(model, ids, [7, 8, 9], [0, 1], special, tok.pad_token_id)
    n = sum(len(x) for x in ids)
    assert rows["activation"].shape == (2 * n, model.config.hidden_size)  # pads dropped, one row per token & layer
    assert list(rows["layer"]) == [0] * n + [1] * n
    for k, (x, inst) in enumerate(zip(ids, [7, 8, 9])):
        alone = harvest_batch(model, [x], [inst], [0, 1], special, tok.pad_token_id)
        sel = rows["instance_id"] == inst
        for col in ("token_id", "position", "is_special", "layer"):
            np.testing.assert_array_equal(rows[col][sel], alone[col])
        np.testing.assert_allclose(rows["activation"][sel], alone["activation"], atol=2e-5, rtol=1e-4)
        assert list(alone["token_id"][: len(x)]) == x and list(alone["position"][: len(x)]) == list(range(len(x)))
        assert list(alone["is_special"][: len(x)]) == [t in special for t in x]
    # the truncated forward equals the full model's hidden state after that layer
    full = model(input_ids=torch.tensor([ids[1]]), output_hidden_states=True).hidden_states
    one = harvest_batch(model, [ids[1]], [0], [0], special, tok.pad_token_id)
    np.testing.assert_allclose(one["activation"], full[1][0].detach().numpy(), atol=2e-5, rtol=1e-4)


def _write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def test_load_instances_from_files_holds_out_and_is_deterministic(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write(tmp_path / "a.json", [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(10)])
    _write(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": f"m{i}"}]} for i in range(5)], True)
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(6)], "answer": ["z"] * 6}), tmp_path / "c.parquet")
    raw = {"data": {"data_root": str(tmp_path), "eval_instances": 4, "sources": [
        {"kind": "file", "path": "a.json"}, {"kind": "file", "path": "b.jsonl"},
        {"kind": "file", "path": "c.parquet", "max_instances": 3}]}}
    config = validate_sae(raw)
    train, held = load_instances(config)
    assert len(train) + len(held) == 18 and len(held) == 4
    ids = {i["instance_id"] for i in train} | {i["instance_id"] for i in held}
    assert len(ids) == 18 and ids >= set(range(15)) and ids <= set(range(21))  # ids: source offset + record index
    assert load_instances(config) == (train, held)
    contents = [json.loads(i["messages"]) for i in train + held]
    assert sum(m[0]["content"].startswith("q") for m in contents) == 3
    assert {"role": "assistant", "content": "a3"} in [m[-1] for m in contents]


def test_config_errors_are_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {sources: [{kind: file, path: nope.json}]}\n")
    with pytest.raises(ConfigError, match="data.sources.0.path: .*nope.json not found"):
        load_sae_config(tmp_path / "c.yaml")
    base = {"data": {"sources": [{"kind": "task", "task": {"name": "a", "format": "synthetic", "generator": "rule_a"}}]}}
    with pytest.raises(ConfigError, match="sae.typo: unknown key"):
        validate_sae({**base, "sae": {"typo": 1}})
    with pytest.raises(ConfigError, match="divisible"):
        validate_sae({**base, "training": {"batch_size": 5}, "distributed": {"num_workers": 2}})
    with pytest.raises(ConfigError, match="batchtopk"):
        validate_sae({**base, "sae": {"architecture": "batchtopk", "k": 4}, "distributed": {"sharding": "latent"}})
    with pytest.raises(ConfigError, match="needs 'k'"):
        validate_sae({**base, "sae": {"architecture": "topk"}})
    for preset in ("configs/sae_demo.yaml", "configs/sae_offline.yaml"):
        cfg = validate_sae(__import__("yaml").safe_load(open(preset)))
        assert cfg.sae.architecture == "gated"
