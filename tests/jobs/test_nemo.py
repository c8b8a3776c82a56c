"""NeMo (SPEC.md section 6): statistics, noise differences, detection, initial selection, refinement.

The search is tested on constructed oracles (s(B) as a function of the neuron set) where the
expected answer follows from SPEC by hand, and batched == sequential is checked on random oracles
with various drop rates and on the real tiny UNet. The DB jobs run end to end on the tiny model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest
import torch
from fbmem.jobs.core.nemo.detection import (
    MsSsimSettings,
    ddim_t1,
    detect_side,
    detection,
    initial_latents,
    minmax_scale,
)
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
    initial_selection,
    localize,
    n_neurons,
    refine_batched,
    refine_sequential,
    select_neurons,
    set_key,
    theta_k_schedule,
)
from fbmem.jobs.core.nemo.statistics import (
    NeuronStats,
    activation_stats,
    check_stats_layers,
    load_stats_csv,
)
from fbmem.jobs.nemo import (
    import_stats_csv,
    read_stats,
    run_detect,
    run_localize,
    run_stats,
)
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.pipelines.diffusion_models import TinySpec, build_tiny_components
from fbmem.storage.database import connect
from model_shapes import sd14_unet_on_meta
from pytorch_msssim import ms_ssim

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


@pytest.fixture(scope="module")
def stats(parts):
    return compute_stats(parts, PROMPTS, source="test-prompts")


@pytest.fixture(scope="module")
def nemo_cfg(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.nemo.n_latents = 4
    cfg.nemo.refine_batch = 16
    return cfg


# ---------------------------------------------------------------------------- statistics


def test_activation_stats_match_torch():
    g = torch.Generator().manual_seed(0)
    acts = {0: torch.rand(50, 8, generator=g), 1: torch.rand(50, 3, generator=g) * 5}
    st = activation_stats(acts)
    for i, a in acts.items():
        assert torch.allclose(st[i][0], a.mean(0), atol=1e-6)
        assert torch.allclose(st[i][1], a.std(0), atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        activation_stats({0: torch.rand(1, 4)})


def test_sd14_stats_csv_loads(reference_data):
    st = load_stats_csv(reference_data / "sd14_to_v_activation_stats.csv")
    assert sorted(st.mean) == list(range(7))
    assert sum(st.sizes().values()) == 5760
    assert st.sizes() == {0: 320, 1: 320, 2: 640, 3: 640, 4: 1280, 5: 1280, 6: 1280}
    assert all(bool((s > 0).all()) for s in st.std.values())
    check_stats_layers(st, find_value_layers(sd14_unet_on_meta()))  # fits an SD 1.4-shaped UNet


def test_stats_that_do_not_fit_the_unet_are_refused(reference_data, parts):
    st = load_stats_csv(reference_data / "sd14_to_v_activation_stats.csv")
    with pytest.raises(ValueError, match="do not match this UNet's value layers"):
        check_stats_layers(st, find_value_layers(parts.unet))


def test_bad_stats_csv_names_the_problem(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("layer_idx,module,neuron,mean_abs_act,std_abs_act\n0,a,0,1,1\n0,a,2,1,1\n")
    with pytest.raises(ValueError, match="neurons are not 0..1"):
        load_stats_csv(p)
    p.write_text("layer_idx,module,neuron\n0,a,0\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_stats_csv(p)


# ---------------------------------------------------------------------------- noise differences


def test_initial_latents_are_the_reference_draw_without_touching_global_rng():
    with torch.random.fork_rng(devices=[]):
        ref = torch.randn((4, 4, 8, 8), generator=torch.manual_seed(1))
    before = torch.random.get_rng_state()
    got = initial_latents(4, (4, 8, 8), seed=1)
    assert torch.equal(got, ref)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_t1_is_the_second_ddim_timestep(parts):
    t1 = ddim_t1(parts.scheduler_config, 50, 1)
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(parts.scheduler_config)
    s.set_timesteps(50)
    assert t1 == int(s.timesteps[1]) and t1 < int(s.timesteps[0])
    assert t1 == 961  # SD's scheduler config (steps_offset 1) gives TOY.md's / the reference's 961


def test_minmax_scale_per_sample_and_channel():
    x = torch.randn(3, 4, 8, 8) * torch.arange(1, 5).view(1, 4, 1, 1)
    x[1, 2] = 7.0  # a constant channel
    y = minmax_scale(x)
    assert torch.allclose(y.amin(dim=(2, 3))[[0, 2]], torch.zeros(2, 4))
    assert torch.allclose(y.amax(dim=(2, 3))[[0, 2]], torch.ones(2, 4))
    assert torch.equal(y[1, 2], torch.zeros(8, 8))
    assert not torch.isnan(y).any()


# ---------------------------------------------------------------------------- MS-SSIM detection


def test_detect_side_upsamples_small_deltas_explicitly():
    assert detect_side(16, 16, win_size=11, n_scales=3) == 41  # > (11 - 1) * 2**2
    assert detect_side(64, 64, win_size=11, n_scales=3) == 64  # SD 1.4 latents: no upsampling
    assert detect_side(16, 16, win_size=11, n_scales=3, min_side=192) == 192
    with pytest.raises(ValueError, match="below the 41 px"):
        detect_side(16, 16, win_size=11, n_scales=3, min_side=32)


def test_detection_ms_ssim_is_pytorch_msssim_with_three_equal_weights():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 4, 170, 170, generator=g), torch.rand(2, 4, 170, 170, generator=g)
    b = 0.5 * a + 0.5 * b
    ours = MsSsimSettings().score(a, b)
    ref = ms_ssim(a, b, data_range=1.0, size_average=False, win_size=11, weights=[1 / 3] * 3)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_detection_retains_samples_with_a_similar_partner():
    g = torch.Generator().manual_seed(1)
    base = minmax_scale(torch.randn(1, 4, 16, 16, generator=g))
    noise = minmax_scale(torch.randn(3, 4, 16, 16, generator=g))
    delta = torch.cat([base, minmax_scale(base + 0.05 * noise[:1]), noise[1:]])  # 0 ~ 1, 2 and 3 unrelated
    det = detection(delta, threshold=0.428, ms=MsSsimSettings())
    assert det.retained.tolist() == [True, True, False, False]
    assert det.memorized and det.score == pytest.approx(float(det.m.max()))
    assert det.pairwise[0, 1] > 0.9 and det.pairwise[2, 3] < 0.428
    iu = torch.triu_indices(4, 4, 1)
    assert det.mean == pytest.approx(float(det.pairwise[iu[0], iu[1]].mean()), abs=1e-6)
    assert not detection(noise, threshold=0.428, ms=MsSsimSettings()).memorized


# ---------------------------------------------------------------------------- initial selection


def test_theta_k_schedule_gives_up_at_theta_one_after_16():
    sched = theta_k_schedule()
    assert len(sched) == 16
    assert sched[0] == (5.0, 0) and sched[-1] == (1.25, 15)
    assert [k for _, k in sched] == list(range(16))


def test_select_neurons_outliers_ascending_then_topk_once():
    st = NeuronStats({0: "l0"}, {0: torch.zeros(6)}, {0: torch.ones(6)})
    acts = {0: torch.tensor([0.5, 9.0, -6.0, 7.0, 0.1, 4.0])}
    assert select_neurons(acts, st, 5.0, 0) == {0: [1, 2, 3]}  # |z| > 5, ascending index
    # top-3 by activation: 1 (9.0), 3 (7.0), 5 (4.0); 1 and 3 already listed: kept once, at first place
    assert select_neurons(acts, st, 5.0, 3) == {0: [1, 2, 3, 5]}
    assert select_neurons(acts, st, 8.0, 2) == {0: [1, 3]}


class SetOracle:
    """s(B) from a rule on the set; records every set it is asked about, and the calls."""

    def __init__(self, fn):
        self.fn, self.seen, self.calls = fn, [], 0

    def one(self, s):
        self.calls += 1
        self.seen.append(s)
        return self.fn(s)

    def many(self, sets):
        self.calls += 1
        self.seen.extend(sets)
        return [self.fn(s) for s in sets]


def _linear_stats(width: int = 40):
    """acts a_j = j / 4 vs mean 0, std 1: neuron j is above theta iff j / 4 > theta."""
    st = NeuronStats({0: "l0", 1: "l1"}, {0: torch.zeros(width), 1: torch.zeros(width)},
                     {0: torch.ones(width), 1: torch.ones(width)})
    acts = {0: torch.arange(width) / 4.0, 1: torch.zeros(width)}
    return acts, st


def test_initial_selection_stops_at_the_first_mitigating_set():
    acts, st = _linear_stats()
    oracle = SetOracle(lambda s: 0.9 if n_neurons(s) < 12 else 0.3)
    res = initial_selection(acts, st, lambda ss: [oracle.one(s) for s in ss], threshold=0.428, batch=1)
    # (theta, k) = (5 - i/4, i): layer 0 has j/4 > theta (j > 20 - i) plus top-i; layer 1 top-i
    counts = [n_neurons(select_neurons(acts, st, th, k)) for th, k in theta_k_schedule()]
    first = next(i for i, c in enumerate(counts) if c >= 12)
    assert res.mitigated and res.evaluations == first + 1 and oracle.calls == first + 1
    assert (res.theta, res.k) == theta_k_schedule()[first]
    assert res.score == 0.3 and res.refine_threshold == 0.428
    batched = initial_selection(acts, st, SetOracle(oracle.fn).many, threshold=0.428, batch=16)
    assert batched.sets == res.sets and batched.calls == 1 and (batched.theta, batched.k) == (res.theta, res.k)


def test_initial_selection_gives_up_and_refines_against_the_last_score():
    acts, st = _linear_stats()
    oracle = SetOracle(lambda s: 0.95 - 0.001 * n_neurons(s))
    res = initial_selection(acts, st, lambda ss: [oracle.one(s) for s in ss], threshold=0.428, batch=1)
    assert not res.mitigated and oracle.calls == 16 and res.evaluations == 16
    assert (res.theta, res.k) == (1.25, 15)
    assert res.sets == select_neurons(acts, st, 1.25, 15)
    assert res.refine_threshold == res.score == pytest.approx(0.95 - 0.001 * n_neurons(res.sets))
    assert all(len(set(v)) == len(v) for v in res.sets.values())  # each neuron once
    batched = initial_selection(acts, st, SetOracle(oracle.fn).many, threshold=0.428, batch=5)
    assert batched.sets == res.sets and batched.calls == 4 and batched.score == res.score


# ---------------------------------------------------------------------------- refinement


def _additive(weights):
    return lambda s: 1.0 - sum(weights[(i, j)] for i, js in s.items() for j in js)


def test_refinement_follows_spec_on_a_hand_worked_case():
    """s = 1 - sum of blocked weights; layers reverse (1 then 0), then neurons of what remains."""
    w = {(0, 1): 0.5, (0, 2): 0.1, (0, 3): 0.3, (1, 4): 0.05, (1, 5): 0.05}
    init = {0: [1, 2, 3], 1: [4, 5]}
    seq = refine_sequential(init, _additive(w), 0.428)
    # layer 1 off -> s = 0.1 < thr: dropped; layer 0 off -> s = 1: kept.
    # neuron 1 -> 0.6 kept; neuron 2 -> 0.2 dropped; neuron 3 -> 0.5 kept.
    assert seq.sets == {0: [1, 3], 1: []}
    assert seq.decisions == 5 and seq.drops == 2 and seq.score == pytest.approx(0.2)
    for batch, calls in ((4, None), (64, 1)):  # 64 slots hold every outcome path of these 5 decisions
        bat = refine_batched(init, lambda ss: [_additive(w)(s) for s in ss], 0.428, batch)
        assert bat.sets == seq.sets and bat.score == seq.score and bat.decisions == 5
        assert bat.calls == calls if calls else bat.calls < seq.calls


def test_refinement_threshold_is_strict():
    w = {(0, 1): 0.5, (0, 2): 0.25}
    # re-enabling neuron 1 gives exactly 0.75: not below the threshold, so 1 stays; then 2 goes (0.5)
    assert refine_sequential({0: [1, 2]}, _additive(w), 0.75).sets == {0: [1]}
    # a hair above: neuron 1 goes (0.75 < thr); then re-enabling 2 would unblock everything (1.0): 2 stays
    assert refine_sequential({0: [1, 2]}, _additive(w), 0.7500001).sets == {0: [2]}


def _hash_oracle(seed: int):
    def f(s):
        h = hashlib.sha256(f"{seed}|{sorted(set_key(s))}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64
    return f


@pytest.mark.parametrize("kind,thr", [("hash", 0.1), ("hash", 0.5), ("hash", 0.9), ("additive", 0.05),
                                      ("additive", 0.3), ("additive", 0.7)])
def test_batched_refinement_equals_sequential_on_random_oracles(kind, thr):
    rng = random.Random(f"{kind}{thr}")
    for trial in range(4):
        init = {i: rng.sample(range(300), rng.randint(0, 40)) for i in range(rng.randint(1, 7))}
        total = max(1, n_neurons(init))
        if kind == "hash":
            fn = _hash_oracle(trial)
        else:
            w = {(i, j): rng.expovariate(1.0) / total for i in init for j in init[i]}
            fn = lambda s, w=w: _additive(w)(s) + 0.002 * (_hash_oracle(trial)(s) - 0.5)  # noqa: E731
        seq_oracle = SetOracle(fn)
        seq = refine_sequential(init, seq_oracle.one, thr, initial_score=fn(init))
        for batch in (2, 7, 64):
            oracle = SetOracle(fn)
            bat = refine_batched(init, oracle.many, thr, batch, initial_score=fn(init))
            assert bat.sets == seq.sets, (kind, thr, trial, batch)
            assert (bat.score, bat.decisions, bat.drops) == (seq.score, seq.decisions, seq.drops)
            assert oracle.calls == bat.calls and sum(bat.per_call) == seq.decisions
            assert len(oracle.seen) == bat.evaluated
            if seq.decisions >= 20 and batch == 64:
                assert bat.calls * 3 <= seq.calls, (kind, thr, trial, seq.calls, bat.calls)
        assert seq_oracle.calls == seq.decisions


def test_batched_refinement_resolves_long_runs_in_few_calls():
    """Mostly-dropped and mostly-kept candidates: speculation resolves many decisions per call."""
    rng = random.Random(5)
    init = {i: rng.sample(range(500), 60) for i in range(5)}
    w = {(i, j): rng.expovariate(1.0) / 300 for i in init for j in init[i]}
    for thr in (0.05, 0.6):
        seq = refine_sequential(init, _additive(w), thr)
        bat = refine_batched(init, lambda ss: [_additive(w)(s) for s in ss], thr, 64)
        assert bat.sets == seq.sets
        assert seq.calls >= 10 * bat.calls, (thr, seq.calls, bat.calls)


def test_refinement_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicates"):
        refine_sequential({0: [1, 1]}, lambda s: 0.0, 0.5)


# ---------------------------------------------------------------------------- on the tiny UNet


def _calibrated(parts, stats, text, nemo):
    """A threshold that makes the search non-trivial on a random model (which memorizes nothing)."""
    setup = detect_prompt(parts, text, nemo, 64)
    layers = find_value_layers(parts.unet)
    ev = BlockingEvaluator(parts.unet, layers, setup.latents, setup.t1, setup.cond, setup.delta, ms_settings(nemo))
    acts = {i: a[0] for i, a in value_activations(parts.unet, setup.cond, layers).items()}
    vals = ev([select_neurons(acts, stats, th, k) for th, k in theta_k_schedule()])
    return setup, ev, acts, (vals[6] + vals[-1]) / 2


@pytest.mark.parametrize("text", ["a red star on stripes 3", "a photo of a blue ring"])
def test_batched_localization_equals_sequential_on_tiny_unet(parts, stats, nemo_cfg, text):
    setup, ev, acts, thr = _calibrated(parts, stats, text, nemo_cfg.nemo)
    before = ev.unet_calls
    seq = localize(acts, stats, ev, threshold=thr, batch=1)
    calls_seq = ev.unet_calls - before
    bat = localize(acts, stats, ev, threshold=thr, batch=16)
    calls_bat = ev.unet_calls - calls_seq - before
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
