"""The CL suite's selection and comparison rules (bench/real_suite.py, bench/compare.py, bench/common.py).

Pure functions on hand-built suites: the lr and the 'strongest regularizer' are chosen on validation only (changing
test scores changes neither), the paired comparison's numbers, and the run names a resumed suite relies on.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.common import run_key, run_yaml
from bench.compare import aa_binomial_sd, paired
from bench.real_suite import choose_lr, strongest


def run(method: str, order: str, test_aa: float, val_aa: float, seed: int = 0) -> dict:
    last = [test_aa] * 4
    return {"method": method, "order": order, "seed": seed, "tasks": ["a", "b", "c", "d"],
            "r_matrix": [[25.0] * 4, last], "summary": {"aa": test_aa, "bwt": -1.0, "fwt": 0.0},
            "summary_validation": {"aa": val_aa}}


def test_run_keys_name_seed_and_lr_probes():
    assert run_key("1", "sae_fd") == "o1/sae_fd"
    assert run_key("2", "ewc", 1) == "o2/ewc/s1"
    assert run_key("1", "seq_lora", lr=3e-4) == "o1/seq_lora/lr0.0003"


def test_lr_is_chosen_on_validation_never_on_test():
    runs = {run_key("1", "seq_lora", lr=3e-4): run("seq_lora", "1", test_aa=90.0, val_aa=60.0),
            run_key("1", "seq_lora", lr=1e-3): run("seq_lora", "1", test_aa=10.0, val_aa=70.0)}
    assert choose_lr(runs, [3e-4, 1e-3])["lr"] == 1e-3
    runs[run_key("1", "seq_lora", lr=1e-3)]["summary"]["aa"] = 99.0  # test moves: the choice does not
    assert choose_lr(runs, [3e-4, 1e-3])["lr"] == 1e-3
    runs[run_key("1", "seq_lora", lr=3e-4)]["summary_validation"]["aa"] = 70.0  # a tie: the smaller lr
    assert choose_lr(runs, [3e-4, 1e-3])["lr"] == 3e-4


def test_lr_probe_without_a_finished_run_is_one_error_line():
    with pytest.raises(SystemExit, match="^error: lr probe: no seq_lora probe run finished"):
        choose_lr({run_key("1", "seq_lora", lr=3e-4): {"error": "boom"}}, [3e-4])


def test_strongest_regularizer_by_mean_validation_aa_over_orders():
    runs = {run_key("1", "ewc"): run("ewc", "1", 80.0, 50.0), run_key("2", "ewc"): run("ewc", "2", 80.0, 52.0),
            run_key("1", "lwf"): run("lwf", "1", 10.0, 60.0), run_key("2", "lwf"): run("lwf", "2", 10.0, 40.0),
            run_key("1", "sae_fd"): run("sae_fd", "1", 99.0, 99.0)}  # not a rival: never 'strongest'
    assert strongest(runs, ["1", "2"], ["ewc", "lwf", "sae_fd"]) == "ewc"  # 51 > 50
    assert strongest({}, ["1"], ["ewc"]) is None


def test_binomial_sd_of_an_aa():
    r = run("x", "1", 50.0, 50.0)
    # four tasks at p = 0.5 on n = 100: sqrt(4 * 0.25 / 100) / 4 = 0.025 -> 2.5 points
    assert aa_binomial_sd(r, 100) == pytest.approx(2.5)


def test_paired_comparison_over_orders_and_seeds():
    suite = {"orders": ["1", "2"], "seeds": [1], "methods": ["seq_lora", "sae_fd"],
             "budget_config": {"max_test": 100}, "runs": {}}
    diffs = {("1", 0): 4.0, ("2", 0): 6.0, ("1", 1): 5.0}  # order 2 seed 1 missing for sae_fd
    for (order, seed), d in diffs.items():
        suite["runs"][run_key(order, "seq_lora", seed)] = run("seq_lora", order, 50.0, 50.0, seed)
        suite["runs"][run_key(order, "sae_fd", seed)] = run("sae_fd", order, 50.0 + d, 50.0, seed)
    suite["runs"][run_key("2", "seq_lora", 1)] = run("seq_lora", "2", 50.0, 50.0, 1)
    p = paired(suite, "seq_lora")
    assert p["cells"] == 3 and p["wins"] == 3
    assert p["mean_diff"] == pytest.approx(5.0) and p["sd"] == pytest.approx(1.0)
    assert (p["min"], p["max"]) == (4.0, 6.0)
    # binomial: sd of each AA ~2.5, of a difference ~3.5; SE over 3 cells ~2.0 > spread's 1/sqrt(3)
    assert p["se"] == pytest.approx(p["binomial_sd_one_cell"] / math.sqrt(3))
    assert p["beyond_noise"] is True  # 5.0 > 2 x ~2.0
    assert paired(suite, "ewc") is None


def test_run_yaml_applies_seed_lr_and_validation_and_names_runs_by_settings(tmp_path: Path):
    preset = {"model": {"name_or_path": "x"}, "tasks": {"sequence": [{"name": "a"}, {"name": "b"}],
                                                        "orders": {"1": ["a", "b"]}}, "training": {"lr": 1.0}}
    budget = {"max_train": 8, "max_test": 4, "validation": 2, "training": {"batch_size": 1}}
    base = {"model": "m", "sae": "/s", "layer": 3}
    args = (preset, budget, {"name": "sae_fd", "rho": 0.15}, "1", base, "cl4", "b", tmp_path)
    raw0, raw1 = run_yaml(*args), run_yaml(*args, seed=1, lr=3e-4)
    assert raw1["training"] == {"lr": 3e-4, "batch_size": 1, "seed": 1}
    assert "seed" not in raw0["training"] and raw0["training"]["lr"] == 1.0
    assert raw0["tasks"]["validation"] == {"size": 2}
    assert raw0["method"]["sae"] == {"path": "/s", "layer": 3}
    assert raw0["output"]["run_name"] != raw1["output"]["run_name"]
    assert run_yaml(*args)["output"]["run_name"] == raw0["output"]["run_name"]  # same settings: same (resumable) dir


def test_a_run_is_named_alike_on_every_clone(tmp_path: Path, monkeypatch):
    """Two clones side by side (their data beside them, their SAE in their own cache) name a run alike, so a
    committed report's runs are kept by any clone; another data folder or SAE is another run."""
    import bench.common as common

    preset = {"model": {"name_or_path": "x"}, "tasks": {"sequence": [{"name": "a"}], "orders": {"1": ["a"]}}}
    budget = {"max_train": 8, "max_test": 4}

    def name(clone: str, data: str = "shared/data", sae: str = "bench/cache/sae/layer_3") -> str:
        monkeypatch.setattr(common, "REPO", tmp_path / clone)
        base = {"model": "smollm2-135m-instruct", "sae": str(tmp_path / clone / sae), "layer": 3}
        raw = run_yaml(preset, budget, {"name": "sae_fd"}, "1", base, "cl4", "b", tmp_path / data)
        assert raw["method"]["sae"]["path"] == base["sae"]  # the run itself reads the absolute path
        return raw["output"]["run_name"]

    assert name("main") == name("suite")
    assert name("main") != name("main", data="other/data")
    assert name("main") != name("main", sae="bench/cache/sae2/layer_3")


