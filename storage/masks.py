"""The masks of training images, wherever they are stored: the one reader every job uses.

A training image's mask is in its own `training_images` row when it was masked at ingest (eager
masks, or a mask given by the source), else in `training_masks` when it was segmented later (lazy
masks, backfills: storage/schema.py TRAINING_MASKS), else nowhere yet. Writing later masks to their
own narrow table keeps `training_images` rows (pixels, vector) from being rewritten.

Ids are read in chunks (`IN (...)` lists of at most `chunk` keys), never as a scan of all keys.
Generations keep their masks in their own rows (few, masked eagerly).
"""
from __future__ import annotations

from collections.abc import Iterable

import pyarrow.compute as pc

from fbmem.storage.database import Database
from fbmem.storage.keys import sql_list

MASK_TABLE = "training_masks"
CHUNK = 2000

# image_id -> (mask_png, fg_fraction, mask_model)
Mask = tuple[bytes, float | None, str | None]


def _chunks(ids: Iterable[str], chunk: int) -> Iterable[list[str]]:
    ids = sorted({i for i in ids if i is not None})
    for start in range(0, len(ids), chunk):
        yield ids[start : start + chunk]


def _with_mask(db: Database, table: str, ids: list[str], columns: list[str]):
    """Rows of `table` among `ids` whose `mask_png` is set, projected to `columns`."""
    if not db.has_table(table):
        return None
    cols = list(dict.fromkeys(["image_id", "mask_png", *columns]))
    rows = db.read(table, cols, where=f"image_id IN ({sql_list(ids)})")
    return rows.filter(pc.is_valid(rows.column("mask_png"))).select(columns)


def training_masks_for(db: Database, ids: Iterable[str], chunk: int = CHUNK) -> dict[str, Mask]:
    """{image_id: (mask_png, fg_fraction, mask_model)} for the ids that have a mask: the image's
    own row first, then `training_masks`. Ids without a mask (or unknown) are absent."""
    cols = ["image_id", "mask_png", "fg_fraction", "mask_model"]
    out: dict[str, Mask] = {}
    for part in _chunks(ids, chunk):
        own = _with_mask(db, "training_images", part, cols)
        if own is not None:
            for r in own.to_pylist():
                out[r["image_id"]] = (r["mask_png"], r["fg_fraction"], r["mask_model"])
        rest = [i for i in part if i not in out]
        later = _with_mask(db, MASK_TABLE, rest, cols) if rest else None
        if later is not None:
            for r in later.to_pylist():
                out[r["image_id"]] = (r["mask_png"], r["fg_fraction"], r["mask_model"])
    return out


def training_ids_without_mask(db: Database, ids: Iterable[str], chunk: int = CHUNK) -> list[str]:
    """The ids among `ids` that are training images with no mask anywhere (sorted): what lazy
    masking still has to segment. Reads keys and the mask column's validity, not the pixels."""
    out: list[str] = []
    for part in _chunks(ids, chunk):
        stored = db.read("training_images", ["image_id", "mask_png"], where=f"image_id IN ({sql_list(part)})")
        bare = stored.filter(pc.is_null(stored.column("mask_png"))).column("image_id").to_pylist()
        if bare and db.has_table(MASK_TABLE):
            done = set(_with_mask(db, MASK_TABLE, bare, ["image_id"]).column("image_id").to_pylist())
            bare = [i for i in bare if i not in done]
        out += bare
    return sorted(out)
