"""Where images come from: a folder, a manifest (CSV/Parquet), or img2dataset webdataset shards.

Each source is a `ray.data.Dataset` with the same columns (`SOURCE_SCHEMA`), so validation and the
model stages never care where a row came from. Sources only *locate* images: bytes are read and
checked later by `images.validate_batch`, in parallel, where a bad file becomes an error row.
The one exception is a webdataset shard, whose bytes can only be had by streaming the tar; a shard
that is truncated or corrupt yields rows with `error` already set, and validation keeps that error.

The ingest engine (jobs/ingest.py) reads the same sources by shard instead (`list_shards`,
`read_shards`, `shard_dataset` at the end of this file): a tar, a chunk of a folder's sorted image
list, or a range of a manifest's rows, each with a stable id the ingest ledger records.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow as pa
import ray.data

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"  # NAME.mask.png: a precomputed foreground mask for NAME.<ext>
CAPTION_SUFFIX = ".txt"
# Source tasks read files and parse small sidecars: I/O-bound, so they reserve a quarter core and
# leave the CPUs to the model actors (a fixed-size actor pool that cannot get its CPUs would wait
# forever behind them on a small machine).
SOURCE_TASK_CPUS = 0.25
MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")

SOURCE_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("source_id", pa.string()),
        ("caption", pa.string()),
        ("image_bytes", pa.binary()),  # null: validation reads source_uri
        ("mask_uri", pa.string()),
        ("mask_bytes", pa.binary()),  # null: validation reads mask_uri when set
        ("error", pa.string()),  # set only when the source itself failed (corrupt shard)
    ]
)
GENERATION_FIELDS = [("prompt", pa.string()), ("seed", pa.int64()), ("sample", pa.int64())]
GENERATION_SCHEMA = pa.schema(list(SOURCE_SCHEMA) + [pa.field(n, t) for n, t in GENERATION_FIELDS])

# manifest columns and the types they are read as (ids stay strings: "007" is not 7)
_MANIFEST_TYPES: dict[str, pa.DataType] = {
    "uri": pa.string(),
    "caption": pa.string(),
    "mask_uri": pa.string(),
    "id": pa.string(),
    "prompt": pa.string(),
    "seed": pa.int64(),
    "sample": pa.int64(),
}

SourceKind = Literal["auto", "folder", "manifest", "webdataset"]


def _has_scheme(uri: str) -> bool:
    head = uri.split("/", 1)[0]
    return head.endswith(":") and uri[len(head) : len(head) + 2] == "//" and len(head) > 2


def _resolve(uri: str | None, base: str) -> str | None:
    """A manifest's relative uri is relative to the manifest's folder (so a manifest travels with its
    images); absolute paths and URLs are kept as they are."""
    if uri is None:
        return None
    uri = uri.strip()
    if not uri or _has_scheme(uri) or os.path.isabs(uri):
        return uri
    if _has_scheme(base):
        return base.rstrip("/") + "/" + uri
    return os.path.normpath(os.path.join(base, uri))


def _open_binary(path: str) -> IO[bytes]:
    if _has_scheme(path) and not path.lower().startswith("file://"):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        return fs.open_input_stream(inner)
    if path.lower().startswith("file://"):
        path = path[len("file://") :]
    return open(path, "rb")


# ---------------------------------------------------------------------------------------------- folder


@dataclass
class FolderListing:
    """One pass over a folder tree: images, their sidecars, and any tar shards (for `auto`)."""

    root: str
    images: list[str] = field(default_factory=list)
    masks: set[str] = field(default_factory=set)
    captions: set[str] = field(default_factory=set)
    tars: list[str] = field(default_factory=list)


def list_folder(path: str | Path) -> FolderListing:
    """Walk a folder once (names only, no reads): fine for millions of files on the driver.

    Hidden files and folders (leading '.') are skipped: they are tool debris (.ipynb_checkpoints,
    ._resource forks), not corpus images. Files with an image extension are listed whatever their
    content, so a garbage `x.jpg` reaches validation and becomes an error row.
    """
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise ValueError(f"not a folder: {path}")
    listing = FolderListing(root=root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            lower = name.lower()
            if lower.endswith(MASK_SUFFIX):
                listing.masks.add(full[: -len(MASK_SUFFIX)])
            elif lower.endswith(IMAGE_EXTENSIONS):
                listing.images.append(full)
            elif lower.endswith(CAPTION_SUFFIX):
                listing.captions.add(full[: -len(CAPTION_SUFFIX)])
            elif lower.endswith(".tar"):
                listing.tars.append(full)
    return listing


def _read_captions(batch: pa.Table) -> pa.Table:
    """Caption sidecars are read in Ray tasks, not on the driver: a million small reads add up."""
    captions = []
    for path in batch.column("_caption_path").to_pylist():
        text = None
        if path:
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", errors="replace").strip() or None
            except OSError:
                text = None  # an unreadable caption is not an image error
        captions.append(text)
    batch = batch.set_column(batch.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string()))
    return batch.drop_columns(["_caption_path"])


def _folder_dataset(listing: FolderListing, rows_per_block: int) -> ray.data.Dataset:
    if not listing.images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {listing.root}")
    schema = SOURCE_SCHEMA.append(pa.field("_caption_path", pa.string()))
    blocks = []
    for start in range(0, len(listing.images), rows_per_block):
        chunk = listing.images[start : start + rows_per_block]
        stems = [os.path.splitext(p)[0] for p in chunk]
        n = len(chunk)
        blocks.append(
            pa.table(
                {
                    "source_uri": chunk,
                    "source_id": [os.path.relpath(p, listing.root).replace(os.sep, "/") for p in chunk],
                    "caption": [None] * n,
                    "image_bytes": [None] * n,
                    "mask_uri": [s + MASK_SUFFIX if s in listing.masks else None for s in stems],
                    "mask_bytes": [None] * n,
                    "error": [None] * n,
                    "_caption_path": [s + CAPTION_SUFFIX if s in listing.captions else None for s in stems],
                },
                schema=schema,
            )
        )
    ds = ray.data.from_arrow(blocks)
    return ds.map_batches(_read_captions, batch_format="pyarrow", batch_size=None, num_cpus=SOURCE_TASK_CPUS)


def folder_source(path: str | Path, *, rows_per_block: int = 1000) -> ray.data.Dataset:
    """Images under a folder (recursive) with `NAME.txt` captions and `NAME.mask.png` masks.

    `source_id` is the path relative to the folder. Rows go to Ray in blocks of `rows_per_block`
    paths, so validation runs as that many parallel tasks.
    """
    return _folder_dataset(list_folder(path), rows_per_block)


# -------------------------------------------------------------------------------------------- manifest


def _manifest_columns(path: str) -> list[str]:
    """Column names from the header/schema only, so a bad manifest fails before any Ray work."""
    lower = path.lower()
    if lower.endswith(".csv"):
        try:
            with _open_binary(path) as f:
                head = f.read(1 << 16).decode("utf-8-sig", errors="replace")
        except (OSError, FileNotFoundError) as exc:
            raise ValueError(f"cannot read manifest {path}: {exc}") from None
        first = next(csv.reader(io.StringIO(head)), None)
        if not first:
            raise ValueError(f"manifest {path} is empty (no header line)")
        return [c.strip() for c in first]
    import pyarrow.dataset as pads

    try:
        return list(pads.dataset(path, format="parquet").schema.names)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"cannot read manifest {path}: {exc}") from None


def _manifest_to_rows(batch: pa.Table, *, base: str, generations: bool) -> pa.Table:
    n = batch.num_rows
    names = set(batch.column_names)

    def col(name: str) -> list[Any]:
        if name not in names:
            return [None] * n
        return batch.column(name).cast(_MANIFEST_TYPES[name]).to_pylist()

    uris = [_resolve(u, base) or "" for u in col("uri")]
    columns: dict[str, Any] = {
        "source_uri": uris,
        "source_id": col("id"),
        "caption": col("caption"),
        "image_bytes": [None] * n,
        "mask_uri": [_resolve(u, base) or None for u in col("mask_uri")],
        "mask_bytes": [None] * n,
        "error": [None if u else "missing uri in manifest row" for u in uris],
    }
    schema = SOURCE_SCHEMA
    if generations:
        columns.update(prompt=col("prompt"), seed=col("seed"), sample=col("sample"))
        schema = GENERATION_SCHEMA
    return pa.table(columns, schema=schema)


def manifest_source(path: str | Path, *, generations: bool = False) -> ray.data.Dataset:
    """Rows of a CSV or Parquet manifest: `uri` (required), optional `caption`, `mask_uri`, `id`.

    With `generations=True` (images made elsewhere for a prompt) `prompt` is required and `seed`,
    `sample` are optional. Relative uris resolve against the manifest's folder.
    """
    path = str(path)
    local = not _has_scheme(path)
    if local:
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise ValueError(f"manifest not found: {path}: check the path")
    columns = _manifest_columns(path)
    required = ["uri", "prompt"] if generations else ["uri"]
    for name in required:
        if name not in columns:
            raise ValueError(
                f"manifest {path} has no required column {name!r} (columns: {', '.join(columns) or 'none'}): "
                f"add a {name!r} column with {'the path or URL' if name == 'uri' else 'the ' + name} of each image"
            )
    base = posixpath.dirname(path) if not local else os.path.dirname(path)
    if path.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        ds = ray.data.read_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={k: v for k, v in _MANIFEST_TYPES.items() if k in columns},
                strings_can_be_null=True,
            ),
        )
    else:
        wanted = [c for c in _MANIFEST_TYPES if c in columns]
        ds = ray.data.read_parquet(path).select_columns(wanted)
    return ds.map_batches(
        _manifest_to_rows,
        batch_format="pyarrow",
        fn_kwargs={"base": base, "generations": generations},
        num_cpus=SOURCE_TASK_CPUS,
    )


# ------------------------------------------------------------------------------------------ webdataset

_WDS_CHUNK_ROWS = 256


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    dirname, base = posixpath.split(name)
    key, _, suffix = base.partition(".")
    return (posixpath.join(dirname, key) if dirname else key), suffix.lower()


def _sample_row(shard: str, key: str, members: dict[str, bytes]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "source_uri": f"{shard}#{key}",
        "source_id": key,
        "caption": None,
        "image_bytes": None,
        "mask_uri": None,
        "mask_bytes": members.get(MASK_SUFFIX[1:]),
        "error": None,
    }
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, ValueError):
            meta = {}  # broken metadata does not make the image bad
    for id_field in ("key", "url"):
        if meta.get(id_field):
            row["source_id"] = str(meta[id_field])
            break
    if "txt" in members:
        row["caption"] = members["txt"].decode("utf-8", errors="replace").strip() or None
    elif isinstance(meta.get("caption"), str):
        row["caption"] = meta["caption"].strip() or None
    for ext in IMAGE_EXTENSIONS:
        if ext[1:] in members:
            row["image_bytes"] = members[ext[1:]]
            break
    else:
        row["error"] = f"webdataset sample has no image member (members: {', '.join(sorted(members))})"
    return row


def iter_shard(shard: str) -> Iterator[dict[str, Any]]:
    """Stream one tar shard into source rows; a corrupt/truncated shard ends with error row(s).

    Samples finished before the damage are kept; the sample being read when the tar broke (or
    the whole shard, if it cannot be opened) becomes an error row naming the shard and the reason.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with _open_binary(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member_key, suffix = _split_member(info.name)
                if member_key != key:
                    if key is not None:
                        yield _sample_row(shard, key, members)
                    key, members = member_key, {}
                extracted = tar.extractfile(info)
                members[suffix] = extracted.read() if extracted is not None else b""
        if key is not None:
            yield _sample_row(shard, key, members)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, FileNotFoundError):
            reason = "file not found"
        yield {
            "source_uri": f"{shard}#{key}" if key is not None else shard,
            "source_id": key,
            "caption": None,
            "image_bytes": None,
            "mask_uri": None,
            "mask_bytes": None,
            "error": f"corrupt or truncated webdataset shard {shard}: {reason}",
        }


