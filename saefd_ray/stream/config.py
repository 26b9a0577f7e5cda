"""The SAE training job's config: what to harvest (model, layers, data), what to train, and how to shard it.

Same conventions as `saefd_ray.config`: YAML, `--set key.sub=value` overrides applied to the raw mapping before
validation, unknown keys rejected, every failure one `ConfigError` line naming the key. The model block and the
task-registry block are the run config's own (`ModelConfig`, `TaskConfig`), so a task that trains in the CL
sequence harvests here with the same spelling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from pydantic import Field, field_validator, model_validator

from saefd_ray.config import (ModelConfig, Strict, TaskConfig, apply_overrides, origin, plain_run_name, read_yaml,
                             validate)
from saefd_ray.errors import ConfigError

SAE_ARCHITECTURES = ("standard", "gated", "jumprelu", "topk", "batchtopk")


class SourceConfig(Strict):
    """One source of instances. `file`: JSON / JSONL / parquet records with prompt/answer fields or a chat
    `messages` list; `task`: a task of the registry (synthetic, trace, cl_benchmark, json), its train split;
    `hf`: a Hugging Face dataset id (needs network access and the `datasets` package)."""

    kind: Literal["file", "task", "hf"]
    path: str | None = Field(None, description="file: the file (relative to data.data_root); hf: dataset id")
    task: TaskConfig | None = Field(None, description="task: the registry entry")
    split: str = Field("train", description="hf: split name")
    hf_config: str | None = Field(None, description="hf: dataset config name")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    messages_field: str = "messages"
    max_instances: int | None = Field(None, ge=1, description="seeded random subset of this source")

    @model_validator(mode="after")
    def _needs(self) -> "SourceConfig":
        if self.kind in ("file", "hf") and not self.path:
            raise ValueError(f"source kind {self.kind!r} needs 'path'")
        if self.kind == "task" and self.task is None:
            raise ValueError("source kind 'task' needs 'task'")
        if self.kind != "task" and self.task is not None:
            raise ValueError(f"source kind {self.kind!r} takes no 'task'")
        return self


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    data_root: str | None = Field(None, description="base folder for relative source paths")
    seed: int = 0
    max_len: int = Field(8192, ge=2, description="FAST: truncate each rendered instance at this many tokens")
    eval_instances: int = Field(32, ge=0, description="held-out instances (not trained on) for sae_report.json")
    window: int = Field(64, ge=1, description="instances per length-bucketing window (one actor call)")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per forward pass inside a window")
    max_padding: float = Field(0.1, ge=0, lt=1, description="padding share a forward batch may waste")
    harvest_actors: int = Field(1, ge=1, description="size of the Ray Data actor pool holding the model")
    cpus_per_actor: float = Field(1, gt=0)
    gpus_per_actor: float = Field(0, ge=0, description="> 0 on GPU clusters: the actors run the model on GPU")
    activation_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    cache: bool = Field(False, description="tee activation shards to cache_dir; later runs stream from them")
    cache_dir: str = "~/.cache/saefd_ray/activations"
    sink_norm_ratio: float | None = Field(None, gt=0, description="attention sinks (sae/sinks.py): tokens whose "
                                          "residual norm exceeds this × their sequence's median are kept out of "
                                          "SAE training and evaluation, and counted; None: keep every token")


class SaeArchConfig(Strict):
    architecture: Literal["standard", "gated", "jumprelu", "topk", "batchtopk"] = "gated"
    width: int | None = Field(None, ge=1, description="d_sae; default expansion × hidden size")
    expansion: int = Field(8, ge=1)
    k: int | None = Field(None, ge=1, description="topk / batchtopk: active latents per token")
    sparsity_coefficient: float | None = Field(None, ge=0, description="λ; None: the architecture's default")
    apply_b_dec_to_input: bool = Field(False, description="encode x − b_dec instead of x (SAELens's cfg key, written "
                                       "with the SAE and honoured on load); FAST trains with False")
    normalize_activations: Literal["none", "expected_average_only_in"] = Field(
        "none", description="SAELens's option: scale activations to mean norm √d_in (estimated on the first batch) "
        "so λ carries across models; folded into the saved weights (sae/normalize.py)")

    @model_validator(mode="after")
    def _k(self) -> "SaeArchConfig":
        if self.architecture in ("topk", "batchtopk") and self.k is None:
            raise ValueError(f"architecture {self.architecture!r} needs 'k'")
        if self.k is not None and self.width is not None and self.k > self.width:
            raise ValueError(f"k ({self.k}) must be <= width ({self.width}), the number of latents")
        return self


class SaeTrainingConfig(Strict):
    tokens: int = Field(1_000_000, ge=1, description="token budget (summed over workers)")
    batch_size: int = Field(4096, ge=1, description="tokens per optimizer step, summed over workers")
    buffer_tokens: int = Field(65536, ge=2, description="mixing buffer capacity per worker")
    lr: float = Field(7e-5, gt=0)
    lr_end: float = Field(7e-6, ge=0)
    lr_warmup_steps: int = Field(16_000, ge=0)
    lr_decay_steps: int = Field(64_000, ge=0)
    sparsity_warmup_steps: int = Field(10_000, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    dead_window_tokens: int = Field(10_000_000, ge=1)
    b_dec_init: Literal["geometric_median", "mean", "none"] = "geometric_median"
    seed: int = 0
    checkpoint_every_tokens: int = Field(0, ge=0, description="0: only at the end")
    log_every_steps: int = Field(20, ge=1)


class SaeDistributedConfig(Strict):
    num_workers: int = Field(1, ge=1)
    sharding: Literal["data", "latent"] = "data"
    cpus_per_worker: float = Field(1, gt=0)
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per worker (default: cpus)")
    use_gpu: bool = False
    ray_address: str | None = None


class SaeOutputConfig(Strict):
    root: str = "runs"
    run_name: str = "sae_demo"

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return plain_run_name(value)


class SaeTrainConfig(Strict):
    model: ModelConfig = ModelConfig()
    layers: list[int] = Field([1], min_length=1, description="residual stream after these decoder layers")
    data: DataConfig
    sae: SaeArchConfig = SaeArchConfig()
    training: SaeTrainingConfig = SaeTrainingConfig()
    distributed: SaeDistributedConfig = SaeDistributedConfig()
    output: SaeOutputConfig = SaeOutputConfig()

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        if any(layer < 0 for layer in layers):
            raise ValueError(f"layers must be >= 0, got {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"duplicate layer in {layers}")
        return sorted(layers)

    @model_validator(mode="after")
    def _consistent(self) -> "SaeTrainConfig":
        t, d = self.training, self.distributed
        if t.batch_size % d.num_workers:
            raise ValueError(f"training.batch_size ({t.batch_size}) must be divisible by "
                             f"distributed.num_workers ({d.num_workers})")
        if t.buffer_tokens < 2 * (t.batch_size // d.num_workers):
            raise ValueError(f"training.buffer_tokens ({t.buffer_tokens}) must be >= 2 × the per-worker batch "
                             f"({t.batch_size // d.num_workers})")
        if d.sharding == "latent" and self.sae.width is not None and self.sae.width % d.num_workers:
            raise ValueError(f"sae.width ({self.sae.width}) must be divisible by distributed.num_workers "
                             f"({d.num_workers}) for sharding 'latent'")
        if d.sharding == "latent" and self.sae.architecture == "batchtopk":
            raise ValueError("distributed.sharding 'latent' does not support batchtopk (its threshold is a "
                             "batch-wide top-k over all latents); use topk or data sharding")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.root).expanduser().resolve() / self.output.run_name

    def data_path(self, relative: str) -> Path:
        path = Path(relative).expanduser()
        if not path.is_absolute() and self.data.data_root:
            path = Path(self.data.data_root).expanduser() / path
        return path.resolve()


def validate_sae(raw: dict, source: str = "config") -> SaeTrainConfig:
    return validate(raw, source, SaeTrainConfig)


def load_sae_config(path: str | Path, overrides: list[str] | None = None) -> SaeTrainConfig:
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    where = origin(path, overrides or [])
    config = validate(raw, where, SaeTrainConfig)
    _check_paths(config, where)
    return config


def _check_paths(config: SaeTrainConfig, where: Callable[[str], str]) -> None:
    for index, src in enumerate(config.data.sources):
        if src.kind == "file":
            path, key = config.data_path(src.path), f"data.sources.{index}.path"
            if not path.is_file():
                raise ConfigError(f"{where(key)}: {path} not found")
            if path.suffix not in (".json", ".jsonl", ".parquet"):
                raise ConfigError(f"{where(key)}: {path.name}: expected .json, .jsonl or .parquet")
        elif src.kind == "task":
            for field in ("path", "train_file"):
                value, key = getattr(src.task, field), f"data.sources.{index}.task.{field}"
                if value and not config.data_path(value).exists():
                    raise ConfigError(f"{where(key)}: {config.data_path(value)} not found")
