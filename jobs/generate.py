"""`fbmem generate`: prompts -> N seeded samples each -> masks + embeddings -> `generations`.

Shape (Ray Data, one streaming pass):
    recipes (driver) -> Generator (actors) -> SamSegmenter (actors) -> ClipImageEmbedder (actors)
    -> the driver upserts good rows into `generations` and failed ones into `errors`.
Masks are eager here, unlike the training corpus: generations are few (prompts x N) and every
one of them is labelled, so each needs its mask anyway.

Recipes are planned on the driver and their ids (`recipe_id`) checked against the table before
any model loads, so a rerun, or a resumed killed run, generates only what is missing.
Mitigated runs ("nemo", "nemo-c") take the neuron set per prompt from the caller (per-prompt sets
for NeMo, the cluster's union for NeMo-C) and use the same seeds as the unmitigated run, so the
"before" and "after" images of SPEC section 8 pair up on (prompt_id, seed, sample).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import pyarrow as pa
import ray

from fbmem.jobs.config import Config
from fbmem.jobs.core.nemo.hooks import deactivate
from fbmem.jobs.ingest import check_model_matches
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.jobs.runtime.stream import ErrorSource, drain
from fbmem.pipelines.actors import actor_kwargs, batch_blocks
from fbmem.pipelines.generator import (
    MITIGATIONS,
    RECIPE_SCHEMA,
    Generator,
    neurons_to_json,
    recipe_id,
    sample_seed,
)
from fbmem.pipelines.ingest import image_rows
from fbmem.storage.database import Database

log = logging.getLogger(__name__)

_STAGES = ("generate", "mask", "clip")


@dataclass
class GenerateCounts:
    planned: int = 0  # recipes for the selected prompts (prompts x n)
    skipped: int = 0  # already in `generations`
    written: int = 0
    errors: int = 0
    prompts_without_neurons: int = 0  # mitigated runs: prompts given no neuron set (not memorized)


# ------------------------------------------------------------------------------ planning (pure)


def plan_recipes(
    prompts: Sequence[tuple[str, str]],
    *,
    n: int,
    base_seed: int,
    mitigation: str = "none",
    alpha: float | None = None,
    neurons_by_prompt: Mapping[str, Mapping[int, Sequence[int]]] | None = None,
) -> list[dict]:
    """One recipe row per (prompt, sample): (prompt_id, text) pairs -> RECIPE_SCHEMA dicts.

    A mitigated run gives every prompt its neuron set; a prompt absent from `neurons_by_prompt`
    gets the empty set (NeMo found nothing to deactivate: its "after" image is the plain one,
    which is still the pair the mitigation score needs).
    """
    rows = []
    for pid, text in prompts:
        neurons_json = None
        if mitigation != "none":
            neurons_json = neurons_to_json((neurons_by_prompt or {}).get(pid, {}))
        for s in range(n):
            rows.append({
                "prompt_id": pid, "prompt": text, "seed": sample_seed(base_seed, pid, s), "sample": s,
                "mitigation": mitigation, "alpha": alpha if mitigation != "none" else None,
                "neurons_json": neurons_json,
            })
    return rows


def recipe_ids(rows: Sequence[dict], cfg: Config) -> list[str]:
    g = cfg.generation
    return [
        recipe_id(cfg.models.diffusion.model_id, r["prompt_id"], r["seed"], r["sample"], r["mitigation"],
                  r["alpha"], g.steps, g.guidance, g.size, neurons_json=r["neurons_json"])
        for r in rows
    ]


def _check_args(mitigation: str, alpha: float | None, neurons_by_prompt, n: int | None) -> None:
    if mitigation not in MITIGATIONS:
        raise ValueError(f"mitigation must be one of {MITIGATIONS}, got {mitigation!r}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if mitigation == "none":
        if alpha is not None or neurons_by_prompt is not None:
            raise ValueError("mitigation 'none' takes no alpha and no neurons_by_prompt")
        return
    if neurons_by_prompt is None:
        raise ValueError(f"mitigation {mitigation!r} needs neurons_by_prompt (prompt_id -> {{layer: [channels]}})")
    if alpha is not None and (not math.isfinite(alpha) or alpha < 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")


# ------------------------------------------------------------------------------- rows (pure)


def generation_rows(batch: pa.Table, cfg: Config, run_id: str) -> pa.Table:
    """Good stream rows -> `generations` rows: ingest's image columns, with the recipe's ids.

    image_rows treats rows as images made elsewhere (content-hash id, model "external"); here
    the id is the recipe and the model, mitigation, alpha and prompt id are the recipe's.
    Image bytes are always kept: a generated image has no other source to re-read.
    """
    rows = image_rows(batch, "generations", cfg, run_id)
    for name in ("generation_id", "prompt_id", "model_id", "mitigation", "alpha", "image_bytes"):
        rows = rows.set_column(rows.column_names.index(name), name, batch.column(name))
    return rows


def _recipe_uris(bad: pa.Table) -> list[str]:
    """The input of a failed generation: its prompt and sample."""
    pids, samples = bad.column("prompt_id").to_pylist(), bad.column("sample").to_pylist()
    return [f"prompt:{p}#sample={s}" for p, s in zip(pids, samples)]


# Failed rows -> `errors`, keyed by (job, stage, generation_id) so a rerun overwrites them.
GENERATION_ERRORS = ErrorSource(stage="generate", stages=_STAGES, source_uri=_recipe_uris,
                                source_id="generation_id", key="generation_id")


# --------------------------------------------------------------------------------- the job


def read_prompts(db: Database, prompt_filter: str | None) -> list[tuple[str, str]]:
    """(prompt_id, text) of the selected prompts, in a stable order."""
    if not db.has_table("prompts"):
        raise ValueError("the prompts table is empty: ingest a prompt set first")
    try:
        table = db.read("prompts", columns=["prompt_id", "text"], where=prompt_filter)
    except Exception as exc:  # Lance reports a bad filter as a generic error: say which input
        raise ValueError(f"prompt filter {prompt_filter!r} is not a valid filter on prompts: {exc}") from exc
    return sorted(zip(table.column("prompt_id").to_pylist(), table.column("text").to_pylist()))


def build_generate_stream(recipes: pa.Table, cfg: Config) -> ray.data.Dataset:
    """The lazy plan recipes -> images -> masks -> embeddings (nothing runs yet).

    Recipes go in as blocks of one actor batch each, so a pool of several generators shares
    the work instead of one actor receiving the single block.
    """
    from fbmem.pipelines.clip_embedder import ClipImageEmbedder
    from fbmem.pipelines.sam_segmenter import SamSegmenter

    res = cfg.resources
    step = res.generate.batch_size
    cfg_json = cfg.to_json()
    ds = ray.data.from_arrow(batch_blocks(recipes, step))
    ds = ds.map_batches(Generator, fn_constructor_args=(cfg_json, deactivate), **actor_kwargs(res.generate))
    ds = ds.map_batches(SamSegmenter, fn_constructor_args=(cfg_json,), **actor_kwargs(res.segment))
    ds = ds.map_batches(ClipImageEmbedder, fn_constructor_args=(cfg_json,), **actor_kwargs(res.embed))
    return ds


def run_generate(
    db: Database,
    cfg: Config,
    *,
    run: RunRecord,
    n: int | None = None,
    prompt_filter: str | None = None,
    mitigation: str = "none",
    alpha: float | None = None,
    neurons_by_prompt: Mapping[str, Mapping[int, Sequence[int]]] | None = None,
) -> GenerateCounts:
    """Generate `n` (default generation.n) samples per selected prompt that are not stored yet.

    `prompt_filter` is a filter on the prompts table (e.g. "planted = 'VM'"). For mitigation
    "nemo"/"nemo-c", `neurons_by_prompt` maps prompt_id -> {layer_idx: [channels]} and alpha
    defaults to nemo.alpha. Raises ValueError on bad arguments before any work starts.
    """
    _check_args(mitigation, alpha, neurons_by_prompt, n)
    n = n or cfg.generation.n
    if mitigation != "none" and alpha is None:
        alpha = cfg.nemo.alpha
    check_model_matches(db, "generations", cfg)  # one CLIP model's vectors per table
    counts = GenerateCounts()
    prompts = read_prompts(db, prompt_filter)
    if mitigation != "none":
        counts.prompts_without_neurons = sum(1 for pid, _ in prompts if pid not in neurons_by_prompt)
        run.metrics["prompts_without_neurons"] = counts.prompts_without_neurons
    rows = plan_recipes(prompts, n=n, base_seed=cfg.generation.base_seed, mitigation=mitigation,
                        alpha=alpha, neurons_by_prompt=neurons_by_prompt)
    counts.planned = len(rows)
    ids = recipe_ids(rows, cfg)
    existing = db.existing_keys("generations") if db.has_table("generations") else set()
    todo = [r for r, i in zip(rows, ids) if i not in existing]
    counts.skipped = counts.planned - len(todo)
    run.rows_in = counts.planned
    run.metrics.update(prompts=len(prompts), n=n, skipped_existing=counts.skipped, mitigation=mitigation)
    if not todo:
        log.info("nothing to generate: all %d recipes are stored", counts.planned)
        return counts

    stream = build_generate_stream(pa.Table.from_pylist(todo, schema=RECIPE_SCHEMA), cfg)
    batches = stream.iter_batches(batch_size=cfg.ingest.write_batch_rows, batch_format="pyarrow")
    done = drain(batches, db=db, table="generations", run=run, desc=f"generate ({mitigation})", unit="img",
                 rows=lambda good: generation_rows(good, cfg, run.run_id), errors=GENERATION_ERRORS, total=len(todo))
    counts.written, counts.errors = done.written, done.errors
    return counts
