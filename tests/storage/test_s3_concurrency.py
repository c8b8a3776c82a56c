"""Concurrent writers on an S3 database (moto on 127.0.0.1, the `s3_store` fixture).

Two processes upsert into one table at once through `Database.upsert`: each op writes a key both
writers write (`shared-i`) and one of its own (`A-i` / `B-i`). Afterwards every key is there
exactly once and nothing is lost. Two things make that hold, and both are checked here:

- the store's conditional PUT: Lance writes each version's manifest with `If-None-Match: *`, so of
  two commits of the same version one gets 412 and rebases instead of overwriting the other (a
  store that ignored the header would silently lose commits);
- the key declared to Lance as its unenforced primary key: without it, two insert-only merges of
  the same new key both commit and the key is duplicated (lance-format/lance#4585). Tables made
  by an older fbmem without the declaration get it at their first write.

Run as a script (`python test_s3_concurrency.py URI OPTIONS_JSON WRITER N`) this file is one writer.
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

N_OPS = 20


def _writer(uri: str, options: str, wid: str, n: int) -> None:
    import pyarrow as pa

    from fbmem.storage.database import connect

    db = connect(uri, json.loads(options))
    print("ready", flush=True)
    sys.stdin.readline()  # both writers start together
    for i in range(n):
        db.upsert("runs", pa.Table.from_pylist([
            {"run_id": f"shared-{i}", "job": wid, "status": "ok"},
            {"run_id": f"{wid}-{i}", "job": wid, "status": "ok"},
        ]))
    print("done", flush=True)


def _run_writers(uri: str, options: dict[str, str], n: int = N_OPS) -> None:
    procs = [subprocess.Popen([sys.executable, __file__, uri, json.dumps(options), wid, str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for wid in ("A", "B")]
    try:
        for p in procs:
            line = p.stdout.readline()
            assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip().endswith("done"), err[-3000:]


def _check(db, n: int = N_OPS) -> None:
    rows = db.read("runs", columns=["run_id", "job"]).to_pylist()
    counts = collections.Counter(r["run_id"] for r in rows)
    assert [k for k, c in counts.items() if c > 1] == []  # nothing duplicated
    expected = {f"{p}-{i}" for p in ("shared", "A", "B") for i in range(n)}
    assert set(counts) == expected  # nothing lost
    by_key = {r["run_id"]: r["job"] for r in rows}
    assert all(by_key[f"{w}-{i}"] == w for w in "AB" for i in range(n))
    assert {by_key[f"shared-{i}"] for i in range(n)} <= {"A", "B"}


def _fresh_uri(s3_store, name: str) -> str:
    return f"{s3_store.uri}/{name}-{uuid.uuid4().hex[:8]}"


def test_the_store_refuses_a_second_conditional_put_and_lance_commits_with_one(s3_store):
    """What an S3-compatible store must do for Lance's commits: PUT with `If-None-Match: *` on an
    existing key fails with 412 (moto does, as AWS S3, MinIO and R2 do); and Lance does write its
    manifests that way (the server logs every PUT carrying the header)."""
    import botocore.exceptions
    import pyarrow as pa

    from fbmem.storage.database import connect

    s3 = s3_store.client()
    key = f"probe-{uuid.uuid4().hex}"
    s3.put_object(Bucket=s3_store.bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.put_object(Bucket=s3_store.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get_object(Bucket=s3_store.bucket, Key=key)["Body"].read() == b"first"  # not overwritten

    uri = _fresh_uri(s3_store, "conditional")
    db = connect(uri, s3_store.storage_options)
    db.upsert("runs", pa.table({"run_id": ["r1"], "job": ["probe"], "status": ["ok"]}))
    db.upsert("runs", pa.table({"run_id": ["r2"], "job": ["probe"], "status": ["ok"]}))
    prefix = uri.removeprefix("s3://") + "/runs.lance/_versions/"
    logged = Path(s3_store.conditional_log).read_text().splitlines()
    manifests = [line for line in logged if line.startswith(prefix)]
    assert len(manifests) >= 3, logged[-20:]  # create, then one per upsert
    assert all(line.endswith(".manifest If-None-Match=*") for line in manifests), manifests


@pytest.mark.parametrize("table_made_by", ["fbmem", "nobody", "older-fbmem"])
def test_two_writers_lose_nothing_and_duplicate_nothing(s3_store, table_made_by):
    """`nobody`: both writers race to create the table too. `older-fbmem`: the table exists
    without the key declared to Lance, as an older fbmem made it; the first write declares it."""
    import lancedb

    from fbmem.storage.database import connect, has_primary_key
    from fbmem.storage.schema import schema_for

    uri = _fresh_uri(s3_store, f"writers-{table_made_by}")
    if table_made_by == "fbmem":
        connect(uri, s3_store.storage_options).table("runs", create=True)
    elif table_made_by == "older-fbmem":
        lancedb.connect(uri, storage_options=s3_store.storage_options).create_table("runs", schema=schema_for("runs"))
        assert not has_primary_key(connect(uri, s3_store.storage_options).table("runs").schema)
    _run_writers(uri, s3_store.storage_options)
    db = connect(uri, s3_store.storage_options)
    _check(db)
    field = db.table("runs").schema.field("run_id")
    assert not field.nullable and field.metadata == {b"lance-schema:unenforced-primary-key:position": b"1"}


if __name__ == "__main__":
    _writer(*sys.argv[1:4], int(sys.argv[4]))
