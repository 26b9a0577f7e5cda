"""Task loaders on the shared real data and on synthetic files, and instance rendering."""

import json
from pathlib import Path

import pytest

from saefd_ray.config import RunConfig, TaskConfig
from saefd_ray.data.render import IGNORE, collate, encode
from saefd_ray.data.synthetic import LABELS, group_of, load_synthetic
from saefd_ray.data.tasks import Example, load_task, subsample
from saefd_ray.errors import DataError


def run_config(tmp_path: Path, *tasks: dict, data_root=None) -> RunConfig:
    return RunConfig.model_validate({"tasks": {"data_root": str(data_root or tmp_path), "sequence": list(tasks)}})


def test_trace_loader_on_shared_data(shared_data):
    config = run_config(shared_data, {"name": "sq", "format": "trace", "path": "trace/ScienceQA", "max_test": 7},
                        data_root=shared_data)
    task = load_task(config.tasks.sequence[0], config)
    raw = json.loads((shared_data / "trace/ScienceQA/train.json").read_text())
    assert task.metric == "first_letter"
    assert len(task.train) == len(raw) and task.train[0] == Example(raw[0]["prompt"], raw[0]["answer"])
    assert len(task.test) == 7


def test_trace_metrics_by_task(shared_data):
    for folder, metric in [("Py150", "edit_sim"), ("20Minuten", "sari"), ("FOMC", "accuracy")]:
        config = run_config(shared_data, {"name": folder, "format": "trace", "path": f"trace/{folder}", "max_test": 3},
                            data_root=shared_data)
        task = load_task(config.tasks.sequence[0], config)
        assert task.metric == metric


def test_cl_benchmark_loader_renders_instruction_and_options(shared_data):
    config = run_config(shared_data, {"name": "ag", "format": "cl_benchmark", "path": "cl_benchmark/agnews",
                                      "max_train": 10}, data_root=shared_data)
    task = load_task(config.tasks.sequence[0], config)
    labels = json.loads((shared_data / "cl_benchmark/agnews/labels.json").read_text())
    assert task.options == labels and task.metric == "options"
    assert len(task.train) == 10
    first = task.train[0]
    assert first.prompt.startswith("What is the topic of the following paragraph? Choose one from the option.\n")
    assert f"Option: {', '.join(labels)}" in first.prompt and first.answer in labels


def test_subsample_is_seeded_and_stable():
    items = [Example(str(i), str(i)) for i in range(100)]
    a = subsample(items, 10, 0, "t")
    assert a == subsample(items, 10, 0, "t") and a != subsample(items, 10, 1, "t")
    assert [int(e.prompt) for e in a] == sorted(int(e.prompt) for e in a)


def test_generic_json_and_jsonl(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": "4"}\n')
    (folder / "test.jsonl").write_text('{"q": "3+3", "a": "6"}\n')
    (folder / "dev.jsonl").write_text('{"q": "4+4", "a": "8"}\n')
    config = run_config(tmp_path, {"name": "qa", "format": "json", "path": "qa", "prompt_field": "q",
                                   "answer_field": "a"})
    task = load_task(config.tasks.sequence[0], config)
    assert task.train == [Example("1+1", "2"), Example("2+2", "4")] and task.metric == "accuracy"
    assert task.validation == [Example("4+4", "8")] and task.validation_source == "dev.jsonl"


def _cl_folder(tmp_path: Path, records, labels=("yes", "no")) -> Path:
    folder = tmp_path / "cl" / "agnews"
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    (tmp_path / "cl" / "instruction_config.json").write_text(json.dumps({"TC": [{"instruction": "Topic?\n"}]}))
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(records if isinstance(records, str) else json.dumps(records))
    return folder


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"sentence": "x"}', "expected a JSON list of records, got dict"),
        ("[]", "no records"),
        ("[1, 2]", "record 0 is int, expected an object"),
        ('[{"sentence": "x"}]', "record 0 has no field 'label'"),
        ('[{"sentence": "x", "label": "maybe"}]', "label 'maybe' is not in"),
        ('[{"sentence": "x", "label": "yes"', "invalid JSON"),
    ],
)
def test_bad_data_files_name_file_and_problem(tmp_path, content, expected):
    _cl_folder(tmp_path, content)
    config = run_config(tmp_path, {"name": "t", "format": "cl_benchmark", "path": "cl/agnews"})
    with pytest.raises(DataError) as info:
        load_task(config.tasks.sequence[0], config)
    assert expected in str(info.value) and "train.json" in str(info.value)


