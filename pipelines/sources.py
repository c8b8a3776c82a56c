"""Where images come from: a folder, a manifest (CSV/Parquet), or img2dataset webdataset shards.

Each source is a `ray.data.Dataset` with the same columns (`SOURCE_SCHEMA`), so validation and the
model stages never care where a row came from. Sources only *locate* images: bytes are read and
checked later by `images.validate_batch`, in parallel, where a bad file becomes an error row.
The one exception is a webdataset shard, whose bytes can only be had by streaming the tar; a shard
that is truncated or corrupt yields rows with `error` already set, and validation keeps that error.
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
            raise ValueError(f"manifest not found: {path}")
    columns = _manifest_columns(path)
    required = ["uri", "prompt"] if generations else ["uri"]
    for name in required:
        if name not in columns:
            raise ValueError(
                f"manifest {path} has no required column {name!r} (columns: {', '.join(columns) or 'none'})"
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


def open_source(
    src: str | Path, kind: SourceKind = "auto", *, generations: bool = False, **kwargs: Any
) -> ray.data.Dataset:
    """Dispatch on what `src` is: a manifest file, a tar shard (or glob), or a folder.

    A folder holding only tar shards is a webdataset; a folder of images a folder source; a
    folder holding both is ambiguous and must be given an explicit `kind`.
    """
    s = str(src)
    if kind == "folder":
        return folder_source(s, **kwargs)
    if kind == "manifest":
        return manifest_source(s, generations=generations, **kwargs)
    if kind == "webdataset":
        return webdataset_source(s)
    if kind != "auto":
        raise ValueError(f"unknown source kind {kind!r}: use auto, folder, manifest or webdataset")
    lower = s.lower()
    if lower.endswith(MANIFEST_EXTENSIONS):
        return manifest_source(s, generations=generations, **kwargs)
    if lower.endswith(".tar") or (any(ch in s for ch in "*?[") and ".tar" in lower):
        return webdataset_source(s)
    if _has_scheme(s):
        raise ValueError(f"cannot tell what {s} is: pass kind= manifest or webdataset")
    if not os.path.exists(s):
        raise ValueError(f"source not found: {s}")
    if not os.path.isdir(s):
        raise ValueError(f"cannot tell what {s} is (not a folder, .csv, .parquet or .tar): pass kind=")
    listing = list_folder(s)
    if listing.tars and listing.images:
        raise ValueError(
            f"folder {s} holds both images ({len(listing.images)}) and tar shards ({len(listing.tars)}): "
            "pass kind='folder' or kind='webdataset'"
        )
    if listing.tars:
        return webdataset_source(listing.tars)
    return _folder_dataset(listing, kwargs.get("rows_per_block", 1000))
