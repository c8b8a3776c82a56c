"""`fbmem detect --method nemo|wen` (issue 16): Wen et al.'s detector beside NeMo's on the tiny
random-weight model, real LanceDB and DuckDB; the actors in-process (a components dict) except in
the CLI test, which runs them in a local Ray.

Scores of a random model mean nothing: what is tested is that Wen's score is the norm of the very
noise predictions generation's CFG batch makes, that NeMo's row is `fbmem nemo detect`'s score,
that costs are counted, that reruns skip, and that the agreement queries line both up.
"""
from __future__ import annotations

import math
from typing import get_args

import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from fbmem.jobs import cli
from fbmem.jobs.core.wen import text_noise_norms, wen_scores
from fbmem.jobs.detect import METHODS, method_settings, run_detect_method, wen_settings
from fbmem.jobs.model_actors import DiffusionWorker
from fbmem.jobs.nemo import detection_settings_hash, run_detect
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.pipelines.diffusion_models import (
    TinySpec,
    assemble_pipeline,
    build_tiny_components,
)
from fbmem.pipelines.generator import generate_images, sample_seed
from fbmem.storage.database import connect
from fbmem.storage.sql import run_named_query

torch.set_num_threads(1)

PROMPTS = [
    {"prompt_id": "vm1", "text": "a red star on stripes", "planted": "VM"},
    {"prompt_id": "vm2", "text": "a blue circle on dots", "planted": "VM"},
    {"prompt_id": "nm1", "text": "a photo of a green ring on a long table at night", "planted": "NM"},
]
BAD = {"prompt_id": "bad", "text": "   ", "planted": "NM"}


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    c = tiny_cfg.model_copy(deep=True)
    c.nemo.n_latents = 3
    c.detect.wen_steps = 3
    c.detect.wen_seeds = 2
    c.detect.prompt_batch = 2  # 3 prompts: two actor calls
    return c


@pytest.fixture(scope="module")
def pipe():
    return assemble_pipeline(build_tiny_components(seed=0, spec=TinySpec()))


def _db_with_prompts(path, rows):
    db = connect(str(path))
    db.upsert("prompts", pa.Table.from_pylist([{**r, "run_id": "test"} for r in rows]))
    return db


def _pipeline_unet_outputs(pipe, text, seeds, cfg):
    """The UNet outputs of generation itself (pipelines.generator.generate_images: diffusers'
    pipeline with CFG), one [2N, C, h, w] batch per step, [uncond; cond]."""
    seen = []

    def keep(_module, _inputs, output):
        seen.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())

    handle = pipe.unet.register_forward_hook(keep)
    try:
        g = cfg.generation
        generate_images(pipe, [text] * len(seeds), seeds, steps=g.steps, guidance=g.guidance, size=g.size)
    finally:
        handle.remove()
    assert len(seen) == cfg.generation.steps
    return seen


# ---------------------------------------------------------------------------- the actor's score


def test_wen_actor_score_is_the_norm_of_generations_own_cfg_predictions(pipe, cfg):
    """The worker's score equals the pure function on the noise predictions the diffusers pipeline
    makes while generating the same (prompt, seed) samples: same x_T, same trajectory, same branches."""
    worker = DiffusionWorker(cfg, pipe=pipe)
    out = worker.wen_detect(PROMPTS[:2], cfg.detect, cfg.generation, cfg.nemo.gpu_numerics)
    steps, n_seeds = cfg.detect.wen_steps, cfg.detect.wen_seeds
    for row, o in zip(PROMPTS[:2], out):
        assert o.error is None and o.prompt_id == row["prompt_id"]
        seeds = [sample_seed(cfg.detect.wen_seed, row["prompt_id"], s) for s in range(n_seeds)]
        eps = _pipeline_unet_outputs(pipe, row["text"], seeds, cfg)[:steps]
        uncond, cond = zip(*(e.chunk(2) for e in eps))
        norms = text_noise_norms(torch.stack(cond, dim=1), torch.stack(uncond, dim=1))  # [seeds, steps]
        assert o.norms.shape == (n_seeds, steps)
        # batch composition (2 prompts x 2 seeds here, 1 prompt x 2 seeds there) moves the last bits only
        torch.testing.assert_close(o.norms, norms, rtol=1e-4, atol=1e-5)
        assert o.score == pytest.approx(wen_scores(norms[None]).item(), rel=1e-4)
        assert o.unet_calls == 2 * n_seeds * steps
    # a later step's norm is not the first step's: the trajectory moved (the steps are really taken)
    assert not torch.allclose(out[0].norms[:, 0], out[0].norms[:, -1])


