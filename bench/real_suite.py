"""The CL suite on a real instruct LLM (issue 18): SmolLM2-135M-Instruct and its FAST Gated SAE.

What differs from the bench-base suite (bench/common.py's run_suite) is the plan, run in this order so that a suite
cut short has the most useful table:

1. lr: seq_lora on order 1 at each of the budget's `lr_candidates`; the best *validation* AA chooses (test is never
   read). Every probe is a kept run; the chosen one is also the seq_lora row of order 1 (same config, only loaded).
2. the core methods on every order (seed 0);
3. `order1_methods` on order 1;
4. `seeds` for `seed_methods` on every order; `strongest` is the regularizer (ewc, l2, lwf, sae_reg) with the best
   mean validation AA over the orders at seed 0.

The SAE is `jobs/train_sae.py --config configs/sae_smollm2.yaml` trained into bench/cache/ (once; its activation
harvest is cached too), or a finished run named by `--sae-run`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

from bench.common import (CACHE, REPO, RESULTS, _f, cli_path, read_json_file, read_yaml_file, resolve_repo_path,
                          run_key, run_one, suite_dict, write_suite)
from bench.compare import lambda_section, lambda_trace, paired_section, seeds_section

MODEL = "smollm2-135m-instruct"
SAE_CONFIG = REPO / "configs" / "sae_smollm2.yaml"
REGULARIZERS = ("ewc", "l2", "lwf", "sae_reg")
SAE_METHODS = ("sae_fd", "sae_reg")
TITLE = "CL benchmark (O-LoRA, 4 tasks) on SmolLM2-135M-Instruct"
NOTES = [
    "O-LoRA's standard CL benchmark (yelp in yahoo's place) on SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to "
    "fp32, `models/registry.py`), every method with the same base, LoRA, data, budget and LoRA draw; scores are label "
    "accuracy by ranking the label options' log-likelihood (0–100). AA = mean of the last R row; BWT, FWT and mean "
    "forgetting as in TRACE / O-LoRA (`saefd_ray/eval/summary.py`). 'val AA' is the same on the validation split "
    "(32 examples per task carved from train, disjoint from it, seeded: these folders have no dev.json), which "
    "alone chose the lr and the strongest regularizer; test only reports.",
    "sae_fd and sae_reg use the SAE of configs/sae_smollm2.yaml (FAST: each chat instance alone). Method "
    "hyperparameters are configs/bench/cl4.yaml's defaults (sae_fd: ρ 0.15, EMA 0.05, λ clip [0.2, 10]), fixed "
    "before any run. Results are reported as they came out; none were selected.",
]


def ensure_sae(sae_run: Path | None, data_root: Path, log=print) -> dict:
    """The SAE folder (layer from configs/sae_smollm2.yaml) and its held-out evaluation; trains it if needed.

    A `sae_run` given is checked before any training: a finished jobs/train_sae.py run (sae_report.json) of this
    suite's model. Errors are one `error:` line."""
    cfg = read_yaml_file(SAE_CONFIG)
    layer = cfg["layers"][0]
    if sae_run:
        run_dir = sae_run
        if not (run_dir / "sae_report.json").is_file():
            raise SystemExit(f"error: --sae-run {run_dir}: expected a finished jobs/train_sae.py run (its "
                             f"sae_report.json), found none")
    else:
        digest = hashlib.sha256(SAE_CONFIG.read_bytes()).hexdigest()[:8]
        run_dir = CACHE / f"sae-smollm2-{digest}"
        if not (run_dir / "sae_report.json").is_file():
            command = [sys.executable, str(REPO / "jobs" / "train_sae.py"), "--config", str(SAE_CONFIG),
                       "--set", f"output.root={CACHE}", "--set", f"output.run_name={run_dir.name}",
                       "--set", f"data.data_root={data_root}"]
            log("[sae] " + " ".join(command))
            if subprocess.run(command, cwd=REPO).returncode != 0:  # train_sae printed its own error line
                raise SystemExit(f"error: {SAE_CONFIG}: jobs/train_sae.py failed (see above); no SAE for sae_fd, sae_reg")
    report = read_json_file(run_dir / "sae_report.json", "a finished jobs/train_sae.py run's sae_report.json")
    trained_on = read_json_file(run_dir / "sae_config.json", "the SAE run's sae_config.json")
    config = trained_on.get("config")
    model_cfg = config.get("model") if isinstance(config, dict) else None
    model = model_cfg.get("name_or_path") if isinstance(model_cfg, dict) else None
    if model is None:
        raise SystemExit(f"error: {run_dir / 'sae_config.json'}: expected config.model.name_or_path (the SAE's model)")
    if model != MODEL:
        raise SystemExit(f"error: {run_dir}: an SAE of {model!r}; this suite's model is {MODEL!r}")
    evaluation = report.get("eval")
    layers = evaluation.get("layers") if isinstance(evaluation, dict) else None
    if not isinstance(layers, dict) or str(layer) not in layers:
        raise SystemExit(f"error: {run_dir}: its sae_report.json has no layer {layer} (configs/sae_smollm2.yaml's)")
    folder = Path(report.get("checkpoint", "")) / f"layer_{layer}"
    if not (folder / "cfg.json").is_file():
        raise SystemExit(f"error: {folder}: no SAE folder (cfg.json) in {run_dir}")
    return {"model": MODEL, "sae": str(folder), "layer": layer, "parameters": 134.5e6,
            "about": ", Q4_1 GGUF de-quantized to fp32", "architecture": cfg["sae"]["architecture"].capitalize(),
            "sae_run": _repo_relative(run_dir), "sae_eval": layers}