def test_trace_record_missing_answer(tmp_path):
    folder = tmp_path / "T"
    folder.mkdir()
    (folder / "train.json").write_text('[{"prompt": "p"}]')
    (folder / "test.json").write_text('[{"prompt": "p", "answer": "a"}]')
    config = run_config(tmp_path, {"name": "T", "format": "trace", "path": "T"})
    with pytest.raises(DataError, match=r"train.json: record 0 has no field 'answer'"):
        load_task(config.tasks.sequence[0], config)


def test_unknown_generator():
    with pytest.raises(DataError, match="unknown generator 'rule_z'"):
        load_synthetic(TaskConfig(name="z", format="synthetic", generator="rule_z"))


def test_synthetic_rules_are_balanced_and_conflict():
    a, b = group_of("rule_a"), group_of("rule_b")
    assert sorted(a.values()).count("north") == len(a) // 4
    assert sum(a[w] != b[w] for w in a) > len(a) // 2  # the rules disagree on most words
    task = load_synthetic(TaskConfig(name="a", format="synthetic", generator="rule_a"))
    for example in task.train[:50]:
        words = example.prompt.split(": ")[1].split()
        votes = [a[w] for w in words]
        assert votes.count(example.answer) >= 3 and example.answer in LABELS


def test_encode_masks_the_prompt(tiny_model_path):
    from saefd_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    encoded = encode(tokenizer, Example("rule a: kalo", "north"), 64, 4)
    answer = encoded.labels[encoded.prompt_len:]
    assert all(label == IGNORE for label in encoded.labels[: encoded.prompt_len])
    assert answer[-1] == tokenizer.eos_token_id and tokenizer.decode(answer[:-1]) == "north"
    rendered = tokenizer.decode(encoded.input_ids[: encoded.prompt_len])
    assert "<|im_start|>user\nrule a: kalo<|im_end|>" in rendered and rendered.endswith("assistant\n")
    batch = collate([encoded, encode(tokenizer, Example("b", "south"), 64, 4)], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][0].sum()) == len(encoded.input_ids)


# ------------------------------------------------------------------------------------------ validation splits


def test_synthetic_validation_is_a_seeded_disjoint_carve_out(tmp_path):
    spec = {"name": "a", "format": "synthetic", "generator": "rule_a"}
    config = RunConfig.model_validate({"tasks": {"sequence": [spec], "validation": {"size": 24}}})
    task = load_task(config.tasks.sequence[0], config)
    full = load_synthetic(TaskConfig(**spec)).train
    assert len(task.validation) == 24 and task.validation_source == "carve-out of train"
    assert not set(task.validation) & set(task.train)  # disjoint by content, not only by position
    assert set(task.validation) | set(task.train) == set(full)  # nothing else lost
    again = load_task(config.tasks.sequence[0], config)
    assert again.validation == task.validation and again.train == task.train  # seeded
    capped = RunConfig.model_validate({"tasks": {"sequence": [{**spec, "max_train": 40}], "validation": {"size": 24}}})
    small = load_task(capped.tasks.sequence[0], capped)
    assert small.validation == task.validation and len(small.train) == 40  # max_train never moves validation
    other = RunConfig.model_validate({"tasks": {"sequence": [spec], "seed": 1, "validation": {"size": 24}}})
    assert load_task(other.tasks.sequence[0], other).validation != task.validation
    default = RunConfig.model_validate({"tasks": {"sequence": [spec]}})
    assert len(load_task(default.tasks.sequence[0], default).validation) == 32  # small by default


