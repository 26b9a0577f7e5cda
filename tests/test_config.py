"""Config validation: every bad input is one line naming the key or file."""

from pathlib import Path

import pytest

from saefd_ray.config import RunConfig, apply_overrides, load_config, parse_override
from saefd_ray.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = "tasks:\n  sequence:\n    - {name: a, format: synthetic, generator: rule_a}\n"


def test_demo_config_is_the_default():
    config = load_config()
    assert config.method.name == "seq_lora"
    assert [t.name for t in config.tasks.sequence] == ["rule_a", "rule_b", "rule_c", "rule_d"]
    assert config.distributed.num_workers == 2 and config.distributed.zero_stage == 2


def test_overrides_are_typed_and_validated(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["training.epochs=3", "lora.target_modules=[q_proj]",
                                                    "method.name=sae_fd", "method.rho=0.3"])
    assert config.training.epochs == 3
    assert config.lora.target_modules == ["q_proj"]
    assert config.method.name == "sae_fd" and config.method.rho == 0.3


def test_override_into_list_item(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["tasks.sequence.0.max_train=5"])
    assert config.tasks.sequence[0].max_train == 5


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (MINIMAL + "trainig: {epochs: 2}\n", [], "trainig: unknown key"),
        (MINIMAL, ["training.epochs=two"], "training.epochs: Input should be a valid integer"),
        (MINIMAL, ["training.lr=-1"], "training.lr: Input should be greater than 0"),
        (MINIMAL, ["method.name=sae_fd", "method.rho=1.5"], "method.rho: rho must be in (0, 1), got 1.5"),
        (MINIMAL, ["method.name=sae_fd", "method.anchor_size=0"], "method.anchor_size: anchor_size must be > 0"),
        (MINIMAL, ["method.name=nope"], "method"),
        (MINIMAL, ["distributed.zero_stage=1"], "distributed.zero_stage"),
        ("model: {name_or_path: tiny}\n", [], "tasks: missing required key"),
        ("# nothing yet\n", [], "run.yaml: empty; expected a YAML mapping"),
        (MINIMAL + "    - {name: a, format: synthetic, generator: rule_b}\n", [], "duplicate task name 'a'"),
        ("tasks:\n  sequence:\n    - {name: a, format: trace}\n", [], "format 'trace' needs 'path'"),
        ("tasks:\n  sequence:\n    - {name: a, format: trace, path: /nonexistent/x}\n", [], "/nonexistent/x not found"),
        (MINIMAL + "model: {name_or_path: ./no/such/model}\n", [], "model.name_or_path: ./no/such/model not found"),
        (MINIMAL, ["tasks.order=2"], "order '2' is not named: tasks.orders is empty"),
        (MINIMAL, ["method.name=sae_fd", "method.sae.path=/no/such/sae"], "method.sae.path: /no/such/sae not found"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (MINIMAL + "training: {lr: abc}\n", [], "run.yaml: training.lr: Input should be a valid number"),
        (MINIMAL, ["training.lr=abc"], "--set training.lr: Input should be a valid number"),
        (MINIMAL + "training: {lr: abc}\n", ["training.epochs=2"], "run.yaml: training.lr: Input should be"),
        (MINIMAL, ["training.epochs=2", "training={lr: abc}"], "--set training: training.lr: Input should be"),
        (MINIMAL, ["method={name: sae_fd, sae: {path: /no/sae}}"], "--set method: method.sae.path: /no/sae not found"),
        (MINIMAL, ["tasks.sequence.0.path=/no/x", "tasks.sequence.0.format=trace"],
         "--set tasks.sequence.0.path: /no/x not found"),
        (MINIMAL, ["method.name=nonsense"], "--set method.name: method: Input tag 'nonsense'"),  # error one level up
        (MINIMAL, ["training.nosuchkey.sub=1"], "--set training.nosuchkey.sub: training.nosuchkey: unknown key"),
        (MINIMAL, ["tasks.sequence.9.name=x"], "--set 'tasks.sequence.9.name=x': tasks.sequence has 1 items; no index 9"),
    ],
)
def test_bad_config_names_the_file_or_the_set_that_gave_the_key(tmp_path, text, overrides, expected):
    """A bad value from `--set` is blamed on that --set, not on the config file the user never edited."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value).replace(f"{tmp_path}/", "")
    assert message.startswith(expected), message


def test_relative_model_folder_that_is_missing_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`runs/my_model` where ./runs exists is a mistyped folder: refused at once, not asked of the hub for a minute;
    one that exists is made absolute (Ray Train workers run in their own directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "config.json").write_text("{}")
    (tmp_path / "runs" / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^--set model\.name_or_path: runs/empty: no config\.json \(expected a"):
        load_config(write(tmp_path, MINIMAL), ["model.name_or_path=runs/empty"])
    with pytest.raises(ConfigError, match=r"^--set model\.name_or_path: runs/my_model not found$"):
        load_config(write(tmp_path, MINIMAL), ["model.name_or_path=runs/my_model"])
    config = load_config(write(tmp_path, MINIMAL), ["model.name_or_path=runs/mine"])
    assert config.model.name_or_path == str(tmp_path / "runs" / "mine")
    assert load_config(write(tmp_path, MINIMAL), ["model.name_or_path=org/model"]).model.name_or_path == "org/model"


def test_config_path_that_is_a_folder_or_not_text(tmp_path):
    with pytest.raises(ConfigError, match="a folder; expected a config file"):
        load_config(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="bin.yaml: expected a UTF-8 text file"):
        load_config(tmp_path / "bin.yaml")


def test_bad_sae_config_names_the_set(tmp_path):
    from saefd_ray.stream.config import load_sae_config

    path = tmp_path / "sae.yaml"
    path.write_text("layers: [0]\ndata: {sources: [{kind: file, path: /no/x.json}]}\n")
    with pytest.raises(ConfigError, match=r"^.*sae\.yaml: data\.sources\.0\.path: /no/x\.json not found$"):
        load_sae_config(path)
    with pytest.raises(ConfigError, match=r"^--set sae\.expansion: Input should be greater than or equal to 1"):
        load_sae_config(path, ["sae.expansion=0"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "tasks:\n  sequence: [\n")
    with pytest.raises(ConfigError, match=r"run.yaml: line \d+ malformed YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("training.epochs")
    assert apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=x"]) == {"a": {"b": 2, "c": "x"}}


@pytest.mark.parametrize("order, first", [("1", "dbpedia"), ("2", "dbpedia"), ("3", "yelp")])
def test_cl4_orders(shared_data, order, first):
    config = load_config(REPO / "configs" / "cl4.yaml", [f"tasks.data_root={shared_data}", f"tasks.order={order}"])
    names = [t.name for t in config.tasks.sequence]
    assert names[0] == first and sorted(names) == ["agnews", "amazon", "dbpedia", "yelp"]
    assert config.tasks.orders[order] == names


def test_trace_preset_validates(shared_data):
    # MeetingBank has no train split in the shared TRACE-500 copy: the preset still validates (paths exist).
    config = load_config(REPO / "configs" / "trace.yaml", [f"tasks.data_root={shared_data / 'trace'}"])
    assert len(config.tasks.sequence) == 8
    assert config.training.epochs_per_task["MeetingBank"] == 7


def test_run_dir_and_data_path(tmp_path):
    config = RunConfig.model_validate({"tasks": {"data_root": str(tmp_path), "sequence": [
        {"name": "a", "format": "synthetic", "generator": "rule_a"}]}, "output": {"root": str(tmp_path), "run_name": "r"}})
    assert config.run_dir == tmp_path.resolve() / "r"
    assert config.data_path("x/y") == (tmp_path / "x" / "y").resolve()


def test_relative_sae_and_model_paths_become_absolute_on_the_driver(tmp_path, monkeypatch):
    """Ray Train workers run in their own directory: a path relative to where the job was started must be made
    absolute before they start (a relative `method.sae.path` was refused by every worker as not found)."""
    (tmp_path / "runs" / "sae").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, MINIMAL + "model: {name_or_path: ./model}\n"),
                         ["method.name=sae_fd", "method.sae.path=runs/sae"])
    assert config.method.sae.path == str(tmp_path / "runs" / "sae")
    assert config.model.name_or_path == str(tmp_path / "model")
