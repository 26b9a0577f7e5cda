"""The standard CL benchmark (O-LoRA's dbpedia / amazon / yahoo→yelp / agnews) for every method.

    python bench/cl_replication.py --model smollm2    # issue 18: SmolLM2-135M-Instruct + its FAST Gated SAE
    python bench/cl_replication.py --budget smoke     # minutes: 2 tasks, 64 examples, 3 methods (a does-it-run check)
    python bench/cl_replication.py --budget small     # <= 60 min on 2 cores after the base: order 1, every method
    python bench/cl_replication.py --budget full      # the three O-LoRA orders, 1000 / 500 examples per task
    python bench/cl_replication.py --budget small --methods seq_lora,sae_fd --orders 1,2

Budgets, method hyperparameters and the preset (configs/cl4.yaml, whose `tasks.orders` are O-LoRA's three orders)
live in configs/bench/cl4.yaml. Every method × order × seed is one `run_sequence(load_config(...))` in a single Ray
session, under bench/cache/runs/cl4-<budget>-o<order>-<method>-<hash>/: re-running resumes, a finished run is only
loaded, and the report is rewritten after every run, so a suite cut short keeps its table.

`--model smollm2` (budget `smollm2`): the base is SmolLM2-135M-Instruct and the SAE its FAST Gated SAE from
`jobs/train_sae.py --config configs/sae_smollm2.yaml` (trained into bench/cache/ unless `--sae-run` names a finished
train_sae run). The plan, in the order it runs: (1) seq_lora on order 1 at each `lr_candidates` value, the lr with the
best *validation* AA chosen; (2) the core methods on every order; (3) `order1_methods` on order 1; (4) `seeds` for
`seed_methods` on every order, `strongest` being the regularizer with the best mean validation AA over orders.
Output: bench/results/cl4_smollm2.{json,md}, the R-matrix heatmaps and SAE-FD's λ / share figure.
The bench base (`--model bench`, the default) is bench/make_base.py's toy; its output is cl4_<budget>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import make_base  # noqa: E402
from bench.common import (choice_list, cli_path, exit_2_on_error, read_bench_config, read_yaml_file,  # noqa: E402
                          resolve_repo_path, run_suite, write_suite)
from bench.real_suite import run_real_suite  # noqa: E402
from saefd_ray.errors import ArgumentParser  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "bench" / "cl4.yaml"

NOTES = [
    "O-LoRA's standard CL benchmark (yelp in yahoo's place) on the bench base model (bench/make_base.py), "
    "LoRA as the budget says (configs/bench/cl4.yaml), every method with the same base, LoRA, data and budget; "
    "scores are label accuracy by ranking "
    "the label options' log-likelihood (0–100). AA = mean of the last R row; BWT, FWT as in TRACE / O-LoRA "
    "(`saefd_ray/eval/summary.py`). LoRA and lr were chosen with seq_lora on validation examples carved from the "
    "training splits; every method's own hyperparameters are fixed defaults (configs/bench/cl4.yaml); nothing saw test.",
    "mtl trains all tasks jointly (one row: only AA); per_task trains a fresh adapter per task.",
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["bench", "smollm2"], default="bench",
                    help="bench: make_base.py's toy base (budgets smoke/small/full); smollm2: the real model")
    ap.add_argument("--budget", default=None, help="a budget of --config: smoke / small / full for --model bench "
                    "(default small), smollm2 / smollm2-smoke for --model smollm2 (default smollm2)")
    ap.add_argument("--report-only", action="store_true", help="--model smollm2: rewrite the report from the "
                    "finished runs; nothing trains")
    ap.add_argument("--sae-run", default=None, help="--model smollm2: a finished jobs/train_sae.py run dir of "
                    "configs/sae_smollm2.yaml to use instead of training one into bench/cache/")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="the bench config (budgets, methods, preset)")
    ap.add_argument("--methods", default=None, help="comma list (default: the budget's)")
    ap.add_argument("--orders", default=None, help="comma list of order names (default: the budget's)")
    ap.add_argument("--data-root", default=None, help="the benchmark's tasks (cl_benchmark/...); default: the bench "
                    "config's data_root (../shared/data from the repository); command-line paths are relative to the "
                    "working directory. The bench base model and its SAE (--model bench) read configs/bench/base.yaml's "
                    "data_root; the SmolLM2 SAE reads this one")
    return ap.parse_args(argv)


def write(suite: dict, base_s: float, began: float) -> list:
    return write_suite(suite, "cl4", "CL benchmark (O-LoRA, 4 tasks)", NOTES, base_s, began)


@exit_2_on_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    args.budget = args.budget or ("smollm2" if args.model == "smollm2" else "small")
    bench_cfg = read_bench_config(args.config)
    if args.budget not in bench_cfg["budgets"]:
        raise SystemExit(f"error: --budget {args.budget!r}: not one of {', '.join(bench_cfg['budgets'])}")
    budget = bench_cfg["budgets"][args.budget]
    if (budget.get("model") == "smollm2") != (args.model == "smollm2"):
        raise SystemExit(f"error: --budget {args.budget}: is for --model {budget.get('model', 'bench')}")
    if args.model != "smollm2" and (args.report_only or args.sae_run):
        raise SystemExit("error: --report-only / --sae-run: only with --model smollm2")
    methods = choice_list(args.methods, "--methods", bench_cfg["methods"])
    preset = read_yaml_file(resolve_repo_path(bench_cfg["preset"]))
    orders = choice_list(args.orders, "--orders", preset["tasks"].get("orders", {}))
    data_root = cli_path(args.data_root) if args.data_root else resolve_repo_path(bench_cfg["data_root"])
    missing = [t["path"] for t in preset["tasks"]["sequence"] if t.get("path") and not (data_root / t["path"]).is_dir()]
    if missing and not args.report_only:  # before the base model is built or Ray starts
        raise SystemExit(f"error: --data-root {data_root}: no {missing[0]} (the benchmark's task folders)")
    if args.model == "smollm2":
        return run_real_suite(bench_cfg, args.budget, data_root, args.sae_run, methods=methods, orders=orders,
                              report_only=args.report_only)
    began = time.time()
    base = make_base.ensure(minutes=budget["base"]["minutes"], sae_tokens=budget["base"]["sae_tokens"])
    base_s = time.time() - began
    suite = run_suite("cl4", resolve_repo_path(bench_cfg["preset"]), bench_cfg, args.budget, base, data_root,
                      methods=methods, orders=orders,
                      on_run=lambda partial: write(partial, base_s, began))
    for path in write(suite, base_s, began):
        print(f"wrote {path.relative_to(REPO)}")
    return suite


if __name__ == "__main__":
    main()
