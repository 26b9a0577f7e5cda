"""Continual-learning methods, selected by `method.name` in the run config."""

from __future__ import annotations

from saefd_ray.config import RunConfig
from saefd_ray.methods.base import Method, TaskContext
from saefd_ray.methods.ewc import Ewc
from saefd_ray.methods.joint import Mtl, PerTask
from saefd_ray.methods.l2 import L2
from saefd_ray.methods.lwf import Lwf
from saefd_ray.methods.o_lora import OLora
from saefd_ray.methods.replay import Replay
from saefd_ray.methods.sae_fd import SaeFd
from saefd_ray.methods.sae_reg import SaeReg

METHODS: dict[str, type[Method]] = {
    "seq_lora": Method,
    "per_task": PerTask,
    "mtl": Mtl,
    "ewc": Ewc,
    "l2": L2,
    "lwf": Lwf,
    "o_lora": OLora,
    "replay": Replay,
    "sae_fd": SaeFd,
    "sae_reg": SaeReg,
}


def build_method(config: RunConfig) -> Method:
    name = config.method.name
    if name not in METHODS:
        raise NotImplementedError(f"method {name!r} is not available yet (have: {', '.join(sorted(METHODS))})")
    return METHODS[name](config)


__all__ = ["METHODS", "Method", "TaskContext", "build_method"]
