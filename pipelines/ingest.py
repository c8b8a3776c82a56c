"""The ingest pipelines: a source of images (or prompts) -> validated, embedded, masked rows.

Shape (Ray Data, one streaming pass):
    source rows -> validate (tasks) -> drop keys already stored (tasks) -> given masks or SAM
    (actors, eager only) -> CLIP (actors) -> the driver upserts good rows and error rows.
Bad rows are carried through the stream with `error` set instead of being dropped, so one pass
yields both the table rows and the error rows, and every good row is kept whatever fails next
to it. Keys already in the table are dropped *before* the model stages, so a rerun or a resumed
scan pays only for new images.
"""
from __future__ import annotations

import logging
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray

from fbmem.jobs.config import Config
from fbmem.pipelines.actors import actor_kwargs
from fbmem.pipelines.images import validate_batch
from fbmem.pipelines.masks import encode_mask_png, fg_fraction, mask_from_file_bytes
from fbmem.pipelines.prompt_sets import prompt_id
from fbmem.storage.schema import now_utc

log = logging.getLogger(__name__)

Target = Literal["training", "generations"]
TABLE_OF: dict[str, str] = {"training": "training_images", "generations": "generations"}
# The stages an error reason may name by its prefix ("clip: ..."); any other reason is validation's.
ERROR_STAGES = ("mask", "clip", "sam")


def drop_existing(batch: pa.Table, existing_ref, counter) -> pa.Table:
    """Drop good rows whose image_id is already stored (error rows always pass: they are news)."""
    existing = _cached_get(existing_ref)
    if not existing or batch.num_rows == 0:
        return batch
    ids = batch.column("image_id").to_pylist()
    errs = batch.column("error").to_pylist()
    keep = [e is not None or i not in existing for i, e in zip(ids, errs)]
    dropped = len(keep) - sum(keep)
    if dropped:
        counter.add.remote(dropped)
    return batch.filter(pa.array(keep))


_REF_CACHE: dict[str, object] = {}


def _cached_get(ref):
    """One `ray.get` per worker process for the (possibly large) set of stored keys."""
    key = ref.hex()
    if key not in _REF_CACHE:
        _REF_CACHE.clear()
        _REF_CACHE[key] = ray.get(ref)
    return _REF_CACHE[key]


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


def build_image_stream(
    ds: ray.data.Dataset, cfg: Config, existing: set[str], counter, masks: str
) -> ray.data.Dataset:
    """The lazy Ray Data plan from source rows to embedded, masked rows (nothing runs yet)."""
    from fbmem.pipelines.clip_embedder import ClipImageEmbedder
    from fbmem.pipelines.sam_segmenter import SamSegmenter

    ing = cfg.ingest
    ds = ds.map_batches(
        validate_batch,
        fn_kwargs=dict(max_pixels=ing.max_pixels, min_side=ing.min_side, timeout_s=ing.http_timeout_s),
        batch_format="pyarrow",
        batch_size=32,
        num_cpus=cfg.resources.decode_num_cpus,
    )
    existing_ref = ray.put(existing)
    ds = ds.map_batches(
        drop_existing,
        fn_kwargs=dict(existing_ref=existing_ref, counter=counter),
        batch_format="pyarrow",
        num_cpus=cfg.resources.decode_num_cpus,
    )
    cfg_json = cfg.to_json()
    if masks == "eager":
        ds = ds.map_batches(SamSegmenter, fn_constructor_args=(cfg_json,), **actor_kwargs(cfg.resources.segment))
    else:
        ds = ds.map_batches(apply_given_masks, batch_format="pyarrow", num_cpus=cfg.resources.decode_num_cpus)
    ds = ds.map_batches(ClipImageEmbedder, fn_constructor_args=(cfg_json,), **actor_kwargs(cfg.resources.embed))
    return ds


def _col(batch: pa.Table, name: str, typ: pa.DataType | None = None) -> pa.Array | pa.ChunkedArray:
    if name in batch.column_names:
        return batch.column(name)
    return pa.nulls(batch.num_rows, type=typ or pa.string())


def image_rows(batch: pa.Table, target: Target, cfg: Config, run_id: str) -> pa.Table:
    """Good stream rows -> rows of `training_images` or `generations` (schema conformed later)."""
    n = batch.num_rows
    ts = pa.array([now_utc()] * n, type=pa.timestamp("us", tz="UTC"))
    image_bytes = _col(batch, "image_bytes", pa.binary()) if cfg.ingest.store_image_bytes else pa.nulls(n, pa.binary())
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
