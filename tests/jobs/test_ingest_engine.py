"""The corpus-scale ingest engine (jobs/ingest.py, DESIGN.md "Running at corpus scale"): shards and
the ledger, writes from the workers with batched commits, duplicate keys, and a kill -9 mid-way.
Tiny preset, a local folder database."""
from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from bad_inputs import write_good_images
from chaos import cli, kill_tree, run_cli
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.storage.database import connect
from fbmem.storage.fragments import table_stats

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def fbmem(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def sets(**settings: object) -> list[str]:
    out: list[str] = []
    for key, value in settings.items():
        out += ["--set", f"engine.{key}={value}"]
    return out


def metrics(db_uri: str, run: int = -1, storage_options: dict | None = None) -> dict:
    runs = connect(db_uri, storage_options).read("runs", ["started_at", "metrics_json", "rows_out"])
    runs = runs.sort_by("started_at").to_pylist()
    return {**json.loads(runs[run]["metrics_json"]), "rows_out": runs[run]["rows_out"]}


def image_table(db_uri: str) -> pa.Table:
    return lance.dataset(str(Path(db_uri) / "training_images.lance")).to_table(columns=["image_id", "embedding"])


def corpus_with_copies(folder: Path, n: int, copied: int, copies: int, seed: int) -> int:
    """`n` distinct images, and `copies` more files (other names, same bytes) of each of the first
    `copied`, named to sort far from their originals (other shards and blocks). Returns the files."""
    originals = sorted(p for p in write_good_images(folder, n, seed=seed))
    for j in range(copies):
        for p in originals[:copied]:
            shutil.copyfile(p, folder / f"zz_copy{j}_{p.name}")
    return n + copied * copies


# ------------------------------------------------------------------------- kill -9 mid-way, rerun


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """Where the databases of a test live: (uri of a new database by name, storage options, CLI args)."""
    if request.param == "local":
        return (lambda name: str(tmp_path / name)), None, []
    s3 = request.getfixturevalue("s3_store")
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({"storage_options": s3.storage_options}))
    prefix = f"{s3.uri}/{tmp_path.name}"
    return (lambda name: f"{prefix}/{name}"), s3.storage_options, ["--config", str(config)]


def _dataset(db_uri: str, table: str, so: dict | None) -> lance.LanceDataset:
    return lance.dataset(f"{db_uri}/{table}.lance", storage_options=so)


