"""Reading TensorBoard event files back, with TensorBoard's own reader (the report's figures, the tests).

`EventAccumulator` applies TensorBoard's restart rules: a writer opened with `purge_step` (a restarted worker group)
discards the earlier attempt's events from that step on, exactly as the dashboard shows them.
"""

from __future__ import annotations

import logging
from pathlib import Path


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...] sorted by step} of every scalar in the event files directly under `log_dir`;
    {} when the folder does not exist or holds no events."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir() or not any(log_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event, no sampling
    logger = logging.getLogger("tensorboard")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "out of order event.step ... purging" warning is our restart, not a fault
    try:
        acc.Reload()
    finally:
        logger.setLevel(level)
    out = {}
    for tag in acc.Tags().get("scalars", []):
        points = {e.step: e.value for e in acc.Scalars(tag)}  # a rewritten step keeps its latest value
        out[tag] = sorted(points.items())
    return out
