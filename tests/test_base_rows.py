"""The base row is scored once per output root: what it may be keyed on, and its reuse across runs.

The cache is only right if the base scores do not depend on what its digest leaves out (method, LoRA config,
lr, seed): the first test scores every method's stage-0 model against the bare base model, bit for bit. The
Ray test runs a sequence, then another method with another lr, seed and LoRA rank on the same root (base row
taken from the cache, identical, not scored), then a different max_test (scored again).
"""

from __future__ import annotations

import json

import pytest
import torch

from saefd_ray.data.tasks import Example, load_tasks
from saefd_ray.eval.scoring import generated_predictions, option_scores
from saefd_ray.methods import METHODS, build_method
from saefd_ray.methods.base import TaskContext
from saefd_ray.models.loading import load_model, load_tokenizer
from saefd_ray.train import base_rows
from test_methods_ray import sequence_config

CPU = torch.device("cpu")


def test_every_method_scores_the_base_model_at_stage_0(tiny_model_path, tmp_path, cache_dir, one_thread):
    """Each method's stage-0 model (a fresh LoRA: B = 0) gives the base model's option scores and generations
    exactly, whatever the LoRA config: so the cached base row is what the run would have computed."""
    tokenizer = load_tokenizer(tiny_model_path)
    base = load_model(tiny_model_path).eval()
    examples = [Example(text, "x") for text in ("kalo mitu rezo pani suve", "dobi", "rezo rezo kalo mitu dobi suve pani")]
    options = ["north", "south by south west", "kalo"]
    config = sequence_config(tmp_path, cache_dir, {"name": "seq_lora"}, "x")
    config.evaluation.max_new_tokens = 4
    want = option_scores(base, tokenizer, examples, options, config, CPU)
    want_text = generated_predictions(base, tokenizer, examples, config, CPU, synced=False)
    loras = [{"r": 4, "alpha": 8, "dropout": 0.1}, {"r": 16, "alpha": 3, "target_modules": ["q_proj", "v_proj"]}]
    for index, name in enumerate(METHODS):
        method = {"name": name, **({"sae": {"layer": 1}} if name.startswith("sae_") else {})}
        config = sequence_config(tmp_path, cache_dir, method, "x")
        config.lora = loras[index % 2]
        config.training.seed = index
        config.evaluation.max_new_tokens = 4
        ctx = TaskContext(config=config, task_index=0, task_names=["a"], model_path=tiny_model_path,
                          tokenizer=tokenizer, state_in=None, state_out=tmp_path / name)
        model = build_method(config).prepare_model(load_model(tiny_model_path), ctx).eval()
        assert torch.equal(option_scores(model, tokenizer, examples, options, config, CPU), want), name
        assert generated_predictions(model, tokenizer, examples, config, CPU, synced=False) == want_text, name


def test_digest_covers_scoring_inputs_not_training_ones(tmp_path, cache_dir):
    def digests(method=None, **changes):
        config = sequence_config(tmp_path, cache_dir, method or {"name": "seq_lora"}, changes.pop("run", "x"))
        for key, value in changes.items():
            section, field = key.split("__")
            setattr(getattr(config, section), field, value)
        entries = base_rows.entries(config, load_tasks(config), "model-sha")
        return None if entries is None else [entry["digest"] for entry in entries]

    reference = digests()
    assert len(set(reference)) == 2  # one per task
    # not part of it: method, lr, training seed, LoRA, epochs, run name, CPU share
    assert digests({"name": "ewc", "weight": 5.0}, training__lr=0.5, training__seed=3, run="y") == reference
    assert digests(lora__r=16, training__epochs=4, distributed__cpus_per_worker=2) == reference
    # part of it: what is scored and how
    for change in ({"training__max_prompt_len": 40}, {"training__max_answer_len": 3}, {"evaluation__batch_size": 4},
                   {"distributed__num_workers": 1}, {"distributed__threads_per_worker": 2}, {"model__dtype": "bfloat16"},
                   {"tasks__seed": 1}):
        assert digests(**change) != reference, change
    assert digests(distributed__num_workers=(1, 2)) is None  # elastic: the world size is unknown here


def test_stored_scores_are_found_by_the_next_run(tmp_path, cache_dir):
    config = sequence_config(tmp_path, cache_dir, {"name": "seq_lora"}, "x")
    tasks = load_tasks(config)
    entries = base_rows.entries(config, tasks, "model-sha")
    assert all(entry["known"] is None for entry in entries)
    metrics = {"base_row": [10.5, 20.25], "base_row_validation": [30.0, 40.125],
               "base_cache": [{"task": e["task"], "digest": e["digest"], "cached": False} for e in entries]}
    base_rows.store(config, entries, metrics)
    again = base_rows.entries(config, tasks, "model-sha")
    assert [e["known"] for e in again] == [{"validation": 30.0, "test": 10.5}, {"validation": 40.125, "test": 20.25}]
    config.tasks.sequence[1].max_test = 5
    assert [e["known"] is None for e in base_rows.entries(config, load_tasks(config), "model-sha")] == [False, True]


@pytest.mark.ray
@pytest.mark.timeout(2400)  # three Ray Train stages: ~5 min each on a loaded 2-core box
@pytest.mark.usefixtures("ray_cluster")
def test_second_run_on_the_root_reuses_the_base_row(tmp_path, cache_dir):
    """One-task sequences keep it to one stage per run; the per-task keying is test_stored_scores_... above."""
    from saefd_ray.train.sequence import run_sequence, task_dir

    def run(method: str, name: str, tweak=lambda config: None):
        config = sequence_config(tmp_path, cache_dir, {"name": method}, name, max_train=16)
        config.tasks.sequence = config.tasks.sequence[:1]
        tweak(config)
        results = run_sequence(config)
        row = json.loads((task_dir(config.run_dir, 0, "all" if method == "mtl" else "rule_a") / "row.json").read_text())
        return results, row

    first, first_row = run("seq_lora", "first")
    scored = first["base_row_cache"]["tasks"]
    assert [entry["cached"] for entry in scored] == [False]
    saved = json.loads((tmp_path / "runs" / "base_rows" / f"{scored[0]['digest']}.json").read_text())
    assert (saved["test"], saved["validation"]) == (first["r_matrix"][0][0], first["r_matrix_validation"][0][0])

    def other_training(config):
        config.training.lr, config.training.seed, config.lora.r = 1e-3, 7, 8

    # another method, lr, seed and LoRA rank on the same root: the base row comes from the cache
    second, second_row = run("mtl", "second", other_training)
    reused = second["base_row_cache"]["tasks"]
    assert [entry["cached"] for entry in reused] == [True] and reused[0]["digest"] == scored[0]["digest"]
    assert second["r_matrix"][0] == first["r_matrix"][0]
    assert second["r_matrix_validation"][0] == first["r_matrix_validation"][0]
    first_s, second_s = first_row["base_scoring_s"], second_row["base_scoring_s"]
    assert second_s < first_s / 4, (first_s, second_s)  # nothing was scored: no forward ran (0.02 s vs 0.5 s)

    def fewer_test_examples(config):
        config.tasks.sequence[0].max_test = 12

    # another max_test is other examples: scored again, under another digest
    third, _ = run("mtl", "third", fewer_test_examples)
    fresh = third["base_row_cache"]["tasks"]
    assert [entry["cached"] for entry in fresh] == [False] and fresh[0]["digest"] != scored[0]["digest"]
    assert len(list((tmp_path / "runs" / "base_rows").glob("*.json"))) == 2
