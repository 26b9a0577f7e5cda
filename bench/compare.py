"""What a CL suite's headline needs beyond one table per order: seeds, paired comparisons and SAE-FD's λ traces.

* Seeds: mean ± sd of AA / BWT over seeds (seed 0 is the main table's run, seeds 1.. the `/s<seed>` runs).
* Paired comparison of sae_fd against each baseline over the (order, seed) cells both finished: the mean AA
  difference, its spread (sd over cells) and whether it is larger than the noise. The noise of one AA is binomial:
  the sd of a mean of T task accuracies on n test examples each, √(Σ_t p_t(1−p_t)/n) / T; a difference of two
  independent AAs has √2 times that. "Larger than the noise" means |mean difference| > 2 standard errors, the
  standard error being the larger of the paired spread's (sd/√cells) and the binomial one (/√cells).
* λ traces: SAE-FD's adaptive λ and realized share λ·L_FD / (L_task + λ·L_FD) read back from each run's
  TensorBoard events (`runs/<name>/tb/`, rank 0), summarised per task and drawn in one figure; the suite keeps a
  compact copy in the report (`lambda_trace`), which outlives the run dir.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean, median, stdev

from bench.common import REPO, RESULTS, _f, run_key

BASELINES = ("seq_lora", "ewc", "l2", "lwf", "sae_reg", "o_lora", "replay")


def seed_runs(suite: dict, order: str, method: str) -> list[dict]:
    """The finished runs of `method` on `order` over every seed (seed 0 first)."""
    seeds = [0] + list(suite.get("seeds", []))
    runs = [suite["runs"].get(run_key(order, method, seed)) for seed in seeds]
    return [r for r in runs if r and "summary" in r]


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = stdev(values) if len(values) > 1 else float("nan")
    return f"{fmean(values):.1f} ± {sd:.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def seeds_section(suite: dict) -> list[str]:
    methods = [m for m in suite.get("seed_methods", []) if m]
    if not suite.get("seeds") or not methods:
        return []
    lines = ["## Over seeds", "", f"Seeds 0, {', '.join(map(str, suite['seeds']))} (LoRA init, data order, anchor "
             "draw); mean ± sd over the seeds that finished.", "",
             "| order | method | AA | BWT | FWT | seeds |", "|---|---|---|---|---|---|"]
    for order in suite["orders"]:
        for name in methods:
            runs = seed_runs(suite, order, name)
            if not runs:
                continue
            col = {m: [r["summary"][m] for r in runs if r["summary"].get(m) is not None] for m in ("aa", "bwt", "fwt")}
            lines.append(f"| {order} | {name} | {_mean_sd(col['aa'])} | {_mean_sd(col['bwt'])} | "
                         f"{_mean_sd(col['fwt'])} | {len(runs)} |")
    return lines + [""]


def aa_binomial_sd(run: dict, n: int) -> float:
    """sd (points) of a run's AA from test-set sampling alone: √(Σ_t p_t(1−p_t)/n) / T over the last R row."""
    last = run["r_matrix"][-1]
    var = sum((p / 100) * (1 - p / 100) / n for p in last)
    return 100 * math.sqrt(var) / len(last)


def paired(suite: dict, against: str, method: str = "sae_fd") -> dict | None:
    """sae_fd − baseline AA over the (order, seed) cells where both finished."""
    diffs, noise = [], []
    for order in suite["orders"]:
        for seed in [0] + list(suite.get("seeds", [])):
            a = suite["runs"].get(run_key(order, method, seed))
            b = suite["runs"].get(run_key(order, against, seed))
            if a and b and "summary" in a and "summary" in b:
                diffs.append(a["summary"]["aa"] - b["summary"]["aa"])
                n = suite["budget_config"]["max_test"]
                noise.append(math.hypot(aa_binomial_sd(a, n), aa_binomial_sd(b, n)))
    if not diffs:
        return None
    n = len(diffs)
    spread = stdev(diffs) if n > 1 else None
    se = max(fmean(noise) / math.sqrt(n), (spread or 0.0) / math.sqrt(n))
    mean = fmean(diffs)
    return {"against": against, "cells": n, "mean_diff": mean, "sd": spread, "min": min(diffs), "max": max(diffs),
            "wins": sum(d > 0 for d in diffs), "binomial_sd_one_cell": fmean(noise), "se": se,
            "beyond_noise": abs(mean) > 2 * se}


