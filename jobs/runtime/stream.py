"""The one drain loop: a stream of pyarrow batches -> table rows and error rows, counted.

Every job that runs a Ray Data stream ends the same way on the driver: iterate the batches, split
the good rows from the bad ones on the `error` column, upsert both, advance a progress bar and keep
the run's counts current (so a job that dies mid-stream still records what it wrote). Written once
here, a job states only what is its own: the table, how a good row becomes a table row, and how
its bad rows are named in `errors` (stage, source).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.storage.database import Database
from fbmem.storage.errors import error_rows, stage_of


@dataclass
class StreamCounts:
    rows_in: int = 0  # rows the stream delivered, good and bad
    written: int = 0  # table rows upserted
    errors: int = 0  # error rows upserted


def _strings(batch: pa.Table, name: str | None) -> list[str | None]:
    if name is None or name not in batch.column_names:
        return [None] * batch.num_rows
    return pc.cast(batch.column(name), pa.string()).to_pylist()


@dataclass(frozen=True)
class ErrorSource:
    """How a job names its bad rows in `errors`.

    `stage` is the stage of a reason that names none of `stages` by its prefix ("clip: ...").
    `source_uri` is a column, or a function of the bad rows giving one uri each; `source_id` and
    `key` are columns (`key`: what the error id hashes, the source uri when None).
    """

    stage: str
    stages: tuple[str, ...] = ()
    source_uri: str | Callable[[pa.Table], Sequence[str | None]] = "source_uri"
    source_id: str | None = "source_id"
    key: str | None = None

    def rows(self, bad: pa.Table, job: str, run_id: str, positions: Sequence[int] | None = None) -> pa.Table:
        reasons = bad.column("error").to_pylist()
        uris = self.source_uri(bad) if callable(self.source_uri) else _strings(bad, self.source_uri)
        return error_rows(
            job, run_id, reasons=reasons, stages=[stage_of(r, self.stages, self.stage) for r in reasons],
            source_uris=uris, source_ids=_strings(bad, self.source_id),
            keys=_strings(bad, self.key) if self.key else None, positions=positions,
        )


def drain(
    batches: Iterable[pa.Table],
    *,
    db: Database,
    table: str,
    run: RunRecord,
    desc: str,
    unit: str,
    rows: Callable[[pa.Table], pa.Table] | None = None,
    errors: ErrorSource | None = None,
    total: int | None = None,
    count_input: bool = False,
) -> StreamCounts:
    """Upsert the good rows of `batches` into `table` (through `rows`, given them without the
    `error` column; as they are when None) and their bad rows into `errors` (named by `errors`).

    A batch without an `error` column is all good. The run's rows_out and errors grow by what this
    stream writes, and with `count_input` its rows_in by the rows the stream delivers (for a source
    whose size is not known before it is read). A bad row with no `errors` to name it is an error.
    """
    counts = StreamCounts()
    base_in, base_out, base_err = run.rows_in, run.rows_out, run.errors
    with tqdm(total=total, desc=desc, unit=unit, disable=None) as bar:
        for batch in batches:
            if "error" in batch.column_names:
                failed = pc.is_valid(batch.column("error"))
                good = batch.filter(pc.invert(failed)).drop_columns(["error"])
                bad = batch.filter(failed)
            else:
                failed, good, bad = None, batch, batch.slice(0, 0)
            if good.num_rows:
                counts.written += db.upsert(table, rows(good) if rows is not None else good)
            if bad.num_rows:
                if errors is None:
                    raise ValueError(f"{desc}: {bad.num_rows} bad rows in a stream whose job names no ErrorSource")
                where = [counts.rows_in + i for i in pc.indices_nonzero(failed).to_pylist()]
                db.upsert("errors", errors.rows(bad, run.job, run.run_id, where))
                counts.errors += bad.num_rows
            counts.rows_in += batch.num_rows
            bar.update(batch.num_rows)
            run.rows_out, run.errors = base_out + counts.written, base_err + counts.errors
            if count_input:
                run.rows_in = base_in + counts.rows_in
    return counts