def _read_shards(batch: pa.Table) -> Iterator[pa.Table]:
    for shard in batch.column("shard").to_pylist():
        rows: list[dict[str, Any]] = []
        for row in iter_shard(shard):
            rows.append(row)
            if len(rows) >= _WDS_CHUNK_ROWS:
                yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


def _shard_paths(paths: str | Path | Sequence[str | Path]) -> list[str]:
    if isinstance(paths, (str, Path)):
        p = str(paths)
        if not _has_scheme(p) and os.path.isdir(p):
            return list_folder(p).tars
        if any(ch in p for ch in "*?["):
            return sorted(os.path.abspath(x) for x in glob.glob(p, recursive=True))
        return [p if _has_scheme(p) else os.path.abspath(p)]
    return [str(x) if _has_scheme(str(x)) else os.path.abspath(x) for x in paths]


def webdataset_source(paths: str | Path | Sequence[str | Path]) -> ray.data.Dataset:
    """img2dataset-style tar shards: members KEY.jpg|png|webp, KEY.txt, KEY.json, KEY.mask.png.

    Not `ray.data.read_webdataset`: with `decoder=None` it does give raw member bytes, but a
    truncated tar raises inside its read task and fails the whole dataset. Here one Ray task
    streams one shard with stdlib tarfile and turns damage into error rows.
    `source_id` is the json `key` (else its `url`, else the tar member key).
    """
    shards = _shard_paths(paths)
    if not shards:
        raise ValueError(f"no .tar shards found in {paths}")
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    return ds.map_batches(_read_shards, batch_format="pyarrow", batch_size=1, num_cpus=SOURCE_TASK_CPUS)


