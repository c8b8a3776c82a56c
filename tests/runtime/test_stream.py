"""The one drain loop and the one error-row builder, on a real LanceDB database."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.jobs.runtime.stream import ErrorSource, drain
from fbmem.storage.database import connect
from fbmem.storage.errors import error_id, error_row, error_rows, stage_of
from fbmem.storage.schema import ERRORS


def pairs(gids: list[str], errors: list[str | None] | None = None, uris: list[str | None] | None = None,
          ids: list[str | None] | None = None) -> pa.Table:
    """Stream rows as a scoring stage leaves them (the `error` column only when given)."""
    cols: dict = {"generation_id": gids, "image_id": [f"img-{g}" for g in gids],
                  "source_uri": uris if uris is not None else [f"file:///{g}.png" for g in gids],
                  "source_id": pa.array(ids if ids is not None else [None] * len(gids), pa.string())}
    if errors is not None:
        cols["error"] = pa.array(errors, pa.string())
    return pa.table(cols)


def to_pair_rows(seen: list[list[str]]):
    def rows(good: pa.Table) -> pa.Table:
        seen.append(good.column_names)
        n = good.num_rows
        return good.append_column("pair_id", pa.array([f"p-{g}" for g in good.column("generation_id").to_pylist()])) \
                   .append_column("run_id", pa.array(["r"] * n))
    return rows


@pytest.fixture()
def db(tmp_path):
    return connect(str(tmp_path / "db"))


@pytest.fixture()
def run(db, tiny_cfg):
    return RunRecord(db, "score", tiny_cfg)


def errors_of(db) -> dict[str, dict]:
    return {r["source_uri"]: r for r in db.read("errors").to_pylist()}


def test_drain_writes_good_and_error_rows_and_keeps_the_run_current(db, run):
    run.rows_in, run.rows_out, run.errors = 7, 5, 2  # what the job did before this stream
    seen: list[list[str]] = []
    batches = [
        pairs(["a", "b", "c"], ["clip: no image_bytes", None, "decode: truncated file"]),
        pairs(["d", "e"]),  # no `error` column: every row is good
        pairs(["f"], [None]),
    ]
    counts = drain(batches, db=db, table="pair_scores", run=run, desc="t", unit="pair", rows=to_pair_rows(seen),
                   errors=ErrorSource(stage="validate", stages=("clip", "sam")))
    assert (counts.rows_in, counts.written, counts.errors) == (6, 4, 2)
    assert (run.rows_in, run.rows_out, run.errors) == (7, 9, 4)  # rows_in is not the stream's to count here
    assert all("error" not in cols for cols in seen)  # the row builder never sees the error column
    stored = db.read("pair_scores", ["pair_id", "generation_id", "run_id"]).to_pylist()
    assert sorted(r["generation_id"] for r in stored) == ["b", "d", "e", "f"]
    errs = errors_of(db)
    assert set(errs) == {"file:///a.png", "file:///c.png"}
    a, c = errs["file:///a.png"], errs["file:///c.png"]
    assert (a["stage"], a["reason"], a["job"], a["run_id"]) == ("clip", "clip: no image_bytes", "score", run.run_id)
    assert (c["stage"], c["reason"]) == ("validate", "decode: truncated file")  # "decode" names no known stage
    assert a["error_id"] == error_id("score", "clip", "file:///a.png")
    assert db.read("errors").schema.equals(ERRORS)


def test_drain_counts_the_input_when_asked_and_a_rerun_overwrites_its_error_rows(db, run):
    def stream():
        return [pairs(["a", "b"], [None, "sam: out of memory"]), pairs(["c"], ["sam: out of memory"])]

    errors = ErrorSource(stage="validate", stages=("sam",))
    first = drain(stream(), db=db, table="pair_scores", run=run, desc="t", unit="img", rows=to_pair_rows([]),
                  errors=errors, count_input=True)
    assert (first.rows_in, run.rows_in, run.rows_out, run.errors) == (3, 3, 1, 2)
    again = RunRecord(db, "score", run.cfg)
    drain(stream(), db=db, table="pair_scores", run=again, desc="t", unit="img", rows=to_pair_rows([]),
          errors=errors, count_input=True)
    assert db.count("errors") == 2 and db.count("pair_scores") == 1
    assert {r["run_id"] for r in db.read("errors").to_pylist()} == {again.run_id}


def test_bad_rows_without_a_name_still_get_distinct_error_ids(db, run):
    """Manifest rows with an empty uri: told apart by source id, else by their place in the stream."""
    batches = [
        pairs(["a", "b", "c"], ["missing uri in manifest row"] * 3, uris=["", "", None], ids=["m1", "m2", None]),
        pairs(["d", "e"], ["missing uri in manifest row", None], uris=["", "file:///e.png"], ids=[None, None]),
    ]
    counts = drain(batches, db=db, table="pair_scores", run=run, desc="t", unit="img", rows=to_pair_rows([]),
                   errors=ErrorSource(stage="validate"))
    assert counts.errors == 4
    errs = db.read("errors", ["error_id", "source_id"]).to_pylist()
    assert len(errs) == 4 and len({e["error_id"] for e in errs}) == 4
    assert sorted(e["source_id"] or "" for e in errs) == ["", "", "m1", "m2"]
    # a named input keeps the plain formula (reruns overwrite the rows of earlier versions)
    assert error_row("j", "r", stage="s", reason="x", source_uri="u", source_id="i", position=3)["error_id"] == \
        hashlib.sha256("j\x1fs\x1fu".encode()).hexdigest()


def test_error_source_with_computed_uri_and_key_column(db, run):
    def uris(bad: pa.Table) -> list[str]:
        return [f"{g}|{i}" for g, i in zip(bad.column("generation_id").to_pylist(), bad.column("image_id").to_pylist())]

    errors = ErrorSource(stage="score", source_uri=uris, source_id="generation_id", key="generation_id")
    drain([pairs(["a", "b"], ["score: generation not found", "clip: x"])], db=db, table="pair_scores", run=run,
          desc="t", unit="pair", errors=errors)
    errs = errors_of(db)
    assert set(errs) == {"a|img-a", "b|img-b"}
    assert errs["a|img-a"]["stage"] == "score" and errs["b|img-b"]["stage"] == "score"  # no stages listed
    assert errs["a|img-a"]["source_id"] == "a" and errs["a|img-a"]["error_id"] == error_id("score", "score", "a")


def test_bad_rows_in_a_stream_that_names_no_error_source_fail_loudly(db, run):
    with pytest.raises(ValueError, match="bad rows"):
        drain([pairs(["a"], ["clip: x"])], db=db, table="pair_scores", run=run, desc="t", unit="pair",
              rows=to_pair_rows([]))
    assert not db.has_table("errors")


def test_error_rows_builder():
    t = error_rows("ingest", "r1", reasons=["mask: bad png", "too small"], stages=["mask", "validate"],
                   source_uris=["u1", "u2"], source_ids=["1", None])
    assert t.schema.equals(ERRORS) and t.num_rows == 2
    assert t.column("stage").to_pylist() == ["mask", "validate"]
    one = error_rows("ingest", "r1", reasons=["x"], stages="validate", source_uris=["u"])
    assert one.column("stage").to_pylist() == ["validate"] and one.column("source_id").to_pylist() == [None]
    with pytest.raises(ValueError, match="length"):
        error_rows("ingest", "r1", reasons=["x", "y"], stages="validate", source_uris=["u"])
    assert stage_of("clip: boom", ("clip",), "validate") == "clip"
    assert stage_of("clipped image", ("clip",), "validate") == "validate"
