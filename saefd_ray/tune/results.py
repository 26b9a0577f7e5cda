"""A finished (or resumed) sweep's outputs, all in its experiment folder:

- `trials.csv` / `trials.md`: one row per trial — its values, status (`completed`, `stopped` by ASHA, `error`),
  tasks trained, AA, BWT, FWT, the running AA at its last report, wall time and its run dir; ranked best first.
- `best.yaml`: the best completed trial's run config (base config + its values), ready for
  `python jobs/run_sequence.py --config best.yaml` (its output goes to `runs/<sweep name>-best`).
- `aa_vs_params.png`: AA against ρ, anchor size and β (whichever were swept; otherwise every numeric parameter).
- `objective_rho_anchor.png`: the objective (HEATMAP_OBJECTIVE) on the ρ × anchor-size grid, when both were swept.

Ranking: completed trials by AA, ties broken by BWT (exact comparison, not the 1e-4 blend Tune optimises), then
the unfinished ones by running AA. Every AA, BWT, FWT and running AA here is on the validation splits (what the
trials report); test scores are in each trial's own results.json and choose nothing.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

from saefd_ray.config import apply_overrides, validate

PLOT_FIRST = ("method.rho", "method.anchor_size", "method.beta")
LABELS = {"method.rho": "ρ (contribution ratio)", "method.anchor_size": "anchor-set size", "method.beta": "β"}
HEATMAP_OBJECTIVE = "aa"  # validation AA: what the trials report and the sweep selects on
METRICS = ("status", "tasks_done", "aa", "bwt", "fwt", "running_aa", "time_s")


def _num(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def trial_rows(grid, params: list[str]) -> list[dict[str, Any]]:
    """One dict per trial of a Tune ResultGrid."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        if result.error is not None:
            status = "error"
        elif metrics.get("final"):
            status = "completed"
        else:
            status = "stopped"
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            **{key: config.get(key) for key in params},
            "status": status,
            "tasks_done": metrics.get("tasks_done", 0),
            "aa": _num(metrics.get("aa")),
            "bwt": _num(metrics.get("bwt")),
            "fwt": _num(metrics.get("fwt")),
            "running_aa": _num(metrics.get("running_aa")),
            "time_s": _num(metrics.get("time_s")),
            "run_dir": metrics.get("run_dir", ""),
        })
    return rank(rows)


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(row):
        done = row["status"] == "completed"
        neg_inf = -math.inf
        return (not done,
                -(row["aa"] if done and row["aa"] is not None else neg_inf),
                -(row["bwt"] if done and row["bwt"] is not None else neg_inf),
                -(row["running_aa"] if row["running_aa"] is not None else neg_inf),
                str(row["trial_id"]))

    return sorted(rows, key=key)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_table(rows: list[dict[str, Any]], columns: list[str], folder: Path) -> tuple[Path, Path]:
    csv_path, md_path = folder / "trials.csv", folder / "trials.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row[c] is None else row[c] for c in columns})
    shown = [c for c in columns if c != "run_dir"]
    lines = ["AA, BWT, FWT and running AA on the validation splits (test scores: each run's results.json).", "",
             "| rank | " + " | ".join(shown) + " |", "|" + "---|" * (len(shown) + 1)]
    lines += [f"| {i} | " + " | ".join(_fmt(row[c]) for c in shown) + " |" for i, row in enumerate(rows, 1)]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def best_config(base_raw: dict, row: dict[str, Any], params: list[str], sweep_name: str) -> dict:
    from saefd_ray.tune.sweep import param_overrides

    raw = apply_overrides(copy.deepcopy(base_raw), param_overrides({k: row[k] for k in params}))
    raw.setdefault("output", {}).update(root="runs", run_name=f"{sweep_name}-best")
    validate(copy.deepcopy(raw), source="best config")
    return raw


