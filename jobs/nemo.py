"""NeMo jobs (SPEC.md section 6): activation statistics, detection, neuron localization.

The model runs in Ray actors, never here: DESIGN.md, every model runs in an actor with declared
resources (`resources.nemo`), so a CPU head node never loads the UNet. These functions plan
(which prompts, which stored results still hold), hand the prompts to a pool of
`DiffusionWorker` actors (jobs/model_actors.py; each loads the model in its constructor, on the
device it finds there, in NeMo's dtype), and write the rows they build from what comes back. Each
fills the RunRecord it is given (rows in/out, errors, metrics), like jobs/label.py.

`model` says where the model is: None, a pool of actors started for the call (what the CLI
does); a `ModelPool` the caller keeps (the demo runs several steps on one); or a pipeline or
components dict already in memory (tests, benchmarks), used in this process. Results are the
same either way: the per-prompt work is the same function (jobs/core/nemo/evaluator.py).

- `run_stats`: activations of a prompt set -> `neuron_stats` (per-neuron mean/std). The actors
  return per-batch partial sums (ActivationAccumulator), added up here in batch order: the same
  float64 sums, in the same order, as one process computing them.
- `import_stats_csv`: the SD 1.4 reference file -> `neuron_stats` (checked against the UNet's
  value layers when one is given).
- `run_detect`: per prompt, the noise-difference detection -> `nemo_prompts`, and NeMo's row in
  `detections` (the detectors' shared table; `fbmem detect --method nemo` runs this same function,
  jobs/detect.py, which also scores Wen et al.'s detector). The `detections` row format lives
  here (`detection_row`) because this job writes it and jobs/detect.py imports this module.
- `run_localize`: per memorized prompt, initial selection + refinement -> `neurons` (one row per
  layer and kind) and `nemo_prompts` (scores, theta/k, counts, criterion, UNet calls, message).

The pure method lives in jobs/core/nemo/ (statistics, detection, search, hooks, and the
UNet-side evaluator); this module only reads prompts, hands them over, and writes rows.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from fbmem.jobs.config import Config
from fbmem.jobs.core.nemo.detection import Detection
from fbmem.jobs.core.nemo.evaluator import outcome_message
from fbmem.jobs.core.nemo.hooks import ValueLayer, find_value_layers
from fbmem.jobs.core.nemo.search import NeuronSets, n_neurons
from fbmem.jobs.core.nemo.statistics import (
    ActivationAccumulator,
    NeuronStats,
    check_stats_layers,
    load_stats_csv,
)
from fbmem.jobs.model_actors import DiffusionWorker, LayerInfo, PromptOutcome, nemo_pool
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.pipelines.actor_pool import ModelPool
from fbmem.storage.database import Database
from fbmem.storage.errors import error_row
from fbmem.storage.keys import stable_hash
from fbmem.storage.schema import DETECTIONS, NEMO_PROMPTS, now_utc

log = logging.getLogger(__name__)


# ============================================================================ ids and rows


def _hash(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(json.dumps(p, sort_keys=True, default=str) for p in parts).encode()).hexdigest()


def nemo_settings(cfg: Config) -> dict:
    """Every setting that changes a detection or localization result (refine_batch does not)."""
    s = cfg.nemo.model_dump()
    s.pop("refine_batch", None)
    s["image_size"] = cfg.generation.size
    return s


def nemo_id(model_id: str, prompt_id: str, cfg: Config) -> str:
    return _hash("nemo", model_id, prompt_id, nemo_settings(cfg))


def stat_id(model_id: str, source: str, layer_idx: int, neuron: int) -> str:
    return _hash("stat", model_id, source, layer_idx, neuron)


def neuron_set_id(model_id: str, prompt_id: str, kind: str, layer_idx: int, cfg: Config, stats_source: str) -> str:
    return _hash("neurons", "prompt", model_id, prompt_id, kind, layer_idx, nemo_settings(cfg), stats_source)


def prompt_set_source(prompts: Sequence[str]) -> str:
    """A stats_source naming a prompt set by content, so stats of different sets never mix."""
    return "prompts:" + hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _q(v: str) -> str:
    return "'" + str(v).replace("'", "''") + "'"


# ============================================================================ detections rows


def nemo_detect_settings(cfg: Config) -> dict:
    """The settings that change NeMo's detection score (max_i m_i): latents, timestep, MS-SSIM,
    numerics and image size. Not the threshold (it decides `memorized`, not the score) nor the
    localization settings, so changing those does not redo detection in `fbmem detect`."""
    n = cfg.nemo
    return {"n_latents": n.n_latents, "latent_seed": n.latent_seed, "timestep_index": n.timestep_index,
            "schedule_steps": n.schedule_steps, "detect_metric": n.detect_metric, "detect_beta": n.detect_beta,
            "detect_win_size": n.detect_win_size, "detect_scales": n.detect_scales,
            "detect_min_side": n.detect_min_side, "gpu_numerics": n.gpu_numerics, "image_size": cfg.generation.size}


def detection_settings_hash(method: str, settings: Mapping) -> str:
    """`settings_hash` of a detections row: the method and its settings (16 hex digits)."""
    return stable_hash("detect", method, dict(settings))[:16]


def detection_id(prompt_id: str, method: str, model_id: str, settings: Mapping) -> str:
    """Key of a detections row: one per prompt, method, model and settings (a rerun overwrites it,
    a changed setting adds a row beside it)."""
    return stable_hash("detection", prompt_id, method, model_id, dict(settings))


def detection_row(prompt_id: str, method: str, model_id: str, settings: Mapping, score: float, *,
                  unet_calls: int, seconds: float, run_id: str) -> dict:
    """One `detections` row. `unet_calls`: UNet evaluations of one latent row spent on the prompt
    (a batched call over B latents counts B; CFG's two branches count two), so costs compare across
    detectors and batch sizes; `seconds`: its wall time in the actor."""
    return {"detection_id": detection_id(prompt_id, method, model_id, settings), "prompt_id": prompt_id,
            "method": method, "model_id": model_id, "score": score,
            "settings_hash": detection_settings_hash(method, settings),
            "settings_json": json.dumps(dict(settings), sort_keys=True), "unet_calls": int(unet_calls),
            "seconds": float(seconds), "run_id": run_id, "created_at": now_utc()}


def prompt_rows(prompts: pa.Table | Sequence[Mapping]) -> list[dict]:
    rows = prompts.to_pylist() if isinstance(prompts, pa.Table) else [dict(r) for r in prompts]
    for r in rows:
        if "prompt_id" not in r or "text" not in r:
            raise ValueError("prompt rows need `prompt_id` and `text` columns")
    return rows


def _error_row(run: RunRecord, stage: str, prompt_id: str, reason: str) -> dict:
    """A prompt that failed `stage`, keyed by its prompt id (a rerun overwrites the row)."""
    return error_row(run.job, run.run_id, stage=stage, reason=reason, source_uri=f"prompt:{prompt_id}",
                     source_id=prompt_id, key=prompt_id)


def _chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# ============================================================================ the model, on actors


@contextlib.contextmanager
def nemo_model(cfg: Config, model: Any = None) -> Iterator[ModelPool]:
    """The pool a NeMo job calls: `model` None (a pool of `resources.nemo` actors, made and closed
    here), a `ModelPool` (the caller's, left open), or a pipeline / components dict in memory
    (run in this process)."""
    if isinstance(model, ModelPool):
        yield model
    elif model is None:
        with nemo_pool(cfg) as pool:
            yield pool
    else:
        yield ModelPool.in_process(DiffusionWorker(cfg, pipe=model), name="nemo")


def model_layers(pool: ModelPool, cfg: Config) -> list[LayerInfo]:
    """The value layers of the pool's model, once it is checked to be `cfg`'s model with weights
    that can give nemo.gpu_numerics (before any prompt runs)."""
    info = pool.call("info", cfg.nemo)
    if info["model_id"] != cfg.models.diffusion.model_id:
        raise ValueError(f"the NeMo workers hold {info['model_id']}, the settings name {cfg.models.diffusion.model_id}")
    return info["layers"]


# ============================================================================ statistics jobs


def stats_rows(stats: NeuronStats, model_id: str, run_id: str) -> pa.Table:
    rows = []
    for li in sorted(stats.mean):
        mean, std = stats.mean[li].tolist(), stats.std[li].tolist()
        for j in range(len(mean)):
            rows.append({"stat_id": stat_id(model_id, stats.source, li, j), "model_id": model_id,
                         "stats_source": stats.source, "layer_idx": li, "module": stats.modules[li], "neuron": j,
                         "mean_abs_act": mean[j], "std_abs_act": std[j], "n_prompts": stats.n_prompts,
                         "run_id": run_id})
    return pa.Table.from_pylist(rows)


def _add_sums(total: ActivationAccumulator, part: ActivationAccumulator) -> None:
    """Add one batch's partial sums (an accumulator of that batch alone) to `total`: the float64
    additions `total.update(batch)` makes, so batches added in order give compute_stats' sums."""
    for idx in part._s:  # the accumulator's own state: core has no merge yet
        total._s[idx] = total._s.get(idx, 0) + part._s[idx]
        total._ss[idx] = total._ss.get(idx, 0) + part._ss[idx]
    total.n += part.n


def _in_order(results: Iterator[tuple[int, Any]]) -> Iterator[Any]:
    """Results that come back as (index, value) in any order, handed on in index order."""
    waiting: dict[int, Any] = {}
    nxt = 0
    for i, value in results:
        waiting[i] = value
        while nxt in waiting:
            yield waiting.pop(nxt)
            nxt += 1


def run_stats(db: Database, cfg: Config, model: Any, prompts: Sequence[str], *, source: str,
              run: RunRecord, batch_size: int = 64) -> NeuronStats:
    """Compute and store `neuron_stats` of the model over `prompts` (SPEC 6 statistics): batches of
    `batch_size` prompts, one actor call each, whose partial sums are added up here in order."""
    prompts = [p for p in prompts]
    run.rows_in = len(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        run.errors += len(bad)
        run.metrics["skipped_empty_prompts"] = len(bad)
        skip = set(bad)
        prompts = [p for i, p in enumerate(prompts) if i not in skip]
    acc = ActivationAccumulator()
    with nemo_model(cfg, model) as pool:
        layers = model_layers(pool, cfg)
        for part in _in_order(pool.map("activation_sums", _chunks(prompts, batch_size), cfg.nemo)):
            _add_sums(acc, part)
    res = acc.result()
    stats = NeuronStats({l.idx: l.name for l in layers}, {i: m for i, (m, _) in res.items()},
                        {i: s for i, (_, s) in res.items()}, source=source, n_prompts=acc.n)
    run.rows_out = db.upsert("neuron_stats", stats_rows(stats, cfg.models.diffusion.model_id, run.run_id))
    run.metrics.update(layers=len(stats.mean), neurons=sum(stats.sizes().values()), n_prompts=stats.n_prompts,
                       stats_source=source)
    return stats


def import_stats_csv(db: Database, path: str | Path, model_id: str, run: RunRecord,
                     unet: torch.nn.Module | None = None, layers: Sequence[LayerInfo] | None = None) -> NeuronStats:
    """Store a statistics file (the SD 1.4 reference format); with `unet` (or its value `layers`,
    from `model_layers`), check it fits its layers."""
    stats = load_stats_csv(path)
    if unet is not None:
        layers = find_value_layers(unet)
    if layers is not None:
        check_stats_layers(stats, layers)
    run.rows_in = sum(stats.sizes().values())
    run.rows_out = db.upsert("neuron_stats", stats_rows(stats, model_id, run.run_id))
    run.metrics.update(layers=len(stats.mean), neurons=run.rows_in, stats_source=stats.source)
    return stats


def read_stats(db: Database, model_id: str, source: str | None = None) -> NeuronStats:
    """Statistics stored for `model_id` (and `source`; required when several sources exist)."""
    where = f"model_id = {_q(model_id)}" + (f" AND stats_source = {_q(source)}" if source else "")
    t = db.read("neuron_stats", ["stats_source", "layer_idx", "module", "neuron", "mean_abs_act", "std_abs_act",
                                 "n_prompts"], where=where)
    if t.num_rows == 0:
        raise ValueError(f"no neuron statistics stored for model {model_id!r}"
                         + (f" from {source!r}" if source else "") + ": run the stats job or import a file first")
    sources = sorted(set(t.column("stats_source").to_pylist()))
    if len(sources) > 1:
        raise ValueError(f"model {model_id!r} has statistics from several sources {sources}: name one")
    rows = sorted(t.to_pylist(), key=lambda r: (r["layer_idx"], r["neuron"]))
    modules: dict[int, str] = {}
    vals: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        modules[r["layer_idx"]] = r["module"]
        vals.setdefault(r["layer_idx"], []).append((r["mean_abs_act"], r["std_abs_act"]))
    mean = {i: torch.tensor([m for m, _ in v], dtype=torch.float32) for i, v in vals.items()}
    std = {i: torch.tensor([s for _, s in v], dtype=torch.float32) for i, v in vals.items()}
    return NeuronStats(modules, mean, std, source=sources[0], n_prompts=rows[0]["n_prompts"])


# ============================================================================ detection / localization jobs


def _detect_row(cfg: Config, model_id: str, prompt_id: str, det: Detection, run_id: str) -> dict:
    return {"nemo_id": nemo_id(model_id, prompt_id, cfg), "prompt_id": prompt_id, "model_id": model_id,
            "detect_score": det.score, "detect_mean": det.mean, "n_retained": int(det.retained.sum()),
            "memorized": det.memorized, "run_id": run_id}


def run_detect(db: Database, cfg: Config, model: Any, prompts: pa.Table | Sequence[Mapping], run: RunRecord) -> int:
    """Detection for each prompt row (prompt_id, text) -> `nemo_prompts` and `detections`
    (method `nemo`, score = detect_score). Returns memorized count.

    Prompts go to the actors `resources.nemo.batch_size` at a time; rows are written every
    `ingest.write_batch_rows` prompts and at the end."""
    model_id = cfg.models.diffusion.model_id
    rows = prompt_rows(prompts)
    run.rows_in = len(rows)
    base_errors = run.errors
    written = n_errors = memorized = 0
    out: list[dict] = []
    detections: list[dict] = []
    settings = nemo_detect_settings(cfg)

    def flush() -> None:
        nonlocal written
        if out:
            # with the schema: rows of stored localizations carry columns a fresh detection row lacks
            # (from_pylist would take the first row's keys for all)
            db.upsert("nemo_prompts", pa.Table.from_pylist(_keep_localization(db, out), schema=NEMO_PROMPTS))
            db.upsert("detections", pa.Table.from_pylist(detections, schema=DETECTIONS))
            written += len(out)
            out.clear()
            detections.clear()

    with nemo_model(cfg, model) as pool:
        if rows:
            model_layers(pool, cfg)  # the model and its numerics, before any prompt
        chunks = _chunks(rows, cfg.resources.nemo.batch_size)
        for _, outcomes in pool.map("detect", chunks, cfg.nemo, cfg.generation.size):
            errors = []
            for o in outcomes:
                if o.error is not None:
                    log.warning("detect %s: %s", o.prompt_id, o.error)
                    errors.append(_error_row(run, "detect", o.prompt_id, o.error))
                    continue
                row = _detect_row(cfg, model_id, o.prompt_id, o.detection, run.run_id)
                row["message"] = "memorized" if row["memorized"] else "not memorized: no sample's m_i above the threshold"
                row["unet_calls"] = o.unet_calls
                memorized += int(row["memorized"])
                out.append(row)
                # one UNet call over the n latents: n evaluations (detection_row's unit)
                detections.append(detection_row(o.prompt_id, "nemo", model_id, settings, row["detect_score"],
                                                unet_calls=o.unet_calls * cfg.nemo.n_latents, seconds=o.seconds,
                                                run_id=run.run_id))
            if errors:
                db.upsert("errors", pa.Table.from_pylist(errors))
                n_errors += len(errors)
            if len(out) >= cfg.ingest.write_batch_rows:
                flush()
    flush()
    run.rows_out, run.errors = written, base_errors + n_errors
    run.metrics.update(memorized=memorized, not_memorized=written - memorized)
    return memorized


_DETECT_FIELDS = ("nemo_id", "prompt_id", "model_id", "detect_score", "detect_mean", "n_retained", "memorized",
                  "run_id")


def _keep_localization(db: Database, rows: list[dict]) -> list[dict]:
    """Detection rows merged over stored ones, so rerunning detection keeps localization results.

    Same nemo_id means same settings, hence the same detection; only the detection columns are
    rewritten.
    """
    if not db.has_table("nemo_prompts"):
        return rows
    ids = ", ".join(_q(r["nemo_id"]) for r in rows)
    old = {r["nemo_id"]: r for r in db.read("nemo_prompts", where=f"nemo_id IN ({ids})").to_pylist()}
    out = []
    for r in rows:
        prev = old.get(r["nemo_id"])
        if prev is None or prev.get("refined_score") is None:
            out.append(r)
        else:
            out.append({**prev, **{k: r[k] for k in _DETECT_FIELDS}})
    return out


def neuron_rows(cfg: Config, model_id: str, prompt_id: str, kind: str, sets: NeuronSets, score: float | None,
                layers: Sequence[ValueLayer | LayerInfo], stats_source: str, run_id: str) -> list[dict]:
    """One `neurons` row per value layer (empty lists included, so unions see every layer)."""
    return [{"neuron_set_id": neuron_set_id(model_id, prompt_id, kind, l.idx, cfg, stats_source), "scope": "prompt",
             "prompt_id": prompt_id, "cluster_id": None, "kind": kind, "layer_idx": l.idx, "module": l.name,
             "neurons": [int(j) for j in sets.get(l.idx, [])], "score": score, "model_id": model_id,
             "run_id": run_id} for l in layers]


def stored_localization(db: Database, cfg: Config, model_id: str, prompt_id: str,
                        layers: Sequence[ValueLayer | LayerInfo], stats_source: str,
                        only_memorized: bool) -> dict | None:
    """The prompt's `nemo_prompts` row from an earlier run with these settings, if it still holds:
    a prompt detection did not flag (localizing only flagged ones), or a localized prompt whose
    initial and refined neuron rows for this statistics source were written by the same run."""
    from fbmem.jobs.candidates import sql_list

    nid = nemo_id(model_id, prompt_id, cfg)
    if not db.has_table("nemo_prompts"):
        return None
    rows = db.read("nemo_prompts", where=f"nemo_id = '{nid}'").to_pylist()
    if not rows:
        return None
    row = rows[0]
    if row["n_initial"] is None:
        return row if only_memorized and row["memorized"] is False else None
    ids = [neuron_set_id(model_id, prompt_id, kind, l.idx, cfg, stats_source)
           for kind in ("initial", "refined") for l in layers]
    got = db.read("neurons", ["run_id"], where=f"neuron_set_id IN ({sql_list(ids)})") if db.has_table("neurons") else None
    if got is None or got.num_rows != len(ids) or set(got.column("run_id").to_pylist()) != {row["run_id"]}:
        return None
    return row


def _localized_rows(cfg: Config, model_id: str, o: PromptOutcome, layers: Sequence[LayerInfo], stats_source: str,
                    run_id: str) -> tuple[dict, list[dict]]:
    """A prompt's `nemo_prompts` row and its `neurons` rows (none when it was not localized)."""
    row = _detect_row(cfg, model_id, o.prompt_id, o.detection, run_id)
    row["unet_calls"] = o.unet_calls
    res = o.result
    if res is None:
        row["message"] = "not memorized: no sample's m_i above the threshold; nothing to localize"
        return row, []
    row.update(initial_score=res.initial.score, refined_score=res.refined_score, theta=res.initial.theta,
               k=res.initial.k, n_initial=n_neurons(res.initial.sets), n_refined=n_neurons(res.refined.sets),
               criterion_reached=res.criterion_reached, message=outcome_message(res))
    nrows = (neuron_rows(cfg, model_id, o.prompt_id, "initial", res.initial.sets, res.initial.score, layers,
                         stats_source, run_id)
             + neuron_rows(cfg, model_id, o.prompt_id, "refined", res.refined.sets, res.refined_score, layers,
                           stats_source, run_id))
    return row, nrows


def run_localize(db: Database, cfg: Config, model: Any, prompts: pa.Table | Sequence[Mapping], stats: NeuronStats,
                 run: RunRecord, batched: bool = True, only_memorized: bool = True,
                 max_unet_batch: int | None = None, force: bool = False) -> list[dict]:
    """Detection + localization per prompt row -> `neurons` and `nemo_prompts`; returns the nemo
    rows, in the order of `prompts`.

    Prompts that detection does not call memorized get a nemo_prompts row saying so and no neurons
    (unless only_memorized=False, which localizes every prompt against all its latents). The stats
    must fit this UNet's value layers (checked before any prompt runs). `max_unet_batch` caps the
    samples of one UNet forward (GPU memory); a capped call counts as several sequential calls.
    A prompt already localized with the same model, settings and statistics is reused (its stored
    row is returned) unless `force`: the search is the costly part of a rerun. Reuse is decided
    here, before any actor starts, so a rerun with nothing new loads no model. The other prompts
    go to the actors `resources.nemo.batch_size` at a time; each batch's rows are written when it
    comes back (neurons first), so a killed run keeps what it did.
    """
    model_id = cfg.models.diffusion.model_id
    rows = prompt_rows(prompts)
    run.rows_in = len(rows)
    # the statistics' layers name the stored neuron rows (they must be the model's layers to be used)
    stat_layers = [LayerInfo(i, stats.modules.get(i, ""), n) for i, n in sorted(stats.sizes().items())]
    found: dict[int, dict] = {}
    todo: list[tuple[int, dict]] = []
    calls = sets_eval = localized = reached = reused = 0
    for pos, r in enumerate(rows):
        old = None if force else stored_localization(db, cfg, model_id, r["prompt_id"], stat_layers, stats.source,
                                                     only_memorized)
        if old is None:
            todo.append((pos, r))
            continue
        reused += 1
        localized += int(old["n_initial"] is not None)
        reached += int(bool(old["criterion_reached"]))
        found[pos] = old
    errors = []
    if todo:
        with nemo_model(cfg, model) as pool:
            layers = model_layers(pool, cfg)
            check_stats_layers(stats, layers)
            chunks = _chunks(todo, cfg.resources.nemo.batch_size)
            results = pool.map("localize", [[r for _, r in c] for c in chunks], stats, cfg.nemo, cfg.generation.size,
                               batched=batched, only_memorized=only_memorized, max_unet_batch=max_unet_batch)
            for ci, outcomes in results:
                done_rows, nrows = [], []
                for (pos, _), o in zip(chunks[ci], outcomes):
                    if o.error is not None:
                        log.warning("localize %s: %s", o.prompt_id, o.error)
                        errors.append(_error_row(run, "localize", o.prompt_id, o.error))
                        continue
                    row, nr = _localized_rows(cfg, model_id, o, layers, stats.source, run.run_id)
                    calls += o.unet_calls
                    sets_eval += o.sets_evaluated
                    localized += int(o.result is not None)
                    reached += int(o.result is not None and o.result.criterion_reached)
                    done_rows.append(row)
                    nrows += nr
                    found[pos] = row
                if nrows:
                    db.upsert("neurons", pa.Table.from_pylist(nrows))
                if done_rows:  # after its neurons: a stored row always has them
                    db.upsert("nemo_prompts", pa.Table.from_pylist(done_rows, schema=NEMO_PROMPTS))
    if errors:
        db.upsert("errors", pa.Table.from_pylist(errors))
    out = [found[pos] for pos in sorted(found)]
    run.rows_out, run.errors = len(out), run.errors + len(errors)
    run.metrics.update(localized=localized, criterion_reached=reached, unet_calls=calls, sets_evaluated=sets_eval,
                       batched=batched, stats_source=stats.source, reused=reused)
    return out
