"""Toy model training: losses fall, runs reproduce from the seed, the cache is keyed on spec and
corpus, the saved folder loads with the real `load_pipeline` offline, and the memorization scorer
tells planted cases apart. Sizes are tiny (32 px images, a few dozen steps) to stay fast."""
from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fbmem.jobs.config import DiffusionConfig
from fbmem.jobs.toy.corpus import BgSpec, ToyCorpusSpec, build_corpus, compose
from fbmem.jobs.toy.train import (
    META_NAME,
    ToyTrainSpec,
    cached_model_matches,
    ensure_toy_model,
    format_memorization,
    memorization_check,
    read_record,
    score_generations,
    train_toy_model,
)
from fbmem.pipelines.diffusion_models import load_pipeline

CORPUS_SPEC = ToyCorpusSpec(vm_prompts=1, vm_copies=4, fm_prompts=1, fm_copies=3, bm_prompts=1, bm_copies=3,
                            nm_prompts=2, size=32, seed=1)
TINY = ToyTrainSpec(
    vae_channels=(8, 16), unet_channels=(16, 32), unet_attention=(False, True), vae_steps=30, vae_batch=8,
    unet_steps=30, unet_batch=8, text_width=32, text_layers=1, max_tokens=16, warmup_steps=2,
    vae_lr=3e-3, unet_lr=3e-3,
)
SHORT = dataclasses.replace(TINY, vae_steps=4, unet_steps=4)
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(CORPUS_SPEC)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    return train_toy_model(tmp_path_factory.mktemp("toy") / "model", corpus, TINY, log_every=0, processes=1)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: loading must be purely local."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_training_lowers_both_losses(trained: Path) -> None:
    rec = read_record(trained)
    assert len(rec["losses"]["autoencoder"]) == TINY.vae_steps
    assert len(rec["losses"]["unet"]) == TINY.unet_steps
    assert rec["autoencoder_loss"]["last"] < 0.9 * rec["autoencoder_loss"]["first"]
    assert rec["unet_loss"]["last"] < 0.9 * rec["unet_loss"]["first"]
    assert all(np.isfinite(rec["losses"]["unet"]))
    assert 0 < rec["reconstruction_ms_ssim"]["mean"] <= 1


def test_saved_folder_is_safetensors_and_has_value_layers_where_nemo_looks(trained: Path) -> None:
    assert (trained / "model_index.json").exists()
    assert not list(trained.rglob("*.bin")) and not list(trained.rglob("*.pt"))
    rec = read_record(trained)
    # cross-attention only in down block 1 (attention=(False, True)) and the mid block
    assert [n.split(".attentions")[0] for n in rec["value_layers"]] == ["down_blocks.1", "mid_block"]
    assert rec["scaling_factor"] > 0


def test_load_pipeline_loads_and_samples_offline(trained: Path, no_network) -> None:
    from fbmem.pipelines.generator import generate_images

    pipe = load_pipeline(DiffusionConfig(model=str(trained), tiny=False), torch.device("cpu"), torch.float32)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.vae.config.scaling_factor == pytest.approx(read_record(trained)["scaling_factor"])
    saved = load_file(trained / UNET_WEIGHTS)
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, saved[name]), name
    imgs = generate_images(pipe, ["a prompt", "another"], [0, 1], steps=2, guidance=6.0, size=32)
    assert imgs.shape == (2, 32, 32, 3)
    assert np.isfinite(imgs).all() and imgs.min() >= 0 and imgs.max() <= 1


