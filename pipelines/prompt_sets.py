"""Prompt sets: the reference `;`-separated LAION files and plain CSVs, read into one Arrow table.

Formats (detected from the header line, not the file name):
- reference: `;Caption;URL;type;mean_sscd;max_sscd;Index` (first column is the row number; the
  unmemorized file has only `;Caption;URL;Index`).
- plain CSV (comma, or tab): a `prompt` column, optional `url`, `id`, `planted`.
Column names match case-insensitively, and either text column name (`caption`/`prompt`/`text`)
works with either delimiter.

Policy: an empty prompt is skipped (there is nothing to generate) and counted; a repeated prompt
text keeps its first row (the prompt id is the text's hash, so two rows would collide). Both counts
are returned by `load_prompt_set` and stored in the table's schema metadata, so nothing disappears
unreported. Malformed files (no text column, a row with the wrong number of fields, a number that
is not a number) raise `PromptSetError` naming the file, line and column.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from fbmem.storage.keys import content_hash

PROMPT_SET_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("mem_type", pa.string()),
        ("linked_uri", pa.string()),
        ("linked_id", pa.string()),
        ("mean_sscd", pa.float64()),
        ("max_sscd", pa.float64()),
        ("planted", pa.string()),
    ]
)

# output column -> accepted header names (lower case), in order of preference
_ALIASES: dict[str, tuple[str, ...]] = {
    "text": ("prompt", "caption", "text"),
    "linked_uri": ("url", "uri"),
    "linked_id": ("index", "id"),
    "mem_type": ("type", "mem_type"),
    "mean_sscd": ("mean_sscd",),
    "max_sscd": ("max_sscd",),
    "planted": ("planted",),
}
_DELIMITERS = (";", ",", "\t")


class PromptSetError(ValueError):
    """A prompt-set file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class PromptSetRead:
    table: pa.Table
    rows_read: int
    empty_skipped: int
    duplicates_dropped: int
    delimiter: str


def prompt_id(text: str) -> str:
    """Stable id of a prompt: sha256 of its (stripped) text, so the same prompt in two files is one id."""
    return content_hash(text.encode("utf-8"))


def _detect(header_line: str, name: str) -> tuple[str, list[str], dict[str, int]]:
    """Pick the delimiter whose header holds a text column; return it, the header, and column indexes."""
    best: tuple[str, list[str], dict[str, int]] | None = None
    for delim in _DELIMITERS:
        header = next(csv.reader([header_line], delimiter=delim), [])
        lower = [h.strip().lower() for h in header]
        found: dict[str, int] = {}
        for out, aliases in _ALIASES.items():
            for alias in aliases:
                if alias in lower:
                    found[out] = lower.index(alias)
                    break
        if "text" in found and (best is None or len(header) > len(best[1])):
            best = (delim, header, found)
    if best is None:
        raise PromptSetError(
            f"prompt set {name}: no prompt column in the header {header_line.strip()[:200]!r} "
            f"(expected one of {', '.join(_ALIASES['text'])}, separated by ';' or ',')"
        )
    return best


def _float(value: str, name: str, line: int, column: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        f = float(value)
    except ValueError:
        raise PromptSetError(f"prompt set {name}, line {line}: {column} is not a number: {value!r}") from None
    return None if math.isnan(f) else f


def load_prompt_set(path: str | Path) -> PromptSetRead:
    """Read a prompt-set file into `PROMPT_SET_SCHEMA` rows, with counts of what was skipped."""
    p = Path(path)
    name = p.name
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptSetError(f"prompt set not found: {p}") from None
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"prompt set {p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PromptSetError(f"prompt set {p}: cannot read: {exc}") from None
    header_line = text.split("\n", 1)[0].rstrip("\r")
    if not header_line.strip():
        raise PromptSetError(f"prompt set {p} is empty (no header line)")
    delim, header, cols = _detect(header_line, name)

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    next(reader)  # header
    out: dict[str, list] = {f.name: [] for f in PROMPT_SET_SCHEMA}
    seen: set[str] = set()
    rows_read = empty = dupes = 0
    for row in reader:
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != len(header):
            raise PromptSetError(
                f"prompt set {name}, line {line}: {len(row)} fields, the header has {len(header)} "
                f"(delimiter {delim!r}; is a prompt with the delimiter left unquoted?)"
            )
        source_row = rows_read
        rows_read += 1

        def get(col: str) -> str | None:
            i = cols.get(col)
            if i is None:
                return None
            v = row[i].strip()
            return v or None

        prompt = get("text")
        if prompt is None:
            empty += 1
            continue
        if prompt in seen:
            dupes += 1
            continue
        seen.add(prompt)
        mem_type = get("mem_type")
        out["prompt_id"].append(prompt_id(prompt))
        out["text"].append(prompt)
        out["source"].append(name)
        out["source_row"].append(source_row)
        out["mem_type"].append(mem_type.upper() if mem_type else None)
        out["linked_uri"].append(get("linked_uri"))
        out["linked_id"].append(get("linked_id"))
        for col in ("mean_sscd", "max_sscd"):
            i = cols.get(col)
            out[col].append(None if i is None else _float(row[i], name, line, header[i]))
        out["planted"].append(get("planted"))

    meta = {
        b"fbmem.source": name.encode(),
        b"fbmem.rows_read": str(rows_read).encode(),
        b"fbmem.empty_skipped": str(empty).encode(),
        b"fbmem.duplicates_dropped": str(dupes).encode(),
    }
    table = pa.table(out, schema=PROMPT_SET_SCHEMA.with_metadata(meta))
    return PromptSetRead(table, rows_read, empty, dupes, delim)


def read_prompt_set(path: str | Path) -> pa.Table:
    """`load_prompt_set(path).table`: prompt_id, text, source, source_row, mem_type, linked_uri,
    linked_id, mean_sscd, max_sscd, planted. `source_row` is the 0-based data row in the file."""
    return load_prompt_set(path).table
