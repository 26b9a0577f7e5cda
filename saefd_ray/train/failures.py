"""Which Ray Train failures are retried: lost workers only, never a deterministic error.

Ray Train V2's failure policy (`ray/train/v2/_internal/execution/failure_handling/default.py`, Ray 2.60) charges
*every* `WorkerGroupError` to `FailureConfig.max_failures`, whatever the worker raised, and offers no public hook
to tell a lost worker from a bad config. A bad config or a bad record fails the same way on every attempt, so
retrying it only repeats the traceback. So the trainer runs with `max_failures=0` and the driver decides here:

- a `UserError` raised in any worker is unwrapped and raised on the driver (one `error:` line, exit 2);
- a failure in which some worker *died* (its actor or node was lost: OOM kill, preemption, SIGKILL) is retried,
  up to `max_failures` times, by a new `fit()` of a trainer with the same run name: Ray Train V2 restores that run's
  checkpoint manager from storage, so `ray.train.get_checkpoint()` hands the new workers the latest mid-task
  checkpoint (as the built-in retry would). As in Ray's own preemption rule, one dead worker is enough: the
  survivors of a lost rank fail with collateral errors (collective aborted, connection reset);
- anything else (an exception in the training code) is raised at once, unretried.
"""

from __future__ import annotations

from typing import Callable

from saefd_ray.errors import UserError


def causes(err: BaseException) -> list[BaseException]:
    """`err`, every worker failure of a Ray Train error, and their causes / contexts (each once)."""
    stack, seen, out = [err], set(), []
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        out.append(current)
        stack += list(getattr(current, "worker_failures", {}).values())
        # Ray Train V2 reports a dead worker as WorkerHealthCheckFailedError(health_check_failure=ActorDiedError)
        stack += [getattr(current, "cause", None), getattr(current, "health_check_failure", None),
                  current.__cause__, current.__context__]
    return out


def user_error_inside(err: BaseException) -> UserError | None:
    """The first UserError among a Ray Train failure's worker errors and their causes."""
    return next((e for e in causes(err) if isinstance(e, UserError)), None)


def lost_worker(err: BaseException) -> bool:
    """True if some worker process or node died (not: raised an exception while alive)."""
    from ray.exceptions import ActorDiedError, NodeDiedError, OutOfMemoryError, RayActorError, WorkerCrashedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckTimeoutError  # a hung or unreachable worker

    lost = (RayActorError, ActorDiedError, NodeDiedError, OutOfMemoryError, WorkerCrashedError,
            WorkerHealthCheckTimeoutError)
    return any(isinstance(e, lost) for e in causes(err))


def fit_with_retries(make_trainer: Callable[[], object], max_failures: int, what: str):
    """`make_trainer().fit()`, retried (a fresh trainer each time) only after a lost worker."""
    attempt = 0
    while True:
        try:
            return make_trainer().fit()
        except Exception as err:  # noqa: BLE001 - classified below, re-raised unless a lost worker
            user = user_error_inside(err)
            if user is not None:
                raise user from None
            if not lost_worker(err) or (max_failures != -1 and attempt >= max_failures):
                raise
            attempt += 1
            limit = "unlimited" if max_failures == -1 else max_failures
            print(f"{what}: a worker was lost ({type(err).__name__}); restarting from the latest checkpoint "
                  f"(retry {attempt} of {limit})", flush=True)
