"""kuberay_rayjob.yaml must be a RayJob that KubeRay accepts, in our shape and on our Ray version.

There is no Kubernetes here, so these tests check what the KubeRay operator (v1) requires of a
RayJob (its CRD's required fields and its `ValidateRayJobSpec` / `ValidateRayClusterSpec`
rules), and what fbmem needs: a CPU head, an autoscaled GPU worker group, fbmem installed on every
node, the database URI on object storage in every pod, the cluster deleted after the job, and the
Ray version of the images equal to the installed one and allowed by pyproject.toml.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "kuberay_rayjob.yaml"
MAX_RAYJOB_NAME = 47  # KubeRay: 53 (RayCluster names) minus the 6 characters it appends
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def load_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def cluster_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]


def groups(job: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) of the head and of every worker group."""
    spec = cluster_spec(job)
    workers = spec.get("workerGroupSpecs", [])
    return [("head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in workers]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def gpus(group: dict[str, Any]) -> float:
    limits = ray_container(group).get("resources", {}).get("limits", {})
    return float(limits.get("nvidia.com/gpu", 0))


def env_of(group: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in ray_container(group).get("env", [])}


def custom_resources(params: dict[str, str]) -> dict[str, float]:
    """`rayStartParams.resources`, KubeRay's quoted JSON string ('"{\\"model_worker\\": 1}"')."""
    text = params.get("resources")
    if text is None:
        return {}
    return json.loads(json.loads(text) if text.startswith('"') else text)


def image_ray_version(image: str) -> str:
    repo, tag = image.rsplit(":", 1)
    assert repo == "rayproject/ray", image
    return tag.split("-")[0]


def problems(job: dict[str, Any]) -> list[str]:
    """What KubeRay (v1) would reject, as messages; empty when the manifest is acceptable."""
    out: list[str] = []
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        out.append("apiVersion/kind must be ray.io/v1 RayJob")
    name = job.get("metadata", {}).get("name", "")
    if not DNS1035.match(name) or len(name) > MAX_RAYJOB_NAME:
        out.append(f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
    spec = job.get("spec", {})
    if not str(spec.get("entrypoint", "")).strip():
        out.append("spec.entrypoint is empty (K8sJobMode submits it)")
    if "clusterSelector" in spec or "rayClusterSpec" not in spec:
        out.append("spec.rayClusterSpec must describe the cluster (no clusterSelector)")
        return out
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        out.append("ttlSecondsAfterFinished must be >= 0")
    try:
        if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}"), dict):
            out.append("runtimeEnvYAML must be a YAML mapping")
    except yaml.YAMLError as exc:
        out.append(f"runtimeEnvYAML is not YAML: {exc}")
    cs = spec["rayClusterSpec"]
    if "headGroupSpec" not in cs:
        out.append("rayClusterSpec.headGroupSpec is required")
        return out
    names = [g.get("groupName") for g in cs.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names) or not all(names):
        out.append(f"worker groups need distinct groupNames: {names}")
    for gname, group in groups(job):
        params = group.get("rayStartParams")
        if not isinstance(params, dict):
            out.append(f"{gname}: rayStartParams (a map) is required")
        elif not all(isinstance(v, str) for v in params.values()):
            out.append(f"{gname}: rayStartParams values must be strings (a map[string]string): {params}")
        elif "labels" in params:
            out.append(f"{gname}: rayStartParams['labels'] is not supported")
        elif group.get("resources") and set(params) & {"num-cpus", "num-gpus", "memory", "resources"}:
            out.append(f"{gname}: resources set both in rayStartParams and the group's resources")
        containers = group.get("template", {}).get("spec", {}).get("containers") or []
        if not containers or not containers[0].get("image"):
            out.append(f"{gname}: template.spec.containers[0].image is required")
        if gname == "head":
            continue
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) and c >= 0 for c in counts) or not counts[0] <= counts[1] <= counts[2]:
            out.append(f"{gname}: need 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
    return out


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return load_manifest()


def test_kuberay_accepts_it(job) -> None:
    assert problems(job) == []


@pytest.mark.parametrize("breakage", [
    lambda j: j["metadata"].update(name="fbmem_scan"),
    lambda j: j["metadata"].update(name="f" * 48),
    lambda j: j["spec"].pop("entrypoint"),
    lambda j: j["spec"].pop("rayClusterSpec"),
    lambda j: cluster_spec(j)["headGroupSpec"].pop("rayStartParams"),
    lambda j: cluster_spec(j)["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
    lambda j: cluster_spec(j)["workerGroupSpecs"][0].pop("groupName"),
    lambda j: cluster_spec(j)["workerGroupSpecs"][0].update(replicas=9),
    lambda j: cluster_spec(j)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image"),
    lambda j: j["spec"].update(runtimeEnvYAML="pip: [unclosed"),
])
def test_broken_copies_are_caught(job, breakage) -> None:
    broken = copy.deepcopy(job)
    breakage(broken)
    assert problems(broken)


def test_ray_version_is_the_installed_one_and_allowed_by_pyproject(job) -> None:
    version = cluster_spec(job)["rayVersion"]
    assert version == ray.__version__
    for gname, group in groups(job):
        assert image_ray_version(ray_container(group)["image"]) == version, gname
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python 3.11+")
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_reqs = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert ray_reqs, "pyproject.toml does not depend on ray"
    assert all(req.specifier.contains(Version(version)) for req in ray_reqs), (ray_reqs, version)


def test_a_cpu_head_and_an_autoscaled_gpu_worker_group(job) -> None:
    spec = cluster_spec(job)
    head = spec["headGroupSpec"]
    assert gpus(head) == 0 and head["rayStartParams"].get("num-gpus") == "0"
    assert ray_container(head)["image"].endswith("-cpu")
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g) >= 1]
    assert gpu_groups, "no worker group asks for a GPU"
    for group in gpu_groups:
        assert ray_container(group)["image"].endswith("-gpu")
        assert group["maxReplicas"] >= 1
        assert custom_resources(group["rayStartParams"]).get("model_worker", 0) >= 1
    assert spec.get("enableInTreeAutoscaling") is True


