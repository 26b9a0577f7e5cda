"""The one typed schema of a run, validated once at the edge.

A run config is YAML, loaded with `load_config(path, overrides)`; `--set key.sub=value` overrides are applied
to the raw mapping before validation, so they are checked exactly like the file. Every failure becomes a
one-line `ConfigError` naming the key (or file) and what was expected. Nothing downstream re-validates.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saefd_ray.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Strict):
    """An offline Llama-architecture model built with random init and a locally trained BPE tokenizer."""

    vocab_size: int = Field(2048, ge=256)
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(344, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(1024, ge=64)
    embedding_std: float = Field(0.1, gt=0, description="init std of the (tied) embeddings; larger than HF's "
                                 "0.02 so that a random unembedding gives logits LoRA can move")
    pretrain_epochs: int = Field(4, ge=0, description="epochs of full pre-training on held-out synthetic rules")
    seed: int = 0


class ModelConfig(Strict):
    name_or_path: str = Field("tiny", description='HF hub id, local folder, a .gguf file, "tiny" (the offline '
                              'model) or a named real model ("smollm2-135m-instruct", see models/registry.py)')
    tiny: TinyModelConfig = TinyModelConfig()
    cache_dir: str = Field("~/.cache/saefd_ray", description="where the tiny model and other builds are cached")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    require_chat_template: bool = False


class LoraConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      min_length=1, description="module names LoRA wraps (each must match one)")


Metric = Literal["accuracy", "first_letter", "options", "rouge_l", "edit_sim", "sari"]


class TaskConfig(Strict):
    """One task of the sequence. `format` picks the loader; fields not used by a format must stay unset."""

    name: str = Field(min_length=1)
    format: Literal["synthetic", "trace", "cl_benchmark", "json"]
    path: str | None = Field(None, description="folder (trace, cl_benchmark) or file (json); relative to data_root")
    generator: str | None = Field(None, description="synthetic: name of the built-in generator")
    family: str | None = Field(None, description="cl_benchmark: instruction family in instruction_config.json")
    metric: Metric | None = Field(None, description="default: by format (options for classification)")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    train_file: str | None = Field(None, description="json format: train file (path is the folder)")
    test_file: str | None = None
    validation_file: str | None = Field(None, description="json format: validation file (default: a dev / eval / "
                                        "validation file next to train, else a carve-out of train)")
    max_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> "TaskConfig":
        if self.format == "synthetic" and not self.generator:
            raise ValueError(f"task {self.name!r}: format 'synthetic' needs 'generator'")
        if self.format in ("trace", "cl_benchmark") and not self.path:
            raise ValueError(f"task {self.name!r}: format {self.format!r} needs 'path'")
        if self.format == "json" and not (self.path or (self.train_file and self.test_file)):
            raise ValueError(f"task {self.name!r}: format 'json' needs 'path' or 'train_file' and 'test_file'")
        return self


class ValidationConfig(Strict):
    """The split that chooses (Tune's objective, pruning, best.yaml); test only reports."""

    size: int = Field(32, ge=1, description="validation instances per task: the dataset's own split (TRACE "
                      "eval.json, CL-benchmark dev.json) subsampled to this, else a seeded carve-out of train, "
                      "disjoint from it")


class TasksConfig(Strict):
    data_root: str | None = Field(None, description="base folder for relative task paths")
    seed: int = 0
    validation: ValidationConfig = ValidationConfig()
    sequence: list[TaskConfig] = Field(min_length=1)
    orders: dict[str, list[str]] = Field(default_factory=dict, description="named task orders (e.g. O-LoRA's 1-3)")
    order: str | None = Field(None, description="which of `orders` to train in; None: the sequence as written")

    @field_validator("order", mode="before")
    @classmethod
    def _order_name(cls, value):
        return str(value) if isinstance(value, int) else value  # `--set tasks.order=2` parses as an int

    @field_validator("orders", mode="before")
    @classmethod
    def _order_keys(cls, value):
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _reorder(self) -> "TasksConfig":
        if self.order is None:
            return self
        if self.order not in self.orders:
            named = f"one of tasks.orders: {', '.join(self.orders)}" if self.orders else "named: tasks.orders is empty"
            raise ValueError(f"order {self.order!r} is not {named} (a named order lists the task names in turn)")
        by_name = {task.name: task for task in self.sequence}
        wanted = self.orders[self.order]
        if sorted(wanted) != sorted(by_name):
            raise ValueError(f"order {self.order!r} must list exactly the sequence's tasks {sorted(by_name)}")
        object.__setattr__(self, "sequence", [by_name[name] for name in wanted])
        return self

    @field_validator("sequence")
    @classmethod
    def _unique(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        seen: set[str] = set()
        for task in tasks:
            if task.name in seen:
                raise ValueError(f"duplicate task name {task.name!r} in the sequence")
            seen.add(task.name)
        return tasks


class TrainingConfig(Strict):
    epochs: int = Field(1, ge=1)
    epochs_per_task: dict[str, int] = Field(default_factory=dict, description="overrides epochs per task name")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(8, ge=1, description="micro-batch per worker")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    max_prompt_len: int = Field(256, ge=8)
    max_answer_len: int = Field(64, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="steps between in-task checkpoints (0: end of task only)")
    on_nonfinite: Literal["stop", "skip"] = "stop"


class DistributedConfig(Strict):
    num_workers: int | tuple[int, int] = Field(2, description="N, or [min, max] for elastic training")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads in each worker. Part of the "
                                    "numerics (CPU reductions split by thread), so the config fixes it, not "
                                    "OMP_NUM_THREADS or cpus_per_worker: the same seed gives the same R matrix")
    zero_stage: Literal[2, 3] = 2
    zero3_persistence_threshold: int = Field(100_000, ge=0, description="ZeRO-3: parameters of at most this many "
                                             "elements are kept whole between forwards (DeepSpeed's "
                                             "stage3_param_persistence_threshold, its default); larger ones are "
                                             "partitioned across workers")
    max_failures: int = Field(1, ge=0)
    ray_address: str | None = Field(None, description=(
        "None: RAY_ADDRESS if set, else Ray's own rule (the machine's `ray start` cluster if one runs, else a new "
        "local Ray); 'local': always a new local Ray"))

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        lo, hi = (value, value) if isinstance(value, int) else value
        if lo < 1 or hi < lo:
            raise ValueError(f"num_workers must be >= 1 (or [min, max] with 1 <= min <= max), got {value}")
        return value


class EvaluationConfig(Strict):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(32, ge=1)


class OutputConfig(Strict):
    root: str = "runs"
    run_name: str = "demo"

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return plain_run_name(value)


class MethodBase(Strict):
    pass


class SeqLora(MethodBase):
    name: Literal["seq_lora"] = "seq_lora"


class PerTask(MethodBase):
    name: Literal["per_task"] = "per_task"


class Mtl(MethodBase):
    name: Literal["mtl"] = "mtl"
    epochs: int | None = Field(None, ge=1, description="epochs over the union of all tasks' data; None: the largest "
                               "of the tasks' epochs (training.epochs_per_task, else training.epochs), so every task "
                               "is seen at least as often as in the sequence")


class Ewc(MethodBase):
    name: Literal["ewc"] = "ewc"
    weight: float = Field(1000.0, ge=0, description="λ in 0.5·λ·Σ F_i (θ_i − θ*_i)²")
    fisher_batches: int = Field(16, ge=1)


class L2(MethodBase):
    name: Literal["l2"] = "l2"
    weight: float = Field(1.0, ge=0)


class Lwf(MethodBase):
    name: Literal["lwf"] = "lwf"
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)