def test_same_seed_same_weights_other_seed_differs(corpus, tmp_path: Path) -> None:
    a = train_toy_model(tmp_path / "a", corpus, SHORT, log_every=0, processes=1)
    b = train_toy_model(tmp_path / "b", corpus, SHORT, log_every=0, processes=1)
    c = train_toy_model(tmp_path / "c", corpus, dataclasses.replace(SHORT, seed=1), log_every=0, processes=1)
    la, lb, lc = (read_record(p)["losses"] for p in (a, b, c))
    assert la == lb
    assert la["unet"] != lc["unet"]
    wa, wb, wc = (load_file(p / UNET_WEIGHTS) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (b / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_two_processes_reproduce_and_match_one_process(corpus, tmp_path: Path) -> None:
    """Data-parallel ranks train on halves of each batch: the run repeats bit for bit, and it
    follows the one-process run up to float summation order."""
    a = train_toy_model(tmp_path / "a", corpus, SHORT, log_every=0, processes=2)
    b = train_toy_model(tmp_path / "b", corpus, SHORT, log_every=0, processes=2)
    one = train_toy_model(tmp_path / "one", corpus, SHORT, log_every=0, processes=1)
    wa, wb, w1 = (load_file(p / UNET_WEIGHTS) for p in (a, b, one))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.allclose(wa[k], w1[k], atol=1e-4) for k in wa)
    la, l1 = read_record(a)["losses"], read_record(one)["losses"]
    assert la["unet"] == pytest.approx(l1["unet"], rel=1e-4)
    assert la["autoencoder"] == pytest.approx(l1["autoencoder"], rel=1e-4)
    assert read_record(a)["processes"] == 2


def test_batch_must_split_evenly_across_processes(corpus, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unet_batch=9 is not divisible by processes=2"):
        train_toy_model(tmp_path / "x", corpus, dataclasses.replace(SHORT, unet_batch=9), processes=2)
    with pytest.raises(ValueError, match="processes=1"):
        train_toy_model(tmp_path / "x", corpus, dataclasses.replace(SHORT, frozen_text_encoder=False), processes=2)


def test_cache_reused_for_same_spec_and_corpus_else_retrained(trained: Path, corpus, tmp_path: Path) -> None:
    folder = tmp_path / "cached"
    shutil.copytree(trained, folder)
    before = (folder / UNET_WEIGHTS).stat().st_mtime_ns
    assert ensure_toy_model(folder, corpus, TINY, processes=1) == folder
    assert (folder / UNET_WEIGHTS).stat().st_mtime_ns == before  # reused, not retrained

    other = build_corpus(dataclasses.replace(CORPUS_SPEC, seed=2))
    ok, why = cached_model_matches(folder, other, TINY, processes=1)
    assert not ok and "corpus" in why
    ok, why = cached_model_matches(folder, corpus, TINY, processes=2)  # other weights: retrain
    assert not ok and "processes" in why

    ensure_toy_model(folder, corpus, SHORT, log_every=0, processes=1)  # spec changed: retrains
    rec = read_record(folder)
    assert rec["spec"] == SHORT.to_json() and len(rec["losses"]["unet"]) == SHORT.unet_steps
    assert cached_model_matches(folder, corpus, SHORT, processes=1)[0]

    (folder / META_NAME).write_text("{not json")
    assert cached_model_matches(folder, corpus, SHORT, processes=1) == (False, "no training record")


def test_score_generations_tells_planted_cases_apart(corpus) -> None:
    """Known 'generations': a VM prompt's own image, the FM object on a new background, and an NM
    prompt answered with another NM prompt's image."""
    vm = next(p for p in corpus.prompts if p.planted == "VM")
    fm = next(p for p in corpus.prompts if p.planted == "FM")
    nm_a, nm_b = [p for p in corpus.prompts if p.planted == "NM"]
    fm_obj = corpus.image(fm.linked[0]).fg
    new_bg = BgSpec("checker", (0, 0, 0), (255, 255, 255), period=0.5, angle=45.0)
    fm_img, _ = compose(fm_obj, new_bg, CORPUS_SPEC.size)
    gens = [
        (vm.text, 0, corpus.image(vm.linked[0]).image),
        (fm.text, 0, fm_img.astype(np.float32) / 255.0),
        (nm_a.text, 0, corpus.image(nm_b.linked[0]).image),
    ]
    res = score_generations(corpus, gens)
    rows = {r["planted"]: r for r in res["rows"]}
    assert rows["VM"]["full"] > 0.99 and rows["VM"]["label"] == "VM"
    # same object pixels; Lanczos upsampling lets the new background ring into the object's edge
    assert rows["FM"]["fg"] > 0.8 > rows["FM"]["bg"] and rows["FM"]["label"] == "FM"
    assert rows["NM"]["full"] < 0.8 and rows["NM"]["label"] == "NM"
    assert res["groups"]["VM"]["full_over_tau"] == 1.0 and res["groups"]["NM"]["full_over_tau"] == 0.0
    with pytest.raises(ValueError, match="not a prompt of this corpus"):
        score_generations(corpus, [("no such prompt", 0, gens[0][2])])


def test_memorization_check_runs_on_the_trained_model(trained: Path, corpus) -> None:
    pipe = load_pipeline(DiffusionConfig(model=str(trained)), torch.device("cpu"), torch.float32)
    res = memorization_check(pipe, corpus, groups=("VM", "NM"), seeds=(0, 1), steps=2)
    assert set(res["groups"]) == {"VM", "NM"}
    assert len(res["rows"]) == 2 * (CORPUS_SPEC.vm_prompts + CORPUS_SPEC.nm_prompts)
    assert all(0 <= r["full"] <= 1 for r in res["rows"])
    assert "VM" in format_memorization(res)
    json.dumps(res)  # the demo stores it


def test_bad_specs_are_rejected_with_a_reason(corpus, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cross-attention"):
        ToyTrainSpec(unet_attention=(False, False, False))
    with pytest.raises(ValueError, match="unet_attention has 2 entries"):
        ToyTrainSpec(unet_attention=(False, True))
    with pytest.raises(ValueError, match="caption_dropout"):
        ToyTrainSpec(caption_dropout=1.0)
    with pytest.raises(ValueError, match="not divisible"):
        train_toy_model(tmp_path / "x", build_corpus(dataclasses.replace(CORPUS_SPEC, size=36)),
                        dataclasses.replace(SHORT, unet_channels=(16, 32, 32), unet_attention=(False, True, True)))


def test_text_encoder_frozen_by_default_trained_on_request(trained: Path, corpus, tmp_path: Path) -> None:
    from fbmem.jobs.toy.train import build_toy_components

    init = build_toy_components(TINY, CORPUS_SPEC.size)["text_encoder"].state_dict()
    frozen = load_file(trained / "text_encoder" / "model.safetensors")
    assert all(torch.equal(frozen[k], init[k]) for k in frozen)  # Stable Diffusion's setting
    unfrozen = train_toy_model(tmp_path / "unfrozen", corpus, dataclasses.replace(SHORT, frozen_text_encoder=False),
                               log_every=0, processes=1)
    moved = load_file(unfrozen / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(moved[k], init[k]) for k in moved if k in init)


def test_spec_round_trips_through_json() -> None:
    spec = ToyTrainSpec.from_json(json.loads(json.dumps(TINY.to_json())))
    assert spec == TINY and hash(spec) == hash(TINY)
    with pytest.raises(ValueError, match="unknown ToyTrainSpec fields"):
        ToyTrainSpec.from_json({"unet_step": 3})
