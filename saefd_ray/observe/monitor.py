"""Rank 0's side of observation: TensorBoard scalars and progress records, for task training and SAE training.

Only rank 0 writes (every other rank gets an inactive monitor whose methods do nothing). Event files go under
`<run_dir>/tb/` (the absolute path comes from the driver), the folder `tensorboard --logdir` reads; like the SAE
checkpoints, that assumes the run folder is on storage the workers see (local runs, NFS; see docs/cluster.md).
The x axis of task training is the global optimizer step over the whole sequence (`step_offset` = steps of the
earlier tasks), so one chart shows every task with its boundaries. A restarted worker group opens its writer with
`purge_step` = the first step it redoes: TensorBoard then drops the events the lost attempt wrote from that step
on, so no curve doubles back.

Scalar tags (all per optimizer step unless noted):
    train/loss        task loss (mean over ranks)          train/lr, train/grad_norm, train/step_s
    method/<name>     the method's logged scalars (sae_fd: lambda, l_task, l_fd, fd_share; ewc: ewc; ...)
    method/rho        sae_fd's target share ρ (constant; drawn with fd_share)
    score/<task>      test score (0-100) of every task after each task (at the task's last step; base at step 0)
    sae/L<l>/<m>      SAE training: loss terms, mse, fvu, l0, dead_fraction, grad_norm; sae/tokens_per_s
"""

from __future__ import annotations

import math
import time
from pathlib import Path

TB_DIR = "tb"
PUSH_EVERY_S = 0.5


class Monitor:
    """TensorBoard writer + throttled progress pushes of one process; inert unless `active`."""

    def __init__(self, log_dir: str | Path | None, active: bool, channel=None, purge_step: int | None = None):
        self.active = active
        self.log_dir = log_dir
        self.channel = channel if active else None
        self.writer = None
        self._last_push = 0.0
        self._last_ref = None
        if purge_step is not None:
            self.open(purge_step)

    def open(self, purge_step: int | None = None) -> None:
        """Start the event file; `purge_step`: the first step this writer may rewrite (see module docstring)."""
        if self.active and self.log_dir is not None and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=10)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)

    def push(self, record: dict, force: bool = False) -> None:
        """Send a progress record to the driver, at most every PUSH_EVERY_S unless `force` (first/last step)."""
        if self.channel is None:
            return
        now = time.monotonic()
        if force or now - self._last_push >= PUSH_EVERY_S:
            self._last_push = now
            self._last_ref = self.channel.push.remote(record)  # fire-and-forget: training never waits for it

    def close(self) -> None:
        """Flush the events, and wait (briefly) until the driver's channel holds every record pushed: a worker
        that exits right after its last push could otherwise take the final progress state with it."""
        if self._last_ref is not None:
            import ray

            try:  # calls from one caller run in order: the last one done means all are
                ray.get(self._last_ref, timeout=10)
            except Exception:  # progress display only; never fail training over it
                pass
            self._last_ref = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TaskMonitor(Monitor):
    """One task of the sequence on rank 0: per-step scalars, scoring progress, scores after the task."""

    def __init__(self, observe: dict | None, config, rank: int, total_steps: int):
        """`observe`: from the driver: tb_dir (absolute), progress (a channel or None), step_offset (optimizer
        steps of the earlier tasks). The event file opens in `start`, once the resume position is known."""
        observe = observe or {}
        self.offset = int(observe.get("step_offset") or 0)
        self.total = total_steps
        self.rho = getattr(config.method, "rho", None) if config.method.name == "sae_fd" else None
        super().__init__(observe.get("tb_dir"), rank == 0, observe.get("progress"))

    def start(self, done_steps: int) -> None:
        """Steps 1..total land at offset+1..offset+total; purge only what this attempt rewrites."""
        self.open(purge_step=self.offset + done_steps + 1)

    def step(self, step: int, task_loss: float, logs: dict, lr: float | None, grad_norm, step_s: float) -> None:
        """`step`: 1-based optimizer step within the task; `task_loss`: mean over ranks; `logs`: the method's."""
        if not self.active:
            return
        values = {"train/loss": task_loss, "train/lr": lr, "train/grad_norm": _float(grad_norm), "train/step_s": step_s}
        values.update({f"method/{k}": v for k, v in logs.items() if isinstance(v, (int, float))})
        if self.rho is not None:
            values["method/rho"] = self.rho
        self.scalars(values, self.offset + step)
        self.push({"kind": "train", "step": step, "total": self.total, "loss": task_loss, "step_s": step_s,
                   "lambda": logs.get("lambda"), "share": logs.get("fd_share"), "rho": self.rho},
                  force=step in (1, self.total))

    def scoring(self, done: int, total: int, what: str = "test") -> None:
        self.push({"kind": "score", "done": done, "total": total, "what": what}, force=True)

    def scores(self, names: list[str], row: list[float], at_start: bool = False) -> None:
        step = self.offset if at_start else self.offset + max(self.total, 1)
        self.scalars({f"score/{name}": value for name, value in zip(names, row)}, step)
        if self.writer is not None:
            self.writer.flush()


def _float(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class SaeMonitor(Monitor):
    """SAE training on rank 0: every metric of every layer per step (x = optimizer step), tokens/s, progress."""

    def __init__(self, observe: dict | None, rank: int, total_steps: int, done_steps: int):
        observe = observe or {}
        self.total = total_steps
        super().__init__(observe.get("tb_dir"), rank == 0, observe.get("progress"), purge_step=done_steps + 1)

    def step(self, step: int, per_layer: dict[int, dict[str, float]], tokens_per_s: float, step_s: float) -> None:
        if not self.active:
            return
        values = {f"sae/L{layer}/{k}": v for layer, m in per_layer.items() for k, v in m.items()}
        values["sae/tokens_per_s"] = tokens_per_s
        self.scalars(values, step)
        first = per_layer[min(per_layer)]
        self.push({"kind": "train", "step": step, "total": self.total, "loss": first.get("loss"),
                   "l0": first.get("l0"), "dead": first.get("dead_fraction"), "tokens_per_s": tokens_per_s,
                   "step_s": step_s}, force=step in (1, self.total))
