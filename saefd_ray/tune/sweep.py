"""A Ray Tune sweep whose trials each train a whole task sequence (Ray Train V2 inside Tune).

A sweep file (`tune_spaces/*.yaml`) names a base run config, the search space as dotted run-config keys, the
searcher, the scheduler, trial resources and the output folder:

    base: {config: configs/demo.yaml, set: [method.name=sae_fd, ...]}   # --set overrides of the run config
    space:
      method.rho: {grid: [0.05, 0.15, 0.3]}                             # grid | choice: [..]
      method.anchor_size: {qrandint: [8, 64, 8]}                        # uniform | loguniform | quniform: [lo, hi(, q)]
      method.beta: {loguniform: [0.1, 10]}                              # randint | lograndint | qrandint (hi inclusive)
    search: {algorithm: grid, num_samples: 1, seed: 0}                  # grid | random | optuna (TPE)
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}       # asha | none
    resources: {driver_cpus: 1, driver_resources: {}, max_concurrent_trials: null}
    output: {root: runs/tune, name: contribution_ratio}

Each trial is a Tune function trainable that builds its run config (base + the trial's values), and calls
`run_sequence`, which starts one Ray Train V2 `TorchTrainer` per task — the pattern Ray documents for Train V2
inside Tune. Train V2 places its workers in a placement group of its own (never the trial's), so a trial's Tune
resources are only its driver bundle (`driver_cpus` + `driver_resources`, e.g. `{trial_driver: 1}` that only the
head node of cluster.yaml offers, which keeps drivers off spot GPU nodes); how many trials run at once is
`max_concurrent_trials`, by default as many as the cluster's CPUs / GPUs fit whole Train worker groups (plus their
driver bundles) at the start.

Validation chooses, test reports: everything a trial reports — so Tune's objective, ASHA's pruning and `best.yaml`
— comes from the validation R matrix (`on_task_end` rows and `r_matrix_validation` of run_sequence); the test
matrix stays in each trial's results.json for the report and never reaches Tune.

A trial reports after every task (`on_task_end` of run_sequence; the last report only once run_sequence has
written the run's report files, since ASHA ends a trial the moment it reports at `max_t`): `running_aa` = mean of R[t][:t], the scores of
the t tasks trained so far after task t (all T columns for a joint-training method's single stage), and
`score` — the running AA while the sequence is unfinished, and AA + 1e-4·BWT after the last task. ASHA stops
trials on `score` at equal task counts, so it compares running AAs; scores are percentages (|BWT| ≤ 100), so the
1e-4·BWT term moves AA by at most 0.01 point and only breaks ties between equal final AAs for Tune's searchers;
results.py ranks trials exactly by (AA, BWT).

Resume: every trial's run dir is `<output.root>/<output.name>/runs/<trial id>/`, so a trial restarted by Tune
(`resources.max_failures`) or by a restored sweep continues after its last finished task. Re-running the same
command after the driver died restores the experiment with `Tuner.restore` (finished trials are kept,
unfinished and errored ones resumed); a sweep folder written by a different sweep file is refused.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from saefd_ray.config import (RunConfig, Strict, apply_overrides, load_config, located, origin, parse_override, read_yaml,
                              validate)
from saefd_ray.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent.parent
SPEC_FILE = "sweep.json"  # the sweep's resolved spec, saved in the experiment folder; a restore must match it
BWT_TIEBREAK = 1e-4  # scores are percentages: |BWT| <= 100, so the blend moves AA by <= 0.01 pt

DISCRETE = ("grid", "choice")
RANGES = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "lograndint": 2, "qrandint": 3}


class BaseRun(Strict):
    config: str | None = Field(None, description="run config YAML (default configs/demo.yaml); relative to the cwd, "
                               "else to the repository")
    set: list[str] = Field(default_factory=list, description="--set overrides of the run config, applied first")


class Search(Strict):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats of the whole grid; random/optuna: trials")
    seed: int | None = 0


class Scheduler(Strict):
    name: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="tasks every trial trains before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1)


class Resources(Strict):
    driver_cpus: float = Field(1.0, ge=0, description="CPUs of a trial's driver (it runs run_sequence, no model)")
    driver_resources: dict[str, float] = Field(default_factory=dict,
                                               description="extra resources of the driver bundle, e.g. {trial_driver: 1}")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as fit the cluster now")
    max_failures: int = Field(0, ge=0, description="times Tune restarts a failed trial (it resumes its sequence)")


class Output(Strict):
    root: str = "runs/tune"
    name: str = Field("sweep", min_length=1)


class SweepConfig(Strict):
    base: BaseRun = BaseRun()
    space: dict[str, dict[str, list[Any]]] = Field(min_length=1)
    search: Search = Search()
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    output: Output = Output()

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for key, spec in space.items():
            if key.startswith("output.") or key == "output":
                raise ValueError(f"{key}: the output location is set per trial, it cannot be swept")
            if len(spec) != 1:
                raise ValueError(f"{key}: give exactly one distribution, e.g. {{grid: [..]}}, got {sorted(spec)}")
            (kind, args), = spec.items()
            if kind in DISCRETE:
                if not args:
                    raise ValueError(f"{key}: {kind} needs at least one value")
            elif kind in RANGES:
                if len(args) != RANGES[kind] or not all(isinstance(a, (int, float)) for a in args):
                    shape = "[low, high]" if RANGES[kind] == 2 else "[low, high, q]"
                    raise ValueError(f"{key}: {kind} needs {shape}, got {args}")
                if not args[0] < args[1]:
                    raise ValueError(f"{key}: {kind} needs low < high, got {args}")
                if kind.startswith("log") and args[0] <= 0:
                    raise ValueError(f"{key}: {kind} needs low > 0, got {args}")
            else:
                raise ValueError(f"{key}: unknown distribution {kind!r} (have: {', '.join((*DISCRETE, *RANGES))})")
        return space

    @model_validator(mode="after")
    def _searcher_fits(self) -> "SweepConfig":
        kinds = {next(iter(spec)) for spec in self.space.values()}
        if self.search.algorithm == "grid" and kinds - set(DISCRETE):
            raise ValueError(f"search.algorithm grid: every parameter needs grid or choice, got {sorted(kinds)}; "
                             "use random or optuna for ranges")
        return self

    @property
    def experiment_dir(self) -> Path:
        return Path(self.output.root).expanduser().resolve() / self.output.name


# ---------------------------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep YAML, apply `--tune-set` overrides, validate; every failure is a one-line ConfigError.

    Parameter names contain dots, so `space.<param>.<distribution>=VALUE` replaces that parameter's whole
    distribution, e.g. `space.method.rho.grid=[0.1,0.2]`, and `space.<param>={distribution: VALUE}` does the same
    (`space.method.rho={grid: [0.1, 0.2]}`); other keys are plain dotted overrides.
    """
    path = Path(path)
    raw = read_yaml(path)
    plain = []
    for text in overrides or []:
        keys, value = parse_override(text)
        if keys[0] == "space" and len(keys) >= 2 and isinstance(value, dict):  # space.<param>={grid: [...]}
            raw["space"] = raw["space"] if isinstance(raw.get("space"), dict) else {}
            raw["space"][".".join(keys[1:])] = value
        elif keys[0] == "space" and len(keys) >= 3:  # space.<dotted param>.<distribution>=[...]: replaces its spec
            raw["space"] = raw["space"] if isinstance(raw.get("space"), dict) else {}
            raw["space"][".".join(keys[1:-1])] = {keys[-1]: value}
        else:
            plain.append(text)
    raw = apply_overrides(raw, plain)
    return validate(raw, origin(path, overrides or [], ["--tune-set"] * len(overrides or [])), SweepConfig)