def paired_section(suite: dict) -> tuple[list[str], list[dict]]:
    rows = [p for b in BASELINES if b in suite["methods"] and (p := paired(suite, b))]
    if not rows:
        return [], []
    lines = ["## Paired comparison: sae_fd − baseline (AA points)", "",
             "Over every (order, seed) cell where both finished. Noise: a single AA's test-sampling sd is shown per "
             "cell pair; 'beyond noise' = |mean| > 2 SE (SE = the larger of the paired spread's and the binomial).",
             "", "| baseline | cells | mean diff | sd | min / max | sae_fd wins | binomial sd per cell | beyond noise |",
             "|---|---|---|---|---|---|---|---|"]
    for p in rows:
        lines.append(f"| {p['against']} | {p['cells']} | {p['mean_diff']:+.1f} | {_f(p['sd'])} | "
                     f"{p['min']:+.1f} / {p['max']:+.1f} | {p['wins']}/{p['cells']} | "
                     f"{p['binomial_sd_one_cell']:.1f} | {'yes' if p['beyond_noise'] else 'no'} |")
    return lines + [""], rows


def lambda_trace(run: dict) -> dict | None:
    """Per task of one sae_fd run: median λ and median realized share over its steps (from rank 0's events)."""
    from saefd_ray.eval.plots import split_stages, task_boundaries
    from saefd_ray.observe.tb import read_scalars

    scalars = read_scalars(REPO / run["run_dir"] / "tb")
    lam, share = scalars.get("method/lambda"), scalars.get("method/fd_share")
    if not lam or not share:
        return None
    out = {"steps": [s for s, _ in share], "share": [v for _, v in share], "lambda": [v for _, v in lam],
           "per_task": []}
    parts_share, parts_lam = split_stages(share, task_boundaries(scalars)), split_stages(lam, task_boundaries(scalars))
    for t, (vals, lams) in enumerate(zip(parts_share, parts_lam)):
        vals = [v for _, v in vals]
        if vals and t < len(run["tasks"]):
            out["per_task"].append({"task": run["tasks"][t], "median_share": median(vals),
                                    "median_lambda": median(v for _, v in lams) if lams else None,
                                    "steps": len(vals)})
    return out


def lambda_section(suite: dict, stem: str, rho: float | None) -> tuple[list[str], Path | None]:
    traces = {key: t for key, run in suite["runs"].items()
              if run.get("method") == "sae_fd" and "summary" in run
              and (t := run.get("lambda_trace") or lambda_trace(run))}
    if not traces:
        return [], None
    lines = ["## SAE-FD's adaptive λ and realized share", "",
             f"Target share ρ = {rho}. Median over each task's steps (the first task has no anchors: no L_FD).", "",
             "| run | per task: median share (median λ) |", "|---|---|"]
    for key, t in traces.items():
        cells = ", ".join(f"{p['task']} {p['median_share']:.2f} ({_f(p['median_lambda'], 2)})" for p in t["per_task"])
        lines.append(f"| {key} | {cells} |")
    path = _lambda_figure(traces, stem, rho)
    return lines + ["", f"![λ and share]({path.name})", ""], path


def _lambda_figure(traces: dict, stem: str, rho: float | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=80)
    FigureCanvasAgg(fig)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for key, t in traces.items():
        top.plot(t["steps"][: len(t["lambda"])], t["lambda"], linewidth=0.8, label=key)
        bottom.plot(t["steps"], t["share"], linewidth=0.8, label=key)
    if rho is not None:
        bottom.axhline(rho, color="black", linestyle=":", label=f"ρ = {rho:g}")
    top.set_ylabel("λ")
    bottom.set_ylabel("realized share")
    bottom.set_xlabel("optimizer step (whole sequence)")
    bottom.legend(fontsize=6)
    top.set_title("SAE-FD: adaptive λ and realized share per run", fontsize=9)
    fig.tight_layout()
    path = RESULTS / f"{stem}_lambda.png"
    fig.savefig(path)
    return path
