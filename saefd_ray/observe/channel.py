"""Progress records from a Ray Train worker (rank 0) to the driver's console.

With `log_to_driver=False` nothing a worker prints reaches the driver, and Ray Train V2 hands the driver no
intermediate `ray.train.report` metrics while `fit()` runs. A zero-CPU actor does: rank 0 pushes small dicts
fire-and-forget (`push.remote`, never waited on, so a slow driver never slows training) and a driver thread
drains them a few times a second. It works unchanged on a multi-node cluster (no shared file to tail).
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressChannel:
    """A list of records; `drain()` returns and forgets everything pushed since the last drain."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def push(self, record: dict) -> None:
        self.records.append(record)

    def drain(self) -> list[dict]:
        out, self.records = self.records, []
        return out