def test_more_seeds_cost_more_unet_evaluations_and_keep_each_seeds_trajectory(pipe, cfg):
    worker = DiffusionWorker(cfg, pipe=pipe)
    one = cfg.detect.model_copy(update={"wen_seeds": 1})
    three = cfg.detect.model_copy(update={"wen_seeds": 3})
    a = worker.wen_detect(PROMPTS[:1], one, cfg.generation, cfg.nemo.gpu_numerics)[0]
    b = worker.wen_detect(PROMPTS[:1], three, cfg.generation, cfg.nemo.gpu_numerics)[0]
    steps = cfg.detect.wen_steps
    assert (a.unet_calls, b.unet_calls) == (2 * 1 * steps, 2 * 3 * steps)
    # seed s is derived from (wen_seed, prompt, s), not counted: seed 0 is the same sample either way
    torch.testing.assert_close(a.norms[0], b.norms[0], rtol=1e-4, atol=1e-5)
    assert b.score != pytest.approx(a.score, rel=1e-6)  # the other seeds enter the mean
    # more steps than the schedule has: the whole schedule, and the settings say so
    many = cfg.detect.model_copy(update={"wen_steps": 1000, "wen_seeds": 1})
    c = worker.wen_detect(PROMPTS[:1], many, cfg.generation, cfg.nemo.gpu_numerics)[0]
    assert c.norms.shape == (1, cfg.generation.steps) and c.unet_calls == 2 * cfg.generation.steps
    assert wen_settings(cfg.model_copy(update={"detect": many}))["steps"] == cfg.generation.steps


def test_wen_batch_with_an_empty_prompt_scores_the_others(pipe, cfg):
    worker = DiffusionWorker(cfg, pipe=pipe)
    out = worker.wen_detect([BAD, PROMPTS[0]], cfg.detect, cfg.generation, cfg.nemo.gpu_numerics)
    assert out[0].error is not None and out[0].score is None and "empty" in out[0].error
    alone = worker.wen_detect([PROMPTS[0]], cfg.detect, cfg.generation, cfg.nemo.gpu_numerics)[0]
    assert out[1].error is None and out[1].score == pytest.approx(alone.score, rel=1e-5)


# ---------------------------------------------------------------------------- the job and the queries


