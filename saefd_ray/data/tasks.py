"""Tasks: what an instance is, and the loaders that turn files (or generators) into train/validation/test splits.

A task is a list of prompt/answer `Example`s per split plus the metric that scores it. Validation chooses (Tune's
objective and pruning, any selection), test only reports: the validation split is the dataset's own (TRACE
`eval.json`, CL-benchmark `dev.json`) when it has one, else a seeded carve-out of train, disjoint from it.
Classification tasks carry their label strings as `options`, so evaluation can rank the options' log-likelihood
instead of generating (fast on CPU, and immune to formatting noise). Loaders never see tokenizers: rendering is
`saefd_ray.data.render`'s job.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from saefd_ray.config import RunConfig, TaskConfig
from saefd_ray.errors import DataError


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass
class Task:
    name: str
    metric: str
    train: list[Example]
    test: list[Example]
    options: list[str] | None = None  # label strings of a classification task
    validation: list[Example] = field(default_factory=list, repr=False)  # filled by load_task if the loader has none
    validation_source: str = "carve-out of train"  # or the file it was read from

    def __post_init__(self) -> None:
        if not self.train:
            raise DataError(f"task {self.name!r}: the train split is empty")
        if not self.test:
            raise DataError(f"task {self.name!r}: the test split is empty")


# ------------------------------------------------------------------------------------------ file reading


def read_records(path: Path) -> list[dict]:
    """JSON list or JSONL, as a list of dicts; every failure names the file."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {number}: invalid JSON ({err.msg})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is {type(record).__name__}, expected an object")
    return records


def pairs(path: Path, prompt_field: str, answer_field: str) -> list[Example]:
    examples = []
    for index, record in enumerate(read_records(path)):
        for key in (prompt_field, answer_field):
            if key not in record:
                raise DataError(f"{path}: record {index} has no field {key!r}")
        examples.append(Example(str(record[prompt_field]), str(record[answer_field])))
    if not any(e.answer.strip() for e in examples):  # e.g. TRACE's Lima/test.json: nothing to train on or score
        raise DataError(f"{path}: every record's {answer_field!r} is empty; nothing to train on or score")
    return examples


def subsample(examples: list[Example], limit: int | None, seed: int, salt: str) -> list[Example]:
    """A seeded random subset that is stable across runs and independent of the other tasks."""
    if limit is None or limit >= len(examples):
        return examples
    rng = random.Random(f"{seed}:{salt}")
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), limit))]


# ------------------------------------------------------------------------------------------ loaders

TRACE_METRICS = {"ScienceQA": "first_letter", "MeetingBank": "rouge_l", "Py150": "edit_sim", "20Minuten": "sari"}


def load_trace(spec: TaskConfig, root: Path) -> Task:
    """TRACE layout: a folder with train.json / eval.json / test.json of {prompt, answer} records."""
    metric = spec.metric or TRACE_METRICS.get(root.name, "accuracy")
    train = pairs(root / "train.json", spec.prompt_field, spec.answer_field)
    test = pairs(root / "test.json", spec.prompt_field, spec.answer_field)
    return _with_validation(Task(spec.name, metric, train, test), root / "eval.json",
                            lambda path: pairs(path, spec.prompt_field, spec.answer_field))


def load_cl_benchmark(spec: TaskConfig, root: Path) -> Task:
    """O-LoRA's CL benchmark: {sentence, label} + labels.json + the family instruction of the parent folder."""
    labels_path = root / "labels.json"
    labels = read_records_plain(labels_path)
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{labels_path}: expected a JSON list of label strings")
    instruction = _family_instruction(root.parent / "instruction_config.json", spec.family or _guess_family(root))
    option_text = ", ".join(labels)

    def load(path: Path) -> list[Example]:
        examples = []
        for index, record in enumerate(read_records(path)):
            for key in ("sentence", "label"):
                if key not in record:
                    raise DataError(f"{path}: record {index} has no field {key!r}")
            if record["label"] not in labels:
                raise DataError(f"{path}: record {index} label {record['label']!r} is not in {labels_path}")
            prompt = f"{instruction}Option: {option_text}\n{record['sentence'].strip()}\nAnswer:"
            examples.append(Example(prompt, record["label"]))
        return examples

    task = Task(spec.name, spec.metric or "options", load(root / "train.json"), load(root / "test.json"), labels)
    return _with_validation(task, root / "dev.json", load)