class OLora(MethodBase):
    name: Literal["o_lora"] = "o_lora"
    lambda_orth: float = Field(0.5, ge=0)
    lambda_l2: float = Field(0.0, ge=0, description="λ2 · Σ ‖θ‖₂ over the new LoRA's tensors (plain norms, as "
                             "O-LoRA's code)")


class Replay(MethodBase):
    name: Literal["replay"] = "replay"
    fraction: float = Field(0.2, gt=0, le=1, description="share of each batch drawn from earlier tasks")
    buffer_per_task: int = Field(64, ge=1)


class SaeSource(Strict):
    path: str | None = Field(None, description="SAELens or sparsify folder; None: train one with jobs/train_sae.py")
    layer: int = Field(1, ge=0)


class SaeFd(MethodBase):
    name: Literal["sae_fd"] = "sae_fd"
    sae: SaeSource = SaeSource()
    rho: float = Field(0.15, description="contribution ratio of λ·L_FD in the total loss")
    ema_alpha: float = Field(0.05, gt=0, le=1)
    lambda_init: float = Field(1.0, gt=0)
    lambda_clip: tuple[float, float] = (0.2, 10.0)
    beta: float = Field(1.0, ge=0, description="weight of the magnitude term")
    eps: float = Field(1e-6, gt=0, description="tokens with code norm below eps skip the cosine term")
    anchor_size: int = Field(32, description="anchor instances stored per finished task")
    anchor_selection: Literal["random", "diverse"] = "random"
    anchor_batch: int = Field(2, ge=1, description="anchor instances per training step (sampled from all earlier "
                              "tasks' anchors; its forward stops at the SAE layer, so its cost is ~anchor_batch/"
                              "batch_size · (layer+1)/num_layers of a training step)")

    @field_validator("rho")
    @classmethod
    def _rho(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"rho must be in (0, 1), got {value}")
        return value

    @field_validator("lambda_clip")
    @classmethod
    def _clip(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"lambda_clip must be [low, high] with 0 < low <= high, got {list(value)}")
        return value

    @field_validator("anchor_size")
    @classmethod
    def _anchor_size(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"anchor_size must be > 0, got {value}")
        return value


