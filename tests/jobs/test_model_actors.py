"""Every model in an actor (issue 12, item 4): NeMo's model and clustering's text encoder run in Ray
actors with their own `resources.*` entries, never in the driver, and give the results the
in-process functions give.

- the actor pool itself (pipelines/actor_pool.py): work spread over the actors, results by index,
  errors raised as themselves (also a constructor's), started only when used;
- `fbmem nemo stats / detect / localize` and `fbmem cluster` through the CLI on a local Ray: the rows
  equal those of the pure per-prompt functions run here, and the runs name the actors' nodes;
- a static check that no driver code path loads a model: every call of a model loader in jobs/ and
  pipelines/ sits in a constructor (`__init__`, where actors load their model) or in another loader.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.jobs.config import ActorResources, load_config
from fbmem.jobs.runtime.context import parse_assignments
from fbmem.storage.database import connect
from fbmem.storage.sql import run_query

torch.set_num_threads(1)  # as the actors (num_cpus < 2: one thread), so float sums run alike

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def fbmem(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


# ---------------------------------------------------------------------------- the pool


def test_a_pool_runs_its_workers_in_actors_and_raises_their_errors_as_themselves(ray_local):
    from fbmem.pipelines.actor_pool import ModelPool

    class Worker:  # defined here: Ray ships it by value
        def __init__(self, fail: bool) -> None:
            if fail:
                raise FileNotFoundError("no model at /nowhere")
            self.pid = os.getpid()

        def square(self, x: int, offset: int = 0) -> tuple[int, int]:
            if x < 0:
                raise ValueError(f"negative: {x}")
            return x * x + offset, self.pid

    res = ActorResources(num_cpus=0.25, pool_size=2)
    node = ray_local.get_runtime_context().get_node_id()
    with ModelPool(Worker, (False,), res, name="probe") as pool:
        assert not pool.started  # nothing loads until there is work
        got = dict(pool.map("square", range(9), 1))
        assert pool.started and pool.nodes == [node, node]
        assert {i: v for i, (v, _) in got.items()} == {i: i * i + 1 for i in range(9)}
        pids = {pid for _, pid in got.values()}
        assert len(pids) == 2 and os.getpid() not in pids  # both actors worked, neither is this process
        assert pool.call("square", 3)[0] == 9
        with pytest.raises(ValueError, match="negative: -2"):
            list(pool.map("square", [1, -2]))
    with ModelPool(Worker, (True,), res, name="probe") as pool:
        with pytest.raises(FileNotFoundError, match="no model at /nowhere"):
            pool.call("square", 1)
    local = ModelPool.in_process(Worker(False), name="probe")
    assert dict(local.map("square", [2])) == {0: (4, os.getpid())} and local.nodes == [node]


# ---------------------------------------------------------------------------- the jobs, through the CLI


PROMPTS = [f"a {c} {s} on {b}" for c in ("red", "blue") for s in ("star", "circle") for b in ("stripes", "dots")]
# small NeMo settings (as tests/jobs/test_nemo.py; a short search), two single-prompt actors
SETTINGS = ["nemo.n_latents=4", "nemo.refine_batch=16", "nemo.theta_start=2.0", "resources.nemo.pool_size=2"]


@pytest.fixture(scope="module")
def prompt_db(tmp_path_factory, ray_local):
    db_uri = str(tmp_path_factory.mktemp("actors") / "db")
    csv = Path(db_uri).parent / "p.csv"
    csv.write_text("prompt\n" + "\n".join(PROMPTS) + "\n")
    fbmem("ingest", "prompts", str(csv), "--db", db_uri, "--preset", "tiny")
    return db_uri


def _cli(db_uri: str, *args: str) -> str:
    sets = [x for s in SETTINGS for x in ("--set", s)]
    return fbmem(*args, "--db", db_uri, "--preset", "tiny", *sets)


def _model_nodes(db, job: str) -> dict:
    metrics = run_query(db, f"SELECT metrics_json FROM runs WHERE job = '{job}' ORDER BY started_at").column(0)
    return json.loads(metrics.to_pylist()[-1]).get("model_nodes")


def test_nemo_commands_run_in_actors_and_give_the_in_process_results(prompt_db, ray_local):
    from fbmem.jobs.cli import ORDINARY_PROMPTS
    from fbmem.jobs.core.nemo.evaluator import (
        compute_stats,
        detect_prompt,
        localize_prompt,
        parts_of,
    )
    from fbmem.jobs.nemo import nemo_id, neuron_set_id, read_stats
    from fbmem.pipelines.diffusion_models import build_tiny_components

    node = ray_local.get_runtime_context().get_node_id()
    cfg = load_config(preset="tiny", overrides=parse_assignments(SETTINGS))  # the commands' settings
    model_id = cfg.models.diffusion.model_id
    size = cfg.generation.size
    parts = parts_of(build_tiny_components(cfg.models.diffusion.seed))  # the tiny preset's model, here
    db = connect(prompt_db)

    _cli(prompt_db, "nemo", "stats")
    texts = db.read("prompts", ["text"], where=ORDINARY_PROMPTS).column(0).to_pylist()  # the job's order
    want = compute_stats(parts, texts, source="here")
    got = read_stats(db, model_id)
    assert got.n_prompts == len(PROMPTS) and got.modules == want.modules
    assert all(torch.equal(got.mean[i], want.mean[i]) and torch.equal(got.std[i], want.std[i]) for i in want.mean)
    assert _model_nodes(db, "nemo-stats") == {"nemo": [node]}

    out = _cli(prompt_db, "nemo", "detect")
    assert f"of {len(PROMPTS)} prompts" in out
    rows = {r["prompt_id"]: r for r in db.read("nemo_prompts").to_pylist()}
    texts = {r["prompt_id"]: r["text"] for r in db.read("prompts", ["prompt_id", "text"]).to_pylist()}
    assert set(rows) == set(texts)
    for pid, r in rows.items():
        det = detect_prompt(parts, texts[pid], cfg.nemo, size).detection
        assert r["nemo_id"] == nemo_id(model_id, pid, cfg)
        assert (r["detect_score"], r["detect_mean"], r["n_retained"], r["memorized"]) == (
            det.score, det.mean, int(det.retained.sum()), det.memorized)
    assert _model_nodes(db, "nemo-detect") == {"nemo": [node]}

    # localize two prompts against all their latents (a random model memorizes nothing)
    two = sorted(texts)[:2]
    where = f"prompt_id IN ('{two[0]}', '{two[1]}')"
    out = _cli(prompt_db, "nemo", "localize", "--all", "--prompts", where)
    assert "localized 2 prompts" in out
    stats = read_stats(db, model_id)
    layers = sorted(stats.mean)
    for pid in two:
        r = db.read("nemo_prompts", where=f"prompt_id = '{pid}'").to_pylist()[0]
        loc = localize_prompt(parts, texts[pid], stats, cfg.nemo, size, retained=torch.ones(4, dtype=torch.bool))
        res = loc.result
        assert (r["initial_score"], r["refined_score"], r["theta"], r["k"], r["unet_calls"]) == (
            res.initial.score, res.refined_score, res.initial.theta, res.initial.k, loc.unet_calls)
        for kind, sets in (("initial", res.initial.sets), ("refined", res.refined.sets)):
            ids = {neuron_set_id(model_id, pid, kind, li, cfg, stats.source): li for li in layers}
            stored = db.read("neurons", ["neuron_set_id", "neurons"], where=f"prompt_id = '{pid}' AND kind = '{kind}'")
            assert {r["neuron_set_id"]: r["neurons"] for r in stored.to_pylist()} == {
                i: [int(j) for j in sets.get(li, [])] for i, li in ids.items()}
    assert _model_nodes(db, "nemo-localize") == {"nemo": [node]}

    # a rerun reuses both searches and starts no actor, hence names no node
    _cli(prompt_db, "nemo", "localize", "--all", "--prompts", where)
    metrics = json.loads(run_query(db, "SELECT metrics_json FROM runs WHERE job = 'nemo-localize' "
                                       "ORDER BY started_at").column(0).to_pylist()[-1])
    assert metrics["reused"] == 2 and metrics["unet_calls"] == 0 and "model_nodes" not in metrics


def test_cluster_text_embeddings_come_from_actors_and_equal_the_in_process_ones(prompt_db, ray_local):
    from fbmem.jobs.cluster import prompt_features
    from fbmem.jobs.model_actors import TextEncoderWorker

    cfg = load_config(preset="tiny", overrides={"resources.cluster.batch_size": 3, "resources.cluster.pool_size": 2})
    table = pa.table({"text": PROMPTS})
    feats = prompt_features(cfg, table)  # 3 batches over 2 actors, back in the prompts' order
    here = TextEncoderWorker(cfg)
    assert np.array_equal(feats, np.concatenate([here.features(PROMPTS[i:i + 3]) for i in range(0, len(PROMPTS), 3)]))
    node = ray_local.get_runtime_context().get_node_id()
    fbmem("cluster", "--db", prompt_db, "--preset", "tiny", "--k", "2")
    assert _model_nodes(connect(prompt_db), "cluster") == {"cluster": [node]}


def test_the_toy_checks_generate_in_an_actor_as_in_process(ray_local):
    """The toy world's model uses (`fbmem toy train`'s check, the demo's random-neuron control) run
    next to the model in a DiffusionWorker actor and make the images the driver used to make."""
    from fbmem.jobs.model_actors import DiffusionWorker, nemo_pool
    from fbmem.jobs.toy.corpus import ToyCorpusSpec, build_corpus
    from fbmem.jobs.toy.train import memorization_check

    cfg = load_config(preset="tiny", overrides={"resources.nemo.num_cpus": 0.5})
    corpus = build_corpus(ToyCorpusSpec(vm_prompts=1, vm_copies=2, fm_prompts=0, bm_prompts=0, nm_prompts=1))
    here = DiffusionWorker(cfg)  # in this process, as the driver used to hold it
    job = {"prompts": ["a red star"] * 2, "seeds": [1, 2], "neurons": {0: [1, 5], 2: [0]}, "alpha": 0.0,
           "steps": 2, "guidance": 6.0, "size": 64}
    kw = {"groups": ("VM", "NM"), "seeds": (0,), "steps": 2}
    with nemo_pool(cfg) as pool:
        assert np.array_equal(pool.call("generate", job), here.generate(job))
        assert not np.array_equal(here.generate({**job, "neurons": {}}), here.generate(job))  # the set is off
        got = pool.call("apply", memorization_check, corpus, **kw)
    assert got["rows"] == memorization_check(here.pipe, corpus, **kw)["rows"]


# ---------------------------------------------------------------------------- no model in the driver


# The loaders of a model's weights (ISSUE 12's grep) and the project's functions that wrap them.
LOADERS = {"load_pipeline", "load_nemo_pipeline", "load_text_encoder", "from_pretrained",
           "create_model_and_transforms", "sam_model_registry", "load_clip", "load_sam", "make_backend"}


def _loads_outside_constructors(source: str, label: str) -> list[str]:
    """`label:line name (in function)` for each use of a loader outside an `__init__` and outside a
    function that is itself a loader (which is then checked where it is used)."""
    bad = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            name = child.id if isinstance(child, ast.Name) else child.attr if isinstance(child, ast.Attribute) else None
            if name in LOADERS and func != "__init__" and func not in LOADERS:
                bad.append(f"{label}:{child.lineno} {name} (in {func or 'module'})")
            visit(child, func)

    visit(ast.parse(source), None)
    return bad


def test_models_load_only_in_actor_constructors():
    files = sorted((ROOT / "jobs").rglob("*.py")) + sorted((ROOT / "pipelines").rglob("*.py"))
    assert len(files) > 20
    assert [b for f in files for b in _loads_outside_constructors(f.read_text(), str(f.relative_to(ROOT)))] == []
    # the check sees a load in a driver function, and one in a method other than the constructor
    probe = ("def job(cfg):\n    return load_nemo_pipeline(cfg)\n"
             "class W:\n    def __init__(self, cfg):\n        self.pipe = load_pipeline(cfg)\n"
             "    def reload(self, cfg):\n        self.pipe = Pipe.from_pretrained(cfg)\n")
    assert _loads_outside_constructors(probe, "probe.py") == [
        "probe.py:2 load_nemo_pipeline (in job)", "probe.py:7 from_pretrained (in reload)"]
