"""Driver-side checks: build once, on the driver, what every Ray worker would build, and fail there in one line.

A mistake that only surfaces inside a Ray worker costs a cluster start, a worker traceback and (before the
driver-side retry rule in `train/failures.py`) a retry of a job that can never succeed. So before Ray starts, the
jobs call these checks, each of which raises a one-line `ConfigError` / `DataError` naming the key or file:

- `check_lora`: every `lora.target_modules` name matches at least one module of the model. The model is built
  from its config on the meta device (`accelerate.init_empty_weights`: no weights read, no memory) and wrapped by
  peft exactly as the workers wrap it; peft itself only refuses a list of which *no* name matches, so a typo in one
  of several names would otherwise train an adapter without it.
- `check_batches`: every stage has at least one full micro-batch per worker (the worker drops the remainder).
- `check_rendering`: one instance of every task goes through the tokenizer's chat template.
- `check_options`: the label options of a classification task stay distinct after tokenization and truncation at
  `training.max_answer_len` (otherwise they cannot be ranked).
"""

from __future__ import annotations

from saefd_ray.config import RunConfig
from saefd_ray.data.tasks import Task
from saefd_ray.errors import ConfigError, DataError


def check_run(config: RunConfig, tasks: list[Task], model_path: str, tokenizer, joint: bool) -> None:
    """Every check of a `run_sequence` run, in the order a worker would hit them."""
    check_batches(config, tasks, joint)
    check_rendering(tokenizer, tasks, config)
    check_options(tokenizer, tasks, config)
    check_lora(config, model_path)


# ------------------------------------------------------------------------------------------ LoRA


def module_names(model_path: str) -> tuple[list[str], object]:
    """(names of every module, the model) built from its config on the meta device (no weights loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: cannot read a model config from {model_path!r} "
                          f"({str(err).splitlines()[0]})") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    return [name for name, _ in model.named_modules()], model


def matches(name: str, target: str) -> bool:
    """peft's rule for a plain target name: the module's full name equals it or ends with `.<target>`."""
    return name == target or name.endswith(f".{target}")


def check_lora(config: RunConfig, model_path: str) -> None:
    """Each `lora.target_modules` entry matches >= 1 module, and peft wraps the meta model without complaint."""
    from peft import LoraConfig, get_peft_model

    names, model = module_names(model_path)
    targets = list(config.lora.target_modules)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
    for target in targets:
        if not any(matches(n, target) for n in names):
            raise ConfigError(f"lora.target_modules: {target!r} matches no module of {model_path} "
                              f"(module names: {', '.join(leaves)})")
    lora = config.lora
    try:
        get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=targets, task_type="CAUSAL_LM"))
    except (ValueError, TypeError) as err:  # e.g. a target that is a container (peft wraps Linear, Embedding, ...)
        raise ConfigError(f"lora.target_modules: {' '.join(str(err).split())}") from None


# ------------------------------------------------------------------------------------------ batches


def largest_world(config: RunConfig) -> int:
    workers = config.distributed.num_workers
    return workers if isinstance(workers, int) else workers[1]


def check_batches(config: RunConfig, tasks: list[Task], joint: bool) -> None:
    """Each rank gets `len(examples) // world` examples and drops what does not fill a micro-batch
    (`train/worker.shard_batches`), so a stage needs `batch_size * world` examples; elastic runs are checked at
    their largest worker count."""
    world, batch = largest_world(config), config.training.batch_size
    stages = [("all tasks", sum(len(t.train) for t in tasks))] if joint else [(t.name, len(t.train)) for t in tasks]
    for name, count in stages:
        if count // world < batch:
            raise ConfigError(f"training.batch_size: task {name!r} has {count} training examples, too few for "
                              f"micro-batches of {batch} on {world} workers (needs >= {batch * world}); lower "
                              f"training.batch_size or distributed.num_workers")


# ------------------------------------------------------------------------------------------ rendering


def check_rendering(tokenizer, tasks: list[Task], config: RunConfig) -> None:
    """Render the first train and test instance of every task as the workers will (chat template included)."""
    from saefd_ray.data.render import encode

    for task in tasks:
        for split, examples in (("train", task.train), ("test", task.test)):
            try:
                encode(tokenizer, examples[0], config.training.max_prompt_len, config.training.max_answer_len)
            except Exception as err:  # noqa: BLE001 - jinja2 TemplateError, tokenizer errors: all bad input
                raise DataError(f"task {task.name!r} {split} record 0: cannot be rendered with the tokenizer of "
                                f"{config.model.name_or_path} ({type(err).__name__}: {first_line(err)})") from None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------ options


def check_options(tokenizer, tasks: list[Task], config: RunConfig) -> None:
    """Label options are ranked by the log-likelihood of their answer tokens (`eval/scoring.option_scores`);
    two options with the same tokens after truncation at `training.max_answer_len` cannot be told apart."""
    from saefd_ray.data.render import answer_ids

    for task in tasks:
        if not task.options:
            continue
        seen: dict[tuple[int, ...], str] = {}
        for option in task.options:
            ids = tuple(answer_ids(tokenizer, option, config.training.max_answer_len))
            if ids in seen:
                raise ConfigError(f"training.max_answer_len: task {task.name!r} options {seen[ids]!r} and "
                                  f"{option!r} become the same {len(ids)} tokens at max_answer_len="
                                  f"{config.training.max_answer_len}; raise it")
            seen[ids] = option


# ------------------------------------------------------------------------------------------ SAE training job


def check_sae_run(config, instances: list[dict], tokenizer, d_in: int) -> None:
    """`jobs/train_sae.py`: the SAE each worker builds (k, width, latent slices), and the first record of every
    source through the chat template (`instances`: `InputPlan.first_instances()`; a later bad record is named by
    the Ray task that reads or renders it: `sources.read_shard`, `harvest.render_checked`)."""
    import json

    from saefd_ray.stream.harvest import render_checked
    from saefd_ray.stream.sharded import sae_config

    make = sae_config(config, d_in)
    for layer in config.layers:
        try:
            cfg = make(layer)
        except ValueError as err:
            raise ConfigError(f"sae: {err} (d_sae = width or expansion × hidden size {d_in})") from None
        world = config.distributed.num_workers
        if config.distributed.sharding == "latent" and cfg.d_sae % world:
            raise ConfigError(f"sae.width: {cfg.d_sae} latents are not divisible by distributed.num_workers "
                              f"({world}) for sharding 'latent'")
    first: dict[str, tuple[int, dict]] = {}  # the first record of every source (lowest record index)
    for instance in instances:
        label, index = instance["origin"].rsplit(" record ", 1)
        if label not in first or int(index) < first[label][0]:
            first[label] = (int(index), instance)
    for _, instance in first.values():
        render_checked(tokenizer, instance["messages"], config.data.max_len, instance["origin"])
