"""TRACE on the CPU bench base: the 7 tasks with train splits (MeetingBank has none), every method, per-task metrics.

    python bench/trace_replication.py --budget smoke    # minutes: 2 tasks, 64 examples, 2 methods (does it run?)
    python bench/trace_replication.py --budget small    # 7 tasks, 100 examples each, every method
    python bench/trace_replication.py --budget full     # 500 / 200 examples, the preset's epochs

Budgets and method hyperparameters: configs/bench/trace.yaml (preset configs/trace.yaml, the paper's order and
per-task metrics: accuracy for C-STANCE / FOMC / NumGLUE, first letter for ScienceQA, edit similarity for Py150,
SARI for 20Minuten). Base model + SAE from bench/make_base.py. Runs under bench/cache/runs/trace-<budget>-...,
resumable; output bench/results/trace_<budget>.{json,md} and trace_<budget>_opaper.png.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import make_base  # noqa: E402
from bench.common import (choice_list, cli_path, exit_2_on_error, read_bench_config,  # noqa: E402
                          resolve_repo_path, run_suite, write_suite)
from saefd_ray.errors import ArgumentParser  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "bench" / "trace.yaml"

NOTES = [
    "TRACE (the 7 tasks with a train split, the paper's order, MeetingBank left out) on the bench base model "
    "(bench/make_base.py), same base / LoRA / data / budget for every method. Per-task columns are the final R row "
    "(after the last task): accuracy (C-STANCE, FOMC, NumGLUE), first letter (ScienceQA), edit similarity (Py150), "
    "SARI (20Minuten), all 0–100. AA = OP = their mean. Hyperparameters: fixed defaults (configs/bench/trace.yaml).",
]


def write(suite: dict, base_s: float, began: float) -> list:
    return write_suite(suite, "trace", "TRACE (7 tasks)", NOTES, base_s, began, per_task=True)


@exit_2_on_error
def main(argv=None) -> dict:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="small", help="smoke, small or full")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="the bench config (budgets, methods, preset)")
    ap.add_argument("--methods", default=None, help="comma list (default: the budget's)")
    ap.add_argument("--data-root", default=None, help="default: the bench config's (../shared/data/trace)")
    args = ap.parse_args(argv)
    bench_cfg = read_bench_config(args.config)
    if args.budget not in bench_cfg["budgets"]:
        raise SystemExit(f"error: --budget {args.budget!r}: not one of {', '.join(bench_cfg['budgets'])}")
    budget = bench_cfg["budgets"][args.budget]
    methods = choice_list(args.methods, "--methods", bench_cfg["methods"])  # before the base model is built
    data_root = cli_path(args.data_root) if args.data_root else resolve_repo_path(bench_cfg["data_root"])
    if not data_root.is_dir():
        raise SystemExit(f"error: --data-root {data_root}: not a folder (expected TRACE's task folders)")
    began = time.time()
    base = make_base.ensure(minutes=budget["base"]["minutes"], sae_tokens=budget["base"]["sae_tokens"])
    base_s = time.time() - began
    suite = run_suite("trace", resolve_repo_path(bench_cfg["preset"]), bench_cfg, args.budget, base, data_root,
                      methods=methods,
                      on_run=lambda partial: write(partial, base_s, began))
    for path in write(suite, base_s, began):
        print(f"wrote {path.relative_to(REPO)}")
    return suite


if __name__ == "__main__":
    main()