def test_carve_out_refuses_to_empty_train(tmp_path):
    folder = tmp_path / "T"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps([{"prompt": str(i), "answer": "a"} for i in range(4)]))
    (folder / "test.json").write_text('[{"prompt": "p", "answer": "a"}]')
    config = RunConfig.model_validate({"tasks": {"data_root": str(tmp_path), "validation": {"size": 4},
                                                 "sequence": [{"name": "T", "format": "trace", "path": "T"}]}})
    with pytest.raises(DataError, match=r"task 'T': 4 train examples leave none .*\(tasks.validation.size\)"):
        load_task(config.tasks.sequence[0], config)


def test_trace_validation_is_its_eval_json(shared_data):
    config = RunConfig.model_validate({"tasks": {"data_root": str(shared_data), "validation": {"size": 10},
                                                 "sequence": [{"name": "sq", "format": "trace",
                                                               "path": "trace/ScienceQA"}]}})
    task = load_task(config.tasks.sequence[0], config)
    raw = json.loads((shared_data / "trace/ScienceQA/eval.json").read_text())
    train = json.loads((shared_data / "trace/ScienceQA/train.json").read_text())
    assert task.validation_source == "eval.json" and len(task.validation) == 10
    assert set(task.validation) <= {Example(r["prompt"], r["answer"]) for r in raw}
    assert len(task.train) == len(train)  # nothing carved out of train when the dataset has its own split


def test_cl_benchmark_and_json_validation_files(tmp_path):
    folder = _cl_folder(tmp_path, [{"sentence": f"s{i}", "label": "yes"} for i in range(40)])
    (folder / "dev.json").write_text(json.dumps([{"sentence": "dev sentence", "label": "no"}]))
    config = run_config(tmp_path, {"name": "t", "format": "cl_benchmark", "path": "cl/agnews"})
    task = load_task(config.tasks.sequence[0], config)
    assert task.validation_source == "dev.json" and len(task.validation) == 1
    assert "dev sentence" in task.validation[0].prompt and task.validation[0].answer == "no"
    assert len(task.train) == 40
    qa = tmp_path / "qa"
    qa.mkdir()
    for split, n in (("train", 40), ("test", 2), ("valid", 3)):
        (qa / f"{split}.json").write_text(json.dumps([{"prompt": f"{split}{i}", "answer": "x"} for i in range(n)]))
    spec = {"name": "qa", "format": "json", "train_file": "qa/train.json", "test_file": "qa/test.json"}
    explicit = run_config(tmp_path, {**spec, "validation_file": "qa/valid.json"})
    task = load_task(explicit.tasks.sequence[0], explicit)
    assert [e.prompt for e in task.validation] == ["valid0", "valid1", "valid2"] and len(task.train) == 40
    carved = load_task(run_config(tmp_path, spec).tasks.sequence[0], run_config(tmp_path, spec))
    assert carved.validation_source == "carve-out of train" and len(carved.train) == 40 - 32


def test_split_with_only_empty_references_is_refused(tmp_path):
    """TRACE's Lima/test.json has an empty answer in every record: nothing to score, refused naming the file."""
    folder = tmp_path / "Lima"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps([{"prompt": f"p{i}", "answer": "a"} for i in range(40)]))
    (folder / "test.json").write_text(json.dumps([{"prompt": "p", "answer": ""}, {"prompt": "q", "answer": "\n"}]))
    config = run_config(tmp_path, {"name": "lima", "format": "trace", "path": "Lima"})
    with pytest.raises(DataError, match=f"{folder / 'test.json'}: every record's 'answer' is empty"):
        load_task(config.tasks.sequence[0], config)
    (folder / "test.json").write_text(json.dumps([{"prompt": "p", "answer": ""}, {"prompt": "q", "answer": "b"}]))
    assert [e.answer for e in load_task(config.tasks.sequence[0], config).test] == ["", "b"]  # one empty is kept
