"""Scheduling a scan the way operators do (README, "Scheduled scans"): the README's cron line, the
Kubernetes CronJob (kuberay_scan_cronjob.yaml) and the KubeRay RayJob it creates
(kuberay_rayjob.yaml) parse, run on the same schedule and name the same scan spec, and the
README's example spec is a valid spec."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from fbmem.jobs.scan_spec import load_scan_spec

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def _block(lang: str, marker: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"one ```{lang} block with {marker!r} in README.md"
    return found[0]


def _cron_line() -> tuple[str, list[str]]:
    line = _block("cron", "fbmem scan").strip()
    fields = line.split()
    schedule = " ".join(fields[:5])
    assert all(CRON_FIELD.match(f) for f in fields[:5]), schedule
    return schedule, shlex.split(" ".join(fields[5:]))


def _spec_of(args: list[str]) -> str:
    i = args.index("scan")
    assert args[i - 1] == "fbmem"
    return args[i + 1]


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / name).read_text()) if d]


def test_the_cron_line_submits_a_scan_to_ray() -> None:
    _, args = _cron_line()
    assert args[args.index("ray"):args.index("ray") + 3] == ["ray", "job", "submit"]
    assert "--" in args and args[args.index("--") + 1] == "fbmem"
    assert "--db" in args and _spec_of(args).endswith(".yaml")


def test_the_cronjob_creates_the_rayjob_that_scans_the_mounted_spec() -> None:
    docs = _documents("kuberay_scan_cronjob.yaml")
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    script = " ".join(container["command"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "rayjob")
    volume = next(v for v in pod["volumes"] if v["name"] == "rayjob")
    item = volume["configMap"]["items"][0]
    assert f"{mount['mountPath']}/{item['path']}" in script and "kubectl create -f -" in script
    # the RBAC the CronJob's pod runs with may create RayJobs
    role = next(d for d in docs if d["kind"] == "Role")
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    assert pod["serviceAccountName"] == next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]

    # the pod's edit of the RayJob: its one `name: fbmem-scan` line becomes a generateName
    pattern = re.search(r"s/\^(.*?)\$/", script).group(1)
    rayjob_text = (ROOT / "kuberay_rayjob.yaml").read_text()
    assert len(re.findall(rf"^{pattern}$", rayjob_text, flags=re.M)) == 1
    edited = yaml.safe_load(re.sub(rf"^{pattern}$", "  generateName: fbmem-scan-", rayjob_text, flags=re.M))
    assert edited["metadata"] == {"generateName": "fbmem-scan-"} and edited["kind"] == "RayJob"


def test_cron_line_and_kubernetes_run_on_one_schedule_and_name_the_same_spec() -> None:
    schedule, args = _cron_line()
    cron = next(d for d in _documents("kuberay_scan_cronjob.yaml") if d["kind"] == "CronJob")
    assert cron["spec"]["schedule"] == schedule

    rayjob = _documents("kuberay_rayjob.yaml")[0]
    k8s_spec = _spec_of(shlex.split(rayjob["spec"]["entrypoint"]))
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    (name, path), = mounts.items()
    volume = next(v for v in head["volumes"] if v["name"] == name)
    items = {i["path"]: i["key"] for i in volume["configMap"]["items"]}
    assert str(Path(k8s_spec).parent) == path and Path(k8s_spec).name in items  # the spec is mounted there
    assert volume["configMap"]["name"] == "fbmem-scan-spec"
    # the same spec file: the cron line's, the ConfigMap's key, and the README's example
    assert Path(_spec_of(args)).name == Path(k8s_spec).name == items[Path(k8s_spec).name]
    assert f"# {Path(k8s_spec).name}" in _block("yaml", "name: sd14-laion-weekly")


def test_the_readme_example_spec_is_valid(tmp_path: Path) -> None:
    spec_path = tmp_path / "fbmem-scan.yaml"
    spec_path.write_text(_block("yaml", "name: sd14-laion-weekly"))
    spec = load_scan_spec(spec_path)
    assert spec.name == "sd14-laion-weekly" and spec.mitigation.alphas == [0.0, 0.25, 0.5]
    cfg = spec.to_config()
    assert cfg.models.diffusion.model == "CompVis/stable-diffusion-v1-4" and cfg.generation.n == 5