def read_records_plain(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None


def _guess_family(root: Path) -> str:
    """The O-LoRA families of the four standard tasks; other folders must name their family."""
    families = {"dbpedia": "TC", "agnews": "TC", "yahoo": "TC", "amazon": "SC", "yelp": "SC"}
    if root.name not in families:
        raise DataError(f"{root}: unknown cl_benchmark task; set 'family' (e.g. TC, SC, NLI)")
    return families[root.name]


def _family_instruction(path: Path, family: str) -> str:
    config = read_records_plain(path)
    entries = config.get(family) if isinstance(config, dict) else None
    if not entries:
        raise DataError(f"{path}: no instruction for family {family!r}")
    return entries[0]["instruction"]


def load_json(spec: TaskConfig, root: Path | None, resolve: Callable[[str], Path]) -> Task:
    """Generic JSON/JSONL with configurable field names: a folder with train/test files, or explicit files."""
    if spec.train_file and spec.test_file:
        train_path, test_path = resolve(spec.train_file), resolve(spec.test_file)
    else:
        assert root is not None
        suffix = ".jsonl" if (root / "train.jsonl").exists() else ".json"
        train_path, test_path = root / f"train{suffix}", root / f"test{suffix}"
    train = pairs(train_path, spec.prompt_field, spec.answer_field)
    test = pairs(test_path, spec.prompt_field, spec.answer_field)
    task = Task(spec.name, spec.metric or "accuracy", train, test)
    if spec.validation_file:
        validation_path = resolve(spec.validation_file)
    else:
        folder = train_path.parent
        found = [folder / f"{stem}{train_path.suffix}" for stem in ("dev", "eval", "validation")]
        validation_path = next((path for path in found if path.is_file()), found[0])
    return _with_validation(task, validation_path, lambda path: pairs(path, spec.prompt_field, spec.answer_field))


def _with_validation(task: Task, path: Path, read: Callable[[Path], list[Example]]) -> Task:
    """Attach the dataset's own validation split when its file exists (else load_task carves one out of train)."""
    if path.is_file():
        task.validation, task.validation_source = read(path), path.name
    return task


def carve_out(examples: list[Example], size: int, seed: int, salt: str) -> tuple[list[Example], list[Example]]:
    """(train, validation): `size` seeded examples moved out of train; train keeps no copy of any of them.

    Removing equal copies too keeps the split disjoint by content, not only by position, so a duplicated record
    cannot sit on both sides.
    """
    if size >= len(examples):
        raise DataError(f"task {salt!r}: {len(examples)} train examples leave none for training after carving out "
                        f"a validation split of {size} (tasks.validation.size)")
    validation = subsample(examples, size, seed, f"{salt}:validation")
    held = set(validation)
    train = [example for example in examples if example not in held]
    if not train:
        raise DataError(f"task {salt!r}: every train example is a copy of a validation one (tasks.validation.size)")
    return train, validation


def load_task(spec: TaskConfig, config: RunConfig) -> Task:
    """Build one task of the sequence, subsampled with the tasks' seed."""
    from saefd_ray.data.synthetic import load_synthetic

    root = config.data_path(spec.path) if spec.path else None
    if spec.format == "synthetic":
        task = load_synthetic(spec)
    elif spec.format == "trace":
        task = load_trace(spec, root)
    elif spec.format == "cl_benchmark":
        task = load_cl_benchmark(spec, root)
    else:
        task = load_json(spec, root, config.data_path)
    seed, size = config.tasks.seed, config.tasks.validation.size
    if task.validation:
        task.validation = subsample(task.validation, size, seed, f"{spec.name}:validation")
    else:  # carved out before max_train, so the validation split does not depend on it
        task.train, task.validation = carve_out(task.train, size, seed, spec.name)
    task.train = subsample(task.train, spec.max_train, seed, f"{spec.name}:train")
    task.test = subsample(task.test, spec.max_test, seed, f"{spec.name}:test")
    return task


def load_tasks(config: RunConfig) -> list[Task]:
    return [load_task(spec, config) for spec in config.tasks.sequence]