def test_both_methods_write_one_row_per_prompt_rerun_safe_and_the_queries_line_them_up(tmp_path, pipe, cfg):
    db = _db_with_prompts(tmp_path / "db", PROMPTS + [BAD])
    rows = [{"prompt_id": r["prompt_id"], "text": r["text"]} for r in PROMPTS + [BAD]]
    summaries = {}
    for method in METHODS:
        with RunRecord(db, f"detect-{method}", cfg) as run:
            summaries[method] = run_detect_method(db, cfg, rows, method, run, pool=pipe)
        assert run.errors == 1 and run.rows_out == 3 and run.rows_in == 4
    det = db.read("detections").to_pylist()
    by = {(r["method"], r["prompt_id"]): r for r in det}
    assert sorted(by) == sorted((m, p["prompt_id"]) for m in METHODS for p in PROMPTS)  # the bad prompt: no row
    assert db.count("errors") == 2  # one per method: the empty prompt
    for (method, _), r in by.items():
        want_calls = cfg.nemo.n_latents if method == "nemo" else 2 * cfg.detect.wen_seeds * cfg.detect.wen_steps
        assert r["unet_calls"] == want_calls and r["seconds"] > 0 and math.isfinite(r["score"])
        assert r["settings_hash"] == detection_settings_hash(method, method_settings(cfg, method))
    for method, s in summaries.items():
        assert (s["scored"], s["skipped"], s["errors"]) == (3, 0, 1)
        assert s["unet_calls"] == sum(r["unet_calls"] for (m, _), r in by.items() if m == method)
    # NeMo's detections score is nemo_prompts.detect_score, written by the same run
    nemo_rows = {r["prompt_id"]: r for r in db.read("nemo_prompts").to_pylist()}
    for p in PROMPTS:
        assert by[("nemo", p["prompt_id"])]["score"] == nemo_rows[p["prompt_id"]]["detect_score"]
        assert by[("nemo", p["prompt_id"])]["run_id"] == nemo_rows[p["prompt_id"]]["run_id"]
    wen = [by[("wen", p["prompt_id"])]["score"] for p in PROMPTS]
    assert len(set(wen)) == 3  # the prompt changes the text-conditional prediction

    # a rerun with the same settings writes nothing and loads no model (pool=None would start Ray)
    before = {r["detection_id"]: r["run_id"] for r in det}
    for method in METHODS:
        with RunRecord(db, f"detect-{method}", cfg) as run:
            s = run_detect_method(db, cfg, rows[:3], method, run, pool=None)
        assert (s["scored"], s["skipped"], run.rows_out) == (0, 3, 0)
    assert {r["detection_id"]: r["run_id"] for r in db.read("detections").to_pylist()} == before

    # another setting is another row beside the first, not an overwrite
    more = cfg.model_copy(deep=True)
    more.detect.wen_seeds = 1
    with RunRecord(db, "detect-wen", more) as run:
        s = run_detect_method(db, more, rows[:1], "wen", run, pool=pipe)
    assert s["scored"] == 1 and db.count("detections", "method = 'wen'") == 4

    # per prompt: both scores and ranks (the latest wen row of vm1 is the one-seed one)
    agree = run_named_query(db, "detector_agreement").to_pylist()
    assert sorted(r["prompt_id"] for r in agree) == sorted(p["prompt_id"] for p in PROMPTS)
    for r in agree:
        assert r["nemo_score"] is not None and r["wen_score"] is not None
        assert r["rank_gap"] == abs(r["nemo_rank"] - r["wen_rank"])
    vm1 = next(r for r in agree if r["prompt_id"] == "vm1")
    latest_vm1 = db.read("detections", where=f"method = 'wen' AND prompt_id = 'vm1' AND run_id = '{run.run_id}'")
    assert vm1["wen_score"] == latest_vm1.column("score")[0].as_py() and vm1["wen_unet_calls"] == 2 * 3
    assert sorted(r["wen_rank"] for r in agree) == [1, 2, 3] and sorted(r["nemo_rank"] for r in agree) == [1, 2, 3]
    top = min(agree, key=lambda r: r["wen_rank"])
    assert top["wen_score"] == max(r["wen_score"] for r in agree)
    # the first settings by name: vm1's 2-seed score again
    first = run_named_query(db, "detector_agreement",
                            {"wen_settings": detection_settings_hash("wen", wen_settings(cfg))}).to_pylist()
    assert next(r for r in first if r["prompt_id"] == "vm1")["wen_score"] == by[("wen", "vm1")]["score"]

    # per planted group: the mean score of each method over the group's prompts
    groups = {(g["group_kind"], g["grp"]): g for g in run_named_query(db, "detector_groups").to_pylist()}
    assert set(groups) == {("all", "(all)"), ("planted", "VM"), ("planted", "NM")}
    vm = groups[("planted", "VM")]
    assert vm["prompts"] == vm["nemo_prompts"] == vm["wen_prompts"] == 2
    want = sum(by[("nemo", p)]["score"] for p in ("vm1", "vm2")) / 2
    assert vm["mean_nemo_score"] == pytest.approx(want, abs=1e-4)
    want = (vm1["wen_score"] + by[("wen", "vm2")]["score"]) / 2
    assert vm["mean_wen_score"] == pytest.approx(want, abs=1e-4)
    assert groups[("all", "(all)")]["prompts"] == 3 and groups[("all", "(all)")]["rank_corr"] is not None
    assert groups[("planted", "NM")]["mean_wen_unet_calls"] == 2 * cfg.detect.wen_seeds * cfg.detect.wen_steps


