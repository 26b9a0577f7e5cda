"""cluster.yaml is a valid Ray autoscaler config — checked by Ray's own schema validator after Ray fills in the AWS
defaults exactly as `ray up` does (prepare_config, then validate_config) — and has the shape the project needs."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def test_cluster_yaml_passes_rays_validator(cluster):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared(cluster))  # raises on any schema violation


def test_validator_rejects_a_broken_copy(cluster):
    """The check above is not vacuous: the same validator refuses an unknown key and a wrong type."""
    from ray.autoscaler._private.util import validate_config

    typo = copy.deepcopy(cluster)
    typo["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepared(typo))
    wrong = copy.deepcopy(cluster)
    wrong["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepared(wrong))


def test_cluster_shape(cluster):
    config = prepared(cluster)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["trial_driver"] >= 1
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand head
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] >= 1 and "trial_driver" not in gpu[0]["resources"]
    assert 0 <= gpu[0]["min_workers"] <= gpu[0]["max_workers"] <= config["max_workers"]
    assert any("pip install -e ~/saefd_ray" in cmd for cmd in config["setup_commands"])
    assert config["file_mounts"]["~/saefd_ray"] == "." and "~/shared/data" in config["file_mounts"]
    assert {"runs/", ".git/"} <= set(config["rsync_exclude"])