def test_a_second_suite_on_the_same_cache_is_refused(tmp_path, monkeypatch):
    import subprocess
    import sys

    import bench.common as common

    monkeypatch.setattr(common, "CACHE", tmp_path)
    common.lock_suite()  # this process holds the lock
    code = ("import sys; from pathlib import Path; import bench.common as c; c.CACHE = Path(sys.argv[1]); "
            "c.exit_2_on_error(c.lock_suite)()")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                           cwd=Path(common.REPO))
    assert other.returncode == 2
    assert other.stderr.strip() == f"error: {tmp_path / 'suite.lock'}: another benchmark suite is running on this cache"
    for handle in common._LOCKS:
        handle.close()
    common._LOCKS.clear()


def test_reading_a_finished_run_keeps_its_recorded_wall_time(tmp_path):
    import json

    from bench.common import WALL_FILE, run_cost

    (tmp_path / "tasks" / "01-a").mkdir(parents=True)
    (tmp_path / "tasks" / "01-a" / "row.json").write_text(json.dumps({"median_step_s": 2.0}))
    (tmp_path / WALL_FILE).write_text(json.dumps({"wall_s": 4440.5, "resumed": False}))
    results = {"timings": {"task_a_s": 10.0}, "r_matrix": [[0.0], [1.0]]}
    cost = run_cost(tmp_path, results, None)  # --report-only: read, never write
    assert cost == {"median_step_s": 2.0, "wall_s": 4440.5, "resumed": False}
    assert json.loads((tmp_path / WALL_FILE).read_text())["wall_s"] == 4440.5
    assert run_cost(tmp_path, results, 12.0)["wall_s"] == 12.0  # a call that trained records its own


