"""Shared helpers of the real-data benchmarks: paths, the method × order suite runner, and its report.

A suite is one benchmark config (configs/cl4.yaml or configs/trace.yaml, the presets users run) adapted to the CPU
budget of configs/bench/<bench>.yaml: the bench base model from bench/make_base.py, the budget's examples per task,
training settings and task subset, and one `method:` block per method. Every method × order is one ordinary run
(`run_sequence(load_config(<written yaml>))`) under bench/cache/runs/<bench>-<budget>-o<order>-<method>/, all in one
Ray session; a run dir resumes, so re-running a suite only trains what is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import traceback
from pathlib import Path
from statistics import fmean

import yaml

from saefd_ray.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / "cache"
RESULTS = REPO / "bench" / "results"


def exit_2_on_error(main):
    """A bench's `main`: its `SystemExit("error: ...")` becomes that one line on stderr and exit status 2."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SystemExit as exit_:
            if isinstance(exit_.code, str) and exit_.code.startswith("error:"):
                print(exit_.code, file=sys.stderr)
                raise SystemExit(2) from None
            raise

    return wrapped


def resolve_repo_path(path: str | Path) -> Path:
    """A path written in a config file: relative ones are relative to the repository (where the configs live)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (REPO / path).resolve()


def cli_path(path: str | Path) -> Path:
    """A path given on the command line: relative ones are relative to the working directory, as in any CLI."""
    return Path(path).expanduser().resolve()


def read_yaml_file(path: str | Path) -> dict:
    """A YAML mapping; a missing, unreadable or non-mapping file is one `error:` line (exit 2 under exit_2_on_error)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: not found") from None
    except OSError as err:
        raise SystemExit(f"error: {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise SystemExit(f"error: {path}: expected a UTF-8 text file (YAML)") from None
    except yaml.YAMLError as err:
        raise SystemExit(f"error: {path}: expected YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path}: expected a YAML mapping, got {type(data).__name__}")
    return data


def read_bench_config(path: str) -> dict:
    """A bench config (configs/bench/*.yaml) named on the command line, its top-level keys checked."""
    cfg = read_yaml_file(path)  # relative to the working directory, and named in errors as given
    missing = [key for key in ("budgets", "methods", "preset", "data_root") if key not in cfg]
    if missing:
        raise SystemExit(f"error: {path}: expected a bench config (configs/bench/*.yaml) with {', '.join(missing)}")
    for key in ("budgets", "methods"):
        if not isinstance(cfg[key], dict) or not all(isinstance(v, dict) for v in cfg[key].values()):
            raise SystemExit(f"error: {path}: {key}: expected a mapping of names to mappings")
    return cfg


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (rounds, steps, threads), refused at parse time in the house's one line."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def choice_list(text: str | None, flag: str, known) -> list[str] | None:
    """A comma list given on the command line (None when not given), each name checked against `known`.

    Spaces and empty entries (a trailing comma) are forgiven; an unknown name, or no name at all, is one `error:` line
    naming the flag.
    """
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = [str(k) for k in known]
    if not names:
        raise SystemExit(f"error: {flag} {text!r}: expected a comma list of names, one of {', '.join(known)}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"error: {flag}: unknown {', '.join(unknown)}; one of {', '.join(known)}")
    return names


def read_json_file(path: str | Path, what: str) -> dict:
    """A JSON object written by one of our jobs; a missing or broken one is one `error:` line naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: not found; expected {what}") from None
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {path}: expected {what} (unreadable: {err})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path}: expected {what} (a JSON object)")
    return data


# ---------------------------------------------------------------------------------------------- run configs


def run_key(order: str, method: str, seed: int = 0, lr: float | None = None) -> str:
    """The suite's name of one run: o<order>/<method>, plus /s<seed> for extra seeds and /lr<lr> for lr probes."""
    key = f"o{order}/{method}"
    if seed:
        key += f"/s{seed}"
    if lr is not None:
        key += f"/lr{lr:g}"
    return key


def run_yaml(preset: dict, budget: dict, method: dict, order: str, base: dict, bench: str, budget_name: str,
             data_root: Path, seed: int = 0, lr: float | None = None) -> dict:
    """The raw run config of one method × order × seed: the preset, with the budget and the bench base applied."""
    raw = copy.deepcopy(preset)
    raw["model"] = {"name_or_path": base["model"], "dtype": "float32"}
    raw.setdefault("lora", {}).update(budget.get("lora", {}))
    tasks = raw["tasks"]
    tasks["data_root"] = str(data_root)
    if "validation" in budget:
        tasks["validation"] = {"size": budget["validation"]}
    keep = set(budget.get("tasks") or [t["name"] for t in tasks["sequence"]])
    tasks["sequence"] = [t for t in tasks["sequence"] if t["name"] in keep]
    for task in tasks["sequence"]:
        task["max_train"] = budget["max_train"]
        task["max_test"] = budget["max_test"]
    wanted = tasks.get("orders", {}).get(order)
    if wanted is not None:  # a named O-LoRA order, restricted to the budget's tasks
        tasks["orders"] = {order: [name for name in wanted if name in keep]}
        tasks["order"] = order
    else:
        tasks.pop("orders", None)
        tasks.pop("order", None)
    training = raw.setdefault("training", {})
    training.update(budget.get("training", {}))
    if lr is not None:
        training["lr"] = lr
    if seed:  # LoRA init, data order, anchor draw (the preset's seed 0 keeps its run dirs)
        training["seed"] = seed
    if "epochs_per_task" in training:  # the preset's per-task epochs (TRACE), scaled by the budget, for kept tasks
        scale = budget.get("epochs_scale", 1.0)
        training["epochs_per_task"] = {k: max(1, round(v * scale)) for k, v in training["epochs_per_task"].items()
                                       if k in keep}
    raw["distributed"] = {"num_workers": budget.get("num_workers", 2), "use_gpu": False, "zero_stage": 2,
                          "cpus_per_worker": 1}
    raw.setdefault("evaluation", {}).update(budget.get("evaluation", {}))
    block = copy.deepcopy(method)
    if block["name"] in ("sae_fd", "sae_reg"):
        block["sae"] = {"path": base["sae"], "layer": base["layer"]}
    raw["method"] = block
    # the run dir is named by a hash of its settings: changing a budget starts fresh runs instead of tripping
    # run_sequence's "written by a different config" check; unchanged settings resume. Paths enter the hash relative
    # to the repository, so that every clone (and the committed report) names a run alike.
    digest = hashlib.sha256(json.dumps(portable_paths(raw), sort_keys=True).encode()).hexdigest()[:8]
    raw["output"] = {"root": str(CACHE / "runs"),
                     "run_name": f"{bench}-{budget_name}-o{order}-{block['name']}-{digest}"}
    return raw


def repo_relpath(path: str) -> str:
    """An absolute path written relative to the repository (`../shared/data`), the same on every clone; others as given
    (a model name, an already relative path)."""
    return os.path.relpath(path, REPO) if Path(path).is_absolute() else path


def portable_paths(raw: dict) -> dict:
    """`raw` with its paths (model, data root, SAE) written relative to the repository: what names a run."""
    raw = copy.deepcopy(raw)
    raw["model"]["name_or_path"] = repo_relpath(raw["model"]["name_or_path"])
    raw["tasks"]["data_root"] = repo_relpath(raw["tasks"]["data_root"])
    if "sae" in raw["method"]:
        raw["method"]["sae"]["path"] = repo_relpath(raw["method"]["sae"]["path"])
    return raw


def lock_suite() -> None:
    """Refuse a second suite while one runs: two drivers on one run dir would train it twice and race its files.
    The lock is held (an open file with fcntl's exclusive lock) until the process exits."""
    import fcntl

    CACHE.mkdir(parents=True, exist_ok=True)
    handle = open(CACHE / "suite.lock", "w")  # noqa: SIM115 - kept open on purpose: the lock lives with the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: {CACHE / 'suite.lock'}: another benchmark suite is running on this cache") from None
    _LOCKS.append(handle)


_LOCKS: list = []


def ensure_ray(budget: dict) -> None:
    import ray

    if not ray.is_initialized():
        workers = budget.get("num_workers", 2)
        from saefd_ray.observe.console import ray_init_options
        from saefd_ray.train.sequence import pin_state_api

        address = os.environ.get("RAY_ADDRESS")
        if address in (None, "local"):  # as sequence.init_ray: only a Ray we start is pinned
            pin_state_api()  # a second Ray on the machine must not make Ray Train remove our placement group
        ray.init(address=address, num_cpus=max(os.cpu_count() or 1, workers),
                 include_dashboard=False, **ray_init_options())  # quiet: stage progress comes as heartbeat lines


def run_one(bench: str, preset: dict, bench_cfg: dict, budget_name: str, base: dict, data_root: Path, order: str,
            name: str, seed: int = 0, lr: float | None = None, key: str | None = None, log=print,
            report_only: bool = False, recorded: dict | None = None) -> dict | None:
    """One method × order × seed as an ordinary run (resumed if its run dir exists); a failure is recorded
    (error + traceback tail), never raised, so one broken method does not sink the suite. `report_only`: read a
    finished run's results.json (None if it has none); nothing trains and Ray is not started.

    `recorded`: this run as the committed report (bench/results/<stem>.json) holds it. Run dirs are caches that a
    fresh checkout lacks; a finished run recorded under the same run name (the hash of its settings) is kept as
    recorded and never trained again."""
    from saefd_ray.config import load_config
    from saefd_ray.train.sequence import run_sequence

    budget = bench_cfg["budgets"][budget_name]
    key = key or run_key(order, name, seed, lr)
    raw = run_yaml(preset, budget, bench_cfg["methods"][name], order, base, bench, budget_name, data_root, seed, lr)
    configs_dir = CACHE / "configs"
    configs_dir.mkdir(parents=True, exist_ok=True)
    path = configs_dir / f"{raw['output']['run_name']}.yaml"
    if recorded and "summary" in recorded and Path(recorded.get("run_dir", "")).name == raw["output"]["run_name"]:
        log(f"=== {bench} {budget_name}: {key}: kept as the committed report records it ({recorded['run_dir']})")
        return recorded
    if report_only:
        done = CACHE / "runs" / raw["output"]["run_name"] / "results.json"
        if not done.is_file():
            return None
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    log(f"=== {bench} {budget_name}: {key} ({path.relative_to(REPO)})")
    began = time.time()
    meta = {"order": order, "method": name, "seed": seed, **({"lr": lr} if lr is not None else {})}
    try:
        results = json.loads(done.read_text()) if report_only else run_sequence(load_config(path))
    except Exception as err:  # noqa: BLE001 - one broken method must not sink the suite
        log(f"!!! {key} failed: {type(err).__name__}: {err}")
        return {**meta, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:],
                "wall_s": round(time.time() - began, 1)}
    run_dir = CACHE / "runs" / raw["output"]["run_name"]
    run = {**meta, "tasks": results["tasks"], "r_matrix": results["r_matrix"], "summary": results["summary"],
           "r_matrix_validation": results.get("r_matrix_validation"),
           "summary_validation": results.get("summary_validation"), "timings": results["timings"],
           **run_cost(run_dir, results, None if report_only else round(time.time() - began, 1)),
           "run_dir": str(run_dir.relative_to(REPO))}
    if (results.get("first_task") or {}).get("trained_by"):  # its task 1 adopted (saefd_ray/train/first_task.py)
        run["task1_from"] = results["first_task"]["trained_by"]
    s = run["summary"]
    log(f"--- {key}: AA {_f(s['aa'])} BWT {_f(s['bwt'])} FWT {_f(s['fwt'])} ({run['wall_s']}s)")
    return run


def run_suite(bench: str, preset_path: Path, bench_cfg: dict, budget_name: str, base: dict, data_root: Path,
              methods: list[str] | None = None, orders: list[str] | None = None, log=print, on_run=None) -> dict:
    """Every method × order of the budget (seed 0), one run at a time; `on_run(suite)` after each."""
    preset = read_yaml_file(preset_path)
    budget = bench_cfg["budgets"][budget_name]
    methods = methods or budget["methods"]
    orders = orders or [str(o) for o in budget["orders"]]
    lock_suite()
    ensure_ray(budget)
    runs: dict[str, dict] = {}
    for order in orders:
        for name in methods:
            runs[run_key(order, name)] = run_one(bench, preset, bench_cfg, budget_name, base, data_root, order, name,
                                                 log=log)
            if on_run is not None:  # a suite cut short still leaves its report
                on_run(suite_dict(bench, budget_name, bench_cfg, methods, orders, base, runs))
    return suite_dict(bench, budget_name, bench_cfg, methods, orders, base, runs)


def suite_dict(bench: str, budget_name: str, bench_cfg: dict, methods: list[str], orders: list[str], base: dict,
               runs: dict, planned: list[str] | None = None) -> dict:
    budget = bench_cfg["budgets"][budget_name]
    return {"bench": bench, "budget": budget_name, "budget_config": budget, "methods": methods, "orders": orders,
            "method_config": {m: bench_cfg["methods"][m] for m in methods}, "base": base, "runs": dict(runs),
            "planned": planned or [run_key(o, m) for o in orders for m in methods]}


WALL_FILE = "bench_wall.json"


def run_cost(run_dir: Path, results: dict, wall_s: float | None) -> dict:
    """Wall time and mean median step time of one run. A run trained by an earlier (interrupted) call keeps the
    wall time that call recorded in the run dir; this call only loaded it (`wall_s` None: only read, never write)."""
    steps = [json.loads(f.read_text()).get("median_step_s") for f in sorted(run_dir.glob("tasks/*/row.json"))]
    cost = {"median_step_s": fmean([x for x in steps if x]) if any(steps) else None}
    trained = sum(k.startswith("task_") for k in results["timings"])
    if trained and wall_s is not None:
        # fewer stages trained now than the R matrix has rows after the base: wall_s covers only this call's part
        wall = {"wall_s": wall_s, "resumed": trained < len(results["r_matrix"]) - 1}
        atomic_write_text(run_dir / WALL_FILE, json.dumps(wall))
    elif (run_dir / WALL_FILE).is_file():
        wall = json.loads((run_dir / WALL_FILE).read_text())
    else:
        wall = {"wall_s": None}  # trained before wall times were recorded in the run dir
    return {**cost, "wall_s": wall.get("wall_s"), "resumed": bool(wall.get("resumed"))}


# ---------------------------------------------------------------------------------------------------- report


def _f(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def mean_over_orders(suite: dict) -> dict[str, dict]:
    """Per method: mean AA / BWT / FWT over the orders that finished, seed 0 (None where no order has the value)."""
    out = {}
    for name in suite["methods"]:
        done = [r for o in suite["orders"] if "summary" in (r := suite["runs"].get(run_key(o, name)) or {})]
        row = {"orders_done": len(done)}
        for metric in ("aa", "bwt", "fwt"):
            values = [r["summary"][metric] for r in done if r["summary"].get(metric) is not None]
            row[metric] = fmean(values) if values else None
        out[name] = row
    return out


REGULARIZERS = ("ewc", "l2", "lwf", "sae_reg")


def target_lines(suite: dict) -> list[str]:
    """Issue 8's targets, per order: SAE-FD's AA best among the regularizers, its BWT >= -2, step time <= 1.15x."""
    out = []
    for order in suite["orders"]:
        runs = {m: suite["runs"].get(f"o{order}/{m}") for m in suite["methods"]}
        fd = runs.get("sae_fd")
        if not fd or "summary" not in fd:
            continue
        rivals = {m: r["summary"]["aa"] for m, r in runs.items() if m in REGULARIZERS and r and "summary" in r}
        best = max(rivals.items(), key=lambda kv: kv[1]) if rivals else None
        aa, bwt = fd["summary"]["aa"], fd["summary"]["bwt"]
        verdict = "n/a (no regularizer ran)" if best is None else (
            f"{'yes' if aa > best[1] else 'no'} (SAE-FD {_f(aa)} vs best of {', '.join(rivals)}: {best[0]} {_f(best[1])})")
        seq = runs.get("seq_lora")
        ratio = (fd.get("median_step_s") / seq["median_step_s"]) if seq and seq.get("median_step_s") and \
            fd.get("median_step_s") else None
        out += [f"- order {order}: best AA among the regularizers: {verdict}; BWT {_f(bwt)} "
                f"({'meets' if bwt is not None and bwt >= -2 else 'misses'} >= -2); median step "
                f"{_f(ratio, 2)}x SeqLoRA's (target <= 1.15x; step times are only comparable between runs on an "
                f"equally loaded machine)"]
    return (["## Targets", ""] + out + [""]) if out else []


def markdown(suite: dict, title: str, notes: list[str], per_task: bool = False, sections: list[str] = ()) -> str:
    """The suite's report; `sections` (markdown lines: seeds, paired comparisons, λ traces) go before the R
    matrices."""
    lines = [f"# {title} — budget `{suite['budget']}`", ""] + [line for note in notes for line in (note, "")]
    planned = suite["budget_config"].get("methods", [])
    missing = [m for m in planned if m not in suite["methods"]] + [
        key for key, run in suite["runs"].items() if "error" in run] + [
        key for key in suite.get("planned", []) if key not in suite["runs"]]
    if missing or set(suite["orders"]) != {str(o) for o in suite["budget_config"].get("orders", [])}:
        lines += [f"**PARTIAL run of this budget**: methods {', '.join(suite['methods'])} on orders "
                  f"{', '.join(suite['orders'])}; not run or failed: {', '.join(missing) or '—'}. "
                  "Not the budget's result.", ""]
    lines += [base_line(suite["base"]), ""]
    for order in suite["orders"]:
        runs = [suite["runs"].get(f"o{order}/{m}") for m in suite["methods"]]
        tasks = next((r["tasks"] for r in runs if r and "tasks" in r), [])
        if not tasks:  # nothing of this order has finished yet
            continue
        lines += [f"## Order {order}: {' → '.join(tasks)}", ""]
        header = ["method", "AA", "BWT", "FWT", "mean forgetting", "val AA", "median step (s)", "wall (s)"]
        if per_task:
            header += [f"{t} (final)" for t in tasks]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, run in zip(suite["methods"], runs):
            if run is None:
                continue
            if "error" in run:
                lines.append(f"| {name} | failed: {run['error'][:120].replace('|', '/')} |" + " |" * (len(header) - 2))
                continue
            s = run["summary"]
            wall = _f(run.get("wall_s"), 0) + (" (resumed)" if run.get("resumed") else "")
            wall += f" (task 1 of {run['task1_from']})" if run.get("task1_from") else ""
            cells = [name, _f(s["aa"]), _f(s["bwt"]), _f(s["fwt"]), _f(s.get("mean_forgetting")),
                     _f((run.get("summary_validation") or {}).get("aa")), _f(run.get("median_step_s"), 2), wall]
            if per_task:
                cells += [_f(v) for v in run["r_matrix"][-1]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if len(suite["orders"]) > 1:
        lines += ["## Mean over orders", "", "| method | AA | BWT | FWT | orders |", "|---|---|---|---|---|"]
        for name, row in mean_over_orders(suite).items():
            lines.append(f"| {name} | {_f(row['aa'])} | {_f(row['bwt'])} | {_f(row['fwt'])} | {row['orders_done']} |")
        lines.append("")
    lines += target_lines(suite)
    lines += list(sections)
    lines += ["## R matrices", "", "Row 0 is the base model; row t the scores after task t (mtl: one joint row).", ""]
    for key, run in suite["runs"].items():
        if "r_matrix" not in run:
            continue
        lines += [f"<details><summary>{key}</summary>", "", "| | " + " | ".join(run["tasks"]) + " |",
                  "|" + "---|" * (len(run["tasks"]) + 1)]
        for index, row in enumerate(run["r_matrix"]):
            label = "base" if index == 0 else (f"after {run['tasks'][index - 1]}" if len(run["r_matrix"]) > 2
                                               else "after all")
            lines.append(f"| {label} | " + " | ".join(_f(v) for v in row) + " |")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def base_line(base: dict) -> str:
    """One line on the base model and its SAE: the bench's pre-trained toy, or a named real model."""
    if "pretrain" in base:
        what = (f"`{Path(base['model']).name}` ({base['parameters'] / 1e6:.1f} M parameters, pre-trained "
                f"{base['pretrain']['seconds']:.0f}s on {base['pretrain']['tokens']:,} tokens, final LM loss "
                f"{base['pretrain']['final_loss']:.2f})")
    else:
        what = f"`{base['model']}` ({base['parameters'] / 1e6:.1f} M parameters{base.get('about', '')})"
    return f"Base: {what}; SAE: {base.get('architecture', 'Gated')}, layer {base['layer']}{_sae_line(base)}."


def _sae_line(base: dict) -> str:
    layer = (base.get("sae_eval") or {}).get(str(base["layer"])) or {}
    if not layer:
        return ""
    return f" (held-out FVU {_f(layer.get('fvu'), 3)}, L0 {_f(layer.get('l0'))})"


def heatmaps(suite: dict, stem: str) -> list[Path]:
    """One small PNG per order: the R matrix of every method side by side (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for order in suite["orders"]:
        runs = [(m, suite["runs"].get(f"o{order}/{m}")) for m in suite["methods"]]
        runs = [(m, r) for m, r in runs if r and "r_matrix" in r]
        if not runs:
            continue
        cols = min(5, len(runs))
        rows = math.ceil(len(runs) / cols)
        fig = Figure(figsize=(2.4 * cols, 2.3 * rows), dpi=80)
        FigureCanvasAgg(fig)
        for index, (name, run) in enumerate(runs):
            ax = fig.add_subplot(rows, cols, index + 1)
            matrix = run["r_matrix"]
            ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis", aspect="auto")
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 60 else "black")
            ax.set_title(f"{name}  AA {_f(run['summary']['aa'])}", fontsize=7)
            ax.set_xticks(range(len(run["tasks"])), [t[:6] for t in run["tasks"]], fontsize=5, rotation=45)
            ax.set_yticks(range(len(matrix)), ["base"] + [str(i) for i in range(1, len(matrix))], fontsize=5)
        fig.suptitle(f"{suite['bench']} {suite['budget']}, order {order}: R matrices", fontsize=8)
        fig.tight_layout()
        path = RESULTS / f"{stem}_o{order}.png"
        fig.savefig(path)
        written.append(path)
    return written


def write_outputs(suite: dict, stem: str, title: str, notes: list[str], per_task: bool = False,
                  sections: list[str] = ()) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = {k: repo_relpath(v) if k in ("model", "sae") else v for k, v in suite.get("base", {}).items()}
    suite = dict(suite, base=base, mean=mean_over_orders(suite))  # no machine's paths in a committed report
    json_path = RESULTS / f"{stem}.json"
    atomic_write_text(json_path, json.dumps(suite, indent=1))
    md_path = RESULTS / f"{stem}.md"
    atomic_write_text(md_path, markdown(suite, title, notes, per_task, sections))
    return [json_path, md_path, *heatmaps(suite, stem)]


def write_suite(suite: dict, bench: str, title: str, notes: list[str], base_s: float, began: float,
                per_task: bool = False, stem: str | None = None, sections: list[str] = ()) -> list[Path]:
    """The JSON / markdown / heatmaps of the suite so far (called after every run, so a cut-short suite keeps them)."""
    # once per run folder: the chosen lr probe is also its method's row (one run under two keys)
    walls = {r.get("run_dir", key): r.get("wall_s") or 0 for key, r in suite["runs"].items()}
    runs_s = sum(walls.values())
    suite["wall_s"] = {"base_and_sae": round(base_s, 1), "this_call": round(time.time() - began - base_s, 1),
                       "runs": round(runs_s, 1)}
    notes = notes + [f"Wall time: the runs {runs_s:.0f}s in all (each as its training call measured it; runs an "
                     f"earlier call trained are only loaded); base + SAE {base_s:.0f}s (≈0 when cached)."]
    if suite["budget"].endswith("smoke"):
        notes.insert(0, "**SMOKE budget: a does-it-run check with tiny data; these numbers are not results.**")
    return write_outputs(suite, stem or f"{bench}_{suite['budget']}", title, notes, per_task, sections)
