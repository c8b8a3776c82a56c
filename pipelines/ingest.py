"""The ingest pipelines: shards of a source -> validated, embedded, masked rows, written by the workers.

Shape (Ray Data, one streaming pass per group of shards; jobs/ingest.py plans and commits):
    shard read tasks (sources.read_shards) -> validate (tasks) -> key check against the stored
    table (tasks) -> given masks or SAM (actors, eager only) -> CLIP (actors) -> fragment writer
    (tasks: good rows -> Lance data files of `training_images`/`generations`, and for training every
    good or already-stored source row -> data files of `training_sources`; bad rows -> `errors`
    rows) -> the driver, which receives fragment metadata and per-shard counts, never rows.
Bad rows are carried through the stream with `error` set instead of being dropped, so one pass
yields the table rows, the error rows and the counts, and every good row is kept whatever fails
next to it. Two kinds of rows only pass through: a row the key check found stored becomes a
`SKIPPED` row (its bytes dropped, so the model stages pass it by), and each shard ends with a
marker row (`sources.SHARD_END`) that carries its row count. Keys already stored are dropped
*before* the model stages, so a resumed shard pays only for its new images.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray

from fbmem.jobs.config import Config
from fbmem.pipelines.actors import actor_kwargs
from fbmem.pipelines.images import validate_batch
from fbmem.pipelines.masks import encode_mask_png, fg_fraction, mask_from_file_bytes
from fbmem.pipelines.prompt_sets import prompt_id
from fbmem.pipelines.sources import SHARD_END, Shard, shard_dataset
from fbmem.storage.database import vector_dim
from fbmem.storage.errors import error_rows, stage_of
from fbmem.storage.fragments import (
    duplicate_keys,
    remove_duplicates,
    stored_rows,
    write_fragments,
)
from fbmem.storage.keys import stable_hash
from fbmem.storage.schema import conform, now_utc, schema_for

log = logging.getLogger(__name__)

Target = Literal["training", "generations"]
TABLE_OF: dict[str, str] = {"training": "training_images", "generations": "generations"}
KEY_OF: dict[str, str] = {"training": "image_id", "generations": "generation_id"}
# The stages an error reason may name by its prefix ("clip: ..."); any other reason is validation's.
ERROR_STAGES = ("mask", "clip", "sam")
SKIPPED = "\x00fbmem:stored"  # the `error` of a row the key check found stored (never an error row)
CONTROL = (SKIPPED, SHARD_END)

SHARD_COUNTS = pa.struct(
    [("shard", pa.string()), ("rows", pa.int64()), ("written", pa.int64()), ("skipped", pa.int64()),
     ("errors", pa.int64()), ("duplicates", pa.int64()), ("total", pa.int64()), ("sources", pa.int64())]
)
# What a write task returns to the driver: metadata and counts only.
WRITE_RESULT = pa.schema(
    [
        ("fragments", pa.list_(pa.string())),  # FragmentMetadata JSON, to commit
        ("source_fragments", pa.list_(pa.string())),  # the same, of `training_sources`
        ("dim", pa.int32()),  # the embedding dimension of the written rows (null: none written)
        ("written", pa.int64()),
        ("errors", pa.binary()),  # `errors` rows as an Arrow IPC stream (null: none)
        ("shards", pa.list_(SHARD_COUNTS)),
    ]
)


@dataclass(frozen=True)
class WritePlan:
    """What the key check and the writer on the workers need to know (shipped with the tasks)."""

    target: str
    table: str
    uri: str  # the table's Lance dataset (it may not exist yet)
    key: str
    order: str  # the timestamp column: the newest copy of a key is kept (storage/fragments.py)
    model_id: str
    masks: str  # eager: a stored row counts only with a mask
    job: str
    run_id: str
    store_image_bytes: bool = True
    storage_options: dict[str, str] | None = None
    data_storage_version: str | None = None  # the existing dataset's, so appends match it
    rows_per_file: int = 1 << 20
    # `training_sources` (training only; None: not written): one row per good or stored source row
    sources_uri: str | None = None
    sources_storage_version: str | None = None


# ------------------------------------------------------------------------------------------ masks


def apply_given_masks(batch: pa.Table) -> pa.Table:
    """Precomputed masks from the source, used as given (lazy mode: no segmenter is loaded).

    A mask that cannot be used (unreadable, wrong size) makes the row an error row, naming the
    mask: a silently dropped mask would be re-segmented by SAM and look like the source's.
    """
    n = batch.num_rows
    given = batch.column("mask_bytes").to_pylist() if "mask_bytes" in batch.column_names else [None] * n
    existing = batch.column("mask_png").to_pylist() if "mask_png" in batch.column_names else [None] * n
    errors = batch.column("error").to_pylist()
    widths = batch.column("width").to_pylist()
    heights = batch.column("height").to_pylist()
    pngs, fracs, models = list(existing), [None] * n, [None] * n
    for i in range(n):
        if errors[i] is not None or given[i] is None or existing[i] is not None:
            continue
        try:
            mask = mask_from_file_bytes(given[i], (widths[i], heights[i]))
            pngs[i], fracs[i], models[i] = encode_mask_png(mask), fg_fraction(mask), "given"
        except Exception as exc:  # noqa: BLE001 - a bad mask is this row's problem only
            errors[i] = f"mask: {exc}"
    out = batch
    for name, arr in (
        ("mask_png", pa.array(pngs, type=pa.binary())),
        ("fg_fraction", pa.array(fracs, type=pa.float32())),
        ("mask_model", pa.array(models, type=pa.string())),
        ("error", pa.array(errors, type=pa.string())),
    ):
        out = _set(out, name, arr)
    return out


def _set(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


# ------------------------------------------------------------------------------------------ stages


def _validate_kwargs(cfg: Config) -> dict[str, Any]:
    """validate_batch's settings: the whole IngestConfig where it takes one, else the limits."""
    if "ingest" in inspect.signature(validate_batch).parameters:
        return {"ingest": cfg.ingest}
    return {"max_pixels": cfg.ingest.max_pixels, "min_side": cfg.ingest.min_side,
            "timeout_s": cfg.ingest.http_timeout_s}