def write_best(raw: dict, row: dict[str, Any], params: list[str], sweep_name: str, folder: Path) -> Path:
    from saefd_ray.tune.sweep import dump_yaml

    values = ", ".join(f"{k}={row[k]!r}" for k in params)
    bwt = "n/a" if row["bwt"] is None else f"{row['bwt']:.4f}"
    header = (f"# Best trial of the sweep {sweep_name!r}: {row['trial_id']} ({values}); validation AA {row['aa']:.4f}, "
              f"BWT {bwt}.\n"
              f"# Run it: python jobs/run_sequence.py --config {folder / 'best.yaml'}\n")
    path = folder / "best.yaml"
    path.write_text(header + dump_yaml(raw))
    return path


def plot_params(rows: list[dict[str, Any]], space: dict[str, dict], folder: Path) -> Path | None:
    numeric = [k for k in space if all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool)
                                      for r in rows if r[k] is not None)]
    shown = [k for k in PLOT_FIRST if k in numeric] or numeric
    if not shown or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, key in zip(axes[0], shown):
        done = [r for r in rows if r["status"] == "completed" and r["aa"] is not None]
        other = [r for r in rows if r["status"] != "completed" and r["running_aa"] is not None]
        ax.scatter([r[key] for r in done], [r["aa"] for r in done], color="tab:blue", label="final AA", zorder=3)
        if other:
            ax.scatter([r[key] for r in other], [r["running_aa"] for r in other], facecolors="none",
                       edgecolors="gray", label="stopped (running AA)", zorder=2)
        by_value: dict[float, list[float]] = {}
        for r in done:
            by_value.setdefault(r[key], []).append(r["aa"])
        if len(by_value) > 1:
            xs = sorted(by_value)
            ax.plot(xs, [sum(by_value[x]) / len(by_value[x]) for x in xs], color="tab:blue", alpha=0.5,
                    label="mean AA")
        kind = next(iter(space[key]))
        if kind.startswith("log"):
            ax.set_xscale("log")
        ax.set_xlabel(LABELS.get(key, key))
        ax.set_ylabel("AA")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = folder / "aa_vs_params.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_heatmap(rows: list[dict[str, Any]], folder: Path) -> Path | None:
    """objective_rho_anchor.png: HEATMAP_OBJECTIVE over ρ × anchor size (None unless both were swept)."""
    from saefd_ray.eval.plots import objective_heatmap
    from saefd_ray.io import atomic_write_bytes

    png = objective_heatmap(rows, HEATMAP_OBJECTIVE)
    return atomic_write_bytes(folder / "objective_rho_anchor.png", png) if png is not None else None


def write_results(grid, sweep, base_raw: dict, folder: Path) -> dict[str, Any]:
    """Table, best config and plot of a ResultGrid; returns a JSON-ready summary."""
    params = list(sweep.space)
    rows = trial_rows(grid, params)
    columns = ["trial_id", *params, *METRICS, "run_dir"]
    csv_path, md_path = write_table(rows, columns, folder)
    best = next((r for r in rows if r["status"] == "completed" and r["aa"] is not None), None)
    best_path = None
    if best is not None:
        best_path = write_best(best_config(base_raw, best, params, sweep.output.name), best, params,
                               sweep.output.name, folder)
    plot = plot_params(rows, sweep.space, folder)
    heatmap = write_heatmap(rows, folder)
    summary = {
        "experiment_dir": str(folder),
        "num_trials": len(rows),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error")},
        "best": best,
        "files": {"table_csv": str(csv_path), "table_md": str(md_path),
                  "best_config": str(best_path) if best_path else None, "plot": str(plot) if plot else None,
                  "heatmap": str(heatmap) if heatmap else None},
    }
    print(md_path.read_text(), flush=True)
    if best is not None:
        print(f"[tune] best: {json.dumps({k: best[k] for k in params})} AA {best['aa']:.4f}; config {best_path}",
              flush=True)
    return summary
