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
import train_sae as sae_job  # noqa: E402

ONE_TASK = "tasks:\n  sequence:\n    - {name: a, format: synthetic, generator: rule_a}\n"


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def untrained_model_path(cache_dir) -> str:
    """The workspace's tiny model without pre-training: these checks read its config and tokenizer only."""
    from saefd_ray.config import TinyModelConfig
    from saefd_ray.data.synthetic import corpus_text
    from saefd_ray.models.tiny import build_tiny_model

    cfg = TinyModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                          pretrain_epochs=0)
    return str(build_tiny_model(cfg, corpus_text(), cache_dir))


@pytest.fixture
def workspace(tmp_path, cache_dir):
    """A data folder with valid CL-benchmark and TRACE-style tasks that each case then breaks one way."""
    cl = tmp_path / "data" / "cl" / "agnews"
    cl.mkdir(parents=True)
    (cl / "labels.json").write_text(json.dumps(["World", "Sports"]))
    (tmp_path / "data" / "cl" / "instruction_config.json").write_text(json.dumps({"TC": [{"instruction": "Topic?\n"}]}))
    good = [{"sentence": "goal scored", "label": "Sports"}, {"sentence": "election", "label": "World"}]
    for split in ("train", "dev", "test"):  # each has its own validation split, as the real datasets do
        (cl / f"{split}.json").write_text(json.dumps(good))
    trace = tmp_path / "data" / "T"
    trace.mkdir()
    for split in ("train", "eval", "test"):
        (trace / f"{split}.json").write_text(json.dumps([{"prompt": "2+2=", "answer": "4"}]))
    base = [f"tasks.data_root={tmp_path / 'data'}", f"output.root={tmp_path / 'runs'}", f"model.cache_dir={cache_dir}",
            "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
            "model.tiny.num_heads=2", "model.tiny.vocab_size=512", "model.tiny.pretrain_epochs=0"]
    return tmp_path, base


def run_main(argv, capsys, main=None) -> str:
    with pytest.raises(SystemExit) as info:
        (main or job.main)(argv)
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
    ("unknown order", {}, ["tasks.order=7"], "--set tasks.order: tasks: order '7' is not"),
    ("zero stage 1", {}, ["distributed.zero_stage=1"], "distributed.zero_stage"),
    ("elastic workers reversed", {}, ["distributed.num_workers=[3, 1]"], "num_workers must be >= 1"),
    # issue 17: what a worker would build is built on the driver first
    ("lora target of another architecture", {}, ["lora.target_modules=[query_key_value]"],
     "lora.target_modules: 'query_key_value' matches no module"),
    ("lora target typo", {}, ["lora.target_modules=[q_proj, v_porj]"], "lora.target_modules: 'v_porj' matches no"),
    ("too few examples for batch and workers", {"T/train.json": json.dumps([{"prompt": "p", "answer": "a"}] * 3)},
     [TRACE_TASK, "training.batch_size=8", "distributed.num_workers=2"],
     "task 't' has 3 training examples, too few for micro-batches of 8 on 2 workers"),
    ("elastic workers checked at their maximum", {"T/train.json": json.dumps([{"prompt": "p", "answer": "a"}] * 9)},
     [TRACE_TASK, "training.batch_size=4", "distributed.num_workers=[1, 3]"], "too few for micro-batches of 4 on 3"),
    ("options identical after truncation", {},
     [CL_TASK, "training.max_answer_len=1", "training.batch_size=1", "distributed.num_workers=1"],
     "options 'World' and 'Sports' become the same 1 tokens"),
    ("run name leaving output.root", {}, ["output.run_name=../../etc"],
     "output.run_name: run_name must be a plain folder name (no '/', not '.' or '..'), got '../../etc'"),
    ("model folder that is no model", {}, ["model.name_or_path=/"], "--set model.name_or_path: /: no config.json"),
    ("all references empty",
     {"T/test.json": json.dumps([{"prompt": "p", "answer": ""}, {"prompt": "q", "answer": " "}])},
     [TRACE_TASK], "test.json: every record's 'answer' is empty"),
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


def test_missing_sae_is_refused_before_the_model_is_read(workspace, tmp_path, capsys):
    """An SAE method without an SAE fails before the model is fetched or read (minutes for a real model): this
    "model" has a config.json, so the config accepts it, and no tokenizer, so reading it first would fail there."""
    _, base = workspace
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    argv = []
    for item in base + ["method.name=sae_fd", f"model.name_or_path={tmp_path / 'model'}"]:
        argv += ["--set", item]
    assert "method.sae.path: not set" in run_main(argv, capsys)


def test_malformed_yaml_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(ONE_TASK + "training: {epochs: 1\n")
    assert f"{path}:" in run_main(["--config", str(path)], capsys)


