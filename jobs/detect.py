"""`fbmem detect --method nemo|wen`: per-prompt memorization scores of two detectors in one table.

Why two: a screen over millions of prompts wants the cheapest detector that works, and to know
how far two detectors agree (sql/detector_agreement.sql per prompt, sql/detector_groups.sql per
planted group or reference mem_type). Both need only the prompt, no image:

- `nemo`: NeMo's detection score (SPEC 6: max_i m_i over the MS-SSIM of noise differences),
  computed by jobs/nemo.run_detect, the function `fbmem nemo detect` runs: one code path, which
  writes `nemo_prompts` and the `detections` row alike;
- `wen`: Wen et al. (ICLR 2024), the magnitude of the text-conditional noise prediction over
  the first sampling steps of a few seeds (jobs/core/wen.py), computed by the `DiffusionWorker`
  actors (`wen_detect`), `detect.prompt_batch` prompts per call.

Every row is keyed by (prompt, method, model, the method's settings) (jobs/nemo.detection_id) and
carries `settings_hash` / `settings_json`, the run, and its cost: `unet_calls`, UNet evaluations
of one latent row (NeMo: n_latents, conditional only; Wen: 2 x seeds x steps), and `seconds`, the
prompt's wall time in the actor (NeMo: timed per prompt; Wen: its batch's time divided evenly
among the batch's prompts, since they share every UNet call). Prompts that already have a row
with the same settings are skipped before any model loads, so a rerun does only new work.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from fbmem.jobs.config import Config
from fbmem.jobs.nemo import (
    detection_id,
    detection_row,
    detection_settings_hash,
    model_layers,
    nemo_detect_settings,
    nemo_model,
    prompt_rows,
    run_detect,
)
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.storage.database import Database
from fbmem.storage.errors import error_row
from fbmem.storage.keys import sql_list

log = logging.getLogger(__name__)

METHODS = ("nemo", "wen")


def wen_settings(cfg: Config) -> dict:
    """The settings that change Wen's score: steps actually taken (wen_steps, capped by the
    schedule's), seeds, seed base, generation's schedule, guidance and size, and the GPU numerics
    the workers run the model with (jobs/core/nemo/numerics.py)."""
    d, g = cfg.detect, cfg.generation
    return {"steps": min(d.wen_steps, g.steps), "seeds": d.wen_seeds, "seed": d.wen_seed, "schedule_steps": g.steps,
            "guidance": g.guidance, "size": g.size, "scheduler": g.scheduler, "norm": "l2",
            "gpu_numerics": cfg.nemo.gpu_numerics}


def method_settings(cfg: Config, method: str) -> dict:
    """The settings a `method`'s score depends on (what its rows' ids and settings_hash hash)."""
    if method == "nemo":
        return nemo_detect_settings(cfg)
    if method == "wen":
        return wen_settings(cfg)
    raise ValueError(f"unknown detection method {method!r}; methods: {', '.join(METHODS)}")


def _stored(db: Database, ids: Sequence[str], batch: int) -> set[str]:
    """Which of `ids` are in `detections`, asked of the table a batch at a time (never all of it)."""
    if not ids or not db.has_table("detections"):
        return set()
    found: set[str] = set()
    for i in range(0, len(ids), batch):
        t = db.read("detections", ["detection_id"], where=f"detection_id IN ({sql_list(ids[i:i + batch])})")
        found.update(t.column(0).to_pylist())
    return found


def _costs(db: Database, ids: Sequence[str], run_id: str, batch: int) -> tuple[int, int, float]:
    """(rows, UNet evaluations, seconds) of this run's rows among `ids`."""
    n = calls = 0
    secs = 0.0
    for i in range(0, len(ids), batch):
        t = db.read("detections", ["unet_calls", "seconds", "run_id"],
                    where=f"detection_id IN ({sql_list(ids[i:i + batch])})").to_pylist()
        for r in t:
            if r["run_id"] == run_id:
                n, calls, secs = n + 1, calls + (r["unet_calls"] or 0), secs + (r["seconds"] or 0.0)
    return n, calls, secs