# -------------------------------------------------------------------------------------------- dispatch


def _dispatch(src: str | Path, kind: SourceKind) -> tuple[str, Any]:
    """What `src` is: ("folder", FolderListing) | ("manifest", path) | ("webdataset", tar paths).

    A folder holding only tar shards is a webdataset; a folder of images a folder source; a
    folder holding both is ambiguous and must be given an explicit `kind`.
    """
    s = str(src)
    if kind == "folder":
        return "folder", list_folder(s)
    if kind == "manifest":
        return "manifest", s
    if kind == "webdataset":
        return "webdataset", s
    if kind != "auto":
        raise ValueError(f"unknown source kind {kind!r}: use auto, folder, manifest or webdataset")
    lower = s.lower()
    if lower.endswith(MANIFEST_EXTENSIONS):
        return "manifest", s
    if lower.endswith(".tar") or (any(ch in s for ch in "*?[") and ".tar" in lower):
        return "webdataset", s
    if _has_scheme(s):
        raise ValueError(f"cannot tell what {s} is: pass kind= manifest or webdataset")
    if not os.path.exists(s):
        raise ValueError(f"source not found: {s}: give a folder of images, a .csv/.parquet manifest or .tar shards")
    if not os.path.isdir(s):
        raise ValueError(f"cannot tell what {s} is (not a folder, .csv, .parquet or .tar): pass kind=")
    listing = list_folder(s)
    if listing.tars and listing.images:
        raise ValueError(
            f"folder {s} holds both images ({len(listing.images)}) and tar shards ({len(listing.tars)}): "
            "pass kind='folder' or kind='webdataset'"
        )
    if listing.tars:
        return "webdataset", listing.tars
    return "folder", listing