def test_tokenizer_without_chat_template_when_required(workspace, untrained_model_path, tmp_path, capsys):
    import shutil

    plain = tmp_path / "plain-model"
    shutil.copytree(untrained_model_path, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    root, base = workspace
    argv = sum([["--set", s] for s in base + [f"model.name_or_path={plain}", "model.require_chat_template=true"]], [])
    err = run_main(argv, capsys)  # a check that needed the tokenizer names the --set that chose the model
    assert err.startswith(f"error: --set model.name_or_path: tokenizer of {str(plain)!r} has no chat template"), err


def test_a_hub_id_the_hub_cannot_answer_is_one_line_at_once(workspace, capsys, monkeypatch):
    """Asked once (no network in tests: HF's offline mode), not after transformers' retries (50 s without a network)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    root, base = workspace
    err = run_main(sum([["--set", s] for s in base + ["model.name_or_path=nobody-here/no-such-model"]], []), capsys)
    assert err.startswith("error: --set model.name_or_path: 'nobody-here/no-such-model' is not a local folder or in "
                          "the HF cache, and the HF hub cannot be asked for it (") and "offline mode" in err, err


def test_a_hub_id_in_the_hf_cache_is_used_without_asking_the_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from saefd_ray.config import ModelConfig
    from saefd_ray.errors import ConfigError
    from saefd_ray.models.loading import resolve_model_path

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    assert resolve_model_path(ModelConfig(name_or_path="org/cached")) == "org/cached"
    with pytest.raises(ConfigError, match="'org/other' is not a local folder or in the HF cache"):
        resolve_model_path(ModelConfig(name_or_path="org/other"))


def _finished_run(config, inputs: dict) -> Path:
    """A run folder holding one finished task (published by the driver's own `publish`), as a real run leaves it."""
    from saefd_ray.train.sequence import prepare_run_dir, publish, task_dir

    run_dir = prepare_run_dir(config, inputs)
    checkpoint = run_dir.parent / "reported-checkpoint"
    checkpoint.mkdir()
    (checkpoint / "row.json").write_text('{"row": [1.0], "base_row": [0.0]}')
    publish(checkpoint, task_dir(run_dir, 0, config.tasks.sequence[0].name))
    (run_dir / "results.json").write_text('{"keep": true}')
    return run_dir


def _inputs(config):
    from saefd_ray.data.tasks import load_tasks
    from saefd_ray.models.loading import resolve_model_path
    from saefd_ray.train.sequence import input_digests, tokenizer_corpus

    tasks = load_tasks(config)
    return input_digests(tasks, resolve_model_path(config.model, tokenizer_corpus(tasks)), [])


def test_other_config_refuses_to_resume_and_keeps_files(workspace, capsys):
    """A run dir with a finished task is never touched by another config; the message says how to start fresh."""
    from saefd_ray.config import load_config

    root, base = workspace
    config = load_config(None, base)
    run_dir = _finished_run(config, _inputs(config))
    before = _tree_digest(run_dir)
    err = run_main(sum([["--set", s] for s in base + ["training.lr=0.1"]], []), capsys)
    assert "written by a different config" in err and "refusing to resume" in err and "output.run_name" in err
    assert _tree_digest(run_dir) == before


def test_finished_run_with_edited_data_is_not_reported_as_finished(workspace, capsys):
    """Same config, edited data file: the old R matrix must not be reported for the new data."""
    from saefd_ray.config import load_config

    root, base = workspace
    overrides = base + [TRACE_TASK, "training.batch_size=1", "distributed.num_workers=1"]
    config = load_config(None, overrides)
    run_dir = _finished_run(config, _inputs(config))
    before = _tree_digest(run_dir)
    _break(root, "T/test.json", json.dumps([{"prompt": "2+3=", "answer": "5"}]))
    err = run_main(sum([["--set", s] for s in overrides], []), capsys)
    assert "written by a different data" in err and "refusing to resume" in err
    assert _tree_digest(run_dir) == before


def test_failed_start_does_not_block_the_corrected_command(workspace):
    """A start that failed before any task finished leaves a folder that the corrected config takes over."""
    from saefd_ray.config import load_config
    from saefd_ray.train.sequence import CONFIG_FILE, fingerprint, prepare_run_dir

    root, base = workspace
    first = load_config(None, base + ["training.lr=0.1"])
    run_dir = prepare_run_dir(first, _inputs(first))
    (run_dir / "ray" / "demo-task01").mkdir(parents=True)  # Ray Train state of the failed attempt
    corrected = load_config(None, base)
    assert prepare_run_dir(corrected, _inputs(corrected)) == run_dir
    assert json.loads((run_dir / CONFIG_FILE).read_text())["fingerprint"] == fingerprint(corrected)
    assert not (run_dir / "ray").exists()  # its mid-task checkpoints belonged to the old config


@pytest.mark.parametrize("args, expected", [
    (["--set", "training.epochs=zero"], "training.epochs: Input should be a valid integer"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml: config file not found"),
    (["--epochs", "2"], "unrecognized arguments: --epochs 2 (see --help)"),  # argparse's error, in our one line
    (["--config"], "argument --config: expected one argument"),
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


def _custom_template(model_path: str, folder: Path, template: str) -> Path:
    """A copy of the tiny model whose tokenizer has `template` as its chat template."""
    import shutil

    shutil.copytree(model_path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(template)
    return folder


SYSTEM_FIRST = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversation must start with a "
                "system message') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>"
             "{% endif %}")


def test_chat_template_that_fails_is_refused_on_the_driver(workspace, untrained_model_path, tmp_path, capsys):
    root, base = workspace
    model = _custom_template(untrained_model_path, tmp_path / "templated", SYSTEM_FIRST)
    err = run_main(sum([["--set", s] for s in base + [f"model.name_or_path={model}"]], []), capsys)
    assert "task 'rule_a' train record 0: cannot be rendered" in err and "must start with a system message" in err
    assert not (root / "runs").exists()


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


def _hook(name: str):
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["metadata"]["hook_name"] = name
        (folder / "cfg.json").write_text(json.dumps(cfg))
        (folder / "checksums.json").unlink(missing_ok=True)
    return damage


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_mid", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
                                  "blocks.1.attn.hook_z", "model.layers.1.mlp"])
def test_sae_hook_not_applied_as_trained_is_refused(workspace, capsys, hook):
    """The code reads the residual stream after decoder layer L; an SAE trained on any other site is refused."""
    root, base = workspace
    folder = _sae_folder(root)
    _hook(hook)(folder)
    overrides = base + ["method.name=sae_fd", f"method.sae.path={folder}", "method.sae.layer=1"]
    err = run_main(sum([["--set", s] for s in overrides], []), capsys)
    assert f"reads hook {hook!r}; only the residual stream after a decoder layer" in err, err
    assert not (root / "runs").exists()


def test_sparsify_hookpoint_folder_not_resid_is_refused(workspace, capsys):
    from saefd_ray.sae import SAEConfig, build_sae, save_sparsify

    root, base = workspace
    run = root / "sparsify-run"
    save_sparsify(build_sae(SAEConfig("topk", 64, 128, k=4), seed=0), run / "layers.1.mlp")
    overrides = base + ["method.name=sae_fd", f"method.sae.path={run / 'layers.1.mlp'}", "method.sae.layer=1"]
    err = run_main(sum([["--set", s] for s in overrides], []), capsys)
    assert "reads hook 'layers.1.mlp'" in err, err


# ------------------------------------------------------------------------------------- jobs/train_sae.py


@pytest.fixture
def sae_workspace(tmp_path, cache_dir):
    data = tmp_path / "data"
    data.mkdir()
    chats = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi"}]}
             for i in range(6)]
    (data / "chats.json").write_text(json.dumps(chats))
    config = tmp_path / "sae.yaml"
    config.write_text("data:\n  sources:\n    - {kind: file, path: chats.json}\n"
                      "    - {kind: task, task: {name: rule_a, format: synthetic, generator: rule_a}}\n")
    base = [f"data.data_root={data}", f"output.root={tmp_path / 'runs'}", f"model.cache_dir={cache_dir}",
            "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
            "model.tiny.num_heads=2", "model.tiny.vocab_size=512", "model.tiny.pretrain_epochs=0",
            "data.eval_instances=2"]
    return tmp_path, ["--config", str(config)] + sum([["--set", s] for s in base], [])


@pytest.mark.parametrize("overrides, expected", [
    (["sae.architecture=topk", "sae.width=64", "sae.k=512"], "sae: k (512) must be <= width (64)"),
    (["sae.architecture=topk", "sae.expansion=1", "sae.k=512"], "sae: topk needs 0 < k <= d_sae, got k=512"),
    (["sae.architecture=topk", "sae.k=4", "sae.width=100", "distributed.num_workers=3", "distributed.sharding=latent",
      "training.batch_size=3072"], "sae.width (100) must be divisible by distributed.num_workers (3)"),
], ids=["k above width", "k above expansion x hidden", "latent slices uneven"])
def test_sae_job_config_refused_in_one_line(sae_workspace, capsys, overrides, expected):
    root, argv = sae_workspace
    err = run_main(argv + sum([["--set", s] for s in overrides], []), capsys, sae_job.main)
    assert expected in err, err
    assert not (root / "runs").exists()


def test_sae_job_chat_template_rejecting_system_role(sae_workspace, untrained_model_path, capsys):
    """Gemma-style template: the first record with a system turn is named on the driver, before Ray starts."""
    root, argv = sae_workspace
    chats = json.loads((root / "data" / "chats.json").read_text())
    chats[0]["messages"].insert(0, {"role": "system", "content": "be brief"})
    (root / "data" / "chats.json").write_text(json.dumps(chats))
    model = _custom_template(untrained_model_path, root / "gemma-like", NO_SYSTEM)
    err = run_main(argv + ["--set", f"model.name_or_path={model}"], capsys, sae_job.main)
    assert f"source chats.json record 0: cannot be rendered" in err and "System role not supported" in err, err
    assert not (root / "runs").exists()


@pytest.mark.parametrize("name, content, expected", [
    ("chats.json", '[{"messages": [{"role": "user", "content": "hi"}]}, {"oops": 1}, ]',
     "chats.json: record 2: invalid JSON"),
    ("chats.json", '{"prompt": "a dict, not a list"}', "chats.json: expected a JSON list of records"),
    ("chats.json", "[1, 2]", "chats.json: record 0 is int, expected an object"),
    ("chats.jsonl", '{"messages": "not a list"}\n', "chats.jsonl: record 0: 'messages' must be a non-empty list"),
    ("chats.jsonl", "{broken\n", "chats.jsonl: record 0: invalid JSON"),
], ids=["json array bad record", "json not a list", "json record not an object", "jsonl bad messages",
        "jsonl first line broken"])
def test_sae_job_bad_source_file_is_one_line(sae_workspace, capsys, name, content, expected):
    """The driver's scan of each source (counts, digest, first record) refuses a bad file before Ray starts."""
    root, argv = sae_workspace
    (root / "data" / name).write_text(content)
    err = run_main(argv + ["--set", f"data.sources=[{{kind: file, path: {name}}}]"], capsys, sae_job.main)
    assert err.startswith("error: ") and expected in err, err
    assert not (root / "runs").exists()


def test_harvester_names_a_later_bad_record(untrained_model_path, tmp_path):
    """A record past the driver's sample fails inside the harvesting actor with its source and index."""
    import numpy as np

    from saefd_ray.errors import DataError
    from saefd_ray.stream.harvest import Harvester

    model = _custom_template(untrained_model_path, tmp_path / "gemma-like", NO_SYSTEM)
    harvester = Harvester(str(model), [1], max_len=64, max_batch_tokens=512)
    good = [{"role": "user", "content": "hi"}]
    bad = [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]
    batch = {"messages": np.array([json.dumps(good), json.dumps(bad)]), "instance_id": np.array([0, 1]),
             "origin": np.array(["source chats.json record 0", "source chats.json record 7"])}
    with pytest.raises(DataError, match="source chats.json record 7: cannot be rendered.*System role not supported"):
        harvester(batch)


def test_sae_failed_start_does_not_block_and_checkpointed_run_is_protected(tmp_path):
    """No checkpoint yet: a new config takes the folder over. A checkpoint: other config or inputs are refused."""
    from saefd_ray.errors import CheckpointError
    from saefd_ray.stream.config import validate_sae
    from saefd_ray.stream.run import prepare_run_dir
    from saefd_ray.stream.checkpoint import CKPT_DIR, LATEST, PROGRESS

    raw = {"data": {"sources": [{"kind": "file", "path": "x.json"}]}, "output": {"root": str(tmp_path)}}
    first = validate_sae({**raw, "sae": {"architecture": "topk", "k": 512, "width": 1024}})
    run_dir = prepare_run_dir(first, {"data": "d1", "model": "m"})
    (run_dir / "ray").mkdir()
    corrected = validate_sae({**raw, "sae": {"architecture": "topk", "k": 8, "width": 1024}})
    assert prepare_run_dir(corrected, {"data": "d1", "model": "m"}) == run_dir and not (run_dir / "ray").exists()
    checkpoint = run_dir / CKPT_DIR / "tok_000000000100"
    checkpoint.mkdir(parents=True)
    (checkpoint / PROGRESS).write_text("{}")
    (run_dir / CKPT_DIR / LATEST).write_text(json.dumps({"checkpoint": checkpoint.name}))
    with pytest.raises(CheckpointError, match="different data"):
        prepare_run_dir(corrected, {"data": "d2", "model": "m"})
    with pytest.raises(CheckpointError, match="different config"):
        prepare_run_dir(first, {"data": "d1", "model": "m"})
    assert prepare_run_dir(corrected, {"data": "d1", "model": "m"}) == run_dir
