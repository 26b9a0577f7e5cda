"""Continual-learning methods, selected by `method.name` in the run config."""

from __future__ import annotations

from saefd_ray.config import RunConfig
from saefd_ray.methods.base import Method, TaskContext

METHODS: dict[str, type[Method]] = {"seq_lora": Method}


def build_method(config: RunConfig) -> Method:
    name = config.method.name
    if name not in METHODS:
        raise NotImplementedError(f"method {name!r} is not available yet (have: {', '.join(sorted(METHODS))})")
    return METHODS[name](config)


__all__ = ["METHODS", "Method", "TaskContext", "build_method"]
