"""FB-Mem end to end through the CLI on planted cases with known masks (issue: FB-Mem labels).

Each planted case is a (generation, training image) pair whose label is known by construction
(jobs/toy_corpus.planted_test_set). They are ingested with their exact masks as precomputed masks,
labelled by `fbmem label`, and every generation must get its planted label under the `region`
metric. The BM case with the new object in exactly the same mask is the one `masked-view`
inflates; `region` must still call it BM.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.jobs.toy.planted import planted_test_set
from fbmem.storage.database import connect
from fbmem.storage.sql import load_query, query_params, run_query

runner = CliRunner()
SQL = Path(__file__).resolve().parents[2] / "sql"


def fbmem(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def sql(db, name: str, **params):
    text = load_query(str(SQL / f"{name}.sql"))
    return run_query(db, text, query_params(text, params)).to_pylist()


def _save(path: Path, arr: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(arr).save(path)
    Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(path.with_suffix(".mask.png"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("planted")
    cases = planted_test_set(size=192, seed=0)
    (root / "train").mkdir()
    (root / "gen").mkdir()
    prompts = root / "prompts.csv"
    gen_manifest = root / "gen" / "manifest.csv"
    with prompts.open("w", newline="") as pf, gen_manifest.open("w", newline="") as gf:
        pw, gw = csv.writer(pf), csv.writer(gf)
        pw.writerow(["prompt", "planted", "url"])
        gw.writerow(["uri", "prompt", "seed", "sample", "mask_uri"])
        for i, c in enumerate(cases):
            _save(root / "train" / f"{c.name}.png", c.training, c.training_mask)
            _save(root / "gen" / f"{c.name}.png", c.generation, c.generation_mask)
            prompt = f"prompt for {c.name}"
            pw.writerow([prompt, c.expected, str(root / "train" / f"{c.name}.png")])
            # two samples per prompt: the same case twice, with a second seed (one-to-many counts)
            gw.writerow([f"{c.name}.png", prompt, 1, 0, f"{c.name}.mask.png"])
    db_uri = str(root / "db")
    common = ["--db", db_uri, "--preset", "tiny", "--set", "fbmem.image_size=192"]
    fbmem("ingest", "training", str(root / "train"), *common)
    fbmem("ingest", "prompts", str(prompts), *common)
    fbmem("ingest", "generations", str(gen_manifest), *common)
    return root, cases, db_uri, common


def _labels(db, rule="most-severe", metric="region", mode=None):
    where = f"rule = '{rule}' AND region_metric = '{metric}'" + (f" AND candidates_mode = '{mode}'" if mode else "")
    rows = run_query(db, f"SELECT g.source_uri, l.label, l.full, l.fg, l.bg, l.best_image_id, t.source_uri AS best "
                         f"FROM labels l JOIN generations g USING (generation_id) "
                         f"JOIN training_images t ON t.image_id = l.best_image_id WHERE {where}").to_pylist()
    return {Path(r["source_uri"]).stem: r for r in rows}


def test_every_planted_case_gets_its_label_exact_and_ann(planted):
    root, cases, db_uri, common = planted
    out = fbmem("label", *common, "--candidates", "exact")
    assert "labels (most-severe)" in out
    db = connect(db_uri)
    exact = _labels(db, mode="exact")
    assert set(exact) == {c.name for c in cases}
    for c in cases:
        got = exact[c.name]
        assert got["label"] == c.expected, (c.name, got)
        if c.expected != "NM":  # a memorized generation points to its own training image
            assert Path(got["best"]).stem == c.name, (c.name, got["best"])
    # ANN candidates (top-k by CLIP cosine, plus the prompt's linked image) give the same labels
    fbmem("label", *common, "--candidates", "ann", "--k", "3")
    ann = _labels(db, mode="ann")
    assert {n: r["label"] for n, r in ann.items()} == {n: r["label"] for n, r in exact.items()}
    # a rerun with the same settings labels nothing new
    out = fbmem("label", *common, "--candidates", "exact")
    assert "rows in=0" in out


def test_masked_view_inflates_the_same_mask_bm_case(planted):
    root, cases, db_uri, common = planted
    fbmem("label", *common, "--candidates", "exact", "--metric", "masked-view")
    db = connect(db_uri)
    region = _labels(db, metric="region", mode="exact")
    masked = _labels(db, metric="masked-view", mode="exact")
    bm = "bm-same-mask"
    assert region[bm]["label"] == "BM"
    assert masked[bm]["fg"] > region[bm]["fg"] + 0.05  # the blanked area counted as agreement


def test_sql_queries_over_the_labels(planted):
    root, cases, db_uri, common = planted
    db = connect(db_uri)
    fbmem("label", *common, "--candidates", "exact", "--force")  # the latest labels: region, exact
    dist = {r["label"]: r["generations"] for r in sql(db, "label_distribution")}
    expected = {}
    for c in cases:
        expected[c.expected] = expected.get(c.expected, 0) + 1
    assert dist == expected  # one (the latest) label per generation
    by_prompt = {r["prompt"]: r for r in sql(db, "labels_by_prompt")}
    assert by_prompt["prompt for vm-noisy-jpeg"]["worst_label"] == "VM"
    otm = {r["prompt"]: r for r in sql(db, "one_to_many")}
    assert otm["prompt for vm-noisy-jpeg"]["distinct_vm_images"] == 1
    assert otm["prompt for nm-new-both"]["distinct_memorized_images"] == 0
    paper = sql(db, "paper_rule_labels")
    assert {r["generation_id"] for r in paper} == set(run_query(db, "SELECT generation_id FROM generations").column(0).to_pylist())
    top = sql(db, "top_matches", limit=3)
    assert len(top) == 3
    keyf = [max(r["full"], 0.5 * r["fg"] + 0.5 * r["bg"]) for r in top]
    assert keyf == sorted(keyf, reverse=True)
    assert sql(db, "errors_summary") == []