def resolve_base_config(sweep: SweepConfig, config_path: str | None = None) -> Path:
    name = config_path or sweep.base.config or "configs/demo.yaml"
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path
    return path


def param_overrides(params: dict[str, Any]) -> list[str]:
    """Trial values as --set overrides (JSON is YAML, so types survive `parse_override`)."""
    return [f"{key}={json.dumps(value)}" for key, value in sorted(params.items())]


def candidate_values(spec: dict[str, list[Any]]) -> list[Any]:
    """Values that stand for a distribution when checking it against the run config: all of a grid, the ends of a range."""
    (kind, args), = spec.items()
    if kind in DISCRETE:
        return list(args)
    low, high = args[0], args[1]
    if kind in ("randint", "lograndint", "qrandint"):
        return [int(low), int(high)]
    return [low, high]


def base_raw_config(sweep: SweepConfig, config_path: str | None = None, extra: list[str] | None = None) -> dict:
    """The base run config as a raw mapping (file + base.set + extra --set), checked with every swept value."""
    path = resolve_base_config(sweep, config_path)
    overrides = [*sweep.base.set, *(extra or [])]
    flags = ["the sweep's base.set"] * len(sweep.base.set) + ["--set"] * len(extra or [])
    config = load_config(path, overrides, flags)  # the base itself must be valid (paths included)
    raw = apply_overrides(read_yaml(path), overrides)
    for key, spec in sweep.space.items():
        for value in candidate_values(spec):
            validate(apply_overrides(copy.deepcopy(raw), param_overrides({key: value})),
                     source=lambda loc, key=key, value=value: f"space {key}={value!r}: {loc}")
    try:
        check_sae_sources(config)
    except ConfigError as err:  # named by the file or the --set / base.set that gave its key
        raise located(err, origin(path, overrides, flags), RunConfig) from None
    return raw


