"""Tune sweeps: the sweep-file schema and its translation to Tune (fast, no Ray), then a real 2×2 grid sweep of
SAE-FD's ρ × anchor size on a 2-task tiny sequence with ASHA, its outputs, and its resume after the driver stops."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from saefd_ray.config import load_config
from saefd_ray.errors import ConfigError
from saefd_ray.methods import METHODS
from saefd_ray.tune.sweep import (
    SweepConfig,
    base_raw_config,
    concurrency,
    load_sweep,
    param_space,
    searcher,
    selection_rows,
    trial_metrics,
)

REPO = Path(__file__).resolve().parent.parent
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- schema, no Ray


def test_shipped_spaces_load_and_translate():
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float, Integer

    names = {p.name for p in SPACES}
    assert {"contribution_ratio.yaml", "anchor_size.yaml", "saefd_joint.yaml"} <= names
    for path in SPACES:
        sweep = load_sweep(path)
        assert sweep.base.config and "method.name=sae_fd" in sweep.base.set
        space = param_space(sweep)
        assert set(space) == set(sweep.space)
    joint = load_sweep(REPO / "tune_spaces" / "saefd_joint.yaml")
    assert set(joint.space) == {"method.rho", "method.anchor_size", "method.beta"}
    assert isinstance(searcher(joint), OptunaSearch)
    space = param_space(joint)
    assert isinstance(space["method.rho"], Float) and isinstance(space["method.anchor_size"], Integer)
    # a grid file searched with Optuna: the grid becomes a categorical choice (Optuna has no grid_search)
    ratio = load_sweep(REPO / "tune_spaces" / "contribution_ratio.yaml", ["search.algorithm=optuna"])
    assert isinstance(param_space(ratio)["method.rho"], Categorical)
    grid = param_space(load_sweep(REPO / "tune_spaces" / "contribution_ratio.yaml"))["method.rho"]
    assert grid == {"grid_search": [0.05, 0.1, 0.15, 0.25, 0.4]}
    # --tune-set replaces one parameter's distribution, written either way
    for override in ("space.method.rho.grid=[0.1,0.2]", "space.method.rho={grid: [0.1, 0.2]}"):
        swept = load_sweep(REPO / "tune_spaces" / "contribution_ratio.yaml", [override])
        assert param_space(swept)["method.rho"] == {"grid_search": [0.1, 0.2]}, override


def test_sweep_file_errors(tmp_path):
    base = {"space": {"method.rho": {"uniform": [0.1, 0.5]}}}
    with pytest.raises(ConfigError, match="grid: every parameter needs grid or choice"):
        load_sweep(write_yaml(tmp_path / "a.yaml", base))
    with pytest.raises(ConfigError, match="unknown distribution 'normal'"):
        load_sweep(write_yaml(tmp_path / "b.yaml", {"space": {"method.rho": {"normal": [0, 1]}}}))
    with pytest.raises(ConfigError, match="low < high"):
        load_sweep(write_yaml(tmp_path / "c.yaml", base), ["search.algorithm=random", "space.method.rho.uniform=[0.5,0.1]"])
    with pytest.raises(ConfigError, match="cannot be swept"):
        load_sweep(write_yaml(tmp_path / "d.yaml", {"space": {"output.root": {"grid": ["x"]}}}))
    with pytest.raises(ConfigError, match="searchs: unknown key"):
        load_sweep(write_yaml(tmp_path / "e.yaml", {**base, "searchs": {}}))
    # a swept value the run config rejects is a ConfigError naming the key, before any trial starts
    sweep = SweepConfig.model_validate({"base": {"set": ["method.name=sae_fd"]},
                                        "space": {"method.rho": {"grid": [0.2, 1.5]}}})
    with pytest.raises(ConfigError, match=r"method.rho=1.5.*rho must be in \(0, 1\)"):
        base_raw_config(sweep)
    # every error names where the bad value came from: --tune-set, the sweep's base.set, the --set, the space entry
    with pytest.raises(ConfigError, match=r"^--tune-set search\.num_samples: Input should be a valid integer"):
        load_sweep(write_yaml(tmp_path / "f.yaml", base), ["search.algorithm=random", "search.num_samples=abc"])
    sweep = SweepConfig.model_validate({"base": {"set": ["training.nosuchkey=1"]}, "space": {"training.lr": {"grid": [1e-3]}}})
    with pytest.raises(ConfigError, match=r"^the sweep's base\.set training\.nosuchkey: unknown key$"):
        base_raw_config(sweep)
    sweep = SweepConfig.model_validate({"space": {"training.lr": {"grid": [1e-3]}}})
    with pytest.raises(ConfigError, match=r"^--set training\.epochs: Input should be a valid integer"):
        base_raw_config(sweep, extra=["training.epochs=two"])
    with pytest.raises(ConfigError, match=r"^space training\.lr=-1: training\.lr: Input should be greater than 0"):
        base_raw_config(SweepConfig.model_validate({"space": {"training.lr": {"grid": [1e-3, -1]}}}))
    # randint bounds are inclusive in the sweep file (Tune's upper bound is exclusive)
    sweep = SweepConfig.model_validate({"space": {"method.anchor_size": {"randint": [4, 6]}},
                                        "search": {"algorithm": "random", "seed": 0}})
    dist = param_space(sweep)["method.anchor_size"]
    assert {dist.sample() for _ in range(200)} == {4, 5, 6}


def test_trial_metrics_and_concurrency():
    rows = [[10.0, 20.0, 30.0], [80.0, 25.0, 30.0], [60.0, 90.0, 40.0], [50.0, 70.0, 100.0]]
    names = ["a", "b", "c"]
    first = trial_metrics(rows[:2], names, 0, final=False)
    assert first["running_aa"] == first["score"] == 80.0 and "aa" not in first  # mean of R[1][:1]
    second = trial_metrics(rows[:3], names, 1, final=False)
    assert second["running_aa"] == 75.0  # mean of R[2][:2]
    last = trial_metrics(rows, names, 2, final=True)
    bwt = ((50 - 80) + (70 - 90)) / 2
    assert last["aa"] == pytest.approx(220 / 3) and last["bwt"] == pytest.approx(bwt)
    assert last["score"] == pytest.approx(220 / 3 + 1e-4 * bwt) and last["final"] is True
    sweep = SweepConfig.model_validate({"space": {"method.rho": {"grid": [0.1]}}})
    raw = {"tasks": {"sequence": [{"name": "a", "format": "synthetic", "generator": "rule_a"}]},
           "distributed": {"num_workers": [1, 2], "cpus_per_worker": 1}}
    assert concurrency(sweep, raw, {"CPU": 7.0}) == 2  # each trial: 1 driver CPU + up to 2 worker CPUs
    raw["distributed"].update(use_gpu=True)
    assert concurrency(sweep, raw, {"CPU": 64.0, "GPU": 4.0}) == 2
    sweep.resources.max_concurrent_trials = 5
    assert concurrency(sweep, raw, {"CPU": 1.0}) == 5


def test_trial_scores_and_choice_read_validation_only():
    """A trial's reports (objective, ASHA's input) and the ranking that writes best.yaml see validation only."""
    from saefd_ray.tune.results import rank

    validation = {"x": [[25.0, 25.0], [70.0, 30.0], [60.0, 65.0]], "y": [[25.0, 25.0], [60.0, 30.0], [50.0, 55.0]]}
    test = {"x": [[20.0, 22.0], [40.0, 20.0], [30.0, 35.0]], "y": [[20.0, 22.0], [90.0, 20.0], [95.0, 90.0]]}
    corrupted = {trial: [[100.0 - v for v in row] for row in rows] for trial, rows in test.items()}

    def reports_and_choice(test_rows):
        reports, table = {}, []
        for trial in ("x", "y"):
            results = {"r_matrix": test_rows[trial], "r_matrix_validation": validation[trial]}
            rows = selection_rows(results)
            reports[trial] = [trial_metrics(rows[: i + 2], ["a", "b"], i, final=i == 1) for i in range(2)]
            last = reports[trial][-1]
            table.append({"trial_id": trial, "status": "completed", "aa": last["aa"], "bwt": last["bwt"],
                          "running_aa": last["running_aa"]})
        return reports, rank(table)[0]["trial_id"]

    reports, best = reports_and_choice(test)
    assert best == "x"  # on test, y would win (AA 92.5 vs 32.5): the choice is validation's
    assert reports_and_choice(corrupted) == (reports, best)
    assert reports["x"][-1]["aa"] == pytest.approx(62.5)


# ---------------------------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    from saefd_ray.sae import SAEConfig, build_sae, save_saelens

    sae = build_sae(SAEConfig("gated", 64, 256, metadata={"hook_name": "blocks.1.hook_resid_post"}), seed=0)
    with torch.no_grad():
        sae.b_gate.fill_(0.05)
    return save_saelens(sae, tmp_path_factory.mktemp("sae") / "gated-l1")


def tiny_run_config(tmp_path: Path, cache_dir: Path, sae_folder: Path) -> Path:
    return write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": "tiny", "cache_dir": str(cache_dir),
                  "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                           "num_heads": 2}},
        "lora": {"r": 4, "alpha": 8},
        "tasks": {"sequence": [{"name": n, "format": "synthetic", "generator": n, "max_train": 16, "max_test": 8}
                               for n in ("rule_a", "rule_b")], "validation": {"size": 8}},
        "training": {"epochs": 1, "lr": 3e-3, "batch_size": 8, "max_prompt_len": 48, "max_answer_len": 4},
        "distributed": {"num_workers": 1, "zero_stage": 2, "max_failures": 0},
        "evaluation": {"batch_size": 16},
        "method": {"name": "sae_fd", "sae": {"path": str(sae_folder), "layer": 1}, "anchor_batch": 2},
        "output": {"root": str(tmp_path / "unused"), "run_name": "base"},
    })


@pytest.mark.ray
@pytest.mark.skipif("sae_fd" not in METHODS, reason="SAE-FD (methods issue) is not registered yet")
def test_grid_sweep_rho_by_anchor_size(tmp_path, cache_dir, sae_folder, ray_cluster):
    from saefd_ray.tune.sweep import run_sweep

    run_yaml = tiny_run_config(tmp_path, cache_dir, sae_folder)
    sweep_yaml = write_yaml(tmp_path / "sweep.yaml", {
        "base": {"config": str(run_yaml)},
        "space": {"method.rho": {"grid": [0.1, 0.3]}, "method.anchor_size": {"grid": [4, 8]}},
        "search": {"algorithm": "grid"},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"driver_cpus": 1, "max_concurrent_trials": 2},
        "output": {"root": str(tmp_path / "tune"), "name": "grid"},
    })
    summary = run_sweep(load_sweep(sweep_yaml), verbose=0)
    exp = tmp_path / "tune" / "grid"
    assert summary["restored"] is False and summary["num_trials"] == 4 and summary["statuses"]["error"] == 0

    with (exp / "trials.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert {(float(r["method.rho"]), int(r["method.anchor_size"])) for r in table} == {(0.1, 4), (0.1, 8), (0.3, 4),
                                                                                      (0.3, 8)}
    completed = [r for r in table if r["status"] == "completed"]
    assert completed and all(r["status"] in ("completed", "stopped") for r in table)
    for row in table:
        trial_dir = Path(row["run_dir"])
        reports = [json.loads(line) for line in (next(exp.glob(f"*{row['trial_id']}*")) / "result.json").open()]
        assert [r["tasks_done"] for r in reports] == list(range(1, int(row["tasks_done"]) + 1))  # a report per task
        if row["status"] == "stopped":  # ASHA stopped it after task 1
            assert row["tasks_done"] == "1" and row["aa"] == ""
            continue
        results = json.loads((trial_dir / "results.json").read_text())  # the trial's own run_sequence report
        cfg = results["config"]["method"]
        assert (cfg["rho"], cfg["anchor_size"]) == (float(row["method.rho"]), int(row["method.anchor_size"]))
        chosen_on = results["summary_validation"]  # trials report validation scores only; test is the report's
        assert float(row["aa"]) == pytest.approx(chosen_on["aa"], abs=1e-4)
        assert float(row["bwt"]) == pytest.approx(chosen_on["bwt"], abs=1e-4)
        R = results["r_matrix_validation"]
        assert reports[0]["running_aa"] == pytest.approx(R[1][0])  # running AA after task 1 = mean R[1][:1]
        assert reports[-1]["score"] == pytest.approx(chosen_on["aa"] + 1e-4 * chosen_on["bwt"])
    keys = [(float(r["aa"]), float(r["bwt"])) for r in completed]
    assert keys == sorted(keys, reverse=True) and table[0]["status"] == "completed"  # ranked by AA, then BWT

    md = (exp / "trials.md").read_text().strip().splitlines()
    assert len(md) == 4 + 4 and "validation" in md[0] and "method.rho" in md[2] and "aa" in md[2]
    best = load_config(exp / "best.yaml")  # ready to run
    assert best.method.name == "sae_fd" and best.output.run_name == "grid-best"
    assert (best.method.rho, best.method.anchor_size) == (float(table[0]["method.rho"]),
                                                         int(table[0]["method.anchor_size"]))
    assert best.tasks.sequence[1].max_train == 16 and best.distributed.num_workers == 1
    assert (exp / "aa_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["best"]["trial_id"] == table[0]["trial_id"]

    # the driver "dies" and the same command runs again: the experiment is restored, nothing is retrained
    manifests = {p: p.stat().st_mtime_ns for p in (exp / "runs").glob("*/tasks/*/MANIFEST.json")}
    again = run_sweep(load_sweep(sweep_yaml), verbose=0)
    assert again["restored"] is True and again["num_trials"] == 4
    assert again["best"]["trial_id"] == summary["best"]["trial_id"]
    assert {p: p.stat().st_mtime_ns for p in (exp / "runs").glob("*/tasks/*/MANIFEST.json")} == manifests
    # a different sweep in the same folder is refused instead of mixed in
    with pytest.raises(ConfigError, match="written by a different sweep"):
        run_sweep(load_sweep(sweep_yaml, ["space.method.rho.grid=[0.1,0.2]"]), verbose=0)
    assert math.isfinite(float(table[0]["aa"]))


def cl_task_folders(root: Path) -> None:
    """Two CL-benchmark-layout tasks (synthetic rules) under root/real and the same under root/relabelled, where
    every test label is changed to another label; train and validation (dev.json) are identical."""
    from saefd_ray.config import TaskConfig
    from saefd_ray.data.synthetic import LABELS, load_synthetic

    def records(examples, shift=0):
        return [{"sentence": e.prompt, "label": LABELS[(LABELS.index(e.answer) + shift) % len(LABELS)]}
                for e in examples]

    for variant, shift in (("real", 0), ("relabelled", 1)):
        (root / variant).mkdir(parents=True)
        (root / variant / "instruction_config.json").write_text(json.dumps({"TC": [{"instruction": "Direction?\n"}]}))
        for rule in ("rule_a", "rule_b"):
            task = load_synthetic(TaskConfig(name=rule, format="synthetic", generator=rule))
            folder = root / variant / rule
            folder.mkdir()
            (folder / "labels.json").write_text(json.dumps(LABELS))
            (folder / "train.json").write_text(json.dumps(records(task.train[:48])))
            (folder / "dev.json").write_text(json.dumps(records(task.train[48:64])))
            (folder / "test.json").write_text(json.dumps(records(task.test[:16], shift)))


@pytest.mark.ray
def test_changing_test_labels_changes_no_trial_score(tmp_path, cache_dir, ray_cluster):
    """A real ASHA sweep whose two trials differ only in their tasks' test labels: every report (Tune's objective,
    ASHA's input) is identical, neither trial is pruned, and only the trials' test R matrices differ."""
    from saefd_ray.tune.sweep import run_sweep

    cl_task_folders(tmp_path / "cl")
    variants = [str(tmp_path / "cl" / "real"), str(tmp_path / "cl" / "relabelled")]
    run_yaml = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": "tiny", "cache_dir": str(cache_dir),
                  "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                           "num_heads": 2, "pretrain_epochs": 0}},  # a base that scores, not one that learns much
        "lora": {"r": 4, "alpha": 8},
        "tasks": {"data_root": variants[0],
                  "sequence": [{"name": n, "format": "cl_benchmark", "path": n, "family": "TC"}
                               for n in ("rule_a", "rule_b")]},
        "training": {"epochs": 1, "lr": 3e-3, "batch_size": 8, "max_prompt_len": 48, "max_answer_len": 4},
        "distributed": {"num_workers": 1, "zero_stage": 2, "max_failures": 0},
        "evaluation": {"batch_size": 16},
        "output": {"root": str(tmp_path / "unused"), "run_name": "base"},
    })
    sweep_yaml = write_yaml(tmp_path / "sweep.yaml", {
        "base": {"config": str(run_yaml)},
        "space": {"tasks.data_root": {"grid": variants}},
        "search": {"algorithm": "grid"},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"driver_cpus": 1, "max_concurrent_trials": 2},
        "output": {"root": str(tmp_path / "tune"), "name": "labels"},
    })
    summary = run_sweep(load_sweep(sweep_yaml), verbose=0)
    exp = tmp_path / "tune" / "labels"
    assert summary["statuses"] == {"completed": 2, "stopped": 0, "error": 0}
    with (exp / "trials.csv").open() as handle:
        table = {r["tasks.data_root"]: r for r in csv.DictReader(handle)}
    reports, results = {}, {}
    for root, row in table.items():
        lines = (next(exp.glob(f"*{row['trial_id']}*")) / "result.json").read_text().splitlines()
        reports[root] = [{k: json.loads(line)[k] for k in ("tasks_done", "running_aa", "score")} for line in lines]
        results[root] = json.loads((Path(row["run_dir"]) / "results.json").read_text())
    real, relabelled = variants
    assert len(reports[real]) == 2 and reports[real] == reports[relabelled]  # every report, also ASHA's rung
    assert [table[real][k] for k in ("aa", "bwt")] == [table[relabelled][k] for k in ("aa", "bwt")]
    assert results[real]["r_matrix_validation"] == results[relabelled]["r_matrix_validation"]
    assert results[real]["r_matrix"] != results[relabelled]["r_matrix"]  # the test labels did change test scores
    assert results[real]["validation"]["rule_a"] == {"source": "dev.json", "size": 16}
