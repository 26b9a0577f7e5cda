"""The run's report: `results.json` (machine-readable, read back on resume), `report.md`, `r_matrix.png` and the
curves of eval/plots.py (score lines; task loss and SAE-FD's λ / share from the run's TensorBoard events).

Every file is written atomically (`saefd_ray.io`), so a run killed mid-report never leaves a half-written
results.json for resume to choke on. The heatmap uses a bare Agg canvas rather than pyplot, so no global backend is
switched and it is safe in Ray workers and headless CI.

`results` keys: `config` (dict), `tasks` (names), `r_matrix` (rows, row 0 = base; scored on test: the report),
`summary` (from `summarize`), `timings` ({name: seconds}), `method` (str); optional `r_matrix_validation` /
`summary_validation` (the same on the validation splits, which Tune and any selection read) and `validation`
({task: {source, size}}); extra keys are kept in results.json. Optional `row_labels` overrides
the default row labels `base`, `after <task>` (e.g. for a multi-task run whose rows are not one per task).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from saefd_ray.io import atomic_write_bytes

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
R_MATRIX_PNG = "r_matrix.png"
FIGURES = {"r_matrix.png": "R matrix", "score_lines.png": "Scores over the sequence",
           "loss_curves.png": "Task loss per task", "lambda_share.png": "SAE-FD λ and realized share"}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def row_labels(results: Mapping[str, Any]) -> list[str]:
    """`base`, `after <task>`, … for each R row, unless `results["row_labels"]` gives them."""
    rows = results["r_matrix"]
    if results.get("row_labels"):
        labels = list(results["row_labels"])
        if len(labels) != len(rows):
            raise ValueError(f"{len(labels)} row_labels for {len(rows)} R-matrix rows")
        return labels
    tasks = list(results["tasks"])
    return ["base"] + [f"after {tasks[t - 1]}" if t <= len(tasks) else f"row {t}" for t in range(1, len(rows))]


def _model_name(results: Mapping[str, Any]) -> str:
    if results.get("model"):
        return str(results["model"])
    model = (results.get("config") or {}).get("model")
    if isinstance(model, Mapping):
        return str(model.get("name_or_path", "?"))
    return str(model) if model else "?"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        ("AA (OP)", _fmt(summary.get("aa"))),
        ("BWT", _fmt(summary.get("bwt"))),
        ("FWT", _fmt(summary.get("fwt"))),
        ("mean forgetting", _fmt(summary.get("mean_forgetting"))),
    ]


def render_markdown(results: Mapping[str, Any], figures: Sequence[str] = ()) -> str:
    """report.md: header, R matrix, figures (links to the PNGs named in `figures`), summary, per-task forgetting,
    timings, config. Scores with 1 decimal."""
    tasks = list(results["tasks"])
    summary = results.get("summary") or {}
    out = [f"# Run report: {results.get('method', '?')}", "", f"- method: `{results.get('method', '?')}`"]
    out += [f"- model: `{_model_name(results)}`", f"- tasks ({len(tasks)}): {', '.join(tasks)}", ""]

    out += ["## R matrix", "", "Score (0–100) on each task's test split (columns) after each training stage (rows).",
            ""]
    body = [[label] + [_fmt(v) for v in row] for label, row in zip(row_labels(results), results["r_matrix"])]
    out += _md_table(["", *tasks], body) + [""]
    if figures:
        out += ["## Figures", "", "Per-step curves of every scalar: `tensorboard --logdir tb` in this folder.", ""]
        out += [f"![{FIGURES.get(name, name)}]({name})" for name in figures] + [""]

    out += ["## Summary", ""] + _md_table(["metric", "value"], _summary_rows(summary)) + [""]

    if results.get("r_matrix_validation"):
        out += ["## R matrix on validation", "", "The same stages scored on each task's validation split: what "
                "Tune and any selection read (test, above, is only reported).", ""]
        body = [[label] + [_fmt(v) for v in row]
                for label, row in zip(row_labels(results), results["r_matrix_validation"])]
        out += _md_table(["", *tasks], body) + [""]
        out += _md_table(["metric", "value"], _summary_rows(results.get("summary_validation") or {})) + [""]
        sources = results.get("validation") or {}
        if sources:
            out += ["Validation splits: " + "; ".join(f"{task} {v.get('size')} ({v.get('source')})"
                                                      for task, v in sources.items()), ""]

    forgetting = summary.get("forgetting") or {}
    if forgetting:
        out += ["## Forgetting per task", ""]
        out += _md_table(["task", "forgetting"], [(k, _fmt(v)) for k, v in forgetting.items()]) + [""]

    timings = results.get("timings") or {}
    if timings:
        rows = [(k, _fmt(v)) for k, v in timings.items()]
        numeric = [v for v in timings.values() if isinstance(v, (int, float))]
        if len(numeric) == len(timings) and len(timings) > 1:
            rows.append(("**total**", _fmt(sum(numeric))))
        out += ["## Timings (s)", ""] + _md_table(["stage", "seconds"], rows) + [""]

    if results.get("config"):
        out += ["## Config", "", "```json", json.dumps(results["config"], indent=2, default=str), "```", ""]
    return "\n".join(out)


def render_heatmap(results: Mapping[str, Any]) -> bytes:
    """PNG bytes of the R matrix heatmap: tasks on x, rows on y, every cell annotated with its score."""
    tasks = list(results["tasks"])
    labels = row_labels(results)
    data = [[math.nan if v is None else float(v) for v in row] for row in results["r_matrix"]]
    fig = Figure(figsize=(max(4.0, 1.1 * len(tasks) + 2.5), max(2.5, 0.5 * len(data) + 1.5)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for y, row in enumerate(data):
        for x, v in enumerate(row):
            if not math.isnan(v):
                ax.text(x, y, f"{v:.1f}", ha="center", va="center", fontsize=8, color="black" if v > 60 else "white")
    ax.set_title(f"R matrix — {results.get('method', '?')}")
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(run_dir: str | Path, results: Mapping[str, Any]) -> dict[str, Path]:
    """Write results.json, report.md and r_matrix.png into `run_dir` (atomically); returns their paths.

    Everything is rendered before anything is written, so a rendering error leaves the previous report intact.
    JSON values that are not JSON types (e.g. Path) are stored as strings.
    """
    run_dir = Path(run_dir)
    figures = {R_MATRIX_PNG: render_heatmap(results), **curve_figures(run_dir, results)}
    payload = {
        RESULTS_JSON: json.dumps(results, indent=2, default=str).encode(),
        REPORT_MD: render_markdown(results, list(figures)).encode(),
        **figures,
    }
    return {name: atomic_write_bytes(run_dir / name, data) for name, data in payload.items()}


def curve_figures(run_dir: Path, results: Mapping[str, Any]) -> dict[str, bytes]:
    """Score lines always; task loss and λ / share when the run's `tb/` events hold them."""
    from saefd_ray.eval.plots import lambda_share, score_lines, training_curves
    from saefd_ray.observe.tb import read_scalars

    scalars = read_scalars(run_dir / "tb")
    stages = [label.removeprefix("after ") for label in row_labels(results)[1:]]
    rho = ((results.get("config") or {}).get("method") or {}).get("rho")
    found = {"score_lines.png": score_lines(results), "loss_curves.png": training_curves(scalars, stages),
             "lambda_share.png": lambda_share(scalars, rho)}
    return {name: png for name, png in found.items() if png is not None}


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read back results.json (e.g. to resume)."""
    return json.loads((Path(run_dir) / RESULTS_JSON).read_text())


def print_r_matrix(results: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the R matrix and the summary as rich tables (end-of-run console output)."""
    console = console or Console()
    tasks = list(results["tasks"])
    table = Table(title=f"R matrix — {results.get('method', '?')} ({_model_name(results)})")
    table.add_column("")
    for task in tasks:
        table.add_column(task, justify="right")
    for label, row in zip(row_labels(results), results["r_matrix"]):
        table.add_row(label, *(_fmt(v) for v in row))
    console.print(table)

    summary = results.get("summary") or {}
    stats = Table(title="Summary")
    stats.add_column("metric")
    stats.add_column("value", justify="right")
    for name, value in _summary_rows(summary):
        stats.add_row(name, value)
    for task, value in (summary.get("forgetting") or {}).items():
        stats.add_row(f"forgetting {task}", _fmt(value))
    console.print(stats)
