"""Stable keys and SQL literals: the one place that turns values into row ids and into SQL text.

Every row id in fbmem is a hash of what makes the row what it is (content, prompt, settings), so
a rerun meets the same ids and upserts instead of duplicating. Every value that enters a SQL
string (a Lance filter or a DuckDB query) goes through `sql_literal`, so a quote in a caption, a
model id or a path can never change the query.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any


def stable_hash(*parts: Any) -> str:
    """sha256 hex of the parts, each as canonical JSON (sorted keys), joined by a unit separator."""
    text = "\x1f".join(json.dumps(p, sort_keys=True, default=str) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(data: bytes) -> str:
    """sha256 hex of raw bytes: the key of an image (its file content) or of a prompt's text."""
    return hashlib.sha256(data).hexdigest()


def sql_literal(value: Any) -> str:
    """One SQL literal, valid for DuckDB and for Lance filters. Strings are single-quoted with
    quotes doubled; NaN and infinities are refused (no SQL literal means the same in both)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"no SQL literal for {value!r}")
        return repr(value)
    if isinstance(value, (datetime, date)):
        return f"TIMESTAMP '{value.isoformat()}'" if isinstance(value, datetime) else f"DATE '{value.isoformat()}'"
    return "'" + str(value).replace("'", "''") + "'"


def sql_list(values: Iterable[Any]) -> str:
    """The inside of an IN (...) list: each value through `sql_literal`."""
    return ", ".join(sql_literal(v) for v in values)