# ---------------------------------------------------------------------------------------------- Tune pieces


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune param space: grids become grid_search for grid/random and categorical choices for Optuna."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in sweep.space.items():
        (kind, args), = spec.items()
        if kind in DISCRETE:
            if sweep.search.algorithm == "optuna" or (kind == "choice" and sweep.search.algorithm == "random"):
                space[key] = tune.choice(list(args))
            else:
                space[key] = tune.grid_search(list(args))
        elif kind == "randint":
            space[key] = tune.randint(int(args[0]), int(args[1]) + 1)  # Tune's upper bound is exclusive
        elif kind == "lograndint":
            space[key] = tune.lograndint(int(args[0]), int(args[1]) + 1)
        elif kind == "qrandint":
            space[key] = tune.qrandint(int(args[0]), int(args[1]), int(args[2]))
        else:
            space[key] = getattr(tune, kind)(*args)
    return space


def searcher(sweep: SweepConfig):
    """None (Tune's BasicVariantGenerator: grid and random sampling) or Optuna's TPE."""
    if sweep.search.algorithm != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.search.seed))


def scheduler(sweep: SweepConfig, num_stages: int):
    if sweep.scheduler.name == "none" or num_stages < 2:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=num_stages,
                         grace_period=min(sweep.scheduler.grace_period, num_stages),
                         reduction_factor=sweep.scheduler.reduction_factor)


def driver_bundle(sweep: SweepConfig) -> dict[str, float]:
    bundle = {"CPU": sweep.resources.driver_cpus, **sweep.resources.driver_resources}
    return {k: v for k, v in bundle.items() if v} or {"CPU": 0}


def trial_demand(run_raw: dict, sweep: SweepConfig) -> dict[str, float]:
    """Logical resources one running trial holds: its driver bundle + a full (max-size) Train worker group."""
    config = validate(copy.deepcopy(run_raw))
    dist = config.distributed
    workers = dist.num_workers if isinstance(dist.num_workers, int) else dist.num_workers[1]
    demand = dict(driver_bundle(sweep))
    demand["CPU"] = demand.get("CPU", 0) + workers * dist.cpus_per_worker
    if dist.use_gpu:
        demand["GPU"] = demand.get("GPU", 0) + workers
    return demand


def concurrency(sweep: SweepConfig, run_raw: dict, available: dict[str, float]) -> int:
    """resources.max_concurrent_trials, or how many trials' demands fit `available` (at least 1)."""
    if sweep.resources.max_concurrent_trials:
        return sweep.resources.max_concurrent_trials
    fits = [math.floor(available.get(name, 0) / need + 1e-9) for name, need in trial_demand(run_raw, sweep).items()
            if need > 0]
    return max(1, min(fits) if fits else 1)


# ---------------------------------------------------------------------------------------------- the trial


def selection_rows(results: dict) -> list[list[float]]:
    """The R matrix a finished trial is judged on: validation, never test (`r_matrix`)."""
    return results["r_matrix_validation"]


def trial_metrics(rows: list[list[float]], names: list[str], index: int, final: bool) -> dict[str, Any]:
    """What a trial reports after stage `index` (0-based) given the validation R rows so far (base row first)."""
    from saefd_ray.eval.summary import summarize

    last = rows[-1]
    seen = len(last) if final else index + 1
    running = sum(last[:seen]) / seen
    metrics: dict[str, Any] = {"tasks_done": index + 1, "running_aa": running, "score": running, "final": final}
    if final:
        summary = summarize(rows, names)
        bwt = summary["bwt"]
        metrics.update(aa=summary["aa"], bwt=bwt, fwt=summary["fwt"], mean_forgetting=summary["mean_forgetting"],
                       score=summary["aa"] + BWT_TIEBREAK * (bwt or 0.0))
    return metrics


