"""Rows of the `errors` table: the one builder every job uses for its bad inputs.

Bad input is data (DESIGN.md): a row that fails a stage becomes an error row naming the job, the
stage, the input and the reason, and the job goes on. The id hashes (job, stage, input), so a
rerun that meets the same bad input overwrites its row instead of adding one. It lives in storage
because pipelines and jobs both build these rows.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import pyarrow as pa

from fbmem.storage.keys import content_hash
from fbmem.storage.schema import ERRORS, now_utc


def error_id(job: str, stage: str, source: str | None) -> str:
    """Reruns that meet the same bad input overwrite the same error row."""
    return content_hash(f"{job}\x1f{stage}\x1f{source}".encode())


def stage_of(reason: str, stages: Collection[str], default: str) -> str:
    """The stage a reason names by its prefix ("clip: ..."), else `default`."""
    head = reason.split(":", 1)[0]
    return head if head in stages else default


def _source_key(key: str | None, source_id: str | None, position: int | None) -> str | None:
    """What the id hashes. An input without a name (a manifest row with an empty uri) is told
    apart by its source id, else by its position in the stream, so two such rows never share an
    id (the plain key is kept otherwise: ids of named inputs stay what they were)."""
    if key:
        return key
    if source_id not in (None, ""):
        return f"\x1fsource_id={source_id}"
    if position is not None:
        return f"\x1frow={position}"
    return key


def error_row(
    job: str,
    run_id: str,
    *,
    stage: str,
    reason: str,
    source_uri: str | None,
    source_id: str | None = None,
    key: str | None = None,
    position: int | None = None,
) -> dict[str, Any]:
    """One `errors` row. `key` names the input in the id (default: `source_uri`); `position` is
    the row's place in its stream, used only when neither the key nor `source_id` names it."""
    source = _source_key(source_uri if key is None else key, source_id, position)
    return {"error_id": error_id(job, stage, source), "job": job, "stage": stage, "source_uri": source_uri,
            "source_id": source_id, "reason": reason, "run_id": run_id, "created_at": now_utc()}


def error_rows(
    job: str,
    run_id: str,
    *,
    reasons: Sequence[str],
    stages: str | Sequence[str],
    source_uris: Sequence[str | None],
    source_ids: Sequence[str | None] | None = None,
    keys: Sequence[str | None] | None = None,
    positions: Sequence[int] | None = None,
) -> pa.Table:
    """`errors` rows, one per reason (a single `stages` string is every row's stage). `positions`
    are the rows' places in their stream (see `error_row`)."""
    n = len(reasons)
    stage_list = [stages] * n if isinstance(stages, str) else list(stages)
    ids = list(source_ids) if source_ids is not None else [None] * n
    key_list = list(keys) if keys is not None else [None] * n
    pos: list[int | None] = list(positions) if positions is not None else [None] * n
    if not len(stage_list) == len(source_uris) == len(ids) == len(key_list) == len(pos) == n:
        raise ValueError("error_rows: reasons, stages, source_uris, source_ids, keys and positions differ in length")
    rows = [
        error_row(job, run_id, stage=stage_list[i], reason=reasons[i], source_uri=source_uris[i],
                  source_id=ids[i], key=key_list[i], position=pos[i])
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=ERRORS)
