"""The reports' figures, as PNG bytes (bare Agg canvases, no pyplot state: safe in workers and headless CI).

    training_curves   task loss over the whole sequence, one colour per task, dashed task boundaries
    lambda_share      SAE-FD's λ and realized share λ·L_FD/(L_task+λ·L_FD) per step, target ρ drawn
    score_lines       the R matrix as curves: each task's score after every stage
    sae_curves        SAE training: loss, FVU, L0 and dead % against tokens, one line per layer
    objective_heatmap a Tune sweep's objective on the ρ × anchor-size grid (mean over trials per cell)

Curves come from TensorBoard scalars (`saefd_ray.observe.tb.read_scalars`, tags in observe/monitor.py) or the
SAE trainer's history.jsonl; every function returns None when its data is absent (e.g. no sae_fd, no tb folder).
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = list[tuple[int, float]]


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def task_boundaries(scalars: Mapping[str, Series]) -> list[int]:
    """Last optimizer step of every stage: where the worker wrote the scores after it (the base row sits at 0)."""
    steps = {step for tag, series in scalars.items() if tag.startswith("score/") for step, _ in series}
    return sorted(s for s in steps if s > 0)


def split_stages(series: Series, bounds: list[int]) -> list[Series]:
    """`series` cut at the stage ends `bounds` (task_boundaries): one list of (step, value) per stage."""
    parts, start = [], 0
    for end in bounds:
        parts.append([(s, v) for s, v in series if start < s <= end])
        start = end
    tail = [(s, v) for s, v in series if s > start]
    return parts + ([tail] if tail else [])


def _boundaries(ax, bounds: list[int]) -> None:
    for b in bounds[:-1]:
        ax.axvline(b + 0.5, color="gray", linestyle="--", linewidth=0.8)


def training_curves(scalars: Mapping[str, Series], stage_names: Sequence[str]) -> bytes | None:
    """Task loss (mean over ranks) per optimizer step of the sequence; stage i coloured and named."""
    loss = scalars.get("train/loss")
    if not loss:
        return None
    bounds = task_boundaries(scalars)
    fig, (ax,) = _figure(8, 3.6)
    for i, part in enumerate(split_stages(loss, bounds)):
        if part:
            name = stage_names[i] if i < len(stage_names) else f"stage {i + 1}"
            ax.plot([s for s, _ in part], [v for _, v in part], linewidth=1, label=name)
    _boundaries(ax, bounds)
    ax.set_xlabel("optimizer step (whole sequence)")
    ax.set_ylabel("task loss")
    ax.set_title("Task loss per task (dashed: task boundaries)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def lambda_share(scalars: Mapping[str, Series], rho: float | None) -> bytes | None:
    """SAE-FD's adaptive λ (top) and its realized share of the loss (bottom) with the target ρ."""
    lam, share = scalars.get("method/lambda"), scalars.get("method/fd_share")
    if not lam or not share:
        return None
    bounds = task_boundaries(scalars)
    fig, (top, bottom) = _figure(8, 5, rows=2)
    top.plot([s for s, _ in lam], [v for _, v in lam], linewidth=1, color="tab:purple")
    top.set_ylabel("λ")
    top.set_title("SAE-FD: adaptive λ and realized share λ·L_FD / (L_task + λ·L_FD)")
    bottom.plot([s for s, _ in share], [v for _, v in share], linewidth=1, color="tab:green", label="realized share")
    if rho is not None:
        bottom.axhline(rho, color="black", linestyle=":", label=f"target ρ = {rho:g}")
    bottom.set_ylabel("share")
    bottom.set_xlabel("optimizer step (whole sequence)")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        _boundaries(ax, bounds)
        ax.grid(alpha=0.3)
    return _png(fig)


def score_lines(results: Mapping[str, Any]) -> bytes:
    """Each task's score (a column of the R matrix) over the stages: learning, then forgetting."""
    from saefd_ray.eval.report import row_labels

    tasks, rows, labels = list(results["tasks"]), results["r_matrix"], row_labels(results)
    fig, (ax,) = _figure(max(5.0, 1.0 * len(rows) + 3), 3.6)
    for j, task in enumerate(tasks):
        ys = [math.nan if row[j] is None else float(row[j]) for row in rows]
        ax.plot(range(len(rows)), ys, marker="o", linewidth=1.2, label=task)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax.set_ylabel("score (0–100)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Scores over the sequence — {results.get('method', '?')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


SAE_PANELS = (("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead %"))


def sae_curves(history: Sequence[Mapping[str, float]], layers: Sequence[int]) -> bytes | None:
    """SAE training curves against tokens seen, from history.jsonl rows (keys `tokens`, `L<layer>/<metric>`)."""
    if not history:
        return None
    fig, axes = _figure(9, 6, rows=2, cols=2)
    tokens = [h["tokens"] for h in history]
    for ax, (key, label) in zip(axes, SAE_PANELS):
        for layer in layers:
            values = [h.get(f"L{layer}/{key}") for h in history]
            if key == "dead_fraction":
                values = [None if v is None else 100 * v for v in values]
            ax.plot(tokens, [math.nan if v is None else v for v in values], linewidth=1, label=f"layer {layer}")
        ax.set_title(label)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    return _png(fig)


def objective_grid(rows: Sequence[Mapping[str, Any]], objective: str = "aa", x: str = "method.rho",
                   y: str = "method.anchor_size") -> tuple[list, list, list[list[float]]]:
    """(x values, y values, grid[y][x]): the mean `objective` of the completed trials in each cell, NaN if none."""
    done = [r for r in rows if r.get("status") == "completed" and r.get(objective) is not None
            and r.get(x) is not None and r.get(y) is not None]
    xs, ys = sorted({r[x] for r in done}), sorted({r[y] for r in done})
    cells: dict[tuple, list[float]] = {}
    for r in done:
        cells.setdefault((r[x], r[y]), []).append(float(r[objective]))
    grid = [[sum(cells[(a, b)]) / len(cells[(a, b)]) if (a, b) in cells else math.nan for a in xs] for b in ys]
    return xs, ys, grid


def objective_heatmap(rows: Sequence[Mapping[str, Any]], objective: str = "aa", x: str = "method.rho",
                      y: str = "method.anchor_size") -> bytes | None:
    """`objective_grid` as a heatmap; None unless the sweep's completed trials cover 2+ values of both x and y.

    `objective` names the trials-table column shown (the sweep's selection objective).
    """
    xs, ys, grid = objective_grid(rows, objective, x, y)
    if len(xs) < 2 or len(ys) < 2:
        return None
    fig, (ax,) = _figure(max(4.5, 0.9 * len(xs) + 2.5), max(3.0, 0.5 * len(ys) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    for j, row in enumerate(grid):
        for i, v in enumerate(row):
            if not math.isnan(v):
                ax.text(i, j, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{objective} (mean over completed trials)")
    fig.colorbar(im, ax=ax, label=objective)
    return _png(fig)