def test_custom_resources_parser_reads_kuberays_quoting() -> None:
    assert custom_resources({"resources": '"{\\"model_worker\\": 1}"'}) == {"model_worker": 1}
    assert custom_resources({"resources": '{"a": 2}'}) == {"a": 2}
    assert custom_resources({}) == {}


def test_the_cluster_goes_away_after_the_job(job) -> None:
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert isinstance(job["spec"]["ttlSecondsAfterFinished"], int)


def test_every_pod_has_the_database_on_object_storage(job) -> None:
    envs = {gname: env_of(group) for gname, group in groups(job)}
    for gname, env in envs.items():
        assert re.match(r"^(s3|gs|az)://[^/]+/.+", env.get("FBMEM_DB") or ""), (gname, env)
        assert env.get("AWS_REGION"), gname
    assert len({env["FBMEM_DB"] for env in envs.values()}) == 1, envs


def test_fbmem_is_installed_and_run(job) -> None:
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    pip = runtime_env["pip"]
    packages = pip["packages"] if isinstance(pip, dict) else pip
    assert any(Requirement(p).name == "fbmem" and Requirement(p).url for p in packages), packages
    assert re.search(r"\bfbmem\s+\w+", job["spec"]["entrypoint"])


def test_every_value_to_edit_is_marked() -> None:
    lines = MANIFEST.read_text().splitlines()
    for needle in ("s3://", "AWS_REGION", "serviceAccountName"):
        hits = [i for i, line in enumerate(lines) if needle in line and not line.lstrip().startswith("#")]
        assert hits, needle
        for i in hits:  # the value's line, or the line after a `- name:` line, says EDIT
            assert "EDIT" in lines[i] or "EDIT" in lines[i + 1], lines[i]
    text = MANIFEST.read_text()
    assert "EDIT: your repository" in text and "git+https://" in text
