"""ray_cluster.yaml must be accepted by the installed Ray's cluster launcher and keep our shape.

`ray up` needs cloud credentials, so these tests run the launcher's own offline steps instead:
the JSON schema shipped inside the ray package, then `prepare_config` + `validate_config` (the
merge with the AWS defaults that `ray up` does before it talks to AWS). On top of that they check
what matters to fbmem: a CPU-only head, an autoscaled GPU worker type, the project installed on
every node, and the database URI exported to the jobs.
"""
from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"

# Matches both `export NAME=value` lines and `'export NAME=value'` words inside a printf.
_EXPORT = re.compile(r"export\s+([A-Z_][A-Z0-9_]*)=([^\s'\"]+)")


def load_cluster_config(path: Path = CLUSTER_YAML) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def launcher_schema() -> dict[str, Any]:
    """The schema `ray up` itself validates against, from the installed ray, not a copy."""
    return json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())


def gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != head and node.get("resources", {}).get("GPU", 0) >= 1
    }


def exported_env(commands: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in commands:
        env.update(dict(_EXPORT.findall(command)))
    return env


def project_install_commands(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bpip install\b", c) and re.search(r"\bfbmem\b", c)]


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_cluster_config()


@pytest.fixture(scope="module")
def prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` works on: the file merged with the provider defaults (offline step)."""
    return prepare_config(copy.deepcopy(config))


def test_file_is_valid_against_the_launcher_schema(config: dict[str, Any]) -> None:
    jsonschema.validate(config, launcher_schema())


def test_ray_prepares_and_validates_it_offline(prepared: dict[str, Any]) -> None:
    validate_config(prepared)  # schema again, plus head type and min/max worker sums
    # The head never scales; the GPU workers are bounded by the global limit.
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    for node in gpu_worker_types(prepared).values():
        assert node["max_workers"] <= prepared["max_workers"]


def test_a_broken_copy_fails_validation(config: dict[str, Any]) -> None:
    broken = copy.deepcopy(config)
    broken["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="many"):
        jsonschema.validate(broken, launcher_schema())
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_a_copy_with_an_unknown_node_field_fails_validation(config: dict[str, Any]) -> None:
    broken = copy.deepcopy(config)
    broken["available_node_types"]["worker.gpu"]["gpus"] = 1  # misspelt, would be ignored
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        jsonschema.validate(broken, launcher_schema())


def test_head_is_a_cpu_node(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) >= 1  # it runs the drivers and CPU stages
    # AWS GPU families start with g or p (g5, p4d, ...); the head must not be billed for one.
    assert not re.match(r"^[gp]\d", head["node_config"]["InstanceType"])


def test_gpu_workers_are_autoscaled_within_bounds(config: dict[str, Any]) -> None:
    gpu_types = gpu_worker_types(config)
    assert gpu_types, "no worker type offers a GPU"
    for name, node in gpu_types.items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", config["max_workers"])
        assert 0 <= lo <= hi, name
        assert hi >= 1, f"{name} can never start"
        assert hi <= config["max_workers"], name


def test_gpu_worker_detector_rejects_a_cpu_only_copy(config: dict[str, Any]) -> None:
    cpu_only = copy.deepcopy(config)
    for node in cpu_only["available_node_types"].values():
        node["resources"].pop("GPU", None)
    assert gpu_worker_types(cpu_only) == {}


def test_every_node_installs_the_project(prepared: dict[str, Any]) -> None:
    # After prepare_config the common setup commands are merged into each role's list.
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert project_install_commands(prepared[role]), f"{role} does not install fbmem"


def test_database_uri_is_on_object_storage_and_exported(config: dict[str, Any]) -> None:
    env = exported_env(config["setup_commands"])
    assert "FBMEM_DB" in env, "setup_commands do not export FBMEM_DB"
    assert re.match(r"^(s3|gs|az)://[^/]+/.+", env["FBMEM_DB"]), env["FBMEM_DB"]
    # The exports must reach the login shells that run `ray start` (and so every job).
    assert any(".bashrc" in c for c in config["setup_commands"])
    # The project is installed from the URL variable, so it must be defined too.
    assert env.get("FBMEM_GIT_URL", "").startswith("https://")


def test_object_store_region_matches_the_cluster_region(config: dict[str, Any]) -> None:
    env = exported_env(config["setup_commands"])
    assert env.get("AWS_REGION") == config["provider"]["region"]


def test_exported_env_parser_reads_printf_words() -> None:
    env = exported_env(["printf '%s\\n' 'export A_B=s3://x/y' 'export C=1' > f", "export D=2"])
    assert env == {"A_B": "s3://x/y", "C": "1", "D": "2"}


def test_images_run_the_installed_ray_version(config: dict[str, Any]) -> None:
    """A cluster on another Ray version than the one the project is tested with fails to join."""
    docker = config["docker"]
    for key in ("head_image", "worker_image"):
        tag = docker[key].rsplit(":", 1)[1]
        assert tag.split("-")[0] == ray.__version__, f"{key}={docker[key]} vs ray {ray.__version__}"
    assert docker["head_image"].endswith("-cpu")
    assert docker["worker_image"].endswith("-gpu")
