"""`fbmem sql` is read-only on the database (issue 14, item 3).

`COPY (SELECT 1) TO '<db>/training_images.lance/_versions/<latest>.manifest'` used to succeed and
break every later command on the table. Now the DuckDB connection has no file system access and
locked settings: every way SQL could write (or read) a file is refused with one message, the
database folder keeps every byte, and results still leave through `--format ... --out FILE`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.storage.database import connect
from fbmem.storage.sql import QueryError, duckdb_connection, run_query

N = 5


def _images(n: int = N) -> pa.Table:
    ids = [f"img{i}" for i in range(n)]
    v = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    return pa.table({"image_id": ids, "image_sha256": ids, "caption": [f"c{i}" for i in range(n)],
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 4),
                     "mask_png": pa.array([b"png"] * n, pa.large_binary()), "run_id": ["r1"] * n})


def _files(root: Path) -> dict[str, str]:
    """Every file under `root` with the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def world(tmp_path):
    root = tmp_path / "db"
    db = connect(str(root))
    db.upsert("training_images", _images())
    db.upsert("runs", pa.table({"run_id": ["r1"], "job": ["ingest"], "status": ["ok"]}))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for SQL\n")
    return db, root, outside


def _latest_manifest(root: Path) -> Path:
    manifests = sorted((root / "training_images.lance" / "_versions").glob("*.manifest"))
    assert manifests
    return manifests[-1]


def _attempts(root: Path, outside: Path) -> list[str]:
    manifest = _latest_manifest(root)
    secret = outside / "secret.txt"
    return [
        # writes into the database: the COPY, and its relatives
        f"COPY (SELECT 1) TO '{manifest}'",
        f"COPY (SELECT 1) TO '{manifest}' (FORMAT csv, HEADER false)",
        f"COPY training_images TO '{root}/training_images.lance/data/x.parquet' (FORMAT parquet)",
        f"COPY (SELECT * FROM runs) TO '{root}/runs.lance/_versions/9.manifest'",
        f"SELECT 1; COPY (SELECT 1) TO '{manifest}'",
        f"COPY (SELECT 1) TO '{manifest}'; SELECT 1",
        f"EXPORT DATABASE '{root}/exported'",
        f"ATTACH '{root}/training_images.lance/_versions/x.duckdb' AS x",
        f"ATTACH '{outside}/new.duckdb' AS x",
        # writes and reads outside
        f"COPY (SELECT 1) TO '{outside}/out.csv'",
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM read_blob('{secret}')",
        f"SELECT * FROM read_csv('{secret}')",
        f"SELECT * FROM glob('{outside}/*')",
        f"SELECT * FROM read_blob('{manifest}')",
        # turning it back on, or around it
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "SET lock_configuration = false",
        f"SET allowed_directories = ['{root}']",
        f"SET temp_directory = '{root}'",
        "INSTALL lance",
        f"LOAD '{secret}'",
    ]


def test_writes_reads_and_settings_are_refused_and_tables_stay_intact(world):
    db, root, outside = world
    before = _files(root)
    for sql in _attempts(root, outside):
        with pytest.raises(QueryError, match="fbmem sql is read-only") as err:
            run_query(db, sql)
        assert "--out FILE" in str(err.value) and "\n" not in str(err.value), sql
    assert _files(root) == before  # not a byte changed, nothing added
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    # every later command on the tables works
    assert db.count("training_images") == N
    assert run_query(db, "SELECT count(*) AS n FROM training_images").column("n")[0].as_py() == N
    assert db.read("training_images", ["image_id"], where="image_id = 'img3'").num_rows == 1


def test_the_cli_refuses_copy_into_the_database_in_one_line(world):
    db, root, _ = world
    before = _files(root)
    out = CliRunner().invoke(app, ["sql", f"COPY (SELECT 1) TO '{_latest_manifest(root)}'", "--db", str(root)],
                             catch_exceptions=False)
    assert out.exit_code == 2, out.output
    assert out.output.startswith("error: fbmem sql is read-only") and "Permission Error" in out.output
    assert _files(root) == before
    ok = CliRunner().invoke(app, ["sql", "SELECT count(*) AS n FROM training_images", "--db", str(root), "--format", "csv"],
                            catch_exceptions=False)
    assert ok.exit_code == 0 and ok.output.split() == ['"n"', str(N)], ok.output


def test_exports_go_through_out_file(world, tmp_path):
    db, root, _ = world
    runner = CliRunner()
    for fmt in ("parquet", "csv", "json"):
        target = tmp_path / f"result.{fmt}"
        out = runner.invoke(app, ["sql", "SELECT image_id, caption FROM training_images ORDER BY image_id",
                                  "--db", str(root), "--format", fmt, "--out", str(target)], catch_exceptions=False)
        assert out.exit_code == 0, out.output
        assert target.is_file()
    assert pq.read_table(tmp_path / "result.parquet").column("image_id").to_pylist() == [f"img{i}" for i in range(N)]
    assert (tmp_path / "result.csv").read_text().splitlines()[1] == '"img0","c0"'


def test_ddl_and_dml_touch_only_the_query_connection(world):
    """DROP, DELETE, CREATE run on the connection's in-memory catalog (or fail on a view); the
    next query sees the tables as they are."""
    db, root, _ = world
    before = _files(root)
    run_query(db, "DROP VIEW training_images")
    with pytest.raises(QueryError, match="Can only delete from base table"):
        run_query(db, "DELETE FROM training_images")
    run_query(db, "CREATE TABLE scratch AS SELECT * FROM training_images")
    run_query(db, "CREATE OR REPLACE VIEW training_images AS SELECT 1 AS x")
    assert run_query(db, "SELECT count(*) AS n FROM training_images").column("n")[0].as_py() == N
    with pytest.raises(QueryError, match="scratch"):
        run_query(db, "SELECT * FROM scratch")
    assert _files(root) == before


def test_sql_sees_the_tables_and_no_python_variables(world):
    db, _, _ = world
    con = duckdb_connection(db)
    secret_table = pa.table({"x": [1]})  # noqa: F841 - a local a replacement scan could find
    try:
        with pytest.raises(Exception, match="secret_table"):
            con.execute("SELECT * FROM secret_table").fetchall()
        assert con.execute("SELECT current_setting('enable_external_access')").fetchall() == [(False,)]
        assert con.execute("SELECT count(*) FROM runs").fetchall() == [(1,)]
    finally:
        con.close()