def open_source(
    src: str | Path, kind: SourceKind = "auto", *, generations: bool = False, **kwargs: Any
) -> ray.data.Dataset:
    """Dispatch on what `src` is (see `_dispatch`): a manifest file, a tar shard (or glob), or a
    folder. The ingest engine reads the same sources by shard instead (`list_shards`)."""
    what, found = _dispatch(src, kind)
    if what == "folder":
        return _folder_dataset(found, kwargs.get("rows_per_block", 1000))
    if what == "manifest":
        return manifest_source(found, generations=generations)
    return webdataset_source(found)


# ---------------------------------------------------------------------------------------------- shards
# The ingest engine's unit of work (jobs/ingest.py, DESIGN.md "Running at corpus scale"): a source
# is cut into shards; one Ray task reads one shard; the ledger marks a shard done once all its rows
# are committed, so a rerun skips it without reading it, and a crash redoes only unfinished shards.

SHARD_END = "\x00fbmem:shard-end"  # the `error` of the marker row that closes each shard's rows
# Columns every shard row carries: the shard, the row's place in its source file (`_pos`: a
# manifest's data row, 0-based, header not counted; a tar's sample index; a folder's index in its
# sorted file list), on the marker row only how many rows the shard had (the driver counts a shard's
# rows back to it), and the file `_pos` counts in (`_source`: the manifest, the tar, the folder).
SHARD_FIELDS = [pa.field("_shard", pa.string()), pa.field("_pos", pa.int64()), pa.field("_shard_rows", pa.int64()),
                pa.field("_source", pa.string())]