def _bench_cli(script: str, *args: str, cwd: Path) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    from bench.common import REPO

    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("content, expected", [
    (None, "not found"),
    ("budgets: [", "expected YAML (while parsing"),
    ("- a list\n", "expected a YAML mapping, got list"),
    ("budgets: {}\nmethods: {}\n", "expected a bench config (configs/bench/*.yaml) with preset, data_root"),
    ("budgets: 3\nmethods: {}\npreset: p\ndata_root: d\n", "budgets: expected a mapping of names to mappings"),
    (b"\xff\xfe budgets", "expected a UTF-8 text file (YAML)"),
])
def test_a_bad_bench_config_is_one_error_line(tmp_path, content, expected):
    path = tmp_path / "bench.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    # relative to the working directory, as any command-line path
    done = _bench_cli("cl_replication.py", "--config", "bench.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"error: bench.yaml: {expected}"), line


def test_an_sae_run_of_another_model_or_a_broken_report_is_refused(tmp_path):
    import json

    from bench.real_suite import ensure_sae

    run = tmp_path / "sae_tiny"
    run.mkdir()
    with pytest.raises(SystemExit, match=rf"^error: --sae-run {run}: expected a finished jobs/train_sae.py run"):
        ensure_sae(run, tmp_path)
    (run / "sae_report.json").write_text("{broken")
    with pytest.raises(SystemExit, match=r"^error: .*sae_report.json: expected a finished .* \(unreadable: "):
        ensure_sae(run, tmp_path)
    (run / "sae_report.json").write_text(json.dumps({"checkpoint": str(run), "eval": {"layers": {"12": {}}}}))
    for broken in ({"config": {"model": "smollm2-135m-instruct"}}, {"config": [1]}, {}):
        (run / "sae_config.json").write_text(json.dumps(broken))
        with pytest.raises(SystemExit, match=r"^error: .*sae_config.json: expected config.model.name_or_path"):
            ensure_sae(run, tmp_path)
    (run / "sae_config.json").write_text(json.dumps({"config": {"model": {"name_or_path": "tiny"}}}))
    with pytest.raises(SystemExit, match=r"^error: .*sae_tiny: an SAE of 'tiny'; this suite's model is "
                                         r"'smollm2-135m-instruct'$"):
        ensure_sae(run, tmp_path)


def test_sae_sweep_finds_its_runs_under_set_output(tmp_path):
    """`--set output.root/run_name` move the runs; the sweep reads them there (a finished run is never redone)."""
    import json

    from bench.common import REPO

    metrics = {"l0": 50.0, "fvu": 0.2, "mse": 1.0, "log2_mse_special": 0.5, "dead_fraction_eval": 0.0,
               "ce_loss_recovered": 0.95}
    for coefficient in (2, 5):
        run = tmp_path / "elsewhere" / f"mine_c{coefficient}"
        run.mkdir(parents=True)
        report = {"eval": {"layers": {"12": {**metrics, "l0": 100.0 / coefficient}}}}
        (run / "sae_report.json").write_text(json.dumps(report))
    done = _bench_cli("sae_sweep.py", "--set", "output.run_name=mine", "--out", "sweep", "--report-only", cwd=tmp_path)
    assert done.returncode == 2  # the config's output.root (runs/ of the repository) has no run named mine_c2
    assert done.stderr.splitlines() == [f"error: {REPO / 'runs' / 'mine_c2'}: no sae_report.json (--report-only "
                                        "trains nothing)"]
    done = _bench_cli("sae_sweep.py", "--set", f"output.root={tmp_path / 'elsewhere'}", "--set",
                      "output.run_name=mine", "--out", "sweep", "--report-only", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [row["l0"] for row in result["rows"]] == [50.0, 20.0]
    assert result["chosen"]["coefficient"] == 5.0  # the largest with CE-loss recovered >= 0.9
    assert "| 5 **(chosen)** | 20.0 |" in (tmp_path / "sweep.md").read_text()
    # a dotted stem stays whole; a run missing among several writes nothing at all
    done = _bench_cli("sae_sweep.py", "--set", f"output.root={tmp_path / 'elsewhere'}", "--set",
                      "output.run_name=mine", "--out", "sweep.v1.2", "--report-only", "--coefficients", "2", "7",
                      cwd=tmp_path)
    assert done.returncode == 2 and "mine_c7: no sae_report.json" in done.stderr
    assert not list(tmp_path.glob("sweep.v1*"))
    done = _bench_cli("sae_sweep.py", "--set", f"output.root={tmp_path / 'elsewhere'}", "--set",
                      "output.run_name=mine", "--out", "sweep.v1.2", "--report-only", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "sweep.v1.2.json").is_file() and (tmp_path / "sweep.v1.2.md").is_file()


def test_a_comma_list_forgives_spaces_and_a_trailing_comma():
    from bench.common import choice_list

    assert choice_list(" seq_lora, sae_fd,", "--methods", ["sae_fd", "seq_lora"]) == ["seq_lora", "sae_fd"]
    assert choice_list(None, "--methods", ["sae_fd"]) is None
    with pytest.raises(SystemExit, match="^error: --orders: unknown 4; one of 1, 2$"):
        choice_list("1,4", "--orders", [1, 2])


@pytest.mark.parametrize("script, args, expected", [
    ("overhead.py", ["--config", "missing.yaml"], "error: missing.yaml"),
    ("overhead.py", ["--sae", "nowhere"], "error: --sae nowhere: expected an SAE folder"),
    ("trace_replication.py", ["--methods", "seq_lora,bogus"], "error: --methods: unknown bogus"),
    ("cl_replication.py", ["--data-root", "nowhere"], "error: --data-root"),  # not after building the base model
    ("cl_replication.py", ["--model", "smollm2", "--data-root", "nowhere"], "error: --data-root"),  # nor Ray
    ("cl_replication.py", ["--bogus"], "error: unrecognized arguments: --bogus"),
    ("cl_replication.py", ["--methods", ","], "error: --methods ',': expected a comma list of names, one of seq_lora"),
    ("cl_replication.py", ["--orders", "1,4"], "error: --orders: unknown 4; one of 1, 2, 3"),
    ("sae_step.py", ["--archs", "gated,bogus"], "error: --archs: unknown bogus; one of standard"),
    ("drift_by_layer.py", ["--runs", "nowhere"], "error: "),
])
def test_bench_scripts_refuse_bad_arguments_before_any_work(tmp_path, script, args, expected):
    done = _bench_cli(script, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(expected), line


def test_a_run_the_committed_report_records_is_kept_without_its_run_dir(tmp_path, monkeypatch):
    """A fresh checkout has no bench/cache: the report's finished runs stand for themselves and never train again;
    a record under another run name (other settings) is not the run asked for."""
    import bench.common as common
    from bench.common import run_one

    monkeypatch.setattr(common, "CACHE", tmp_path)
    preset = {"model": {"name_or_path": "x"}, "tasks": {"sequence": [{"name": "a"}], "orders": {"1": ["a"]}}}
    bench_cfg = {"budgets": {"b": {"max_train": 8, "max_test": 4}}, "methods": {"l2": {"name": "l2"}}}
    base = {"model": "m"}
    name = run_yaml(preset, bench_cfg["budgets"]["b"], {"name": "l2"}, "1", base, "cl4", "b", tmp_path)
    record = {**run("l2", "1", 60.0, 55.0), "run_dir": f"bench/cache/runs/{name['output']['run_name']}"}
    args = ("cl4", preset, bench_cfg, "b", base, tmp_path, "1", "l2")
    assert run_one(*args, log=lambda _: None, recorded=record) is record
    other = {**record, "run_dir": "bench/cache/runs/cl4-b-o1-l2-00000000"}
    assert run_one(*args, log=lambda _: None, recorded=other, report_only=True) is None  # no results.json: not done


def test_a_recorded_sae_run_is_kept_only_with_the_same_sae():
    from bench.real_suite import compact_trace, kept_run

    evaluation = {"12": {"fvu": 0.178, "l0": 190.6}}
    report = {"base": {"sae_eval": evaluation},
              "runs": {"o1/sae_fd": {**run("sae_fd", "1", 54.3, 55.5)}, "o1/l2": {**run("l2", "1", 50.0, 50.0)},
                       "o1/lwf": {"method": "lwf", "error": "RuntimeError: boom"}}}
    assert kept_run(report, "o1/sae_fd", {"sae_eval": evaluation}) is report["runs"]["o1/sae_fd"]
    retrained = {"12": {"fvu": 0.181, "l0": 190.6}}
    assert kept_run(report, "o1/sae_fd", {"sae_eval": retrained}) is None  # another SAE: a new run
    assert kept_run(report, "o1/l2", {"sae_eval": retrained}) is report["runs"]["o1/l2"]  # l2 uses no SAE
    assert kept_run(report, "o1/lwf", {}) is None  # a failed run is tried again
    assert kept_run(report, "o2/l2", {}) is None

    steps = list(range(1000))
    trace = {"steps": steps, "share": [0.1] * 1000, "lambda": [2.0] * 1000,
             "per_task": [{"task": "b", "median_share": 0.1, "median_lambda": 2.0, "steps": 1000}]}
    small = compact_trace(trace, points=100)
    assert len(small["steps"]) == 100 and small["steps"][:2] == [0, 10] and small["per_task"] == trace["per_task"]
    assert compact_trace(None) is None


def test_a_fresh_checkout_rewrites_the_whole_report_from_its_records(tmp_path, monkeypatch):
    """No run dirs and no SAE on disk, and --methods naming one method: the rewritten report still holds every
    finished run it recorded (the SAE runs with the recorded SAE and their λ medians), and nothing trains."""
    import json

    import bench.common as common
    import bench.compare as compare
    import bench.real_suite as real_suite
    import yaml

    for module in (common, compare, real_suite):
        monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "CACHE", tmp_path / "cache")
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"tasks": {"sequence": [{"name": "a"}, {"name": "b"}],
                                                "orders": {"1": ["a", "b"]}}, "training": {"lr": 1.0}}))
    budget = {"model": "smollm2", "orders": ["1"], "max_train": 8, "max_test": 4, "validation": 2,
              "methods": ["seq_lora", "sae_fd"], "lr_candidates": [1e-3, 3e-4]}
    bench_cfg = {"preset": str(preset), "budgets": {"b": budget},
                 "methods": {"seq_lora": {"name": "seq_lora"}, "sae_fd": {"name": "sae_fd", "rho": 0.15}}}
    sae = {"sae": str(tmp_path / "gone" / "layer_12"), "sae_run": str(tmp_path / "gone"), "layer": 12,
           "sae_eval": {"12": {"fvu": 0.2, "l0": 190.0}}}
    base = {"model": real_suite.MODEL, **sae}

    def record(method, test_aa, val_aa, lr):
        raw = run_yaml(yaml.safe_load(preset.read_text()), budget, bench_cfg["methods"][method], "1", base, "cl4",
                       "b", tmp_path)
        if lr is not None:  # as run_one builds it: the lr probe's own setting
            raw = run_yaml(yaml.safe_load(preset.read_text()), budget, bench_cfg["methods"][method], "1", base,
                           "cl4", "b", tmp_path, lr=lr)
        return {**run(method, "1", test_aa, val_aa), "lr": lr, "wall_s": 100.0, "median_step_s": 1.0,
                "run_dir": f"bench/cache/runs/{raw['output']['run_name']}"}

    trace = {"steps": [], "share": [], "lambda": [],
             "per_task": [{"task": "b", "median_share": 0.07, "median_lambda": 10.0, "steps": None}]}
    runs = {"o1/seq_lora/lr0.001": record("seq_lora", 40.0, 41.0, 1e-3),
            "o1/seq_lora/lr0.0003": record("seq_lora", 50.0, 52.0, 3e-4),
            "o1/sae_fd": {**record("sae_fd", 55.0, 53.0, 3e-4), "lambda_trace": trace}}
    runs["o1/seq_lora"] = runs["o1/seq_lora/lr0.0003"]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cl4_b.json").write_text(json.dumps({"base": base, "runs": runs}))

    real_suite.run_real_suite(bench_cfg, "b", tmp_path, None, methods=["seq_lora"], report_only=True,
                              log=lambda _: None)
    report = json.loads((tmp_path / "results" / "cl4_b.json").read_text())
    assert set(report["runs"]) == set(runs) and report["runs"]["o1/sae_fd"]["summary"]["aa"] == 55.0
    assert report["lr_choice"]["lr"] == 3e-4 and report["base"]["sae_eval"] == sae["sae_eval"]
    md = (tmp_path / "results" / "cl4_b.md").read_text()
    assert "| o1/sae_fd | b 0.07 (10.00) |" in md and "| sae_fd | 55.0 |" in md
    assert not (tmp_path / "cache" / "runs").exists()  # nothing trained, no run dir made