def test_fbmem_nemo_detect_writes_the_detections_rows_detect_nemo_would(tmp_path, pipe, cfg):
    """One path: `fbmem nemo detect`'s function writes NeMo's detections rows, so `fbmem detect
    --method nemo` afterwards finds every prompt scored; and a NeMo setting that does not change
    the score (the threshold, alpha) does not redo it."""
    db = _db_with_prompts(tmp_path / "db", PROMPTS)
    rows = [{"prompt_id": r["prompt_id"], "text": r["text"]} for r in PROMPTS]
    with RunRecord(db, "nemo-detect", cfg) as run:
        run_detect(db, cfg, pipe, rows, run)
    assert db.count("detections", "method = 'nemo'") == 3
    other = cfg.model_copy(deep=True)
    other.nemo.threshold = 0.1
    other.nemo.alpha = 0.5
    with RunRecord(db, "detect-nemo", other) as run:
        s = run_detect_method(db, other, rows, "nemo", run, pool=None)
    assert (s["scored"], s["skipped"]) == (0, 3)
    other.nemo.n_latents = 4  # this one does change the score: scored again, beside the first rows
    with RunRecord(db, "detect-nemo", other) as run:
        s = run_detect_method(db, other, rows[:1], "nemo", run, pool=pipe)
    assert s["scored"] == 1 and s["unet_calls"] == 4 and db.count("detections", "method = 'nemo'") == 4


def test_unknown_method_is_refused(tmp_path, cfg):
    db = connect(str(tmp_path / "db"))
    with RunRecord(db, "detect-x", cfg) as run, pytest.raises(ValueError, match="unknown detection method 'x'"):
        run_detect_method(db, cfg, [], "x", run)


# ---------------------------------------------------------------------------- the command, on Ray actors


def test_cli_choices_are_the_jobs_methods():
    assert set(get_args(cli.DetectMethod)) == set(METHODS)


def test_fbmem_detect_runs_on_actors_and_reruns_skip(tmp_path, ray_local):
    db_uri = str(tmp_path / "db")
    _db_with_prompts(db_uri, PROMPTS)
    runner = CliRunner()
    args = ["detect", "--method", "wen", "--db", db_uri, "--preset", "tiny", "--set", "detect.wen_steps=2",
            "--set", "detect.wen_seeds=1", "--set", "detect.prompt_batch=2"]
    r = runner.invoke(cli.app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "wen: scored 3 of 3 prompts (0 already scored" in r.output and "4 UNet evaluations" in r.output
    r = runner.invoke(cli.app, args + ["--prompts", "planted = 'VM'"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "wen: scored 0 of 2 prompts (2 already scored" in r.output
    db = connect(db_uri)
    assert db.count("detections") == 3
    runs = db.read("runs", where="job = 'detect-wen'").to_pylist()
    assert len(runs) == 2 and all(r["status"] == "ok" for r in runs)


def test_detection_after_localization_keeps_the_localization_whatever_the_row_order(tmp_path, pipe, cfg):
    """NeMo's detection rewrites only the detection columns of a prompt already localized, also
    when the batch it writes begins with a prompt that was never localized (a scan's `detect`
    stage after its `nemo` stage: the demo's localized prompts once lost their neuron counts)."""
    from fbmem.jobs.nemo import nemo_id

    db = _db_with_prompts(tmp_path / "db", PROMPTS)
    model_id = cfg.models.diffusion.model_id
    localized = {"nemo_id": nemo_id(model_id, "vm2", cfg), "prompt_id": "vm2", "model_id": model_id,
                 "detect_score": 0.5, "memorized": True, "initial_score": 0.9, "refined_score": 0.8, "theta": 1.25,
                 "k": 15, "n_initial": 72, "n_refined": 40, "criterion_reached": False,
                 "message": "initial search gave up", "run_id": "localize"}
    db.upsert("nemo_prompts", pa.Table.from_pylist([localized]))
    with RunRecord(db, "nemo-detect", cfg) as run:  # nm1 and vm1 first: fresh detection rows lead the batch
        run_detect(db, cfg, pipe, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], run)
    rows = {r["prompt_id"]: r for r in db.read("nemo_prompts").to_pylist()}
    kept = rows["vm2"]
    assert (kept["n_initial"], kept["n_refined"], kept["refined_score"], kept["message"]) == (
        72, 40, pytest.approx(0.8), "initial search gave up")
    assert kept["run_id"] == run.run_id and kept["detect_score"] != 0.5  # the detection columns are new
    assert rows["nm1"]["n_initial"] is None
