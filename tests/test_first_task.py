"""Task 1 is shared between the methods that train it as seq_lora does (train/first_task.py).

The unit tests check each method's `plain_first_task` claim (nothing added on task 1: same LoRA, examples, epochs,
no regularizer term, row as scored) and what the cache key covers. The Ray test trains sae_fd alone on one root
and adopts seq_lora's stored task 1 on another: same task-1 training (with LoRA dropout on, whatever the SAE's
setup drew), then the same anchors and the same R matrix."""

from __future__ import annotations

import json

import pytest
import torch

from saefd_ray.data.tasks import load_tasks
from saefd_ray.methods import METHODS, build_method
from saefd_ray.methods.anchors import Anchors, anchor_file
from saefd_ray.models.loading import load_model
from saefd_ray.train import first_task
from test_methods_ray import sae_folder, sequence_config  # noqa: F401  (fixture)
from test_methods_unit import batch_of, context, make_config, sae_dir, tokenizer  # noqa: F401  (fixtures)

NOT_PLAIN = {"sae_reg", "o_lora", "mtl", "per_task"}  # each adds something on task 1 (see their classes)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_plain_first_task_claims_hold(name, tiny_model_path, tokenizer, sae_dir):  # noqa: F811
    config = make_config({"name": name}, sae_dir)
    method = build_method(config)
    assert method.plain_first_task == (name not in NOT_PLAIN)
    if not method.plain_first_task:
        return
    plain_config = make_config({"name": "seq_lora"})
    plain = build_method(plain_config)
    ctx = context(config, tiny_model_path, tokenizer, None)
    model = method.prepare_model(load_model(tiny_model_path), ctx)
    method.load_state(ctx)
    reference = plain.prepare_model(load_model(tiny_model_path), context(plain_config, tiny_model_path, tokenizer, None))
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert method.training_examples(0, ctx.tasks, None) == ctx.tasks[0].train
    assert method.epochs(0, ctx.tasks) == plain.epochs(0, ctx.tasks)
    batch = batch_of(tokenizer, config)
    loss = model(**batch).loss
    assert method.regularizer(model, batch, loss) == (None, {})
    assert method.adjust_row([12.5, 50.0], [10.0, 40.0], ctx, "test") == [12.5, 50.0]


def test_key_covers_what_trains_task_one_not_the_method(tmp_path, cache_dir):
    def key_of(method="seq_lora", model="m", change=lambda c: None):
        config = sequence_config(tmp_path, cache_dir, {"name": method}, "x")
        change(config)
        return first_task.key(config, load_tasks(config), model)

    base = key_of()
    assert base == key_of("ewc") == key_of(change=lambda c: setattr(c.output, "run_name", "other"))
    changes = [lambda c: setattr(c.training, "lr", 1e-3), lambda c: setattr(c.training, "seed", 1),
               lambda c: setattr(c.lora, "r", 8), lambda c: setattr(c.lora, "dropout", 0.1),
               lambda c: setattr(c.tasks.sequence[1], "max_test", 8),  # another task's scored examples
               lambda c: setattr(c.distributed, "num_workers", 1)]
    keys = {key_of(change=change) for change in changes} | {key_of(model="other model files")}
    assert base not in keys and len(keys) == len(changes) + 1
    assert key_of(model=None) is None  # a hub id names no fixed files: never shared


@pytest.mark.ray
@pytest.mark.timeout(2400)  # five Ray Train stages: ~4 min each on a loaded 2-core box
@pytest.mark.usefixtures("ray_cluster")
def test_sae_fd_adopts_seq_loras_task_one_and_continues_exactly(tmp_path, cache_dir, sae_folder):  # noqa: F811
    from saefd_ray.train.sequence import run_sequence, task_dir

    sae_fd = {"name": "sae_fd", "sae": {"path": str(sae_folder), "layer": 1}, "anchor_size": 4}

    def run(method: dict, root: str, name: str):
        config = sequence_config(tmp_path / root, cache_dir, method, name, max_train=32)
        config.lora.dropout = 0.1
        results = run_sequence(config)
        return results, config.run_dir

    plain, plain_dir = run({"name": "seq_lora"}, "shared", "plain")
    alone, alone_dir = run(sae_fd, "own", "alone")
    adopted, adopted_dir = run(sae_fd, "shared", "adopted")

    rows = {name: json.loads((task_dir(folder, 0, "rule_a") / "row.json").read_text())
            for name, folder in (("plain", plain_dir), ("alone", alone_dir), ("adopted", adopted_dir))}
    # sae_fd training task 1 itself is seq_lora's run (LoRA B = 0 at the first step, so the epoch mean tells)
    assert rows["alone"]["epoch_losses"] == pytest.approx(rows["plain"]["epoch_losses"], rel=1e-6)
    assert rows["alone"]["row"] == rows["plain"]["row"] and "first_task" not in rows["alone"]
    assert rows["adopted"]["first_task"]["trained_by"] == "plain"
    assert "task_rule_a_s" in adopted["timings"]  # the stage ran: its own after_task, on seq_lora's adapter
    # the same anchors, tensor for tensor (not the files' bytes: safetensors writes its metadata keys in a
    # per-process hash order)
    anchors = [Anchors.load(anchor_file(task_dir(folder, 0, "rule_a"), 0, "rule_a"))
               for folder in (adopted_dir, alone_dir)]
    assert [(a.task, a.layer, a.d_sae) for a in anchors] == [("rule_a", 1, anchors[1].d_sae)] * 2
    for field in ("input_ids", "lengths", "values", "indices"):
        assert torch.equal(getattr(anchors[0], field), getattr(anchors[1], field)), field
    assert adopted["r_matrix"] == alone["r_matrix"] and adopted["r_matrix"][1] == plain["r_matrix"][1]
    assert adopted["r_matrix_validation"] == alone["r_matrix_validation"]
