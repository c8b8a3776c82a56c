"""Every job of the CLI end to end with --preset tiny into one LanceDB (random-weight models).

Scores of random models mean nothing; what is tested is that generate, cluster, nemo stats /
detect / localize, mitigate and report run in sequence on real Ray + LanceDB + DuckDB and leave
consistent rows behind.
"""
from __future__ import annotations

import pytest
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


def test_all_jobs_end_to_end(tmp_path, ray_local):
    spec = ToyCorpusSpec(vm_prompts=2, vm_copies=3, fm_prompts=1, fm_copies=3, bm_prompts=1, bm_copies=3, nm_prompts=4)
    paths = write_corpus(build_corpus(spec), tmp_path / "world")
    db_uri = str(tmp_path / "db")
    common = ["--db", db_uri, "--preset", "tiny", "--set", "generation.steps=3", "--set", "nemo.n_latents=3",
              "--set", "nemo.refine_batch=8"]
    fbmem("ingest", "training", str(paths.images_dir), *common)
    fbmem("ingest", "prompts", str(paths.prompts_csv), *common)
    out = fbmem("cluster", *common, "--k", "3")
    assert "silhouette=" in out
    fbmem("generate", *common, "--n", "2")
    fbmem("label", *common, "--candidates", "exact")
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

    db = connect(db_uri)
    n_prompts = db.count("prompts")
    assert db.count("generations", "mitigation = 'none'") == 2 * n_prompts
    # NeMo regenerates the localized prompts; NeMo-C every prompt of their clusters, same seeds
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
    assert {"ingest-training", "ingest-prompts", "cluster", "generate", "label", "nemo-stats", "nemo-detect",
            "nemo-localize", "mitigate"} <= jobs
