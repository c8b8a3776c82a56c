"""Every job of the CLI end to end with the database on S3 (moto on 127.0.0.1, the `s3_store`
fixture): the run of test_e2e_tiny.py, plus `index`, with `--db s3://...` and the endpoint, region,
keys and `allow_http` as `storage_options` in a `--config` YAML file, checking the same outcomes.

The Ray workers that open the database (fragment writers, scorers, ...) get the storage options
from the config they are handed, never from the environment: the dummy AWS variables the fixture
sets only keep libraries from probing the network.
"""
from __future__ import annotations

import csv
import hashlib
import io

import pytest
import yaml
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.jobs.toy.corpus import ToyCorpusSpec, build_corpus, write_corpus
from fbmem.storage.database import connect
from fbmem.storage.sql import load_query, query_params, run_query

runner = CliRunner()
pytestmark = pytest.mark.slow


def fbmem(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_all_jobs_end_to_end_on_s3(tmp_path, s3_store, ray_local):
    spec = ToyCorpusSpec(vm_prompts=2, vm_copies=3, fm_prompts=1, fm_copies=3, bm_prompts=1, bm_copies=3, nm_prompts=4)
    paths = write_corpus(build_corpus(spec), tmp_path / "world")
    db_uri = f"{s3_store.uri}/e2e"
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({"storage_options": s3_store.storage_options}))  # "true" stays a string
    common = ["--db", db_uri, "--preset", "tiny", "--config", str(config), "--set", "generation.steps=3",
              "--set", "nemo.n_latents=3", "--set", "nemo.refine_batch=8"]
    fbmem("ingest", "training", str(paths.images_dir), *common)
    fbmem("ingest", "prompts", str(paths.prompts_csv), *common)
    out = fbmem("index", *common, "--force", "--set", "index.index_type=IVF_FLAT")
    assert "built IVF_FLAT" in out
    out = fbmem("cluster", *common, "--k", "3")
    assert "silhouette=" in out
    fbmem("generate", *common, "--n", "2")
    fbmem("label", *common)  # candidates from the index on S3
    fbmem("nemo", "stats", *common)
    out = fbmem("nemo", "detect", *common)
    assert "memorized:" in out
    out = fbmem("nemo", "localize", *common, "--all", "--prompts", "planted = 'VM'")
    assert "localized 2 prompts" in out
    out = fbmem("mitigate", *common, "--method", "nemo")
    assert "nemo: mitigation score=" in out
    out = fbmem("mitigate", *common, "--method", "nemo-c")
    assert "nemo-c: mitigation score=" in out
    out = fbmem("report", *common, "--out", str(tmp_path / "report"))
    assert (tmp_path / "report" / "index.html").is_file()

    # everything is in the bucket, nothing in a local folder named like the URI
    listed = s3_store.client().list_objects_v2(Bucket=s3_store.bucket, Prefix="e2e/training_images.lance/_versions/")
    assert listed.get("KeyCount", 0) > 0
    db = connect(db_uri, s3_store.storage_options)
    assert {"training_images", "prompts", "generations", "labels", "neurons", "runs"} <= set(db.table_names())
    stored = db.read("training_images", ["image_sha256"]).column(0).to_pylist()
    assert sorted(stored) == sorted({hashlib.sha256(p.read_bytes()).hexdigest() for p in paths.image_paths.values()})
    n_prompts = db.count("prompts")
    assert db.count("generations", "mitigation = 'none'") == 2 * n_prompts
    seeds = run_query(db, """
        SELECT a.mitigation, count(*) AS n, count(b.generation_id) AS paired
        FROM generations a LEFT JOIN generations b
          ON b.prompt_id = a.prompt_id AND b.seed = a.seed AND b.sample = a.sample AND b.mitigation = 'none'
        WHERE a.mitigation <> 'none' GROUP BY 1""").to_pylist()
    by = {r["mitigation"]: r for r in seeds}
    assert by["nemo"]["n"] == 4 and by["nemo"]["paired"] == 4
    assert by["nemo-c"]["n"] >= 4 and by["nemo-c"]["paired"] == by["nemo-c"]["n"]
    assert db.count("labels", "rule = 'most-severe'") == db.count("generations")
    kinds = run_query(db, "SELECT scope, kind, count(*) AS n FROM neurons GROUP BY ALL").to_pylist()
    assert {(k["scope"], k["kind"]) for k in kinds} == {("prompt", "initial"), ("prompt", "refined"), ("cluster", "union")}
    assert db.count("nemo_prompts") == n_prompts
    assert db.count("neuron_stats") > 0
    text = load_query("mitigation_score")
    rows = run_query(db, text, query_params(text, {})).to_pylist()
    assert {r["method"] for r in rows if r["level"] == "overall"} == {"nemo", "nemo-c"}
    jobs = set(run_query(db, "SELECT DISTINCT job FROM runs WHERE status = 'ok'").column(0).to_pylist())
    assert {"ingest-training", "ingest-prompts", "index", "cluster", "generate", "label", "nemo-stats",
            "nemo-detect", "nemo-localize", "mitigate"} <= jobs

    # `fbmem sql` through DuckDB over the S3 tables, and no key twice in any table
    out = fbmem("sql", "SELECT label, count(*) AS n FROM current_labels WHERE rule = 'most-severe' GROUP BY 1 ORDER BY 1", *common,
                "--format", "csv")
    counted = {r["label"]: int(r["n"]) for r in csv.DictReader(io.StringIO(out))}
    assert set(counted) <= {"VM", "FM", "BM", "NM"} and sum(counted.values()) == db.count("generations")
    from fbmem.storage.schema import KEYS

    for name in db.table_names():
        key = KEYS[name][0]
        dup = run_query(db, f"SELECT count(*) - count(DISTINCT {key}) AS d FROM {name}").column(0)[0].as_py()
        assert dup == 0, name
