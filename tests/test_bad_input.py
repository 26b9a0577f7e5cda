"""Bad input through the real entry point: exit code 2, one line naming the file/key/value, nothing lost.

Each case calls `jobs/run_sequence.py`'s main() in-process (fast); two cases run the script as a subprocess to
check what a user actually sees on the terminal. Every case fails before Ray or any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "jobs"))
import run_sequence as job  # noqa: E402

ONE_TASK = "tasks:\n  sequence:\n    - {name: a, format: synthetic, generator: rule_a}\n"


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path, cache_dir):
    """A data folder with valid CL-benchmark and TRACE-style tasks that each case then breaks one way."""
    cl = tmp_path / "data" / "cl" / "agnews"
    cl.mkdir(parents=True)
    (cl / "labels.json").write_text(json.dumps(["World", "Sports"]))
    (tmp_path / "data" / "cl" / "instruction_config.json").write_text(json.dumps({"TC": [{"instruction": "Topic?\n"}]}))
    good = [{"sentence": "goal scored", "label": "Sports"}, {"sentence": "election", "label": "World"}]
    for split in ("train", "test"):
        (cl / f"{split}.json").write_text(json.dumps(good))
    trace = tmp_path / "data" / "T"
    trace.mkdir()
    for split in ("train", "test"):
        (trace / f"{split}.json").write_text(json.dumps([{"prompt": "2+2=", "answer": "4"}]))
    base = [f"tasks.data_root={tmp_path / 'data'}", f"output.root={tmp_path / 'runs'}", f"model.cache_dir={cache_dir}",
            "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
            "model.tiny.num_heads=2", "model.tiny.vocab_size=512"]
    return tmp_path, base


def run_main(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        job.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


CL_TASK = "tasks.sequence=[{name: ag, format: cl_benchmark, path: cl/agnews}]"
TRACE_TASK = "tasks.sequence=[{name: t, format: trace, path: T}]"


def _break(root: Path, relative: str, content: str) -> None:
    (root / "data" / relative).write_text(content)


CASES = [
    # (id, file edits {relative: content}, overrides, expected substring)
    ("unknown key", {}, ["training.epochz=1"], "training.epochz: unknown key"),
    ("wrong type", {}, ["training.batch_size=[1]"], "training.batch_size: Input should be a valid integer"),
    ("rho outside (0,1)", {}, ["method.name=sae_fd", "method.rho=0"], "method.rho: rho must be in (0, 1), got 0"),
    ("anchor_size <= 0", {}, ["method.name=sae_fd", "method.anchor_size=-3"], "anchor_size must be > 0, got -3"),
    ("missing data file", {}, ["tasks.sequence=[{name: x, format: trace, path: nowhere}]"], "nowhere not found"),
    ("json not a list", {"cl/agnews/train.json": '{"sentence": "x"}'}, [CL_TASK], "train.json: expected a JSON list"),
    ("empty task", {"cl/agnews/train.json": "[]"}, [CL_TASK], "train.json: no records"),
    ("missing label field", {"cl/agnews/train.json": '[{"sentence": "x"}]'}, [CL_TASK], "has no field 'label'"),
    ("label not in labels.json", {"cl/agnews/test.json": '[{"sentence": "x", "label": "Moon"}]'}, [CL_TASK],
     "test.json: record 0 label 'Moon' is not in"),
    ("missing answer field", {"T/train.json": '[{"prompt": "p"}]'}, [TRACE_TASK], "record 0 has no field 'answer'"),
    ("unregistered task generator", {}, ["tasks.sequence=[{name: z, format: synthetic, generator: rule_z}]"],
     "unknown generator 'rule_z'"),
    ("unknown task format", {}, ["tasks.sequence=[{name: z, format: csv, path: T}]"], "tasks.sequence.0.format"),
    ("duplicate task names", {}, ["tasks.sequence=[{name: a, format: synthetic, generator: rule_a}, "
                                  "{name: a, format: synthetic, generator: rule_b}]"], "duplicate task name 'a'"),
    ("model path missing", {}, ["model.name_or_path=/no/such/model"], "model.name_or_path: /no/such/model not found"),
    ("bad --set", {}, ["training.epochs"], "expected key.sub=value"),
    ("unknown order", {}, ["tasks.order=7"], "order '7' is not one of orders"),
    ("zero stage 1", {}, ["distributed.zero_stage=1"], "distributed.zero_stage"),
    ("elastic workers reversed", {}, ["distributed.num_workers=[3, 1]"], "num_workers must be >= 1"),
]


@pytest.mark.parametrize("edits, overrides, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(workspace, capsys, edits, overrides, expected):
    root, base = workspace
    for relative, content in edits.items():
        _break(root, relative, content)
    argv = []
    for item in base + overrides:
        argv += ["--set", item]
    err = run_main(argv, capsys)
    assert expected in err, err
    assert not (root / "runs").exists()  # refused before anything was written


def test_malformed_yaml_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(ONE_TASK + "training: {epochs: 1\n")
    assert f"{path}:" in run_main(["--config", str(path)], capsys)


def test_tokenizer_without_chat_template_when_required(workspace, tiny_model_path, tmp_path, capsys):
    import shutil

    plain = tmp_path / "plain-model"
    shutil.copytree(tiny_model_path, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    root, base = workspace
    argv = sum([["--set", s] for s in base + [f"model.name_or_path={plain}", "model.require_chat_template=true"]], [])
    assert "has no chat template, but one is required" in run_main(argv, capsys)


def test_other_config_refuses_to_resume_and_keeps_files(workspace, capsys):
    """A run dir written by one config is never touched by another; the message says how to start fresh."""
    from saefd_ray.config import load_config
    from saefd_ray.train.sequence import prepare_run_dir

    root, base = workspace
    run_dir = prepare_run_dir(load_config(None, base))
    (run_dir / "results.json").write_text('{"keep": true}')
    before = _tree_digest(run_dir)
    err = run_main(sum([["--set", s] for s in base + ["training.lr=0.1"]], []), capsys)
    assert "written by a different config; refusing to resume" in err and "output.run_name" in err
    assert _tree_digest(run_dir) == before


@pytest.mark.parametrize("args, expected", [
    (["--set", "training.epochs=zero"], "training.epochs: Input should be a valid integer"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml: config file not found"),
])
def test_cli_prints_one_line_and_exits_2(args, expected):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "run_sequence.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def _sae_folder(tmp_path: Path, d_in: int = 64, layer: int = 1) -> Path:
    from saefd_ray.sae import SAEConfig, build_sae, save_saelens

    cfg = SAEConfig("gated", d_in, 128, metadata={"hook_name": f"blocks.{layer}.hook_resid_post"})
    return save_saelens(build_sae(cfg, seed=0), tmp_path / f"sae-{d_in}-{layer}")


def _drop_key(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights.pop("r_mag")
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "checksums.json").unlink(missing_ok=True)


def _wrong_shape(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights["b_dec"] = weights["b_dec"][:10].clone()
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "checksums.json").unlink(missing_ok=True)


def _corrupt(folder: Path) -> None:
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 8)
    (folder / "checksums.json").unlink(missing_ok=True)


@pytest.mark.parametrize("d_in, layer, sae_layer, damage, expected", [
    (64, 1, 9, None, "layer 9 is out of range"),
    (32, 1, 1, None, "d_in 32"),
    (64, 1, 1, _drop_key, "r_mag"),
    (64, 1, 1, _wrong_shape, "b_dec"),
    (64, 1, 1, _corrupt, "sae_weights.safetensors"),
], ids=["layer out of range", "sae d_in mismatch", "sae missing weight", "sae wrong shape", "corrupt safetensors"])
def test_bad_sae_is_refused_in_one_line(workspace, capsys, d_in, layer, sae_layer, damage, expected):
    root, base = workspace
    folder = _sae_folder(root, d_in, layer)
    if damage:
        damage(folder)
    overrides = base + ["method.name=sae_fd", f"method.sae.path={folder}", f"method.sae.layer={sae_layer}"]
    err = run_main(sum([["--set", s] for s in overrides], []), capsys)
    assert expected in err, err
    assert not (root / "runs").exists()
