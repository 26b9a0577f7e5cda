"""The driver's console: third-party noise silenced at its source, and one live progress bar per stage.

Quiet (the default) means: Ray starts with `log_to_driver=False` (workers' and actors' stdout stays in the Ray
session's log files, /tmp/ray/session_latest/logs) and `logging_level=ERROR`; Ray Train / Tune / Data,
DeepSpeed and transformers log at WARNING or above; Ray Data and transformers draw no progress bars. Errors still reach the user:
a failed worker's exception is re-raised by `trainer.fit()` on the driver. `--verbose` leaves every library at its
own defaults and forwards all worker output, as before.

The verbosity travels to the driver-side helpers (and to a Tune trial's process) in the environment variable
SAEFD_VERBOSE, which `configure` sets.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

ENV = "SAEFD_VERBOSE"
QUIET_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "ray.serve", "deepspeed", "DeepSpeed", "transformers",
                 "torch.distributed", "filelock", "urllib3", "absl")  # absl: rouge_score's "Using default tokenizer."


def verbose() -> bool:
    return os.environ.get(ENV, "0") == "1"


def configure(verbose_mode: bool = False) -> None:
    """Set the console's verbosity for this process and every process it starts (jobs call it first thing)."""
    os.environ[ENV] = "1" if verbose_mode else "0"
    if not verbose_mode:
        quiet_libraries()


def quiet_libraries() -> None:
    """Log levels and warning filters of the libraries we drive (idempotent; also run inside Tune trials).

    The environment variables reach processes Ray starts on this node (a local cluster); the log levels hold in
    this process. The FutureWarnings filtered here are the ones our pinned versions raise about their own
    internals (e.g. torch's `torch.cuda.amp` deprecations inside DeepSpeed), which a user cannot act on.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars follow it
    from ray.data import DataContext  # first: importing ray.data sets up its loggers (console at INFO)

    DataContext.get_current().enable_progress_bars = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("deepspeed", "torch", "transformers", "peft", "ray"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def ray_init_options() -> dict[str, Any]:
    """Extra `ray.init` keyword arguments for the current verbosity."""
    if verbose():
        return {}
    # ERROR: Ray's start-up notices (dashboard, token-auth default) are logged as warnings a user cannot act on
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def _stats(fields: dict) -> str:
    parts = []
    if fields.get("loss") is not None:
        parts.append(f"loss {fields['loss']:.3f}")
    if fields.get("lambda") is not None:
        parts.append(f"λ {fields['lambda']:.2f}")
    if fields.get("share") is not None:
        parts.append(f"share {fields['share']:.2f}" + (f"/ρ {fields['rho']:g}" if fields.get("rho") else ""))
    if fields.get("l0") is not None:
        parts.append(f"L0 {fields['l0']:.1f}")
    if fields.get("dead") is not None:
        parts.append(f"dead {100 * fields['dead']:.1f}%")
    if fields.get("tokens_per_s") is not None:
        parts.append(f"{fields['tokens_per_s']:,.0f} tok/s")
    if fields.get("step_s") is not None:
        parts.append(f"{fields['step_s']:.2f} s/step")
    return "  ".join(parts)


class StageProgress:
    """Driver: one live bar for training (step / total, task loss, λ and share for sae_fd, step time, ETA) and one
    for scoring (tasks scored / total), fed from a `ProgressChannel` by a background thread.

    On a terminal the bars redraw in place. In a log file or a pipe (`ray job logs`, nohup) rich prints each bar only
    when the stage ends, which on a real model is half an hour of silence; there the stage's status is also printed
    as one plain line every HEARTBEAT_S seconds while it changes.
    `enabled=False` (verbose mode, Tune trials) makes every method a no-op and creates no actor.
    """

    HEARTBEAT_S = 60.0

    def __init__(self, label: str, enabled: bool = True, console: Console | None = None, unit: str = "steps"):
        self.label, self.enabled, self.unit = label, enabled, unit
        if console is None:  # a log file or pipe has no width: give a bar its whole line instead of rich's 80 columns
            console = Console()
            console = console if console.is_terminal else Console(width=200)
        self.console = console
        self.channel = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._began = time.monotonic()
        self._status = ""  # the latest status as a plain line (heartbeat)
        self._printed: tuple[float, str] = (self._began, "")  # when the last heartbeat line was printed, and what
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"), console=self.console, transient=False,
        )
        self.train_row = self.progress.add_task(self.label, total=None, unit=self.unit, stats="")
        self.score_rows: dict[str, int] = {}

    def __enter__(self) -> "StageProgress":
        if not self.enabled:
            return self
        from saefd_ray.observe.channel import ProgressChannel

        self.channel = ProgressChannel.remote()
        self.progress.start()
        self._thread = threading.Thread(target=self._poll, name="saefd-progress", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        import ray

        while not self._stop.wait(0.5):
            try:
                self.apply(ray.get(self.channel.drain.remote(), timeout=10))
                if not self.console.is_terminal and (line := self.heartbeat(time.monotonic())):
                    self.console.print(line, highlight=False, soft_wrap=True)
            except Exception:  # a progress bar must never break the run; the next poll retries
                continue

    def apply(self, records: list[dict]) -> None:
        for record in records:
            if record.get("kind") == "train":
                self.progress.update(self.train_row, completed=record["step"], total=record["total"],
                                     stats=_stats(record))
                self._status = f"{record['step']}/{record['total']} {self.unit}  {_stats(record)}".rstrip()
            elif record.get("kind") == "score":
                what = record.get("what", "test")
                if what not in self.score_rows:
                    self.score_rows[what] = self.progress.add_task(f"  scoring ({what})", total=record["total"],
                                                                   unit="tasks", stats="")
                self.progress.update(self.score_rows[what], completed=record["done"], total=record["total"])
                self._status = f"scoring {what}: {record['done']}/{record['total']} tasks"

    def heartbeat(self, now: float) -> str | None:
        """The status as one plain line `progress: <label> [<elapsed> s] <status>`, when HEARTBEAT_S seconds have
        passed since the last line and the status changed; else None. `now`: time.monotonic()."""
        last_at, last = self._printed
        if not self._status or self._status == last or now - last_at < self.HEARTBEAT_S:
            return None
        self._printed = (now, self._status)
        return f"progress: {self.label} [{now - self._began:.0f} s] {self._status}"

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        try:
            import ray

            self.apply(ray.get(self.channel.drain.remote(), timeout=10))
            ray.kill(self.channel)
        except Exception:
            pass
        self.progress.stop()
