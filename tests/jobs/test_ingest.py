"""The real Ray Data ingest pipelines into a temp LanceDB with the tiny preset, via the CLI."""
from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import EXPECTED_ERRORS, MUST_DECODE, write_bad_inputs, write_good_images
from PIL import Image
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.storage.database import connect
from fbmem.storage.sql import run_query

runner = CliRunner()


def fbmem(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _write_manifest(folder: Path, images: list[Path], generations: bool = False) -> Path:
    path = folder / ("gen_manifest.csv" if generations else "manifest.csv")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "caption", "id"] + (["prompt", "seed", "sample"] if generations else []))
        for i, p in enumerate(images):
            rel = p.relative_to(folder)
            row = [str(rel), f"manifest caption {i}", f"m{i}"]
            if generations:
                row += [f"prompt {i % 3}", str(100 + i), str(i % 2)]
            w.writerow(row)
    return path


def _write_shard(path: Path, n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    payloads = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            arr = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            data = buf.getvalue()
            payloads.append(data)
            key = f"{i:09d}"
            for name, blob in (
                (f"{key}.png", data),
                (f"{key}.txt", f"shard caption {i}".encode()),
                (f"{key}.json", json.dumps({"url": f"http://example.invalid/{i}.png", "key": key}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return payloads


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("ingest")
    write_good_images(root / "folder", 50, seed=1)
    write_good_images(root / "mdir" / "imgs", 10, seed=2)
    manifest = _write_manifest(root / "mdir", sorted(p for p in (root / "mdir" / "imgs").glob("good_*.[pj][np]g") if ".mask" not in p.name))
    (root / "shards").mkdir()
    _write_shard(root / "shards" / "00000.tar", 10, seed=3)
    return root, manifest


@pytest.fixture(scope="module")
def folder_db(world):
    """The 50-image folder ingested once with eager masks; (db uri, command output)."""
    root, _ = world
    db_uri = str(root / "db_folder")
    out = fbmem("ingest", "training", str(root / "folder"), "--db", db_uri, "--preset", "tiny", "--masks", "eager")
    return db_uri, out


def test_folder_ingest_eager_then_rerun_adds_nothing(world, folder_db):
    root, _ = world
    db_uri, out = folder_db
    assert "rows written=50" in out and "errors=0" in out
    db = connect(db_uri)
    t = db.read("training_images", ["image_id", "embedding", "mask_png", "mask_model", "caption", "fg_fraction"])
    assert t.num_rows == 50
    assert t.column("embedding").null_count == 0 and t.column("mask_png").null_count == 0
    vecs = np.array(t.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    models = t.column("mask_model").to_pylist()
    assert models.count("given") == 17  # every third image has a sidecar mask, used as given
    assert all(m.startswith("sam:tiny") for m in models if m != "given")
    assert sum(c is not None for c in t.column("caption").to_pylist()) == 25
    out2 = fbmem("ingest", "training", str(root / "folder"), "--db", db_uri, "--preset", "tiny", "--masks", "eager")
    assert "rows written=0" in out2 and "skipped_existing=50" in out2
    assert db.count("training_images") == 50
    runs = run_query(db, "SELECT job, status, rows_out FROM runs ORDER BY started_at").to_pylist()
    assert [r["rows_out"] for r in runs] == [50, 0] and {r["status"] for r in runs} == {"ok"}


def test_manifest_and_webdataset_sources_lazy_masks(world):
    root, manifest = world
    db_uri = str(root / "db_mixed")
    fbmem("ingest", "training", str(manifest), "--db", db_uri, "--preset", "tiny")
    fbmem("ingest", "training", str(root / "shards"), "--db", db_uri, "--preset", "tiny")
    db = connect(db_uri)
    t = run_query(
        db,
        "SELECT caption, source_id, source_uri, mask_png IS NULL AS no_mask, mask_model FROM training_images",
    ).to_pylist()
    assert len(t) == 20
    from_manifest = [r for r in t if r["caption"].startswith("manifest")]
    from_shard = [r for r in t if r["caption"].startswith("shard")]
    assert len(from_manifest) == 10 and len(from_shard) == 10
    assert {r["source_id"] for r in from_manifest} == {f"m{i}" for i in range(10)}
    assert all("#" in r["source_uri"] for r in from_shard)
    # lazy: no segmenter ran; only nothing-given rows lack masks (the manifest has no mask_uri)
    assert all(r["no_mask"] for r in t)


def test_bad_inputs_give_one_error_row_each_and_keep_good_rows(world, tmp_path):
    folder = tmp_path / "mixed"
    bad = write_bad_inputs(folder)
    write_good_images(folder, 8, seed=4)
    # the folder source never lists a missing file: put the missing path in a manifest instead
    manifest = tmp_path / "with_missing.csv"
    manifest.write_text(f"uri\n{bad['missing']}\n{folder / 'good_4_001.jpg'}\n")
    db_uri = str(tmp_path / "db")
    out = fbmem("ingest", "training", str(folder), "--db", db_uri, "--preset", "tiny")
    n_bad_files = len(EXPECTED_ERRORS) - 1  # all but 'missing' are files in the folder
    assert f"errors={n_bad_files}" in out
    db = connect(db_uri)
    errors = run_query(db, "SELECT source_uri, reason, stage FROM errors").to_pylist()
    by_name = {Path(e["source_uri"]).stem: e["reason"] for e in errors}
    assert len(errors) == n_bad_files
    for name, needle in EXPECTED_ERRORS.items():
        if name != "missing":
            assert needle in by_name[name], (name, by_name.get(name))
    good = {Path(u).stem for u in db.read("training_images", ["source_uri"]).column(0).to_pylist()}
    assert good == {f"good_4_{i:03d}" for i in range(8)} | set(MUST_DECODE)
    out = fbmem("ingest", "training", str(manifest), "--db", db_uri, "--preset", "tiny")
    assert "errors=1" in out and "rows written=0" in out  # the good one is already stored
    reasons = run_query(db, "SELECT reason FROM errors WHERE source_uri LIKE '%missing.jpg'").column(0).to_pylist()
    assert len(reasons) == 1 and "file not found" in reasons[0]
    # rerunning the same bad folder overwrites its error rows instead of duplicating them
    fbmem("ingest", "training", str(folder), "--db", db_uri, "--preset", "tiny")
    assert db.count("errors") == n_bad_files + 1


def test_generations_manifest_and_prompts(world, tmp_path, reference_data):
    root, _ = world
    gen_dir = tmp_path / "gens"
    imgs = write_good_images(gen_dir / "imgs", 6, seed=5)
    manifest = _write_manifest(gen_dir, imgs, generations=True)
    db_uri = str(tmp_path / "db")
    fbmem("ingest", "generations", str(manifest), "--db", db_uri, "--preset", "tiny")
    fbmem("ingest", "prompts", str(reference_data / "memorized_laion_prompts.csv"), "--db", db_uri, "--preset", "tiny")
    db = connect(db_uri)
    g = run_query(db, "SELECT prompt, seed, sample, mask_png IS NOT NULL AS has_mask, model_id FROM generations ORDER BY seed").to_pylist()
    assert [r["seed"] for r in g] == list(range(100, 106))
    assert [r["prompt"] for r in g] == [f"prompt {i % 3}" for i in range(6)]
    assert all(r["has_mask"] for r in g) and {r["model_id"] for r in g} == {"external"}
    counts = dict(run_query(db, "SELECT mem_type, count(*) FROM prompts GROUP BY ALL").to_pylist() and
                  [(r["mem_type"], r["count_star()"]) for r in run_query(db, "SELECT mem_type, count(*) FROM prompts GROUP BY ALL").to_pylist()])
    assert counts == {"VM": 112, "TM": 388}
    dims = run_query(db, "SELECT DISTINCT len(embedding) AS d FROM prompts").column(0).to_pylist()
    assert dims == [64]
    out = fbmem("ingest", "prompts", str(reference_data / "memorized_laion_prompts.csv"), "--db", db_uri, "--preset", "tiny")
    assert "rows written=0" in out and db.count("prompts") == 500


def test_tables_and_sql_formats(folder_db, tmp_path):
    db_uri, _ = folder_db
    out = fbmem("tables", "--db", db_uri)
    assert re.search(r"^training_images\s+50$", out, re.M), out  # the column widens with the longest table name
    csv_out = fbmem("sql", "SELECT count(*) AS n FROM training_images", "--db", db_uri, "--format", "csv")
    assert csv_out.strip().splitlines() == ["\"n\"", "50"]
    js = json.loads(fbmem("sql", "SELECT mask_model, count(*) AS n FROM training_images GROUP BY 1 ORDER BY 1", "--db", db_uri, "--format", "json"))
    assert sum(r["n"] for r in js) == 50
    pq_path = tmp_path / "out.parquet"
    fbmem("sql", "SELECT image_id, embedding FROM training_images", "--db", db_uri, "--format", "parquet", "--out", str(pq_path))
    import pyarrow.parquet as pq

    assert pq.read_table(pq_path).num_rows == 50


def test_batch_blocks_spread_a_table_over_an_actor_pool(ray_local) -> None:
    """Handed over whole, a table is one block and one actor of the pool does all the work."""
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy

    from fbmem.pipelines.actors import batch_blocks

    table = pa.table({"x": list(range(40))})
    blocks = batch_blocks(table, 8)
    assert [b.num_rows for b in blocks] == [8] * 5
    assert pa.concat_tables(blocks).column("x").to_pylist() == list(range(40))
    assert batch_blocks(table.slice(0, 0), 8)[0].num_rows == 0

    class Pid:  # defined here: Ray ships it by value (the workers cannot import test modules)
        def __call__(self, batch):
            import os

            return pa.table({"pid": [os.getpid()] * batch.num_rows})

    def pids(tables) -> set[int]:
        ds = ray.data.from_arrow(tables).map_batches(Pid, compute=ActorPoolStrategy(size=2), num_cpus=0.25,
                                                     batch_size=8, batch_format="pyarrow")
        return {r["pid"] for r in ds.take_all()}

    assert len(pids(table)) == 1
    assert len(pids(blocks)) == 2