def validated(ds: ray.data.Dataset, cfg: Config) -> ray.data.Dataset:
    return ds.map_batches(validate_batch, fn_kwargs=_validate_kwargs(cfg), batch_format="pyarrow", batch_size=32,
                          num_cpus=cfg.resources.decode_num_cpus)


class _ModelStage:
    """A Ray Data actor whose model class is imported and built inside the actor (`TARGET`, a
    dotted path): the driver plans the stream without importing torch, which it never uses and
    which would cost it ~600 MB of memory."""

    TARGET = ""

    def __init__(self, config_json: str) -> None:
        module, _, name = self.TARGET.rpartition(".")
        self.model = getattr(importlib.import_module(module), name)(config_json)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.model(batch)


class SamStage(_ModelStage):
    TARGET = "fbmem.pipelines.sam_segmenter.SamSegmenter"


class ClipStage(_ModelStage):
    TARGET = "fbmem.pipelines.clip_embedder.ClipImageEmbedder"


def model_stages(ds: ray.data.Dataset, cfg: Config, masks: str) -> ray.data.Dataset:
    """Given masks or SAM (eager), then CLIP: actor pools with the configured resources."""
    cfg_json = cfg.to_json()
    if masks == "eager":
        ds = ds.map_batches(SamStage, fn_constructor_args=(cfg_json,), **actor_kwargs(cfg.resources.segment))
    else:
        ds = ds.map_batches(apply_given_masks, batch_format="pyarrow", num_cpus=cfg.resources.decode_num_cpus)
    return ds.map_batches(ClipStage, fn_constructor_args=(cfg_json,), **actor_kwargs(cfg.resources.embed))


def build_image_stream(
    ds: ray.data.Dataset, cfg: Config, existing: set[str] | None = None, counter=None, masks: str = "lazy"
) -> ray.data.Dataset:
    """Validate and the model stages, with no key check and no writer (bench/ingest.py measures
    this). Stored keys are no longer handed over as a set: the engine checks them on the workers
    (`check_stored`), so `existing` must be empty and `counter` is unused."""
    if existing:
        raise ValueError("build_image_stream no longer drops a set of keys: use jobs.ingest.ingest_images")
    return model_stages(validated(ds, cfg), cfg, masks)


def check_stored(batch: pa.Table, *, plan: WritePlan) -> pa.Table:
    """The key check, on a worker: rows whose key the committed table already holds (same model,
    and a mask when masks are eager) become SKIPPED rows without bytes. One filtered scan per
    batch (`key IN (...)`, answered by the key's BTREE index once the table has one); nothing is
    held between batches. Keys found stored twice (a crash between a commit and its duplicate
    check) are brought back to one row here."""
    errors = batch.column("error").to_pylist()
    ids = batch.column("image_id").to_pylist()
    todo = [i for i in range(batch.num_rows) if errors[i] is None and ids[i] is not None]
    if not todo:
        return batch
    found = stored_rows(plan.uri, plan.key, [ids[i] for i in todo], ["embedding_model", "mask_model"],
                        plan.storage_options)
    if found is None or found.num_rows == 0:
        return batch
    dups = duplicate_keys(found, plan.key)
    if dups:
        remove_duplicates(plan.uri, plan.key, plan.order, dups, plan.storage_options)
    usable = pc.equal(found.column("embedding_model"), plan.model_id)
    if plan.masks == "eager":
        usable = pc.and_(usable, pc.is_valid(found.column("mask_model")))
    stored = set(found.filter(pc.fill_null(usable, False)).column(plan.key).to_pylist())
    hit = [i for i in todo if ids[i] in stored]
    if not hit:
        return batch
    for i in hit:
        errors[i] = SKIPPED
    out = _set(batch, "error", pa.array(errors, pa.string()))
    for name in ("image_bytes", "mask_bytes"):
        if name in out.column_names:
            values = out.column(name).to_pylist()
            for i in hit:
                values[i] = None
            out = _set(out, name, pa.array(values, out.schema.field(name).type))
    return out