def _repo_relative(path: Path) -> str:
    """A path as the report records it: relative to the repository when inside it (the same on every clone)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def recorded_report(stem: str) -> dict:
    """The committed report of this budget (bench/results/<stem>.json), {} if there is none. Its finished runs are
    kept, never trained again (run_one's `recorded`): run dirs are caches, the report is what a checkout keeps."""
    path = RESULTS / f"{stem}.json"
    return read_json_file(path, "a suite report") if path.is_file() else {}


def recorded_sae_run(report: dict) -> Path | None:
    """The SAE run the last report of this budget used (its `base.sae_run`): --report-only's default, so that the
    sae_fd / sae_reg runs are found under the same keys without retyping --sae-run."""
    recorded = report.get("base", {}).get("sae_run")
    return resolve_repo_path(recorded) if recorded else None


def kept_run(report: dict, key: str, base: dict) -> dict | None:
    """The report's record of run `key` if it may stand for the run this suite would make now: finished, and for
    the SAE methods made with the same SAE (the same held-out evaluation; a retrained SAE that differs is new)."""
    run = report.get("runs", {}).get(key)
    if not run or "summary" not in run:
        return None
    if run.get("method") in SAE_METHODS and report.get("base", {}).get("sae_eval") != base.get("sae_eval"):
        return None
    return run


def compact_trace(trace: dict | None, points: int = 400) -> dict | None:
    """A λ / share trace small enough to keep in the report (every k-th step), its per-task medians exact."""
    if not trace:
        return None
    k = max(1, len(trace["steps"]) // points)
    return {**trace, "steps": trace["steps"][::k], "share": trace["share"][::k], "lambda": trace["lambda"][::k]}


def val_aa(run: dict | None) -> float | None:
    return ((run or {}).get("summary_validation") or {}).get("aa")


def choose_lr(runs: dict, candidates: list[float]) -> dict:
    """The candidate with the best validation AA of seq_lora on order 1 (ties: the smaller lr)."""
    scored = [(val_aa(runs.get(run_key("1", "seq_lora", lr=lr))), lr) for lr in candidates]
    scored = [(aa, lr) for aa, lr in scored if aa is not None]
    if not scored:
        raise SystemExit("error: lr probe: no seq_lora probe run finished; see the run errors above")
    best = max(scored, key=lambda t: (t[0], -t[1]))
    return {"lr": best[1], "validation_aa": {f"{lr:g}": aa for aa, lr in scored}, "rule": "best validation AA"}


def lr_section(runs: dict, candidates: list[float], choice: dict | None) -> list[str]:
    """The lr probe: seq_lora on order 1 at each candidate, its validation AA (what chose) and test (reported)."""
    lines = ["## lr probe (seq_lora, order 1)", "", "| lr | val AA | AA | BWT | FWT | median step (s) | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for lr in candidates:
        run = runs.get(run_key("1", "seq_lora", lr=lr))
        if not run or "summary" not in run:
            lines.append(f"| {lr:g} | " + ("failed | " if run else "not run yet | ") + "| | | | |")
            continue
        s = run["summary"]
        mark = " **(chosen)**" if choice and choice["lr"] == lr else ""
        lines.append(f"| {lr:g}{mark} | {_f(val_aa(run))} | {_f(s['aa'])} | {_f(s['bwt'])} | {_f(s['fwt'])} | "
                     f"{_f(run.get('median_step_s'), 2)} | {_f(run.get('wall_s'), 0)} |")
    return lines + [""]


def strongest(runs: dict, orders: list[str], methods: list[str]) -> str | None:
    """The regularizer with the best mean validation AA over the orders at seed 0."""
    means = {}
    for name in methods:
        if name in REGULARIZERS:
            values = [v for o in orders if (v := val_aa(runs.get(run_key(o, name)))) is not None]
            if values:
                means[name] = fmean(values)
    return max(means, key=means.get) if means else None


def run_real_suite(bench_cfg: dict, budget_name: str, data_root: Path, sae_run: str | None,
                   methods: list[str] | None = None, orders: list[str] | None = None, log=print,
                   report_only: bool = False) -> dict:
    from bench.common import ensure_ray, lock_suite

    budget = bench_cfg["budgets"][budget_name]
    preset = read_yaml_file(resolve_repo_path(bench_cfg["preset"]))
    # the report always covers the budget's whole plan; --methods / --orders only choose what this call runs
    all_methods, all_orders = budget["methods"], [str(o) for o in budget["orders"]]
    methods, orders = methods or all_methods, orders or all_orders
    extra = [m for m in budget.get("order1_methods", []) if m not in all_methods]
    stem = "cl4_" + budget_name.replace("-", "_")  # bench/results/cl4_smollm2.{json,md}
    recorded = recorded_report(stem)
    recorded_sae = recorded_sae_run(recorded)
    sae_run = cli_path(sae_run) if sae_run else recorded_sae  # default: the SAE the report's runs used
    if not report_only:
        lock_suite()
    began = time.time()
    cfg = read_yaml_file(SAE_CONFIG)
    base = {"model": MODEL, "layer": cfg["layers"][0], "parameters": 134.5e6,
            "about": ", Q4_1 GGUF de-quantized to fp32", "architecture": cfg["sae"]["architecture"].capitalize()}
    base_s = 0.0
    sae_missing = bool(sae_run) and sae_run == recorded_sae and not (sae_run / "sae_report.json").is_file()
    if sae_missing:  # a fresh checkout: the report's record of its SAE stands for the runs it kept
        base.update(recorded["base"])
    elif sae_run:  # a finished run: checked and read before hours of probes, so the report names it from the start
        base.update(ensure_sae(sae_run, data_root, log))
    # else the SAE is trained when the first method that uses it runs: the lr probe does not wait
    if not report_only:
        ensure_ray(budget)
    runs = {key: run for key in recorded.get("runs", {}) if (run := kept_run(recorded, key, base))}
    state = {"lr_choice": None, "strongest": None}

    def run(order: str, name: str, seed: int = 0, lr: float | None = None, key: str | None = None) -> None:
        nonlocal base_s, sae_missing
        key = key or run_key(order, name, seed)
        kept = kept_run(recorded, key, base)
        if name in SAE_METHODS and not kept and ("sae" not in base or sae_missing):
            if report_only:  # no SAE to load, and never train one here
                return
            t0 = time.time()
            base.update(ensure_sae(None, data_root, log))  # trained into bench/cache/ (once)
            base_s, sae_missing = time.time() - t0, False
            for other in [k for k, r in runs.items() if r.get("method") in SAE_METHODS and not kept_run(recorded, k, base)]:
                log(f"[sae] {other}: made with the report's earlier SAE, not this one: dropped from the report")
                del runs[other]
        run = run_one("cl4", preset, bench_cfg, budget_name, base, data_root, order, name, seed, lr, key=key,
                      log=log, report_only=report_only, recorded=kept)
        if run is not None and run is not kept and name == "sae_fd" and "summary" in run:
            run["lambda_trace"] = compact_trace(lambda_trace(run))  # the run dir is a cache: keep it in the report
        if run is not None:
            runs[key] = run
            report()

    def planned() -> list[str]:
        keys = [run_key("1", "seq_lora", lr=lr) for lr in budget["lr_candidates"]]
        keys += [run_key(o, m) for o in all_orders for m in all_methods] + [run_key("1", m) for m in extra]
        seed_methods = [state["strongest"] if m == "strongest" else m for m in budget.get("seed_methods", [])]
        keys += [run_key(o, m, s) for s in budget.get("seeds", []) for o in all_orders for m in seed_methods if m]
        return keys

    def report() -> list[Path]:
        if state["lr_choice"]:  # read from every run so far, so a report written mid-suite names it as the end would
            state["strongest"] = strongest(runs, all_orders, all_methods)
        suite = suite_dict("cl4", budget_name, bench_cfg, all_methods + extra, all_orders, base, runs, planned())
        suite.update(state, seeds=budget.get("seeds", []),
                     seed_methods=[state["strongest"] if m == "strongest" else m for m in budget.get("seed_methods", [])])
        rho = bench_cfg["methods"]["sae_fd"].get("rho")
        sections = lr_section(runs, budget["lr_candidates"], state["lr_choice"]) + seeds_section(suite)
        paired_lines, suite["paired"] = paired_section(suite)
        lambda_lines, _ = lambda_section(suite, stem, rho)
        notes = NOTES + ([f"lr {state['lr_choice']['lr']:g}, chosen by seq_lora's validation AA on order 1 among "
                          f"{state['lr_choice']['validation_aa']}."] if state["lr_choice"] else [])
        return write_suite(suite, "cl4", TITLE, notes, base_s, began, stem=stem,
                           sections=sections + paired_lines + lambda_lines)

    for lr in budget["lr_candidates"]:
        run("1", "seq_lora", lr=lr, key=run_key("1", "seq_lora", lr=lr))
    if report_only and not runs:  # never overwrite a report with an empty one
        raise SystemExit(f"error: --report-only: no finished run of budget {budget_name} under {CACHE / 'runs'}")
    if report_only and not all(run_key("1", "seq_lora", lr=lr) in runs for lr in budget["lr_candidates"]):
        return finish(report())  # the lr is not chosen yet: nothing else can have run
    state["lr_choice"] = choose_lr(runs, budget["lr_candidates"])
    lr = state["lr_choice"]["lr"]
    log(f"[lr] chosen on validation: {lr:g} ({state['lr_choice']['validation_aa']})")
    for order in orders:
        for name in methods:
            if name in all_methods:
                run(order, name, lr=lr)
    for name in extra:
        if methods is all_methods or name in methods:
            run("1", name, lr=lr)
    state["strongest"] = strongest(runs, all_orders, all_methods)
    for seed in budget.get("seeds", []):
        for order in orders:
            for name in budget.get("seed_methods", []):
                name = state["strongest"] if name == "strongest" else name
                if name in methods:
                    run(order, name, seed, lr=lr)
    return finish(report())


def finish(paths: list[Path]) -> None:
    for path in paths:
        print(f"wrote {_repo_relative(path)}")