class SaeReg(MethodBase):
    name: Literal["sae_reg"] = "sae_reg"
    sae: SaeSource | list[SaeSource] = Field(SaeSource(), description="one SAE, or a list: one per layer")
    knn_k: int = Field(8, ge=0, description="mask spread to the k nearest features by decoder cosine (0: none)")
    stability_budget: float = Field(0.05, ge=0, description="relative drift protected features may have for free")
    plasticity_threshold: float = Field(0.05, ge=0, description="relative drift task features should reach")
    weight_protect: float = Field(1.0, ge=0)
    weight_guide: float = Field(0.1, ge=0)
    high_mask_quantile: float = Field(0.9, gt=0, lt=1, description="the top 1 − q share of features by mask rank "
                                      "(those with mask > 0) are the task's, guided")
    mask_examples: int = Field(256, ge=1, description="task instances the mask is computed from")

    @field_validator("sae")
    @classmethod
    def _layers(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("sae: give at least one SAE")
            layers = [s.layer for s in value]
            if len(set(layers)) != len(layers):
                raise ValueError(f"sae: one SAE per layer, got layers {layers}")
        return value


MethodConfig = Annotated[
    Union[SeqLora, PerTask, Mtl, Ewc, L2, Lwf, OLora, Replay, SaeFd, SaeReg], Field(discriminator="name")
]


# Methods that touch the LoRA tensors outside DeepSpeed's module forward (tried at stage 3: ewc fails with the
# adapter partitioned even below the persistence threshold; the others do the same kind of access).
ZERO3_REFUSED = {
    "ewc": "reads the LoRA weights outside the model's forward (Fisher penalty)",
    "l2": "reads the LoRA weights outside the model's forward (L2 penalty)",
    "o_lora": "reads the LoRA A matrices outside the model's forward (orthogonality penalty)",
    "lwf": "swaps the LoRA weights in place for its teacher pass",
}


class RunConfig(Strict):
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    tasks: TasksConfig
    training: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    method: MethodConfig = SeqLora()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _zero3(self) -> "RunConfig":
        if self.distributed.zero_stage == 3 and self.method.name in ZERO3_REFUSED:
            raise ValueError(f"distributed.zero_stage: 3 does not work with method {self.method.name}: it "
                             f"{ZERO3_REFUSED[self.method.name]}, which ZeRO-3 leaves partitioned there; use 2")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.root).expanduser().resolve() / self.output.run_name

    def data_path(self, relative: str) -> Path:
        """Resolve a task path against tasks.data_root (absolute paths pass through)."""
        path = Path(relative).expanduser()
        if not path.is_absolute() and self.tasks.data_root:
            path = Path(self.tasks.data_root).expanduser() / path
        return path.resolve()


