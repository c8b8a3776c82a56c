from __future__ import annotations

import pytest

from fbmem.jobs.config import Config, ConfigError, load_config, preset_names


def test_defaults_are_the_reference_values():
    cfg = Config()
    assert cfg.fbmem.image_size == 512
    assert cfg.fbmem.tau == 0.8 and cfg.fbmem.thresholds == (0.8, 0.8, 0.8)
    assert cfg.fbmem.beta == 0.03
    assert cfg.fbmem.region_metric == "region"
    assert cfg.fbmem.ms_weights == [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    assert (cfg.fbmem.win_size, cfg.fbmem.win_sigma) == (11, 1.5)
    assert cfg.candidates.k == 20
    assert (cfg.cluster.k, cfg.cluster.max_iter, cfg.cluster.random_state) == (12, 500, 1)
    assert cfg.nemo.threshold == 0.428 and cfg.nemo.n_latents == 10 and cfg.nemo.latent_seed == 1
    assert (cfg.nemo.theta_start, cfg.nemo.theta_step, cfg.nemo.theta_min, cfg.nemo.k_start) == (5.0, 0.25, 1.0, 0)
    assert (cfg.generation.steps, cfg.generation.guidance, cfg.generation.size) == (50, 7.0, 512)


def test_separate_thresholds_fall_back_to_tau():
    cfg = load_config(overrides={"fbmem.tau": 0.7, "fbmem.tau_bg": 0.9})
    assert cfg.fbmem.thresholds == (0.7, 0.7, 0.9)


def test_presets_load_and_differ():
    assert {"tiny", "sd14"} <= set(preset_names())
    tiny, sd = load_config("tiny"), load_config("sd14")
    assert tiny.models.clip.tiny and not sd.models.clip.tiny
    assert sd.models.diffusion.model == "CompVis/stable-diffusion-v1-4"
    assert sd.models.segmenter.sam_model_type == "vit_h"


def test_file_overrides_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("fbmem:\n  tau: 0.6\ncandidates: {k: 7}\n")
    cfg = load_config("tiny", f)
    assert cfg.fbmem.tau == 0.6 and cfg.candidates.k == 7
    assert cfg.models.clip.tiny  # the preset still applies underneath


@pytest.mark.parametrize(
    "text, needle",
    [
        ("fbmem:\n  tau: 1.5\n", "fbmem.tau"),
        ("fbmem:\n  taau: 0.5\n", "fbmem.taau"),
        ("fbmem: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("fbmem:\n  win_size: 10\n", "odd"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path=f)
    assert needle in str(exc.value)
    if "YAML" not in needle and "mapping" not in needle:
        assert str(f) in str(exc.value)


def test_missing_file_and_unknown_preset():
    with pytest.raises(ConfigError, match="not found"):
        load_config(path="/nonexistent/fbmem.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_config_round_trips_through_json():
    cfg = load_config("tiny", overrides={"fbmem.tau": 0.75})
    assert Config.model_validate_json(cfg.to_json()) == cfg


def test_storage_options_are_strings_and_the_runs_record_masks_credentials():
    import json

    from fbmem.jobs.config import load_config

    cfg = load_config(overrides={"storage_options": {"allow_http": True, "aws_region": "us-east-1",
                                                     "aws_secret_access_key": "s3cr3t", "aws_access_key_id": "AKIA1",
                                                     "timeout": 30}})
    assert cfg.storage_options["allow_http"] == "true" and cfg.storage_options["timeout"] == "30"
    assert "s3cr3t" in cfg.to_json()  # the job's own actors need them
    record = json.loads(cfg.to_record_json())
    assert "s3cr3t" not in cfg.to_record_json() and "AKIA1" not in cfg.to_record_json()
    assert record["storage_options"]["aws_region"] == "us-east-1"
    assert record["storage_options"]["aws_secret_access_key"] == "***"