def _col(batch: pa.Table, name: str, typ: pa.DataType | None = None) -> pa.Array | pa.ChunkedArray:
    if name in batch.column_names:
        return batch.column(name)
    return pa.nulls(batch.num_rows, type=typ or pa.string())


def image_rows(
    batch: pa.Table, target: Target, cfg: Config | None, run_id: str, *, store_image_bytes: bool | None = None
) -> pa.Table:
    """Good stream rows -> rows of `training_images` or `generations` (schema conformed later).
    Image bytes are kept when `store_image_bytes` (default: `cfg.ingest.store_image_bytes`)."""
    if store_image_bytes is None:
        store_image_bytes = cfg.ingest.store_image_bytes if cfg is not None else True
    n = batch.num_rows
    ts = pa.array([now_utc()] * n, type=pa.timestamp("us", tz="UTC"))
    image_bytes = _col(batch, "image_bytes", pa.binary()) if store_image_bytes else pa.nulls(n, pa.binary())
    cols = {
        "image_sha256": batch.column("image_id"),
        "source_uri": _col(batch, "source_uri"),
        "source_id": pc.cast(_col(batch, "source_id"), pa.string()),
        "width": batch.column("width"),
        "height": batch.column("height"),
        "image_bytes": image_bytes,
        "embedding": batch.column("embedding"),
        "embedding_model": batch.column("embedding_model"),
        "mask_png": _col(batch, "mask_png", pa.binary()),
        "fg_fraction": _col(batch, "fg_fraction", pa.float32()),
        "mask_model": _col(batch, "mask_model"),
        "run_id": pa.array([run_id] * n),
    }
    if target == "training":
        cols = {"image_id": batch.column("image_id"), **cols, "caption": _col(batch, "caption"), "ingested_at": ts}
    else:
        prompts = _col(batch, "prompt").to_pylist()
        cols = {
            "generation_id": batch.column("image_id"),
            "prompt_id": pa.array([prompt_id(p.strip()) if p is not None else None for p in prompts], pa.string()),
            "prompt": pa.array([p.strip() if p is not None else None for p in prompts], pa.string()),
            "seed": pc.cast(_col(batch, "seed", pa.int64()), pa.int64()),
            "sample": pc.cast(_col(batch, "sample", pa.int32()), pa.int32()),
            "model_id": pa.array(["external"] * n),
            "mitigation": pa.array(["none"] * n),
            "alpha": pa.nulls(n, pa.float32()),
            **cols,
            "created_at": ts,
        }
    return pa.table(cols)


def source_row_id(image_id: str, source: str | None, line: int | None) -> str:
    """The key of a `training_sources` row: one (image, source row) pair, the same on every run."""
    return stable_hash("fbmem-source-row-v1", image_id, source, line)


def source_rows(batch: pa.Table, run_id: str) -> pa.Table:
    """Stream rows (good, or found stored by the key check) -> `training_sources` rows: what each
    source row said about its image (uri, caption, id, and where it is listed)."""
    n = batch.num_rows
    ids = batch.column("image_id").to_pylist()
    sources = _col(batch, "_source").to_pylist()
    lines = _col(batch, "_pos", pa.int64()).to_pylist()
    return pa.table({
        "source_row_id": pa.array([source_row_id(ids[i], sources[i], lines[i]) for i in range(n)], pa.string()),
        "image_id": batch.column("image_id"),
        "source_uri": _col(batch, "source_uri"),
        "source": pa.array(sources, pa.string()),
        "line": pa.array(lines, pa.int64()),
        "source_id": pc.cast(_col(batch, "source_id"), pa.string()),
        "caption": _col(batch, "caption"),
        "run_id": pa.array([run_id] * n, pa.string()),
        "ingested_at": pa.array([now_utc()] * n, type=pa.timestamp("us", tz="UTC")),
    })


