"""storage/fragments.py on a local folder: fragments written apart and committed in batches,
duplicate keys brought back to one row, compaction and cleanup. No Ray: workers are simulated by
calling the worker-side functions from threads."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import lance
import pyarrow as pa
import pytest

from fbmem.storage import fragments as fr
from fbmem.storage.database import StorageError, connect

SCHEMA = pa.schema([
    pa.field("k", pa.string(), nullable=False),
    pa.field("v", pa.int64()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
])
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def rows(keys: list[str], v: int, ts_offset: int = 0) -> pa.Table:
    n = len(keys)
    return pa.table({"k": keys, "v": [v] * n, "ts": [T0 + timedelta(seconds=ts_offset)] * n}, schema=SCHEMA)


def empty_dataset(uri: str) -> None:
    lance.write_dataset(SCHEMA.empty_table(), uri)


def test_fragments_written_before_the_dataset_exists_commit_in_batches(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    blocks = [rows([f"k{b}-{i}" for i in range(5)], b) for b in range(10)]
    written = [fr.write_fragments(b, uri, schema=SCHEMA) for b in blocks]  # the "workers"
    assert fr.open_dataset(uri) is None  # data files only: nothing committed, nothing visible
    empty_dataset(uri)
    committer = fr.FragmentCommitter(uri, every_fragments=4, every_s=3600)
    commits = []
    for frags in written:
        committer.add(frags)
        if committer.due():
            commits.append(committer.commit())
    commits.append(committer.commit())
    assert committer.commit() is None  # nothing pending
    assert [c.fragments for c in commits] == [4, 4, 2]
    assert sum(c.rows for c in commits) == 50
    ds = lance.dataset(uri)
    assert ds.count_rows() == 50
    assert len(ds.versions()) == 1 + 3  # the empty table and one version per commit, not per block
    # the commit's data files name its fragments (ids are assigned at commit)
    assert sorted(fr.fragment_keys(uri, commits[-1].data_files, "k")) == sorted(
        [f"k{b}-{i}" for b in (8, 9) for i in range(5)])


def test_a_commit_over_concurrent_commits_loses_nothing(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    empty_dataset(uri)
    errors: list[BaseException] = []

    def driver(d: int) -> None:
        try:
            c = fr.FragmentCommitter(uri, every_fragments=1)
            for j in range(8):
                c.add(fr.write_fragments(rows([f"d{d}-{j}"], j), uri, schema=SCHEMA))
                c.commit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=driver, args=(d,)) for d in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert lance.dataset(uri).count_rows() == 24


def test_remove_duplicates_keeps_the_newest_row_of_each_key(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(rows(["a", "b", "c"], 1, ts_offset=0), uri)
    lance.write_dataset(rows(["a", "b"], 2, ts_offset=10), uri, mode="append")
    lance.write_dataset(rows(["a"], 3, ts_offset=5), uri, mode="append")  # newer commit, older row
    found = fr.stored_rows(uri, "k", ["a", "b", "c", "zz"], ["v"])
    assert sorted(fr.duplicate_keys(found, "k")) == ["a", "b"]
    assert fr.remove_duplicates(uri, "k", "ts", ["a", "b", "c"]) == 3
    got = {r["k"]: r["v"] for r in lance.dataset(uri).to_table().to_pylist()}
    assert got == {"a": 2, "b": 2, "c": 1}
    assert fr.remove_duplicates(uri, "k", "ts", ["a", "b", "c"]) == 0  # idempotent


def test_concurrent_duplicate_removals_leave_exactly_one_row(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    keys = [f"k{i}" for i in range(30)]
    lance.write_dataset(rows(keys, 0, ts_offset=0), uri)
    for copy in range(1, 4):
        lance.write_dataset(rows(keys, copy, ts_offset=copy), uri, mode="append")
    errors: list[BaseException] = []

    def remove(part: list[str]) -> None:
        try:
            fr.remove_duplicates(uri, "k", "ts", part)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    # overlapping key sets, as the checks of several commits and key checks would have
    parts = [keys[:20], keys[10:], keys[5:25], keys]
    threads = [threading.Thread(target=remove, args=(p,)) for p in parts]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    table = lance.dataset(uri).to_table()
    assert sorted(table.column("k").to_pylist()) == sorted(keys)
    assert set(table.column("v").to_pylist()) == {3}  # the newest copy of each


def test_dedupe_commit_checks_only_the_keys_a_commit_added(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(rows(["x", "y"], 1), uri)
    lance.write_dataset(rows(["y"], 9, ts_offset=-5), uri, mode="append")  # an old duplicate of y
    c = fr.FragmentCommitter(uri, every_fragments=1)
    c.add(fr.write_fragments(rows(["x", "new"], 2, ts_offset=10), uri, schema=SCHEMA))
    commit = c.commit()
    assert fr.dedupe_commit(uri, commit.data_files, "k", "ts") == 1  # x: the older copy goes
    got = sorted((r["k"], r["v"]) for r in lance.dataset(uri).to_table().to_pylist())
    assert got == [("new", 2), ("x", 2), ("y", 1), ("y", 9)]  # y was not in this commit


def test_compact_cleanup_and_stats(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    empty_dataset(uri)
    c = fr.FragmentCommitter(uri, every_fragments=2)
    for b in range(12):
        c.add(fr.write_fragments(rows([f"k{b}-{i}" for i in range(3)], b), uri, schema=SCHEMA))
        if c.due():
            c.commit()
    c.commit()
    before = fr.table_stats(uri)
    assert before == {"rows": 36, "versions": 7, "fragments": 12, "data_files": 12}
    assert fr.compact(uri, min_fragments=2)["fragments_added"] == 1
    assert fr.cleanup(uri, retention_s=3600) == 0  # nothing is an hour old
    assert fr.cleanup(uri, retention_s=0) >= 7
    assert fr.table_stats(uri) == {"rows": 36, "versions": 1, "fragments": 1, "data_files": 1}


def test_key_index_is_built_from_a_size_and_then_kept_up(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(rows([f"k{i}" for i in range(50)], 0), uri)
    assert fr.maintain_key_index(uri, "k", min_rows=100) == "none"
    lance.write_dataset(rows([f"m{i}" for i in range(60)], 0), uri, mode="append")
    assert fr.maintain_key_index(uri, "k", min_rows=100) == "created"
    lance.write_dataset(rows(["late"], 0), uri, mode="append")
    assert fr.maintain_key_index(uri, "k", min_rows=100) == "optimized"
    assert fr.stored_rows(uri, "k", ["late", "k3", "nope"]).column("k").to_pylist().count("late") == 1
    plan = lance.dataset(uri).scanner(columns=["k"], filter="k IN ('k3')").explain_plan()
    assert "ScalarIndexQuery" in plan or "BTree" in plan


def test_table_uri_and_a_table_created_over_orphan_data_files(tmp_path) -> None:
    db = connect(str(tmp_path / "db"))
    uri = db.table_uri("training_images")
    assert uri == str(tmp_path / "db" / "training_images.lance")
    with pytest.raises(StorageError):
        db.table_uri("nope")
    # a worker wrote data files before the first commit (then the job died): the folder exists,
    # no version does; creating the table still works and the files stay invisible
    from fbmem.storage.schema import schema_for

    schema = schema_for("errors")
    assert fr.write_fragments(schema.empty_table(), db.table_uri("errors"), schema=schema) == []
    orphan = pa.table({"error_id": ["e"], "job": ["j"], "stage": ["s"], "source_uri": [None], "source_id": [None],
                       "reason": ["r"], "run_id": ["x"], "created_at": [None]}).cast(schema)
    fr.write_fragments(orphan, db.table_uri("errors"), schema=schema)
    assert fr.open_dataset(db.table_uri("errors")) is None
    db.table("errors", create=True)
    assert db.count("errors") == 0


def test_compaction_over_ray_workers_above_a_size(ray_local, tmp_path) -> None:
    """Above `distributed_min_rows` the rewrite runs in Ray workers (lance-ray)."""
    uri = str(tmp_path / "t.lance")
    empty_dataset(uri)
    c = fr.FragmentCommitter(uri, every_fragments=100)
    for b in range(8):
        c.add(fr.write_fragments(rows([f"k{b}-{i}" for i in range(4)], b), uri, schema=SCHEMA))
    c.commit()
    version = lance.dataset(uri).version
    out = fr.compact(uri, target_rows=16, min_fragments=2, distributed_min_rows=1, workers=2,
                     ray_remote_args={"num_cpus": 0.25})
    assert out == {"fragments_removed": 8, "fragments_added": 2}
    ds = lance.dataset(uri)
    assert ds.version > version and ds.count_rows() == 32 and len(ds.get_fragments()) == 2
