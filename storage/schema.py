"""The pyarrow schemas of every fbmem table, in one place.

Why explicit schemas: Lance tables are append-mostly and typed; letting each job infer a schema
from its first batch makes a null-only column or an int32/int64 slip a hard failure weeks later.
Every table has a stable key (`KEYS`) used for idempotent upserts and a `run_id` column.
Vectors are `fixed_size_list<float32>[D]`, the type LanceDB indexes; D depends on the model, so
tables with vectors are built by functions of the dimension.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

TABLES = (
    "training_images",
    "prompts",
    "generations",
    "pair_scores",
    "labels",
    "neurons",
    "neuron_stats",
    "nemo_prompts",
    "runs",
    "errors",
    "ingest_shards",
    "training_masks",
    "training_sources",
    "scans",
    "scan_stages",
    "scan_shards",
    "label_changes",
    "detections",
    "mitigation_quality",
)

# The columns that identify a row; upserts match on them.
KEYS: dict[str, tuple[str, ...]] = {
    "training_images": ("image_id",),
    "prompts": ("prompt_id",),
    "generations": ("generation_id",),
    "pair_scores": ("pair_id",),
    "labels": ("label_id",),
    "neurons": ("neuron_set_id",),
    "neuron_stats": ("stat_id",),
    "nemo_prompts": ("nemo_id",),
    "runs": ("run_id",),
    "errors": ("error_id",),
    "ingest_shards": ("ledger_id",),
    "training_masks": ("image_id",),
    "training_sources": ("source_row_id",),
    "scans": ("scan_id",),
    "scan_stages": ("stage_row_id",),
    "scan_shards": ("scan_shard_id",),
    "label_changes": ("change_id",),
    "detections": ("detection_id",),
    "mitigation_quality": ("quality_id",),
}

VECTOR_TABLES = ("training_images", "prompts", "generations")

TS = pa.timestamp("us", tz="UTC")


def now_utc() -> datetime:
    """The time stamped on rows (`TS` columns): timezone-aware UTC."""
    return datetime.now(timezone.utc)


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def _image_columns(dim: int) -> list[pa.Field]:
    """Columns shared by training images and generations: the pixels, the vector, the mask."""
    return [
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("source_uri", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_bytes", pa.large_binary()),
        pa.field("embedding", vector_type(dim)),
        pa.field("embedding_model", pa.string()),
        pa.field("mask_png", pa.large_binary()),
        pa.field("fg_fraction", pa.float32()),
        pa.field("mask_model", pa.string()),
    ]


def training_images_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [pa.field("image_id", pa.string(), nullable=False)]
        + _image_columns(dim)
        + [
            pa.field("caption", pa.string()),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("ingested_at", TS),
        ]
    )


def prompts_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("source_row", pa.int64()),
            pa.field("mem_type", pa.string()),  # reference set: VM / TM
            pa.field("planted", pa.string()),  # toy world: VM / FM / BM / NM
            pa.field("linked_uri", pa.string()),
            pa.field("linked_id", pa.string()),
            pa.field("mean_sscd", pa.float32()),
            pa.field("max_sscd", pa.float32()),
            pa.field("embedding", vector_type(dim)),
            pa.field("embedding_model", pa.string()),
            pa.field("cluster_id", pa.int32()),
            pa.field("cluster_run_id", pa.string()),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("ingested_at", TS),
        ]
    )


def generations_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            # content hash for images made elsewhere; hash of the recipe for images made here
            pa.field("generation_id", pa.string(), nullable=False),
            pa.field("prompt_id", pa.string()),
            pa.field("prompt", pa.string()),
            pa.field("seed", pa.int64()),
            pa.field("sample", pa.int32()),
            pa.field("model_id", pa.string()),  # the diffusion model, or "external"
            pa.field("mitigation", pa.string()),  # none / nemo / nemo-c
            pa.field("alpha", pa.float32()),
        ]
        + _image_columns(dim)
        + [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("created_at", TS),
        ]
    )


PAIR_SCORES = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),  # hash(generation, image, scoring settings)
        pa.field("generation_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string()),
        pa.field("candidate_source", pa.string()),  # ann / exact / linked
        pa.field("rank", pa.int32()),
        pa.field("distance", pa.float32()),
        pa.field("full", pa.float32()),
        pa.field("fg", pa.float32()),
        pa.field("bg", pa.float32()),
        pa.field("fg_area", pa.float32()),
        pa.field("bg_area", pa.float32()),
        pa.field("pair_label", pa.string()),
        pa.field("pair_rule", pa.string()),  # which clause of the label rule fired
        pa.field("region_metric", pa.string()),
        pa.field("image_size", pa.int32()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

LABELS = pa.schema(
    [
        pa.field("label_id", pa.string(), nullable=False),  # hash(generation, rule, settings)
        pa.field("generation_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string()),
        pa.field("label", pa.string(), nullable=False),  # VM / FM / BM / NM
        pa.field("rule", pa.string(), nullable=False),  # most-severe / paper-best-average
        pa.field("reason", pa.string()),
        pa.field("best_image_id", pa.string()),
        pa.field("full", pa.float32()),
        pa.field("fg", pa.float32()),
        pa.field("bg", pa.float32()),
        pa.field("n_candidates", pa.int32()),
        pa.field("tau_full", pa.float32()),
        pa.field("tau_fg", pa.float32()),
        pa.field("tau_bg", pa.float32()),
        pa.field("beta", pa.float32()),
        pa.field("region_metric", pa.string()),
        pa.field("candidates_mode", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("labelled_at", TS),
    ]
)

NEURONS = pa.schema(
    [
        pa.field("neuron_set_id", pa.string(), nullable=False),
        pa.field("scope", pa.string(), nullable=False),  # prompt / cluster
        pa.field("prompt_id", pa.string()),
        pa.field("cluster_id", pa.int32()),
        pa.field("kind", pa.string(), nullable=False),  # initial / refined / union
        pa.field("layer_idx", pa.int32(), nullable=False),
        pa.field("module", pa.string(), nullable=False),
        pa.field("neurons", pa.list_(pa.int32())),
        pa.field("score", pa.float32()),  # s(B) of the set, when known
        pa.field("model_id", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

NEURON_STATS = pa.schema(
    [
        pa.field("stat_id", pa.string(), nullable=False),  # hash(model, source, layer, neuron)
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("stats_source", pa.string(), nullable=False),  # prompt set (hash) or imported file
        pa.field("layer_idx", pa.int32(), nullable=False),
        pa.field("module", pa.string(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("mean_abs_act", pa.float32()),
        pa.field("std_abs_act", pa.float32()),
        pa.field("n_prompts", pa.int64()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

NEMO_PROMPTS = pa.schema(
    [
        pa.field("nemo_id", pa.string(), nullable=False),  # hash(model, prompt, settings)
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("detect_score", pa.float32()),  # max_i m_i (SPEC 6 detection)
        pa.field("detect_mean", pa.float32()),  # mean pairwise similarity of noise differences
        pa.field("n_retained", pa.int32()),
        pa.field("memorized", pa.bool_()),
        pa.field("initial_score", pa.float32()),  # s(B) of the initial selection
        pa.field("refined_score", pa.float32()),  # s(B) of the refined set
        pa.field("theta", pa.float32()),
        pa.field("k", pa.int32()),
        pa.field("n_initial", pa.int32()),
        pa.field("n_refined", pa.int32()),
        pa.field("criterion_reached", pa.bool_()),  # refined s(B) <= threshold
        pa.field("unet_calls", pa.int64()),  # sequential UNet calls spent on this prompt
        pa.field("message", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("job", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # running / ok / failed
        pa.field("started_at", TS),
        pa.field("finished_at", TS),
        pa.field("rows_in", pa.int64()),
        pa.field("rows_out", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("config_json", pa.string()),
        pa.field("args_json", pa.string()),
        pa.field("metrics_json", pa.string()),
        pa.field("message", pa.string()),
        # added with `fbmem scan` (older tables get them on first write, storage/database.py):
        pa.field("scan_id", pa.string()),  # the scan this run was a stage of, if any
        pa.field("heartbeat_at", TS),  # written every runtime.heartbeat_s while running
        pa.field("host", pa.string()),
        pa.field("pid", pa.int64()),
    ]
)

ERRORS = pa.schema(
    [
        pa.field("error_id", pa.string(), nullable=False),  # hash(job, stage, source): reruns overwrite
        pa.field("job", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("source_uri", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", TS),
    ]
)

# The ingest ledger (jobs/runtime/ledger.py): one row per finished source shard and settings, so a
# rerun skips whole shards without reading them. Rows are few (one per shard: ~1e5 for LAION-2B).
INGEST_SHARDS = pa.schema(
    [
        pa.field("ledger_id", pa.string(), nullable=False),  # hash(shard, table, model, masks)
        pa.field("shard_id", pa.string(), nullable=False),  # hash of what the shard reads (sources.Shard)
        pa.field("source", pa.string()),  # the source as the user named it
        pa.field("shard_kind", pa.string()),  # folder / manifest / webdataset
        pa.field("shard_spec", pa.string()),  # JSON: which files or rows (short form)
        pa.field("target_table", pa.string(), nullable=False),
        pa.field("embedding_model", pa.string(), nullable=False),
        pa.field("masks", pa.string(), nullable=False),  # eager / lazy
        pa.field("status", pa.string(), nullable=False),  # done
        pa.field("rows_in", pa.int64()),
        pa.field("rows_written", pa.int64()),
        pa.field("rows_skipped", pa.int64()),  # already stored
        pa.field("errors", pa.int64()),
        pa.field("duplicates", pa.int64()),  # same key twice in one written block
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("finished_at", TS),
    ]
)

# Masks of training images computed after ingest (lazy masks, backfills): a narrow table of their
# own keyed by image, so writing a mask never rewrites a `training_images` row (pixels, vector and
# all). A training image's mask is its own row's (eager ingest, a mask given by the source), else
# this table's; read both through storage/masks.py `training_masks_for`.
TRAINING_MASKS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("mask_png", pa.large_binary()),
        pa.field("fg_fraction", pa.float32()),
        pa.field("mask_model", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", TS),
    ]
)

# Every (image, source row) pair of a training ingest: `training_images` is keyed by content and
# keeps one row (and the first caption seen) per image; this table keeps what each source row said,
# so copies of an image with other captions or ids all survive, whatever the batching. Written from
# the workers as fragments, like the images (pipelines/ingest.py), also for rows whose image was
# already stored. `line`: the row's place in `source` (a manifest's data row, 0-based, header not
# counted; a tar's sample index; a folder's sorted file index).
TRAINING_SOURCES = pa.schema(
    [
        pa.field("source_row_id", pa.string(), nullable=False),  # hash(image_id, source, line)
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string()),  # the image's file or URL
        pa.field("source", pa.string()),  # the manifest, tar or folder it was listed in
        pa.field("line", pa.int64()),
        pa.field("source_id", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("ingested_at", TS),
    ]
)

# `fbmem scan` (jobs/scan.py): one row per scan, one per (scan, stage), one per (scan, source shard).
# A row whose status is `running` and whose heartbeat is older than runtime.stale_after_s (or whose
# process is gone, on the same host) is shown as `aborted`, and the next scan takes its work over.
SCANS = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),  # the spec's name: scans of one schedule
        pa.field("status", pa.string(), nullable=False),  # running / done / failed / aborted
        pa.field("spec_json", pa.string()),
        pa.field("spec_hash", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("started_at", TS),
        pa.field("finished_at", TS),
        pa.field("heartbeat_at", TS),
        pa.field("host", pa.string()),
        pa.field("pid", pa.int64()),
        pa.field("attempts", pa.int32()),  # processes that ran it (1 + takeovers)
        pa.field("seconds", pa.float64()),  # summed over attempts
        pa.field("summary_json", pa.string()),  # the figures of --summary-json
        pa.field("message", pa.string()),
    ]
)

SCAN_STAGES = pa.schema(
    [
        pa.field("stage_row_id", pa.string(), nullable=False),  # hash(scan, stage)
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("ordinal", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # pending / running / done / failed / skipped
        pa.field("started_at", TS),
        pa.field("finished_at", TS),
        pa.field("heartbeat_at", TS),
        pa.field("seconds", pa.float64()),
        pa.field("rows_in", pa.int64()),
        pa.field("rows_out", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("counts_json", pa.string()),  # the stage's own figures (shards new/done before, ...)
        pa.field("run_ids", pa.list_(pa.string())),  # the `runs` of every attempt
        pa.field("message", pa.string()),  # the error of a failed stage
    ]
)

SCAN_SHARDS = pa.schema(
    [
        pa.field("scan_shard_id", pa.string(), nullable=False),  # hash(scan, shard, table)
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("target_table", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # pending / done / done-before / failed
        pa.field("rows_in", pa.int64()),
        pa.field("rows_written", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("run_id", pa.string()),
        pa.field("updated_at", TS),
    ]
)

# One row each time a generation's label is set or changes (jobs/label.py), so what changed
# between two scans (sql/scan_diff.sql) is a query, while `labels` keeps the current label.
LABEL_CHANGES = pa.schema(
    [
        pa.field("change_id", pa.string(), nullable=False),  # hash(label_id, run)
        pa.field("label_id", pa.string(), nullable=False),
        pa.field("generation_id", pa.string(), nullable=False),
        pa.field("rule", pa.string()),
        pa.field("label", pa.string()),
        pa.field("previous_label", pa.string()),  # null: first label
        pa.field("best_image_id", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scan_id", pa.string()),
        pa.field("changed_at", TS),
    ]
)

# Per-prompt memorization scores of the detectors (`fbmem detect --method nemo|wen`).
DETECTIONS = pa.schema(
    [
        pa.field("detection_id", pa.string(), nullable=False),  # hash(prompt, method, model, settings)
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # nemo / wen
        pa.field("model_id", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("settings_hash", pa.string()),
        pa.field("settings_json", pa.string()),
        pa.field("unet_calls", pa.int64()),  # UNet evaluations of one latent row (CFG counts 2), batching aside
        pa.field("seconds", pa.float64()),  # the prompt's wall time in the actor (a shared batch: its share)
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", TS),
    ]
)

# What mitigation costs in image quality, per method, alpha and cluster (all clusters: null).
MITIGATION_QUALITY = pa.schema(
    [
        pa.field("quality_id", pa.string(), nullable=False),  # hash(method, alpha, level, cluster, metric, model)
        pa.field("method", pa.string(), nullable=False),
        pa.field("alpha", pa.float32()),
        # overall (cluster_id null) or cluster (cluster_id null there = prompts never clustered),
        # as sql/mitigation_score.sql's `level`, so the two join on (method, alpha, level, cluster_id)
        pa.field("level", pa.string(), nullable=False),
        pa.field("cluster_id", pa.int32()),
        pa.field("metric", pa.string(), nullable=False),  # clip_score / fd_clip / kid_clip / pyiqa name
        pa.field("before", pa.float64()),  # per-image metrics: mean over the before images
        pa.field("after", pa.float64()),  # ... and over the after images
        pa.field("value", pa.float64()),  # per-image: after - before; set-level: distance before vs after
        pa.field("value_std", pa.float64()),  # kid_clip: std over subsets
        pa.field("n_pairs", pa.int64()),
        pa.field("note", pa.string()),  # why a value is missing, e.g. "skipped: weights not present ..."
        pa.field("model_id", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("computed_at", TS),
    ]
)

_FIXED = {
    "pair_scores": PAIR_SCORES,
    "labels": LABELS,
    "neurons": NEURONS,
    "neuron_stats": NEURON_STATS,
    "nemo_prompts": NEMO_PROMPTS,
    "runs": RUNS,
    "errors": ERRORS,
    "ingest_shards": INGEST_SHARDS,
    "training_masks": TRAINING_MASKS,
    "training_sources": TRAINING_SOURCES,
    "scans": SCANS,
    "scan_stages": SCAN_STAGES,
    "scan_shards": SCAN_SHARDS,
    "label_changes": LABEL_CHANGES,
    "detections": DETECTIONS,
    "mitigation_quality": MITIGATION_QUALITY,
}

_BY_DIM = {
    "training_images": training_images_schema,
    "prompts": prompts_schema,
    "generations": generations_schema,
}


def schema_for(table: str, dim: int | None = None) -> pa.Schema:
    """The schema of `table`; vector tables need the embedding dimension."""
    if table in _FIXED:
        return _FIXED[table]
    if table in _BY_DIM:
        if dim is None:
            raise ValueError(f"table {table!r} holds vectors: its schema needs the embedding dimension")
        return _BY_DIM[table](dim)
    raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder/cast `table` to `schema`, adding missing nullable columns as nulls.

    Jobs build batches with the columns they know; the schema decides the rest. A missing
    non-nullable column or an impossible cast is an error naming the column.
    """
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if not col.type.equals(field.type):
                try:
                    col = col.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ValueError(
                        f"column {field.name!r}: cannot cast {col.type} to {field.type}: {exc}"
                    ) from exc
            cols.append(col)
        else:
            if not field.nullable:
                raise ValueError(f"column {field.name!r} is required but missing")
            cols.append(pa.nulls(table.num_rows, type=field.type))
    return pa.Table.from_arrays(cols, schema=schema)