def error_source_uris(bad: pa.Table) -> list[str | None]:
    """The `source_uri` of error rows: the input's own uri, or for a row that names none (a
    manifest row with an empty uri) its place, `<manifest>#row=<line>` (0-based data row, header
    not counted), which also tells two such rows apart in the error id."""
    uris = _col(bad, "source_uri").to_pylist()
    sources = _col(bad, "_source").to_pylist()
    lines = _col(bad, "_pos", pa.int64()).to_pylist()
    return [u if u or sources[i] is None or lines[i] is None else f"{sources[i]}#row={lines[i]}"
            for i, u in enumerate(uris)]


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def write_output(batch: pa.Table, *, plan: WritePlan) -> pa.Table:
    """The fragment writer, on a worker: good rows -> Lance data files of the target table (one
    row per key: a key twice in the batch is written once), bad rows -> `errors` rows; returns one
    `WRITE_RESULT` row (fragment metadata, error rows, per-shard counts) for the driver."""
    errors = batch.column("error").to_pylist()
    shards = batch.column("_shard").to_pylist()
    counts: dict[str, dict[str, Any]] = {}

    def tally(shard: str, what: str, k: int = 1) -> None:
        c = counts.setdefault(shard, {"shard": shard, "rows": 0, "written": 0, "skipped": 0, "errors": 0,
                                      "duplicates": 0, "total": None, "sources": 0})
        c[what] += k

    good_idx, bad_idx, sourced_idx = [], [], []
    totals = batch.column("_shard_rows").to_pylist()
    for i, err in enumerate(errors):
        if err == SHARD_END:
            tally(shards[i], "rows", 0)
            counts[shards[i]]["total"] = totals[i]
            continue
        tally(shards[i], "rows")
        if err == SKIPPED:
            tally(shards[i], "skipped")
            sourced_idx.append(i)
        elif err is None:
            good_idx.append(i)
            sourced_idx.append(i)
        else:
            bad_idx.append(i)
            tally(shards[i], "errors")

    fragments: list[str] = []
    dim = None
    written = 0
    if good_idx:
        ids = batch.column("image_id").to_pylist()
        seen: set[str] = set()
        keep = []
        for i in good_idx:
            if ids[i] in seen:
                tally(shards[i], "duplicates")
                continue
            seen.add(ids[i])
            keep.append(i)
            tally(shards[i], "written")
        good = batch.take(pa.array(keep, pa.int64()))
        dim = vector_dim(good)
        rows = image_rows(good, plan.target, None, plan.run_id, store_image_bytes=plan.store_image_bytes)
        rows = conform(rows, schema_for(plan.table, dim))
        fragments = write_fragments(rows, plan.uri, schema=rows.schema, storage_options=plan.storage_options,
                                    max_rows_per_file=plan.rows_per_file,
                                    data_storage_version=plan.data_storage_version)
        written = rows.num_rows

    # Every good source row, copies and rows whose image was already stored included: what the
    # source said about its image is kept whatever happens to the image row.
    source_fragments: list[str] = []
    if plan.sources_uri is not None and sourced_idx:
        srows = conform(source_rows(batch.take(pa.array(sourced_idx, pa.int64())), plan.run_id),
                        schema_for("training_sources"))
        source_fragments = write_fragments(srows, plan.sources_uri, schema=srows.schema,
                                           storage_options=plan.storage_options,
                                           max_rows_per_file=plan.rows_per_file,
                                           data_storage_version=plan.sources_storage_version)
        for i in sourced_idx:
            tally(shards[i], "sources")

    err_bytes = None
    if bad_idx:
        bad = batch.take(pa.array(bad_idx, pa.int64()))
        reasons = bad.column("error").to_pylist()
        table = error_rows(
            plan.job, plan.run_id, reasons=reasons, stages=[stage_of(r, ERROR_STAGES, "validate") for r in reasons],
            source_uris=error_source_uris(bad),
            source_ids=pc.cast(_col(bad, "source_id"), pa.string()).to_pylist(),
            positions=bad.column("_pos").to_pylist(),
        )
        err_bytes = _ipc(table)
    return pa.Table.from_pylist(
        [{"fragments": fragments, "source_fragments": source_fragments, "dim": dim, "written": written, "errors": err_bytes,
          "shards": list(counts.values())}],
        schema=WRITE_RESULT,
    )


def build_engine_stream(shards: list[Shard], cfg: Config, plan: WritePlan) -> ray.data.Dataset:
    """The lazy Ray Data plan from `shards` to write results (nothing runs yet)."""
    eng = cfg.engine
    ds = validated(shard_dataset(shards, generations=plan.target == "generations"), cfg)
    ds = ds.map_batches(check_stored, fn_kwargs={"plan": plan}, batch_format="pyarrow",
                        batch_size=eng.check_batch_rows, num_cpus=eng.write_num_cpus)
    ds = model_stages(ds, cfg, plan.masks)
    return ds.map_batches(write_output, fn_kwargs={"plan": plan}, batch_format="pyarrow",
                          batch_size=eng.rows_per_fragment, num_cpus=eng.write_num_cpus)