def plain_run_name(value: str) -> str:
    """A run name is one folder under output.root: never a path that leaves it."""
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise ValueError(f"run_name must be a plain folder name (no '/', not '.' or '..'), got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML, so `3`, `true`, `[1,2]` get their types)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
                continue
            if isinstance(node, list) and key.isdigit():
                raise ConfigError(f"--set {text!r}: {'.'.join(keys[:depth])} has {len(node)} items; no index {key}")
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(keys[:depth])} is not a mapping")
            node = node.setdefault(key, {})
        last = keys[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {text!r}: {'.'.join(keys[:-1])} is not a mapping")
    return raw


def read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"{path}: a folder; expected a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: expected a UTF-8 text file (YAML)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(err, 'problem', err)})") from None
    if raw is None:
        raise ConfigError(f"{path}: empty; expected a YAML mapping (configs/ has examples)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def origin(path: str | Path, overrides: list[str], flags: list[str] | None = None) -> Callable[[str], str]:
    """`where(loc)`: the error prefix for config key `loc` ("training.lr") naming who set it — `--set training.lr`
    for the last override of it (`--set method: method.sae.path` for one of a mapping above it), else
    `<config file>: training.lr` — so an error names what the user has to change. `flags[i]` names where override
    i came from when it is not `--set` (`--tune-set`, a sweep file's `base.set`)."""
    keys = [".".join(parse_override(text)[0]) for text in overrides]
    named = list(zip(flags or ["--set"] * len(keys), keys))

    def where(loc: str) -> str:
        for flag, key in reversed(named):
            if loc and (loc == key or loc.startswith(key + ".")):
                return f"{flag} {key}" + (f": {loc}" if loc != key else "")
        for flag, key in reversed(named):  # the error sits on a mapping the override wrote into (method.name=x)
            if loc and key.startswith(loc + "."):
                return f"{flag} {key}: {loc}"
        return f"{path}: {loc}" if loc else str(path)

    return where


def validate(raw: dict, source: str | Callable[[str], str] = "config", schema: type[BaseModel] | None = None):
    """Validate `raw` against `schema` (default: RunConfig); the first problem becomes a one-line ConfigError named
    after `source` (a label, or `origin(...)`: the file or the --set that gave the bad key)."""
    try:
        return (schema or RunConfig).model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "missing required key"
        elif "input" in first and first["type"] not in ("value_error",):
            message = f"{message} (got {first['input']!r})"
        if not loc and callable(source):  # a cross-key check: its message leads with the key to change
            raise located(ConfigError(message), source, schema or RunConfig) from None
        prefix = source(loc) if callable(source) else f"{source}: {loc}" if loc else source
        raise ConfigError(f"{prefix}: {message}") from None


def located(err: ConfigError, where: Callable[[str], str], schema: type[BaseModel]) -> ConfigError:
    """`err`, whose message leads with the bare config key it is about ("model.name_or_path: cannot load ..."), with
    that key named as `where` names it: the file or the --set that gave it. Other errors are returned as they are."""
    key, sep, rest = str(err).partition(": ")
    if sep and " " not in key and key.split(".")[0] in schema.model_fields:
        return type(err)(f"{where(key)}: {rest}")
    return err


@contextmanager
def errors_located(path: str | Path | None, overrides: list[str], schema: type[BaseModel] | None = None):
    """Around the driver's work after `load_config`: a check that needed the model or the data (a tokenizer, LoRA
    target modules, an SAE's layer) names the file or the --set that gave its key, as load-time errors do."""
    try:
        yield
    except ConfigError as err:
        raise located(err, origin(path or DEFAULT_CONFIG, overrides), schema or RunConfig) from None


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the discriminator value (e.g. 'sae_fd') into error locations; hide it from users."""
    return part in {"seq_lora", "per_task", "mtl", "ewc", "l2", "lwf", "o_lora", "replay", "sae_fd", "sae_reg"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                flags: list[str] | None = None) -> RunConfig:
    """The run config: `path` (default configs/demo.yaml) with `overrides` (`key=value`, from `flags`, default
    --set) applied, validated once; every problem is one ConfigError naming the file or the override."""
    path = Path(path) if path else DEFAULT_CONFIG
    raw = apply_overrides(read_yaml(path), overrides or [])
    where = origin(path, overrides or [], flags)
    config = validate(raw, source=where)
    _check_paths(config, where)
    return config


def _check_paths(config: RunConfig, where: Callable[[str], str]) -> None:
    """Missing data files are config errors: reject them before any Ray worker starts."""
    for index, task in enumerate(config.tasks.sequence):
        for field in ("path", "train_file", "test_file", "validation_file"):
            value = getattr(task, field)
            key = f"tasks.sequence.{index}.{field}"
            if value and not config.data_path(value).exists():
                raise ConfigError(f"{where(key)}: {config.data_path(value)} not found")
    sae = getattr(config.method, "sae", None)  # sae_fd, sae_reg: a missing SAE folder, before any import or worker
    for index, src in enumerate(sae if isinstance(sae, list) else [sae] if sae is not None else []):
        if src.path and not Path(src.path).expanduser().is_dir():
            key = f"method.sae.{index}.path" if isinstance(sae, list) else "method.sae.path"
            raise ConfigError(f"{where(key)}: {Path(src.path).expanduser()} not found")
        if src.path:  # absolute: Ray Train workers run in their own directory, where a relative path means nothing
            src.path = str(Path(src.path).expanduser().resolve())
    name = config.model.name_or_path
    local = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or (  # "runs/my_model" with a runs/ here: a typo'd folder,
        "/" in name and Path(name.split("/")[0]).is_dir())  # not a hub id to ask the network about for a minute
    if not looks_local:  # "tiny", a named model, a hub id
        return
    if not local.exists():
        raise ConfigError(f"{where('model.name_or_path')}: {name} not found")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"{where('model.name_or_path')}: {name}: no config.json (expected a Hugging Face model "
                          "folder, a .gguf file, a hub id, 'tiny' or a named model)")
    if not name.startswith("/"):  # absolute: the same for a folder given relative to here
        config.model.name_or_path = str(local.resolve())
