"""The scan spec (jobs/scan_spec.py): validated like the config, paths relative to the spec,
settings layered, the shipped toy spec valid."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fbmem.jobs.config import ConfigError
from fbmem.jobs.scan_spec import STAGES, load_scan_spec

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, **fields) -> Path:
    spec = {"name": "weekly", "preset": "tiny", "sources": [{"uri": "corpus"}], "prompts": [{"set": "p.csv"}], **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_shipped_toy_spec_is_valid_and_runs_every_stage() -> None:
    spec = load_scan_spec(REPO / "jobs" / "toy" / "toy_scan.yaml")
    assert spec.stages == list(STAGES)
    cfg = spec.to_config()
    assert cfg.models.segmenter.backend == "colour"  # the demo layer over the tiny preset
    assert cfg.models.clip.tiny and cfg.generation.n == 5 and cfg.fbmem.tau == 0.8


def test_paths_are_relative_to_the_spec_and_uris_stay_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    (tmp_path / "model").mkdir()
    spec = load_scan_spec(write(tmp_path, model="model", sources=[{"uri": "corpus"}, {"uri": "s3://b/shards/*.tar"}]))
    assert spec.path("corpus") == str(tmp_path / "corpus")
    assert spec.path("s3://b/shards/*.tar") == "s3://b/shards/*.tar"
    assert spec.prompt_set(spec.prompts[0]) == str(tmp_path / "p.csv")
    assert spec.to_config().models.diffusion.model == str(tmp_path / "model")
    hub = load_scan_spec(write(tmp_path, model="CompVis/stable-diffusion-v1-4", prompts=[{"set": "memorized-laion"}]))
    assert hub.to_config().models.diffusion.model == "CompVis/stable-diffusion-v1-4"
    assert hub.prompt_set(hub.prompts[0]) == "memorized-laion"  # a shipped set by name


def test_layers_preset_then_settings_then_the_specs_own_fields(tmp_path: Path) -> None:
    spec = load_scan_spec(write(tmp_path, preset=["tiny", "demo"], samples=3, thresholds={"tau": 0.7, "beta": 0.05},
                                settings={"generation.n": 9, "candidates.k": 7},
                                resources={"score": {"pool_size": 3}}))
    cfg = spec.to_config({"candidates.k": 11})
    assert cfg.generation.n == 3  # samples wins over settings
    assert cfg.fbmem.tau == 0.7 and cfg.fbmem.beta == 0.05
    assert cfg.candidates.k == 11  # the command's --set wins over all
    assert cfg.resources.score.pool_size == 3 and cfg.models.segmenter.backend == "colour"


def test_stages_keep_the_scan_order_whatever_order_they_are_listed_in(tmp_path: Path) -> None:
    spec = load_scan_spec(write(tmp_path, stages=["report", "label", "ingest"]))
    assert spec.stages == ["ingest", "label", "report"]


@pytest.mark.parametrize(("fields", "says"), [
    ({"stages": ["ingest", "lable"]}, "stages"),
    ({"thresholds": {"tua": 0.8}}, "unknown thresholds"),
    ({"sampels": 3}, "sampels"),
    ({"sources": []}, "needs `sources`"),
    ({"name": "bad name!"}, "name"),
    ({"samples": 0}, "samples"),
    ({"settings": {"fbmem.tau": 2.0}}, "tau"),
    ({"mitigation": {"alphas": [1.5]}}, "alphas"),
    ({"preset": "nonesuch"}, "nonesuch"),
])
def test_a_bad_spec_is_a_config_error_naming_the_field(tmp_path: Path, fields: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_scan_spec(write(tmp_path, **fields))


def test_a_missing_or_malformed_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_scan_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scan_spec(bad)
