"""`fbmem mitigate`: NeMo and NeMo-C (SPEC section 7) and the mitigation score (section 8).

NeMo deactivates each prompt's own refined neurons; NeMo-C takes, per cluster and per layer,
the union of the refined neurons of the cluster's prompts and deactivates that union for every
prompt of the cluster (a prompt NeMo never localized still benefits from its neighbours). The
images are generated again with the same (prompt, seed, sample), labelled with FB-Mem, and the
before/after label pairs give the mitigation score.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict

import numpy as np
import pyarrow as pa

from fbmem.jobs.config import Config
from fbmem.jobs.core.nemo_c import union_by_cluster
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_literal, stable_hash

log = logging.getLogger(__name__)

NeuronSets = dict[str, dict[int, list[int]]]


class NothingToMitigate(ValueError):
    """No neurons to deactivate for a method (nothing localized, or no localized prompt clustered):
    a scan reports the method as not run instead of failing."""


def refined_sets(db: Database, model_id: str) -> NeuronSets:
    """Per prompt, per layer: the refined neurons NeMo localized for this model."""
    if not db.has_table("neurons"):
        return {}
    rows = db.read("neurons", ["prompt_id", "layer_idx", "neurons"],
                   where=f"scope = 'prompt' AND kind = 'refined' AND model_id = {sql_literal(model_id)}").to_pylist()
    out: NeuronSets = defaultdict(dict)
    for r in rows:
        out[r["prompt_id"]][int(r["layer_idx"])] = list(r["neurons"] or [])
    return dict(out)


def neurons_for_method(db: Database, cfg: Config, method: str, run_id: str | None = None) -> NeuronSets:
    """Neurons to deactivate per prompt for `method` (nemo | nemo-c); stores NeMo-C unions."""
    model_id = cfg.models.diffusion.model_id
    refined = refined_sets(db, model_id)
    if not refined:
        raise NothingToMitigate("no refined neurons in the `neurons` table for this model: run `fbmem nemo localize` first")
    if method == "nemo":
        return refined
    if method != "nemo-c":
        raise ValueError(f"unknown mitigation method {method!r}: nemo or nemo-c")
    prompts = db.read("prompts", ["prompt_id", "cluster_id"]).to_pylist()
    clusters = {p["prompt_id"]: p["cluster_id"] for p in prompts}
    unclustered = [p for p in refined if clusters.get(p) is None]
    if len(unclustered) == len(refined):
        raise NothingToMitigate("no localized prompt has a cluster_id: run `fbmem cluster` first")
    if unclustered:
        log.warning("%d localized prompts have no cluster and are left out of NeMo-C", len(unclustered))
    unions = union_by_cluster(refined, clusters)
    if run_id is not None:
        rows = [
            {"neuron_set_id": stable_hash("neurons", "cluster", model_id, c, layer),
             "scope": "cluster", "cluster_id": c, "kind": "union", "layer_idx": layer,
             "module": f"layer{layer}", "neurons": ns, "model_id": model_id, "run_id": run_id}
            for c, layers in unions.items() for layer, ns in layers.items()
        ]
        if rows:
            db.upsert("neurons", pa.Table.from_pylist(rows))
    return {p: unions[c] for p, c in clusters.items() if c in unions}


def parse_alphas(text: str | None) -> list[float | None]:
    """`fbmem mitigate --alpha`: None -> [None] (nemo.alpha); "0.5" -> [0.5]; "0,0.25,0.5" -> a
    dampening sweep, one mitigation per alpha, in the order given (repeats dropped, compared as
    stored, in float32). Raises ValueError naming the value that is not a number >= 0."""
    if text is None or not text.strip():
        return [None]
    out: list[float | None] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"alpha {part.strip()!r} is not a number: give one alpha or a comma list like 0,0.25,0.5") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"alpha {part.strip()!r} must be a finite number >= 0 (0 = off, 0 < alpha < 1 = dampening)")
        if not any(same_alpha(value, seen) for seen in out):
            out.append(value)
    return out


def same_alpha(stored: float | None, alpha: float | None) -> bool:
    """Whether a stored alpha (float32, as `generations.alpha` holds it) is `alpha`: 0.1 reads back
    as 0.10000000149, so both are compared as float32 (how recipe_id hashes alpha too)."""
    if stored is None or alpha is None:
        return stored is None and alpha is None
    return bool(np.float32(stored) == np.float32(alpha))


def score_method(db: Database, method: str, alpha: float | None = None) -> dict:
    """The overall row of sql/mitigation_score.sql for `method` at `alpha` (one place for the
    pairing and the weights; jobs/core/mitigation_score.py is its tested Python twin).

    The query keeps one row per (method, alpha), so a dampening sweep's scores stay apart.
    `alpha` None: the method's only alpha; several stored alphas then need an explicit one.
    """
    from fbmem.storage.sql import load_query, query_params, run_query

    text = load_query("mitigation_score")
    rows = [r for r in run_query(db, text, query_params(text, {})).to_pylist()
            if r["method"] == method and r["level"] == "overall"]
    if alpha is not None:
        rows = [r for r in rows if same_alpha(r["alpha"], alpha)]
    elif len(rows) > 1:
        raise ValueError(f"{method} was run at several alphas {[r['alpha'] for r in rows]}: say which one")
    if not rows:
        return {"pairs": 0, "score": float("nan"), "vm_before": 0, "vm_after": 0, "alpha": alpha}
    r = rows[0]
    return {"pairs": r["pairs"], "score": float(r["mitigation_score"]),
            "vm_before": r["vm_before"], "vm_after": r["vm_after"], "alpha": r["alpha"]}


def run_mitigate(db: Database, cfg: Config, *, method: str, run: RunRecord, alpha: float | None = None,
                 n: int | None = None, prompt_filter: str | None = None) -> dict:
    """Regenerate with `method`'s neurons off (same seeds), label, and score the transitions.

    `alpha` (default nemo.alpha) scales the neurons instead of switching them off; each alpha's
    generations have their own ids (the recipe hashes alpha) and its own score, so calling this
    once per alpha is a dampening sweep.
    """
    from fbmem.jobs.generate import run_generate
    from fbmem.jobs.label import run_label_job

    alpha = cfg.nemo.alpha if alpha is None else alpha
    neurons = neurons_for_method(db, cfg, method, run_id=run.run_id)
    ids = sorted(neurons)
    where = f"prompt_id IN ({', '.join(repr(i) for i in ids)})"
    if prompt_filter:
        where = f"({where}) AND ({prompt_filter})"
    counts = run_generate(db, cfg, run=run, n=n, prompt_filter=where, mitigation=method, alpha=alpha,
                          neurons_by_prompt=neurons)
    label_run = RunRecord(db, "label", cfg, args={"where": f"mitigation = {sql_literal(method)}"},
                          scan_id=run.scan_id)
    with label_run:
        run_label_job(db, cfg, run=label_run, where=f"mitigation = {sql_literal(method)}")
    result = score_method(db, method, alpha)
    run.metrics.update(method=method, alpha=alpha, prompts=len(ids), mitigation_score=round(result["score"], 4),
                       vm_before=result["vm_before"], vm_after=result["vm_after"], pairs=result["pairs"])
    log.info("%s: %s", method, result)
    return {**result, "alpha": alpha, "generated": counts.written}