_SHARD_CHUNK_ROWS = 256  # rows per block a read task yields


@dataclass(frozen=True)
class Shard:
    """One shard of a source. `spec` is what its read task needs (JSON); `shard_id` hashes what
    identifies its content: a tar's path; a folder chunk's root and file names; a manifest's path,
    row range, size and modification time (an edited manifest is a new one: its shards are new,
    and the key check still skips the images already stored). `label` is the short form the
    ledger keeps."""

    shard_id: str
    kind: str
    source: str
    spec: dict[str, Any]
    label: dict[str, Any]


def _make_shard(kind: str, source: str, identity: dict[str, Any], spec: dict[str, Any], label: dict[str, Any]) -> Shard:
    from fbmem.storage.keys import stable_hash

    return Shard(stable_hash("fbmem-shard-v1", kind, identity), kind, source, spec, label)


def _folder_shards(listing: FolderListing, source: str, files_per_shard: int) -> list[Shard]:
    if not listing.images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {listing.root}")
    from fbmem.storage.keys import stable_hash

    shards = []
    for start in range(0, len(listing.images), files_per_shard):
        chunk = listing.images[start : start + files_per_shard]
        rel = [os.path.relpath(p, listing.root).replace(os.sep, "/") for p in chunk]
        stems = [os.path.splitext(p)[0] for p in chunk]
        spec = {"root": listing.root, "start": start, "files": rel, "masks": [s in listing.masks for s in stems],
                "captions": [s in listing.captions for s in stems]}
        identity = {"root": listing.root, "files": stable_hash(rel)}
        label = {"root": listing.root, "first": rel[0], "last": rel[-1], "files": len(rel)}
        shards.append(_make_shard("folder", source, identity, spec, label))
    return shards


