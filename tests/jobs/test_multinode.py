"""Multi-node, for real: fbmem jobs on a two-node Ray cluster started on this machine.

The slow test starts a head node (1 CPU, no custom resources) and a worker node (1 CPU and
`model_worker: 4`, the stand-in for a GPU worker) with `ray start` (tests/cluster_nodes.py),
submits the scan's commands with `ray job submit` (so their drivers run on the head), with every
model stage pinned to `model_worker`; then checks that the `runs` rows name only the worker node
for every model stage, and that the tables equal those of the same commands run single-node in
this process. Both nodes share this machine's disk, so a local folder serves as the database.

The fast tests check the parts on their own: custom resources in `actor_kwargs`, and a run's
`model_nodes` metrics from actors on a local Ray.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.jobs.config import ActorResources, ConfigError, load_config
from fbmem.jobs.toy.corpus import ToyCorpusSpec, build_corpus, write_corpus
from fbmem.pipelines.actors import actor_kwargs
from fbmem.storage.database import connect
from fbmem.storage.schema import KEYS

MODEL_STAGES = ("embed", "segment", "generate")
# The model stages each job runs. Ingest masks are lazy and the world has no mask files, so label
# segments the training images it compares with.
STAGES_BY_JOB = {
    "ingest-training": {"embed"},
    "ingest-prompts": {"embed"},
    "index": set(),
    "generate": {"generate", "segment", "embed"},
    "label": {"segment"},
}
COMPARED_TABLES = ("training_images", "prompts", "generations", "pair_scores", "labels")
VOLATILE = {"run_id", "ingested_at", "created_at", "labelled_at", "cluster_run_id"}
# The same settings on both sides; quarter-CPU actors so a generate job's three pools fit a 1-CPU node.
SETTINGS = ["generation.steps=2", *(f"resources.{s}.num_cpus=0.25" for s in MODEL_STAGES)]
PINNED = [f"resources.{s}.custom.model_worker=1" for s in MODEL_STAGES]


# --- fast: the parts -------------------------------------------------------------------------


def test_actor_kwargs_pass_custom_resources() -> None:
    assert actor_kwargs(ActorResources(custom={"model_worker": 1}))["resources"] == {"model_worker": 1.0}
    assert actor_kwargs(ActorResources())["resources"] is None


def test_custom_resources_from_settings() -> None:
    cfg = load_config(preset="tiny", overrides={"resources.segment.custom.model_worker": 1})
    assert cfg.resources.segment.custom == {"model_worker": 1.0}
    assert cfg.resources.embed.custom == {}
    for bad in ({"GPU": 1}, {"model_worker": -1}):
        with pytest.raises(ConfigError, match="custom"):
            load_config(overrides={"resources.embed.custom": bad})


@contextlib.contextmanager
def local_ray():
    """A local Ray for the block (as conftest's `ray_local`), shut down after it, so that at most
    one Ray of this module runs at a time; an already running Ray is used and left running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    tmp = tempfile.mkdtemp(prefix="fbr", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    ray.data.range(1).take(1)  # bind Ray Data's log handlers here, not under a CliRunner
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_run_records_the_nodes_of_its_model_actors(tmp_path) -> None:
    from fbmem.jobs.runtime.run_record import RunRecord
    from fbmem.pipelines.actors import record_model_node

    class Probe:  # defined here: Ray ships it by value
        def __init__(self, stage: str) -> None:
            record_model_node(stage)

        def __call__(self, batch: pa.Table) -> pa.Table:
            return batch

    def run_probe(ray, stage: str) -> None:
        kw = actor_kwargs(ActorResources(num_cpus=0.25, batch_size=4))
        ray.data.from_arrow(pa.table({"x": list(range(8))})).map_batches(
            Probe, fn_constructor_args=(stage,), **kw).materialize()

    db, cfg = connect(str(tmp_path / "db")), load_config(preset="tiny")
    record_model_node("outside")  # not in an actor: nothing happens
    with local_ray() as ray:
        node = ray.get_runtime_context().get_node_id()
        with RunRecord(db, "probe", cfg) as outer:
            run_probe(ray, "a")
            with RunRecord(db, "probe", cfg) as inner:  # a run inside a run (mitigate's label)
                run_probe(ray, "b")
        with RunRecord(db, "probe", cfg) as idle:
            pass
        with RunRecord(db, "probe", cfg) as later:
            run_probe(ray, "c")
    assert outer.metrics["model_nodes"] == {"a": [node], "b": [node]}
    assert inner.metrics["model_nodes"] == {"b": [node]}
    assert "model_nodes" not in idle.metrics
    assert later.metrics["model_nodes"] == {"c": [node]}
    stored = db.read("runs", where=f"run_id = '{later.run_id}'").column("metrics_json")[0].as_py()
    assert json.loads(stored)["model_nodes"] == {"c": [node]}


# --- slow: the real cluster ------------------------------------------------------------------


def scan_commands(world, db: str, settings: list[str]) -> list[list[str]]:
    """The scan: ingest the corpus and the prompts, index, generate, label."""
    common = ["--db", db, "--preset", "tiny"] + [x for s in settings for x in ("--set", s)]
    return [
        ["ingest", "training", str(world.images_dir), *common],
        ["ingest", "prompts", str(world.prompts_csv), *common],
        ["index", *common],
        ["generate", *common, "--n", "1"],
        ["label", *common],
    ]


def model_nodes_by_job(db) -> dict[str, dict[str, list[str]]]:
    runs = db.read("runs", columns=["job", "status", "metrics_json"]).to_pylist()
    assert runs and all(r["status"] == "ok" for r in runs), runs
    assert sorted(r["job"] for r in runs) == sorted(STAGES_BY_JOB), runs
    return {r["job"]: json.loads(r["metrics_json"]).get("model_nodes", {}) for r in runs}


def assert_tables_equal(a, b) -> None:
    """Same keys and values; vectors and scores to 1e-6; run ids and times aside."""
    for name in COMPARED_TABLES:
        ta, tb = (db.read(name).sort_by(KEYS[name][0]) for db in (a, b))
        assert ta.num_rows > 0, name
        assert ta.column_names == tb.column_names, name
        for col in ta.column_names:
            if col in VOLATILE:
                continue
            x, y = ta.column(col), tb.column(col)
            if pa.types.is_fixed_size_list(x.type) or pa.types.is_floating(x.type):
                xs, ys = x.to_pylist(), y.to_pylist()
                assert [v is None for v in xs] == [v is None for v in ys], (name, col)
                xa = np.array([v for v in xs if v is not None], dtype=np.float64)
                ya = np.array([v for v in ys if v is not None], dtype=np.float64)
                np.testing.assert_allclose(xa, ya, rtol=0, atol=1e-6, err_msg=f"{name}.{col}")
            else:
                assert x.to_pylist() == y.to_pylist(), (name, col)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="tests/cluster_nodes.py tracks processes in /proc")
def test_jobs_on_a_two_node_cluster_run_models_on_the_worker_and_match_single_node(tmp_path) -> None:
    from cluster_nodes import LocalCluster

    t0 = time.monotonic()
    # The smallest world with every model stage: a VM group of two copies and one NM prompt, without
    # the masks the toy world ships (label makes them with the segmenter).
    world = write_corpus(build_corpus(ToyCorpusSpec(vm_prompts=1, vm_copies=2, fm_prompts=0, bm_prompts=0,
                                                    nm_prompts=1)), tmp_path / "world")
    for mask in world.images_dir.glob("*.mask.png"):
        mask.unlink()
    runner = CliRunner()

    # 1. single-node, in this process
    single = str(tmp_path / "single")
    with local_ray():
        for args in scan_commands(world, single, SETTINGS):
            result = runner.invoke(app, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
    t_single = time.monotonic() - t0

    # 2. the same commands on the cluster, model stages pinned to the worker node
    multi, times = str(tmp_path / "multi"), []
    cluster = LocalCluster(head_cpus=1, worker_cpus=1, worker_resources={"model_worker": 4})
    try:
        cluster.start()
        for args in scan_commands(world, multi, SETTINGS + PINNED):
            t = time.monotonic()
            cluster.submit("fbmem", *args)
            times.append(f"{args[0]} {args[1] if args[1][0] != '-' else ''}: {time.monotonic() - t:.0f} s")
        head, worker = cluster.head_node_id, cluster.worker_node_id
        submitted = [j for j in cluster.jobs() if j.get("type") == "SUBMISSION"]
    finally:
        left = cluster.stop()
        cluster.remove_files()
    assert left == [], f"processes of the cluster still running: {left}"
    t_multi = time.monotonic() - t0 - t_single

    # The drivers ran on the head; every model actor on the worker.
    assert len(submitted) == len(STAGES_BY_JOB)
    assert {j["status"] for j in submitted} == {"SUCCEEDED"}
    assert {j["driver_node_id"] for j in submitted} == {head}
    for job, nodes in model_nodes_by_job(connect(multi)).items():
        assert set(nodes) == STAGES_BY_JOB[job], (job, nodes)
        assert all(ids == [worker] for ids in nodes.values()), (job, nodes, worker)
    # Single-node runs record their (one) node just the same.
    local_nodes = model_nodes_by_job(connect(single))
    assert {s for nodes in local_nodes.values() for s in nodes} == set(MODEL_STAGES)
    assert len({i for nodes in local_nodes.values() for ids in nodes.values() for i in ids}) == 1

    # Same results either way.
    assert_tables_equal(connect(single), connect(multi))
    print(f"single-node {t_single:.0f} s, cluster {t_multi:.0f} s (start {cluster.start_seconds:.0f} s, "
          f"{', '.join(times)}, stop {cluster.stop_seconds:.0f} s)")