def run_trial(params: dict[str, Any], base_raw: dict, runs_root: str) -> None:
    """The Tune function trainable: one task sequence with this trial's values; reports after every task."""
    from ray import tune

    from saefd_ray.methods import METHODS
    from saefd_ray.train.sequence import run_sequence

    trial_id = tune.get_context().get_trial_id()
    raw = apply_overrides(copy.deepcopy(base_raw), param_overrides(params))
    raw.setdefault("output", {}).update(root=runs_root, run_name=trial_id)
    config = validate(raw, source=f"trial {trial_id}")
    names = [task.name for task in config.tasks.sequence]
    joint = getattr(METHODS.get(config.method.name), "joint_training", False)
    began = time.time()

    def report(index: int, rows: list[list[float]], final: bool = False) -> None:
        metrics = trial_metrics(rows, names, index, final)
        metrics.update(time_s=round(time.time() - began, 2), run_dir=str(config.run_dir))
        tune.report(metrics)

    def after_task(index: int, rows: list[list[float]]) -> None:
        if not (joint or index == len(names) - 1):  # the last report waits for the run's report files: ASHA
            report(index, rows)                     # stops a trial at max_t as soon as it reports

    results = run_sequence(config, on_task_end=after_task, progress=False)
    report(0 if joint else len(names) - 1, selection_rows(results), final=True)


# ---------------------------------------------------------------------------------------------- the sweep


def check_sae_sources(config) -> None:
    """An SAE method without a usable SAE folder fails here, once, instead of in every trial."""
    from saefd_ray.methods.sae_source import sae_folder

    sae = getattr(config.method, "sae", None)
    for source in (sae if isinstance(sae, list) else [sae] if sae is not None else []):
        sae_folder(source, "method.sae")


def spec_record(sweep: SweepConfig, base_raw: dict) -> dict:
    return {"sweep": sweep.model_dump(mode="json", exclude={"resources": {"max_concurrent_trials"}}),
            "base": base_raw}


def init_ray_for_sweep(run_raw: dict) -> None:
    """The same Ray as a single run joins (RAY_ADDRESS, distributed.ray_address, or a local one)."""
    from saefd_ray.train.sequence import init_ray

    init_ray((run_raw.get("distributed") or {}).get("ray_address"))


def run_sweep(sweep: SweepConfig, config_path: str | None = None, overrides: list[str] | None = None,
              verbose: int | None = None) -> dict:
    """Run (or resume) the sweep and write its results; returns the summary (see results.write_results)."""
    base_raw = base_raw_config(sweep, config_path, overrides)  # first: a typo is one line in a second, not after Ray
    base = validate(copy.deepcopy(base_raw))

    import ray
    from ray import tune

    from saefd_ray.methods import METHODS
    from saefd_ray.observe.console import verbose as verbose_console
    from saefd_ray.tune.console import TrialLines
    from saefd_ray.tune.results import write_results

    joint = getattr(METHODS.get(base.method.name), "joint_training", False)
    stages = 1 if joint else len(base.tasks.sequence)
    exp_dir = sweep.experiment_dir
    record = spec_record(sweep, base_raw)
    saved = exp_dir / SPEC_FILE
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(record)):
        raise ConfigError(f"{exp_dir}: written by a different sweep (space, searcher or base config changed); "
                          f"refusing to resume. Use --tune-set output.name=<new name>, or delete {exp_dir}")

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    init_ray_for_sweep(base_raw)
    available = ray.cluster_resources()
    max_concurrent = concurrency(sweep, base_raw, available)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=base_raw, runs_root=str(exp_dir / "runs")),
        tune.PlacementGroupFactory([driver_bundle(sweep)]),
    )
    if verbose is None:  # quiet console: our one line per trial report instead of Tune's tables
        verbose = 1 if verbose_console() else 0
    callbacks = [] if verbose else [TrialLines(stages)]
    restored = tune.Tuner.can_restore(str(exp_dir))
    began = time.time()
    if restored:
        print(f"[tune] resuming the sweep in {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(record, indent=1))
        print(f"[tune] {sweep.search.algorithm} sweep over {', '.join(sweep.space)}: up to {max_concurrent} trials "
              f"at once (driver bundle {driver_bundle(sweep)}, cluster {dict(available)})", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric="score", mode="max", search_alg=searcher(sweep), scheduler=scheduler(sweep, stages),
                num_samples=sweep.search.num_samples, max_concurrent_trials=max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=sweep.output.name, storage_path=str(exp_dir.parent), verbose=verbose, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=sweep.resources.max_failures),
            ),
        )
    grid = tuner.fit()
    summary = write_results(grid, sweep, base_raw, exp_dir)
    summary.update(restored=restored, sweep_s=round(time.time() - began, 2), max_concurrent_trials=max_concurrent)
    (exp_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
