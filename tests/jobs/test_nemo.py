"""NeMo on the tiny UNet (SPEC.md section 6): prompt encoding, the batched evaluator, and the DB jobs.

The pure pieces are tested in tests/core/test_nemo_{statistics,detection,search}.py. Here
batched == sequential is checked on the real tiny UNet, and the DB jobs run end to end on it.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fbmem.jobs.core.nemo.evaluator import (
    BlockingEvaluator,
    compute_stats,
    detect_prompt,
    encode_prompts,
    ms_settings,
    parts_of,
)
from fbmem.jobs.core.nemo.hooks import find_value_layers, value_activations
from fbmem.jobs.core.nemo.search import (
    localize,
    select_neurons,
    set_key,
    theta_k_schedule,
)
from fbmem.jobs.core.nemo.statistics import load_stats_csv
from fbmem.jobs.nemo import (
    import_stats_csv,
    read_stats,
    run_detect,
    run_localize,
    run_stats,
)
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.pipelines.diffusion_models import TinySpec, build_tiny_components, nemo_dtype
from fbmem.storage.database import connect

torch.set_num_threads(1)

PROMPTS = [f"a {c} {s} on {b}" for c in ("red", "blue", "green") for s in ("star", "circle") for b in ("stripes", "dots")]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0, spec=TinySpec())


@pytest.fixture(scope="module")
def parts(components):
    return parts_of(components)


def test_parts_of_a_pipeline_encode_like_the_pipeline(components):
    from fbmem.pipelines.diffusion_models import assemble_pipeline

    pipe = assemble_pipeline(components)
    p = parts_of(pipe)
    assert p.vae_scale_factor == 4 and p.unet is components["unet"]
    ours = encode_prompts(p, ["a red star on stripes", "x"])
    ref = pipe.encode_prompt(["a red star on stripes", "x"], torch.device("cpu"), 1, False)[0]
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="empty or non-text prompts at positions \\[1\\]"):
        encode_prompts(p, ["ok", " "])


def test_one_prompt_encoder_for_nemo_clustering_and_generation(components, tiny_cfg):
    """Issue 11: clustering, NeMo and the toy model's conditioning embed a prompt the one way
    StableDiffusionPipeline.encode_prompt does, the attention mask included when the text encoder's
    config asks for it."""
    import copy

    from fbmem.jobs.core.prompt_encoding import encode_prompts as shared
    from fbmem.jobs.model_actors import TextEncoderWorker
    from fbmem.pipelines.diffusion_models import assemble_pipeline

    texts = ["a red star on stripes", "a photo of a blue ring on a long table at night"]
    tok, enc = components["tokenizer"], components["text_encoder"]
    e = shared(tok, enc, texts)
    assert torch.equal(e, encode_prompts(parts_of(components), texts))  # NeMo
    # clustering: what its actors (jobs/cluster.prompt_features) compute, here in-process (same seeded tiny encoder)
    feats = TextEncoderWorker(tiny_cfg).features(texts)
    assert tiny_cfg.models.diffusion.tiny and tiny_cfg.models.diffusion.seed == 0
    assert torch.equal(torch.from_numpy(feats), e.reshape(2, -1))
    assert shared(tok, enc, [""]).shape == (1, 77, TinySpec().text_width)  # the unconditional branch is allowed
    # a text encoder whose config says use_attention_mask: the mask goes in, as in the pipeline
    masked = copy.deepcopy(components)
    masked["text_encoder"].config.use_attention_mask = True
    pipe = assemble_pipeline(masked)
    ref = pipe.encode_prompt(texts, torch.device("cpu"), 1, False)[0]
    got = shared(tok, masked["text_encoder"], texts)
    assert torch.equal(got, ref) and not torch.allclose(got, e)


@pytest.fixture(scope="module")
def stats(parts):
    return compute_stats(parts, PROMPTS, source="test-prompts")


@pytest.fixture(scope="module")
def nemo_cfg(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.nemo.n_latents = 4
    cfg.nemo.refine_batch = 16
    return cfg


# ---------------------------------------------------------------------------- on the tiny UNet


def _calibrated(parts, stats, text, nemo):
    """A threshold that makes the search non-trivial on a random model (which memorizes nothing)."""
    setup = detect_prompt(parts, text, nemo, 64)
    layers = find_value_layers(parts.unet)
    ev = BlockingEvaluator(parts.unet, layers, setup.latents, setup.t1, setup.cond, setup.delta, ms_settings(nemo))
    acts = {i: a[0] for i, a in value_activations(parts.unet, setup.cond, layers).items()}
    vals = ev([select_neurons(acts, stats, th, k) for th, k in theta_k_schedule()])
    return setup, ev, acts, (vals[6] + vals[-1]) / 2


@pytest.fixture(scope="module")
def loud_parts():
    """The tiny model with its value projections scaled by 8. On the plain random model blocking any
    set moves s(B) by ~1e-3 in all (the reference's MS-SSIM, s ~ 0.998), so decisions crowd within
    the ~1e-6 by which a UNet's float results depend on the batch size, and a batched decision can
    fall on the other side of the threshold than the sequential one (search.py's docstring). Louder
    value neurons spread s(B) ~10x wider, which leaves every decision clear of that noise."""
    comps = build_tiny_components(seed=0, spec=TinySpec())
    with torch.no_grad():
        for layer in find_value_layers(comps["unet"]):
            layer.module.weight.mul_(8.0)
    return parts_of(comps)


@pytest.fixture(scope="module")
def loud_stats(loud_parts):
    return compute_stats(loud_parts, PROMPTS, source="test-prompts")


@pytest.mark.parametrize("text", ["a red star on stripes 3", "a photo of a blue ring"])
def test_batched_localization_equals_sequential_on_tiny_unet(loud_parts, loud_stats, nemo_cfg, text):
    parts, stats = loud_parts, loud_stats
    setup, ev, acts, thr = _calibrated(parts, stats, text, nemo_cfg.nemo)
    seen: list[float] = []

    def evaluate(sets):
        vals = ev(sets)
        seen.extend(vals)
        return vals

    before = ev.unet_calls
    seq = localize(acts, stats, evaluate, threshold=thr, batch=1)
    calls_seq = ev.unet_calls - before
    bat = localize(acts, stats, evaluate, threshold=thr, batch=16)
    calls_bat = ev.unet_calls - calls_seq - before
    # the premise of comparing float decisions: none was within the batch-size noise of its threshold
    assert min(abs(v - t) for v in seen for t in {thr, seq.initial.refine_threshold}) > 2e-6
    assert 0 < seq.refined.drops < seq.refined.decisions  # non-trivial: some dropped, some kept
    assert bat.initial.sets == seq.initial.sets
    assert (bat.initial.theta, bat.initial.k) == (seq.initial.theta, seq.initial.k)
    assert bat.refined.sets == seq.refined.sets and bat.refined.decisions == seq.refined.decisions
    # the UNet's float results depend on the batch size in the last bits (seen: 5e-7)
    assert bat.refined_score == pytest.approx(seq.refined_score, abs=1e-5)
    assert calls_seq == seq.calls and calls_bat == bat.calls
    assert 2 * bat.calls <= seq.calls


def test_capped_unet_batch_splits_calls_not_results(parts, stats, nemo_cfg):
    setup = detect_prompt(parts, "a red star on stripes 3", nemo_cfg.nemo, 64)
    layers = find_value_layers(parts.unet)
    acts = {i: a[0] for i, a in value_activations(parts.unet, setup.cond, layers).items()}
    sets = [{}] + [select_neurons(acts, stats, th, k) for th, k in theta_k_schedule()[3::3]]  # 6 sets
    args = (parts.unet, layers, setup.latents, setup.t1, setup.cond, setup.delta, ms_settings(nemo_cfg.nemo))
    full, capped = BlockingEvaluator(*args), BlockingEvaluator(*args, max_unet_batch=8)  # 2 sets x 4 latents
    a, b = full(sets), capped(sets)
    assert (full.unet_calls, capped.unet_calls) == (1, 3) and capped.sets_evaluated == 6
    assert a == pytest.approx(b, abs=1e-5)
    assert a[0] == pytest.approx(1.0, abs=1e-6) and min(a) < 1.0  # the empty set changes nothing


# ---------------------------------------------------------------------------- DB jobs


def test_stats_jobs_roundtrip(tmp_path, parts, nemo_cfg, reference_data):
    db = connect(str(tmp_path / "db"))
    with RunRecord(db, "nemo-stats", nemo_cfg) as run:
        st = run_stats(db, nemo_cfg, {"unet": parts.unet, "text_encoder": parts.text_encoder,
                                      "tokenizer": parts.tokenizer, "scheduler": _sched(parts)},
                       PROMPTS + [""], source="toy", run=run)
    assert run.rows_out == 160 and run.errors == 1 and st.n_prompts == len(PROMPTS)
    back = read_stats(db, nemo_cfg.models.diffusion.model_id)
    assert back.source == "toy" and back.modules == st.modules
    assert all(torch.allclose(back.mean[i], st.mean[i]) and torch.allclose(back.std[i], st.std[i]) for i in st.mean)
    with RunRecord(db, "nemo-import", nemo_cfg) as run:
        with pytest.raises(ValueError, match="do not match"):
            import_stats_csv(db, reference_data / "sd14_to_v_activation_stats.csv", "sd14", run, unet=parts.unet)
        imported = import_stats_csv(db, reference_data / "sd14_to_v_activation_stats.csv", "sd14", run)
    assert run.rows_out == 5760 and db.count("neuron_stats", "model_id = 'sd14'") == 5760
    assert read_stats(db, "sd14").sizes() == imported.sizes()


def _sched(parts):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(parts.scheduler_config)


def test_detect_and_localize_jobs_write_rows(tmp_path, parts, stats, nemo_cfg):
    db = connect(str(tmp_path / "db"))
    pipe = {"unet": parts.unet, "text_encoder": parts.text_encoder, "tokenizer": parts.tokenizer,
            "scheduler": _sched(parts)}
    prompts = [{"prompt_id": "p1", "text": "a red star on stripes 3"}, {"prompt_id": "bad", "text": "  "}]
    with RunRecord(db, "nemo-detect", nemo_cfg) as run:
        run_detect(db, nemo_cfg, pipe, prompts, run)
    rows = db.read("nemo_prompts").to_pylist()
    assert [r["prompt_id"] for r in rows] == ["p1"] and run.errors == 1
    assert rows[0]["memorized"] is False and rows[0]["n_retained"] == 0  # a random model memorizes nothing
    assert db.count("errors") == 1

    # localize every prompt (a random model has nothing memorized), default threshold: the search gives up
    with RunRecord(db, "nemo-localize", nemo_cfg) as run:
        out = run_localize(db, nemo_cfg, pipe, prompts[:1], stats, run, only_memorized=False)
    r = out[0]
    assert r["theta"] == 1.25 and r["k"] == 15 and r["criterion_reached"] is False
    assert "gave up" in r["message"] and "NOT reached" in r["message"]
    assert "(stop rule: theta == 1 or k >= 1280)" in r["message"]  # which give-up test the search used
    assert r["refined_score"] <= r["initial_score"] and r["n_refined"] <= r["n_initial"]
    neurons = db.read("neurons").to_pylist()
    layers = find_value_layers(parts.unet)
    assert len(neurons) == 2 * len(layers)
    refined = {n["layer_idx"]: n["neurons"] for n in neurons if n["kind"] == "refined"}
    initial = {n["layer_idx"]: n["neurons"] for n in neurons if n["kind"] == "initial"}
    assert set_key(refined) <= set_key(initial) and sum(map(len, initial.values())) == r["n_initial"]
    assert db.read("nemo_prompts", where="prompt_id = 'p1'").num_rows == 1  # detection row updated, not duplicated
    assert run.metrics["unet_calls"] == r["unet_calls"] > 1
    # a rerun with the same settings and statistics reuses the stored search; force searches again
    with RunRecord(db, "nemo-localize", nemo_cfg) as run:
        again = run_localize(db, nemo_cfg, pipe, prompts[:1], stats, run, only_memorized=False)
    assert run.metrics["reused"] == 1 and run.metrics["unet_calls"] == 0
    assert again[0]["refined_score"] == r["refined_score"] and again[0]["message"] == r["message"]
    with RunRecord(db, "nemo-localize", nemo_cfg) as run:
        run_localize(db, nemo_cfg, pipe, prompts[:1], stats, run, only_memorized=False, force=True)
    assert run.metrics["reused"] == 0 and run.metrics["unet_calls"] == r["unet_calls"]
    other = dataclasses.replace(stats, source="other-prompt-set")  # other statistics: search again
    with RunRecord(db, "nemo-localize", nemo_cfg) as run:
        run_localize(db, nemo_cfg, pipe, prompts[:1], other, run, only_memorized=False)
    assert run.metrics["reused"] == 0 and run.metrics["unet_calls"] > 1
    with RunRecord(db, "nemo-localize", nemo_cfg) as run:
        run_localize(db, nemo_cfg, pipe, prompts[:1], stats, run, only_memorized=False)
    assert run.metrics["reused"] == 0  # the stored row is the other source's run: not this one's
    two = [{"prompt_id": "p2", "text": "a blue circle on waves 2"}, prompts[0]]  # a new prompt, then a stored one
    with RunRecord(db, "nemo-localize", nemo_cfg) as run:
        both = run_localize(db, nemo_cfg, pipe, two, stats, run, only_memorized=False)
    assert [r["prompt_id"] for r in both] == ["p2", "p1"] and run.metrics["reused"] == 1
    with RunRecord(db, "nemo-detect", nemo_cfg) as run:  # rerunning detection keeps the localization
        run_detect(db, nemo_cfg, pipe, prompts[:1], run)
    again = db.read("nemo_prompts", where="prompt_id = 'p1'").to_pylist()
    assert len(again) == 1 and again[0]["refined_score"] == pytest.approx(r["refined_score"])
    assert again[0]["message"] == r["message"]

    # a threshold the search can reach: the criterion is reached and said so
    _, _, _, thr = _calibrated(parts, stats, prompts[0]["text"], nemo_cfg.nemo)
    cfg2 = nemo_cfg.model_copy(deep=True)
    cfg2.nemo.threshold = thr
    with RunRecord(db, "nemo-localize", cfg2) as run:
        r2 = run_localize(db, cfg2, pipe, prompts[:1], stats, run, only_memorized=False)[0]
    assert r2["criterion_reached"] is True and "criterion reached" in r2["message"]
    assert r2["refined_score"] <= thr


def test_localize_refuses_stats_of_another_model(tmp_path, parts, reference_data, nemo_cfg):
    db = connect(str(tmp_path / "db"))
    sd14 = load_stats_csv(reference_data / "sd14_to_v_activation_stats.csv")
    with RunRecord(db, "nemo-localize", nemo_cfg) as run:
        with pytest.raises(ValueError, match="do not match this UNet"):
            run_localize(db, nemo_cfg, {"unet": parts.unet, "text_encoder": parts.text_encoder,
                                        "tokenizer": parts.tokenizer, "scheduler": _sched(parts)},
                         [{"prompt_id": "p", "text": "x"}], sd14, run)


def test_all_off_score_is_the_blocking_score_with_every_value_neuron_deactivated(parts, nemo_cfg):
    """The control the demo prints: one batched call with all channels masked equals the plain
    `deactivate` hook over every neuron, on all latents when detection retains none."""
    from fbmem.jobs.core.nemo.detection import blocking_scores, noise_difference
    from fbmem.jobs.core.nemo.evaluator import all_off_score
    from fbmem.jobs.core.nemo.hooks import deactivate

    text = PROMPTS[0]
    size = nemo_cfg.generation.size
    got = all_off_score(parts, text, nemo_cfg.nemo, size)
    setup = detect_prompt(parts, text, nemo_cfg.nemo, size)
    keep = setup.detection.retained if bool(setup.detection.retained.any()) else torch.ones_like(setup.detection.retained)
    layers = find_value_layers(parts.unet)
    with deactivate(parts.unet, {l.idx: list(range(l.out_features)) for l in layers}, alpha=0.0):
        blocked = noise_difference(parts.unet, setup.latents[keep], setup.t1, setup.cond)
    want = blocking_scores(setup.delta[keep], blocked, ms=ms_settings(nemo_cfg.nemo)).max().item()
    assert got == pytest.approx(want, abs=1e-5)
    assert got < 1.0 - 1e-4  # switching every value neuron off does change the prediction


def test_nemo_loads_fp32_on_a_gpu_for_the_reference_numerics(tiny_cfg):
    """SPEC 6: on a GPU the reference runs fp32 weights under fp16 autocast (nemo.gpu_numerics=autocast,
    the default); `native` keeps generation's dtype (fp16 on a GPU: pure fp16)."""
    cfg = tiny_cfg.model_copy(deep=True)
    assert cfg.nemo.gpu_numerics == "autocast"
    assert nemo_dtype(cfg, torch.device("cuda")) == torch.float32
    assert nemo_dtype(cfg, torch.device("cpu")) == torch.float32
    cfg.nemo.gpu_numerics = "native"
    assert nemo_dtype(cfg, torch.device("cuda")) == torch.float16
