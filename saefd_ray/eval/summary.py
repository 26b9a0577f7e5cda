"""Continual-learning summaries of an R matrix (papers.md §4).

`R` is a list of rows: `R[0]` is the base model before any task, `R[t]` the scores after training task t
(t = 1..T), and every row has T scores, one per task in sequence order. The formulas below use the papers'
1-based task index i; in code task i is column i-1 and "after task i" is row i (row 0 is the base, so rows
are already 1-based in that sense).

- AA (= OP) = mean of the last row.
- BWT = 1/(T−1) · Σ_{i<T} (R[T][i] − R[i][i])         how much later tasks changed earlier ones (negative = forgot)
- FWT = 1/(T−1) · Σ_{i≥2} (R[i−1][i] − R[0][i])       what earlier tasks did for a task before training on it
- forgetting_i = max_{i≤t<T} R[t][i] − R[T][i], i<T   the max runs over rows *after* task i was learned (t ≥ i),
  never the base row or rows before task i, whose low scores would be meaningless peaks.

T = 1 has no "other" tasks: BWT, FWT and mean forgetting are None. A matrix with fewer than T+1 rows (the
multi-task upper bound stores only its final row; an interrupted run has a prefix) gets only AA, of its last row.
"""

from __future__ import annotations

from statistics import fmean
from typing import Any, Sequence

Matrix = Sequence[Sequence[float]]


def _width(R: Matrix) -> int:
    if not R or not R[0]:
        raise ValueError("R matrix is empty")
    T = len(R[0])
    if any(len(row) != T for row in R):
        raise ValueError(f"R matrix rows have different lengths: {[len(row) for row in R]}")
    if len(R) > T + 1:
        raise ValueError(f"R matrix has {len(R)} rows for {T} tasks; at most T+1 (base + one per task)")
    return T


def _full(R: Matrix, what: str) -> int:
    T = _width(R)
    if len(R) != T + 1:
        raise ValueError(f"{what} needs all T+1={T + 1} rows (base + one per task), got {len(R)}")
    return T


def average_accuracy(R: Matrix) -> float:
    """AA = OP: mean score over all tasks after the last row."""
    _width(R)
    return fmean(R[-1])


def bwt(R: Matrix) -> float | None:
    """Backward transfer; None when T = 1."""
    T = _full(R, "BWT")
    if T == 1:
        return None
    # 1-based i = 1..T-1 -> column j = i-1, "after task i" = row i = j+1
    return fmean(R[T][j] - R[j + 1][j] for j in range(T - 1))


def fwt(R: Matrix) -> float | None:
    """Forward transfer; None when T = 1."""
    T = _full(R, "FWT")
    if T == 1:
        return None
    # 1-based i = 2..T -> column j = i-1 = 1..T-1, row i-1 = j
    return fmean(R[j][j] - R[0][j] for j in range(1, T))


def forgetting(R: Matrix) -> list[float]:
    """Per-task forgetting for tasks 1..T-1 (the last task cannot be forgotten yet); empty when T = 1."""
    T = _full(R, "forgetting")
    # task column j was learned at row j+1; peak over rows j+1..T-1, compare to row T
    return [max(R[t][j] for t in range(j + 1, T)) - R[T][j] for j in range(T - 1)]


def summarize(R: Matrix, task_names: Sequence[str]) -> dict[str, Any]:
    """All summaries as a JSON-ready dict.

    Keys: `num_tasks`, `complete` (R has T+1 rows), `aa`, `bwt`, `fwt`, `forgetting` ({task: value} for all but the
    last task), `mean_forgetting`. With an incomplete R only `aa` is filled; the rest are None / {}.
    """
    T = _width(R)
    if len(task_names) != T:
        raise ValueError(f"{len(task_names)} task names for an R matrix with {T} columns")
    out: dict[str, Any] = {
        "num_tasks": T,
        "complete": len(R) == T + 1,
        "aa": average_accuracy(R),
        "bwt": None,
        "fwt": None,
        "forgetting": {},
        "mean_forgetting": None,
    }
    if out["complete"]:
        per_task = forgetting(R)
        out.update(
            bwt=bwt(R),
            fwt=fwt(R),
            forgetting=dict(zip(task_names, per_task)),
            mean_forgetting=fmean(per_task) if per_task else None,
        )
    return out