def _run_wen(db: Database, cfg: Config, rows: list[dict], run: RunRecord, model: Any) -> int:
    """Wen's score of each row on the actors -> `detections`; returns the number of errors."""
    model_id = cfg.models.diffusion.model_id
    settings = wen_settings(cfg)
    out: list[dict] = []
    n_errors = 0

    def flush() -> None:
        if out:
            db.upsert("detections", pa.Table.from_pylist(out))
            out.clear()

    with nemo_model(cfg, model) as pool:
        model_layers(pool, cfg)  # the workers hold cfg's model, with weights that can give its numerics
        chunks = [rows[i:i + cfg.detect.prompt_batch] for i in range(0, len(rows), cfg.detect.prompt_batch)]
        for _, outcomes in pool.map("wen_detect", chunks, cfg.detect, cfg.generation, cfg.nemo.gpu_numerics):
            errors = []
            for o in outcomes:
                if o.error is not None:
                    log.warning("wen %s: %s", o.prompt_id, o.error)
                    errors.append(error_row(run.job, run.run_id, stage="detect-wen", reason=o.error,
                                            source_uri=f"prompt:{o.prompt_id}", source_id=o.prompt_id,
                                            key=o.prompt_id))
                    continue
                out.append(detection_row(o.prompt_id, "wen", model_id, settings, o.score, unet_calls=o.unet_calls,
                                         seconds=o.seconds, run_id=run.run_id))
            if errors:
                db.upsert("errors", pa.Table.from_pylist(errors))
                n_errors += len(errors)
            if len(out) >= cfg.ingest.write_batch_rows:
                flush()
    flush()
    return n_errors


def run_detect_method(db: Database, cfg: Config, prompts: pa.Table | Sequence[Mapping], method: str,
                      run: RunRecord, pool: Any = None) -> dict:
    """Score each prompt row (prompt_id, text) with `method` (`nemo` or `wen`) -> `detections`.

    `pool`: None (a pool of `resources.nemo` actors started for the call, only if some prompt is
    new), a `ModelPool` the caller keeps (the demo), or a pipeline / components dict in memory
    (tests), as jobs/nemo.nemo_model takes it. Prompts with a row for this method, model and
    settings are skipped. Returns the summary the CLI prints: prompts, scored, skipped, errors,
    unet_calls and seconds (totals over the prompts scored now), settings_hash.
    """
    settings = method_settings(cfg, method)
    model_id = cfg.models.diffusion.model_id
    rows = prompt_rows(prompts)
    batch = cfg.engine.check_batch_rows
    ids = [detection_id(r["prompt_id"], method, model_id, settings) for r in rows]
    stored = _stored(db, ids, batch)
    todo = [r for r, i in zip(rows, ids) if i not in stored]
    base_errors = run.errors
    errors = 0
    if todo:
        if method == "nemo":
            run_detect(db, cfg, pool, todo, run)  # `fbmem nemo detect`'s own function
            errors = run.errors - base_errors
        else:
            errors = _run_wen(db, cfg, todo, run, pool)
    todo_ids = [i for i in ids if i not in stored]
    scored, calls, secs = _costs(db, todo_ids, run.run_id, batch) if todo else (0, 0, 0.0)
    summary = {"method": method, "prompts": len(rows), "scored": scored, "skipped": len(rows) - len(todo),
               "errors": errors, "unet_calls": calls, "seconds": secs,
               "settings_hash": detection_settings_hash(method, settings)}
    run.rows_in, run.rows_out, run.errors = len(rows), scored, base_errors + errors
    run.metrics.update(method=method, settings_hash=summary["settings_hash"], skipped=summary["skipped"],
                       unet_calls=calls, actor_seconds=round(secs, 3))
    return summary


def format_summary(s: Mapping) -> str:
    """The CLI's line: how many prompts were scored, skipped, failed, and the cost per scored prompt."""
    per = (f"; per prompt {s['unet_calls'] / s['scored']:.0f} UNet evaluations, {s['seconds'] / s['scored']:.3f}s"
           if s["scored"] else "")
    return (f"{s['method']}: scored {s['scored']} of {s['prompts']} prompts ({s['skipped']} already scored with "
            f"settings {s['settings_hash']}, {s['errors']} failed){per}")