def test_a_written_report_holds_no_machine_paths(tmp_path, monkeypatch):
    import json

    import bench.common as common
    from bench.common import REPO, suite_dict, write_outputs

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    base = {"model": "smollm2-135m-instruct", "sae": str(REPO / "bench/cache/sae-x/layer_12"), "layer": 12,
            "parameters": 134.5e6}
    bench_cfg = {"budgets": {"b": {}}, "methods": {"seq_lora": {"name": "seq_lora"}}}
    runs = {"o1/seq_lora": run("seq_lora", "1", 50.0, 50.0)}
    write_outputs(suite_dict("cl4", "b", bench_cfg, ["seq_lora"], ["1"], base, runs), "s", "t", [])
    written = json.loads((tmp_path / "s.json").read_text())["base"]
    assert written["sae"] == "bench/cache/sae-x/layer_12" and written["model"] == "smollm2-135m-instruct"
    assert base["sae"].startswith(str(REPO))  # the suite's own record (its runs read it) is left as it was


def test_drift_is_the_token_mean_of_relative_residual_change():
    import torch

    from bench.drift_by_layer import drift

    before = [[torch.tensor([[3.0, 4.0], [1.0, 0.0]])]]  # one instance, one layer, two tokens (norms 5 and 1)
    after = [[torch.tensor([[3.0, 4.0], [1.0, 0.5]])]]  # token 1 moves by 0.5: relative 0.5; token 0 not at all
    assert drift(before, after, 0) == pytest.approx(0.25)
    assert drift(before, before, 0) == 0.0