@pytest.mark.slow
def test_killed_ingest_then_rerun_equals_an_uninterrupted_run(tmp_path, store) -> None:
    """kill -9 after some shards were committed, rerun: the keys and embeddings of an uninterrupted
    run, no duplicate key (the corpus holds copies of images in other shards), every shard done.
    On a local folder and on the S3 server (moto)."""
    db_of, so, extra = store
    folder = tmp_path / "corpus"
    n_files = corpus_with_copies(folder, 48, copied=4, copies=2, seed=7)
    # small shards, fragments and commits: a job of many steps, so that it can be cut in the middle
    settings = [*extra, *sets(folder_files_per_shard=2, rows_per_fragment=2, commit_every_fragments=1,
                              check_batch_rows=2, version_retention_s=0)]
    n_shards = -(-n_files // 2)
    ray_tmp = tempfile.mkdtemp(prefix="fbk", dir="/tmp")
    whole, killed = db_of("whole"), db_of("killed")
    try:
        run_cli(["ingest", "training", str(folder), "--db", whole, "--preset", "tiny", *settings], ray_tmp)
        proc = cli(["ingest", "training", str(folder), "--db", killed, "--preset", "tiny", *settings], ray_tmp)
        done_at_kill = 0
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                done_at_kill = _dataset(killed, "ingest_shards", so).count_rows()
            except (ValueError, OSError):
                done_at_kill = 0
            if done_at_kill >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the ingest finished before it could be killed mid-way"
        kill_tree(proc)
        rows_at_kill = _dataset(killed, "training_images", so).count_rows()
        assert 2 <= done_at_kill < n_shards and rows_at_kill > 0, (done_at_kill, rows_at_kill)
        run_cli(["ingest", "training", str(folder), "--db", killed, "--preset", "tiny", *settings], ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    a = _dataset(whole, "training_images", so).to_table(columns=["image_id", "embedding"])
    b = _dataset(killed, "training_images", so).to_table(columns=["image_id", "embedding"])
    keys_a, keys_b = a.column("image_id").to_pylist(), b.column("image_id").to_pylist()
    assert len(keys_b) == len(set(keys_b)) == 48  # no duplicate key; the copies are one row each
    assert len(keys_a) == len(set(keys_a)) == 48
    assert set(keys_a) == set(keys_b)
    emb_a = dict(zip(keys_a, a.column("embedding").to_pylist()))
    emb_b = dict(zip(keys_b, b.column("embedding").to_pylist()))
    for k in keys_a:
        np.testing.assert_allclose(emb_a[k], emb_b[k], atol=1e-5)
    done = _dataset(killed, "ingest_shards", so).to_table(columns=["shard_id", "status"])
    assert done.num_rows == n_shards and set(done.column("status").to_pylist()) == {"done"}
    m = metrics(killed, storage_options=so)  # the rerun: the shards done before the kill were not read again
    assert m["skipped_shards"] >= done_at_kill and m["skipped_shards"] + m["shards_done"] == n_shards


# ------------------------------------------------------------------------------- in-process runs


def test_rerun_of_a_finished_ingest_skips_every_shard_unread(ray_local, tmp_path) -> None:
    folder = tmp_path / "corpus"
    write_good_images(folder, 20, seed=3)
    db_uri = str(tmp_path / "db")
    args = ["ingest", "training", str(folder), "--db", db_uri, "--preset", "tiny",
            *sets(folder_files_per_shard=7)]
    out = fbmem(*args)
    assert "rows written=20" in out and "shards=3" in out and "shards_done=3" in out
    # Garbage under the same names: a rerun that read any file would write error rows or new keys.
    for p in folder.iterdir():
        if p.suffix in (".png", ".jpg"):
            p.write_bytes(b"not an image any more")
    out = fbmem(*args)
    assert "rows written=0" in out and "errors=0" in out and "skipped_shards=3" in out
    assert "skipped_existing=20" in out and "rows in=20" in out and "shards_done" not in out
    db = connect(db_uri)
    assert db.count("training_images") == 20 and db.count("errors") == 0


def test_duplicates_across_blocks_give_one_row(ray_local, tmp_path) -> None:
    """Copies of an image in other blocks, none committed before the others are written (one
    commit at the end): all are appended, and the check after the commit leaves one row each."""
    folder = tmp_path / "corpus"
    n_files = corpus_with_copies(folder, 12, copied=3, copies=3, seed=4)
    db_uri = str(tmp_path / "db")
    out = fbmem("ingest", "training", str(folder), "--db", db_uri, "--preset", "tiny",
                *sets(rows_per_fragment=1, commit_every_fragments=1000, folder_files_per_shard=5))
    assert f"rows in={n_files}" in out and f"rows written={n_files}" in out and "duplicates=9" in out
    keys = image_table(db_uri).column("image_id").to_pylist()
    assert len(keys) == len(set(keys)) == 12
    m = metrics(db_uri)
    assert m["commits"] == 1 and m["fragments"] == n_files


def test_commits_are_batched_and_the_job_compacts(ray_local, tmp_path) -> None:
    folder = tmp_path / "corpus"
    write_good_images(folder, 40, seed=5)
    db_uri = str(tmp_path / "db")
    fbmem("ingest", "training", str(folder), "--db", db_uri, "--preset", "tiny",
          *sets(rows_per_fragment=4, commit_every_fragments=3, folder_files_per_shard=10, version_retention_s=0))
    m = metrics(db_uri)
    assert m["fragments"] >= 10 and 2 <= m["commits"] <= -(-m["fragments"] // 3)
    assert m["maintenance"]["fragments_added"] == 1
    # compacted, and with a retention of 0 only the latest version is kept
    assert table_stats(str(Path(db_uri) / "training_images.lance")) == {
        "rows": 40, "versions": 1, "fragments": 1, "data_files": 1}


# ----------------------------------------------------------------------------- shards and ledger


def _write_tar(path: Path, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for name, blob in ((f"{i:04d}.png", b"x"), (f"{i:04d}.txt", f"c{i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def test_shards_of_each_kind_and_their_rows(tmp_path) -> None:
    from fbmem.pipelines.sources import SHARD_END, list_shards, read_shards

    def rows_of(shards, **kw):
        batch = pa.table({"shard_id": [s.shard_id for s in shards], "kind": [s.kind for s in shards],
                          "spec": [json.dumps(s.spec) for s in shards]})
        return pa.concat_tables(read_shards(batch, **kw)).to_pylist()

    folder = tmp_path / "imgs"
    write_good_images(folder, 11, seed=1)
    shards = list_shards(folder, files_per_shard=4)
    assert [s.label["files"] for s in shards] == [4, 4, 3]
    assert [s.shard_id for s in list_shards(folder, files_per_shard=4)] == [s.shard_id for s in shards]
    rows = rows_of(shards)
    markers = [r for r in rows if r["error"] == SHARD_END]
    assert [m["_shard_rows"] for m in markers] == [4, 4, 3]
    assert sum(r["caption"] is not None for r in rows) == 6 and sum(r["mask_uri"] is not None for r in rows) == 4

    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "caption", "id"])
        for i in range(25):
            w.writerow([f"imgs/x{i}.png", f"line one\nline two {i}", f"id{i}"])  # quoted newlines
    csv_shards = list_shards(manifest, rows_per_shard=10)
    assert [(s.spec["start"], s.spec["stop"]) for s in csv_shards] == [(0, 10), (10, 20), (20, 25)]
    got = [r for r in rows_of(csv_shards) if r["error"] is None]
    assert [r["source_id"] for r in got] == [f"id{i}" for i in range(25)]
    assert [r["_pos"] for r in got] == list(range(25))
    pq.write_table(pa.table({"uri": [f"x{i}.png" for i in range(25)], "id": [f"p{i}" for i in range(25)]}),
                   tmp_path / "m.parquet", row_group_size=7)
    pq_rows = [r for r in rows_of(list_shards(tmp_path / "m.parquet", rows_per_shard=10)) if r["error"] is None]
    assert [r["source_id"] for r in pq_rows] == [f"p{i}" for i in range(25)]
    # an edited manifest is a new one: new shard ids
    with manifest.open("a") as f:
        f.write("imgs/late.png,late,id25\n")
    assert not {s.shard_id for s in list_shards(manifest, rows_per_shard=10)} & {s.shard_id for s in csv_shards}

    (tmp_path / "wds").mkdir()
    _write_tar(tmp_path / "wds" / "a.tar", 3)
    _write_tar(tmp_path / "wds" / "b.tar", 0)
    wds = list_shards(tmp_path / "wds")
    assert len(wds) == 2
    markers = [r for r in rows_of(wds) if r["error"] == SHARD_END]
    assert sorted(m["_shard_rows"] for m in markers) == [0, 3]  # an empty shard still ends


def test_ledger_eager_work_satisfies_a_lazy_rerun_not_the_reverse(tmp_path) -> None:
    from fbmem.jobs.runtime.ledger import ShardCounts, ShardLedger
    from fbmem.pipelines.sources import Shard

    db = connect(str(tmp_path / "db"))
    shards = [Shard(f"s{i}", "folder", "src", {}, {"i": i}) for i in range(3)]
    lazy = ShardLedger(db, table="training_images", model="m", masks="lazy")
    eager = ShardLedger(db, table="training_images", model="m", masks="eager")
    eager.mark_done([(shards[0], ShardCounts(rows=5, written=4, errors=1, total=5))], "run1")
    lazy.mark_done([(shards[1], ShardCounts(rows=3, skipped=3, total=3))], "run2")
    ids = [s.shard_id for s in shards]
    got = lazy.finished(ids)
    assert got.ids == {"s0", "s1"} and got.rows_in == 8 and got.stored == 7 and got.errors == 1
    assert eager.finished(ids).ids == {"s0"}
    other = ShardLedger(db, table="training_images", model="another", masks="lazy")
    assert other.finished(ids).ids == set()
    lazy.mark_done([(shards[1], ShardCounts(rows=3, skipped=3, total=3))], "run3")  # upsert: one row
    assert db.count("ingest_shards") == 2


def test_key_check_skips_stored_rows_and_repairs_a_duplicate_left_by_a_crash(tmp_path) -> None:
    """A crash between an Append and its duplicate check leaves two rows of one key, in a shard the
    ledger does not mark; the rerun's key check meets the key, skips the row and deletes the older."""
    from datetime import datetime, timedelta, timezone

    from fbmem.pipelines.ingest import SKIPPED, WritePlan, check_stored
    from fbmem.storage.fragments import FragmentCommitter, write_fragments
    from fbmem.storage.schema import conform, schema_for

    db = connect(str(tmp_path / "db"))
    db.table("training_images", dim=4, create=True)
    uri = db.table_uri("training_images")
    schema = schema_for("training_images", 4)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def stored(key: str, seconds: int, model: str = "m") -> pa.Table:
        return conform(pa.table({"image_id": [key], "image_sha256": [key], "run_id": ["r"], "embedding_model": [model],
                                 "embedding": pa.array([[0.5] * 4], pa.list_(pa.float32(), 4)),
                                 "ingested_at": pa.array([t0 + timedelta(seconds=seconds)], schema.field("ingested_at").type)}),
                       schema)

    c = FragmentCommitter(uri, every_fragments=1)
    for table in (stored("dup", 0), stored("dup", 5), stored("one", 0), stored("other-model", 0, model="x")):
        c.add(write_fragments(table, uri, schema=schema))
        c.commit()
    plan = WritePlan(target="training", table="training_images", uri=uri, key="image_id", order="ingested_at",
                     model_id="m", masks="lazy", job="j", run_id="r2")
    batch = pa.table({"image_id": ["dup", "one", "new", "other-model", None], "error": [None, None, None, None, "bad"],
                      "image_bytes": [b"1", b"2", b"3", b"4", None]})
    out = check_stored(batch, plan=plan).to_pylist()
    assert [r["error"] for r in out] == [SKIPPED, SKIPPED, None, None, "bad"]
    assert [r["image_bytes"] for r in out] == [None, None, b"3", b"4", None]
    left = lance.dataset(uri).to_table(columns=["image_id", "ingested_at"]).to_pylist()
    assert sorted(r["image_id"] for r in left) == ["dup", "one", "other-model"]
    assert [r["ingested_at"] for r in left if r["image_id"] == "dup"] == [t0 + timedelta(seconds=5)]
    eager = WritePlan(**{**plan.__dict__, "masks": "eager"})
    assert [r["error"] for r in check_stored(batch, plan=eager).to_pylist()][:2] == [None, None]  # no masks stored