def _file_fingerprint(path: str) -> dict[str, Any]:
    if _has_scheme(path) and not path.lower().startswith("file://"):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        info = fs.get_file_info(inner)
        mtime = info.mtime_ns if info.mtime is not None else None
        return {"size": info.size, "mtime_ns": mtime}
    st = os.stat(path[len("file://") :] if path.lower().startswith("file://") else path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _csv_options(columns: list[str]):
    import pyarrow.csv as pacsv

    wanted = [c for c in _MANIFEST_TYPES if c in columns]
    return (
        pacsv.ParseOptions(newlines_in_values=True),
        pacsv.ConvertOptions(column_types={c: _MANIFEST_TYPES[c] for c in wanted}, strings_can_be_null=True,
                             include_columns=wanted),
    )


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    if _has_scheme(path) and not path.lower().startswith("file://"):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        return pq.ParquetFile(fs.open_input_file(inner))
    return pq.ParquetFile(path[len("file://") :] if path.lower().startswith("file://") else path)


def _manifest_row_count(path: str, columns: list[str]) -> int:
    """Rows of a manifest: Parquet from its footer; CSV by one streaming parse of the first known
    column (constant memory, the same parser the read tasks use, so the counts agree)."""
    if not path.lower().endswith(".csv"):
        return _parquet_file(path).metadata.num_rows
    import pyarrow.csv as pacsv

    parse, convert = _csv_options(columns)
    convert.include_columns = convert.include_columns[:1]
    n = 0
    with _open_binary(path) as f:
        for batch in pacsv.open_csv(f, parse_options=parse, convert_options=convert):
            n += batch.num_rows
    return n


def _manifest_range(path: str, columns: list[str], start: int, stop: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of a manifest. Parquet reads only the row groups that overlap; CSV parses
    from the top and drops the rows before `start` (use Parquet for manifests of many shards)."""
    if path.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        parse, convert = _csv_options(columns)
        pos = 0
        with _open_binary(path) as f:
            for batch in pacsv.open_csv(f, parse_options=parse, convert_options=convert):
                lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
                if hi > lo:
                    yield pa.Table.from_batches([batch.slice(lo, hi - lo)])
                pos += batch.num_rows
                if pos >= stop:
                    return
        return
    pf = _parquet_file(path)
    wanted = [c for c in _MANIFEST_TYPES if c in columns]
    pos = 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        lo, hi = max(start - pos, 0), min(stop - pos, n)
        if hi > lo:
            yield pf.read_row_group(i, columns=wanted).slice(lo, hi - lo)
        pos += n
        if pos >= stop:
            return


def _manifest_shards(path: str, source: str, generations: bool, rows_per_shard: int) -> list[Shard]:
    local = not _has_scheme(path)
    if local:
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise ValueError(f"manifest not found: {path}: check the path")
    columns = _manifest_columns(path)
    for name in (["uri", "prompt"] if generations else ["uri"]):
        if name not in columns:
            raise ValueError(
                f"manifest {path} has no required column {name!r} (columns: {', '.join(columns) or 'none'}): "
                f"add a {name!r} column with {'the path or URL' if name == 'uri' else 'the ' + name} of each image"
            )
    n = _manifest_row_count(path, columns)
    fingerprint = _file_fingerprint(path)
    shards = []
    for start in range(0, n, rows_per_shard):
        stop = min(n, start + rows_per_shard)
        spec = {"path": path, "columns": columns, "start": start, "stop": stop}
        identity = {"path": path, "start": start, "stop": stop, **fingerprint}
        label = {"path": path, "start": start, "stop": stop}
        shards.append(_make_shard("manifest", source, identity, spec, label))
    return shards


def _webdataset_shards(paths: str | Path | Sequence[str | Path], source: str) -> list[Shard]:
    tars = _shard_paths(paths)
    if not tars:
        raise ValueError(f"no .tar shards found in {paths}")
    return [_make_shard("webdataset", source, {"tar": t}, {"tar": t}, {"tar": t}) for t in tars]


def list_shards(
    src: str | Path,
    kind: SourceKind = "auto",
    *,
    generations: bool = False,
    files_per_shard: int = 1000,
    rows_per_shard: int = 10_000,
) -> list[Shard]:
    """The shards of a source (names and sizes only, nothing is read but a manifest's rows count):
    a webdataset is one shard per .tar; a folder its sorted image list in chunks of
    `files_per_shard`; a manifest its rows in ranges of `rows_per_shard`. Same dispatch and errors
    as `open_source`."""
    what, found = _dispatch(src, kind)
    if what == "folder":
        return _folder_shards(found, str(src), files_per_shard)
    if what == "manifest":
        return _manifest_shards(found, str(src), generations, rows_per_shard)
    return _webdataset_shards(found, str(src))


def _folder_chunks(spec: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    root, files = spec["root"], spec["files"]
    for start in range(0, len(files), _SHARD_CHUNK_ROWS):
        rows = []
        for i in range(start, min(start + _SHARD_CHUNK_ROWS, len(files))):
            path = os.path.join(root, *files[i].split("/"))
            stem = os.path.splitext(path)[0]
            caption = None
            if spec["captions"][i]:
                try:
                    with open(stem + CAPTION_SUFFIX, "rb") as f:
                        caption = f.read().decode("utf-8", errors="replace").strip() or None
                except OSError:
                    caption = None  # an unreadable caption is not an image error
            rows.append({"source_uri": path, "source_id": files[i], "caption": caption, "image_bytes": None,
                         "mask_uri": stem + MASK_SUFFIX if spec["masks"][i] else None, "mask_bytes": None,
                         "error": None})
        yield rows


def _shard_tables(kind: str, spec: dict[str, Any], schema: pa.Schema, generations: bool) -> Iterator[tuple[pa.Table, int]]:
    """(source rows, position of the first) per chunk of one shard, in `schema`."""
    if kind == "folder":
        pos = spec.get("start", 0)
        for rows in _folder_chunks(spec):
            yield pa.Table.from_pylist(rows, schema=schema), pos
            pos += len(rows)
    elif kind == "webdataset":
        rows, pos = [], 0
        for row in iter_shard(spec["tar"]):
            rows.append(row)
            if len(rows) >= _SHARD_CHUNK_ROWS:
                yield pa.Table.from_pylist(rows, schema=schema), pos
                pos += len(rows)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=schema), pos
    elif kind == "manifest":
        path = spec["path"]
        base = os.path.dirname(path) if not _has_scheme(path) else posixpath.dirname(path)
        pos = spec["start"]
        for part in _manifest_range(path, spec["columns"], spec["start"], spec["stop"]):
            out = _manifest_to_rows(part, base=base, generations=generations)
            yield out.cast(schema) if out.schema != schema else out, pos
            pos += out.num_rows
    else:
        raise ValueError(f"unknown shard kind {kind!r}")


def read_shards(batch: pa.Table, *, generations: bool = False) -> Iterator[pa.Table]:
    """Ray task (`map_batches`, batch_size=1): the rows of each shard in `batch`, with the shard
    columns (`SHARD_FIELDS`), then one marker row (`error` = SHARD_END, `_shard_rows` = the count)."""
    base = GENERATION_SCHEMA if generations else SOURCE_SCHEMA
    schema = pa.schema(list(base) + SHARD_FIELDS)
    plain = pa.schema(list(base))
    for shard_id, kind, spec_json in zip(
        batch.column("shard_id").to_pylist(), batch.column("kind").to_pylist(), batch.column("spec").to_pylist()
    ):
        n = 0
        spec = json.loads(spec_json)
        source = spec.get("path") or spec.get("tar") or spec.get("root")
        for table, pos in _shard_tables(kind, spec, plain, generations):
            k = table.num_rows
            table = table.append_column(SHARD_FIELDS[0], pa.array([shard_id] * k, pa.string()))
            table = table.append_column(SHARD_FIELDS[1], pa.array(range(pos, pos + k), pa.int64()))
            table = table.append_column(SHARD_FIELDS[2], pa.nulls(k, pa.int64()))
            yield table.append_column(SHARD_FIELDS[3], pa.array([source] * k, pa.string()))
            n += k
        marker = {name: None for name in schema.names}
        marker.update(error=SHARD_END, _shard=shard_id, _shard_rows=n, _source=source)
        yield pa.Table.from_pylist([marker], schema=schema)


def shard_dataset(shards: Sequence[Shard], *, generations: bool = False) -> ray.data.Dataset:
    """The rows of `shards` as a Ray Data stream: one read task per shard."""
    items = [{"shard_id": s.shard_id, "kind": s.kind, "spec": json.dumps(s.spec)} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(read_shards, fn_kwargs={"generations": generations}, batch_format="pyarrow",
                          batch_size=1, num_cpus=SOURCE_TASK_CPUS)
