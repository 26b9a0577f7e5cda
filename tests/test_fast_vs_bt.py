"""bench/fast_vs_bt.py's feeding modes: BT blocks are the FAST token stream (or plain text) cut into equal blocks, and
the harvester runs a pre-tokenized block exactly as given."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def _train(n: int) -> list[dict]:
    msgs = [[{"role": "user", "content": f"rule a: kalo {i}"}, {"role": "assistant", "content": "north " * (i % 5)}]
            for i in range(n)]
    return [{"instance_id": i, "messages": json.dumps(m)} for i, m in enumerate(msgs)]


def test_bt_blocks_are_the_rendered_stream_cut_evenly(tiny_model_path):
    import fast_vs_bt as fvb

    from saefd_ray.models.loading import load_tokenizer
    from saefd_ray.stream.harvest import render, render_instance

    tok = load_tokenizer(tiny_model_path)
    train = _train(40)
    stream = [t for i in train for t in render(tok, json.loads(i["messages"]), 64)]
    blocks = fvb.bt_f_instances(tok, train, 64, block_len=32, tokens=200)
    ids = [render_instance(tok, b["messages"], 10_000) for b in blocks]
    assert all(len(x) == 32 for x in ids) and [b["instance_id"] for b in blocks] == list(range(len(blocks)))
    assert sum(ids, []) == stream[: 32 * len(blocks)]
    assert 32 * len(blocks) >= 200  # covers the budget
    assert render_instance(tok, blocks[0]["messages"], 5) == ids[0][:5]  # max_len still truncates

    fast = fvb.fast_instances(tok, train, 64, tokens=100)
    lengths = [len(render(tok, json.loads(i["messages"]), 64)) for i in fast]
    assert sum(lengths) >= 100 and sum(lengths[:-1]) < 100  # the shortest prefix holding the budget

    plain = fvb.bt_p_instances(tok, ["first text", "second text here"] * 30, block_len=16, tokens=64)
    special = set(tok.all_special_ids)
    assert plain and not any(t in special for b in plain for t in json.loads(b["messages"])["input_ids"])
