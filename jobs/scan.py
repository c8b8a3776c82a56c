"""`fbmem scan SPEC --db DB`: one scheduled audit of a corpus and a model, as one job.

The stages, in order (jobs/scan_spec.STAGES): ingest the corpus sources, build or update the
vector index, ingest the prompt sets, cluster the prompts (NeMo-C), generate, label (FB-Mem),
NeMo (statistics, detection, localization), the detectors (`detect`), mitigation (NeMo, NeMo-C,
per alpha, with its quality cost) and the report. Each stage is the job its own command runs,
through the same job context, so a scan is exactly the chain of commands an operator would
type, with a ledger around it (jobs/runtime/scan_ledger.py):

- every stage has a status row; a rerun of the same scan skips its `done` stages, and a scan
  whose process died (stale heartbeat, or a dead process on this host) is taken over by the
  next `fbmem scan` of the same spec, which resumes it;
- every stage is rerun-safe on its own (the ingest ledger skips done shards, the key checks skip
  stored rows, labels skip labelled generations), so a stage cut off by kill -9 and run again
  gives the tables an uninterrupted run gives (tests/jobs/test_scan_chaos.py, bench/chaos.py);
- a later scan of the same spec is incremental by the same means: only new shards are read,
  only new prompts generated and localized, the index is updated while the unindexed share is
  small, and generations labelled before are compared with the new training images only.

At the end the scan's figures (label counts and shares of the audited generations, mitigation
scores, what changed since the previous scan) go to `scans.summary_json` and `--summary-json`,
then the gates (`--fail-on`) are evaluated: a crossed gate exits with its own code after
everything is written.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fbmem.jobs.config import Config
from fbmem.jobs.core.gates import Gate, evaluate_gates, parse_gate
from fbmem.jobs.core.label_rule import LABELS
from fbmem.jobs.errors import GateCrossed, one_line
from fbmem.jobs.runtime.context import JobContext
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.jobs.runtime.scan_ledger import DONE, FAILED, ScanLedger, latest_unfinished, status_now
from fbmem.jobs.scan_spec import STAGES, ScanSpec
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_literal
from fbmem.storage.schema import now_utc
from fbmem.storage.sql import run_named_query, run_query

log = logging.getLogger(__name__)


@dataclass
class ScanContext:
    """What a stage gets: the spec, the settings, the database, and `run` to open its jobs'
    `runs` rows (each tagged with the scan id; the stage's row lists them)."""

    spec: ScanSpec
    job: JobContext
    scan_id: str
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def cfg(self) -> Config:
        return self.job.cfg

    @property
    def db(self) -> Database:
        return self.job.db

    def run(self, job: str, args: dict[str, Any] | None = None) -> RunRecord:
        record = self.job.run(job, args)
        self.runs.append(record)
        return record


# ------------------------------------------------------------------------------------- stages


def stage_ingest(ctx: ScanContext) -> dict[str, Any]:
    from fbmem.jobs.ingest import ingest_images

    out: dict[str, Any] = {"sources": [], "shards": 0, "shards_done_before": 0, "shards_new": 0,
                           "images_written": 0, "errors": 0}
    for src in ctx.spec.sources:
        uri = ctx.spec.path(src.uri)
        masks = src.masks or ctx.cfg.ingest.masks
        with ctx.run("ingest-training", {"src": uri, "kind": src.kind, "masks": masks}) as run:
            counts = ingest_images(ctx.db, ctx.cfg, uri, target="training", kind=src.kind, masks=masks, run=run)
        m = run.metrics
        out["sources"].append({"uri": uri, "shards": m.get("shards", 0), "done_before": m.get("skipped_shards", 0),
                               "new": m.get("shards_todo", 0), "written": counts.written, "errors": counts.errors})
        out["shards"] += m.get("shards", 0)
        out["shards_done_before"] += m.get("skipped_shards", 0)
        out["shards_new"] += m.get("shards_todo", 0)
        out["images_written"] += counts.written
        out["errors"] += counts.errors
    return out


def stage_index(ctx: ScanContext) -> dict[str, Any]:
    from fbmem.storage.vector_index import update_index

    with ctx.run("index", {"mode": "update"}) as run:
        info = update_index(ctx.db, ctx.cfg.index)
        run.rows_in = int(info.get("rows", 0) or 0)
        run.metrics.update({k: v for k, v in info.items() if k != "message"})
    return info


def stage_prompts(ctx: ScanContext) -> dict[str, Any]:
    from fbmem.jobs.ingest import ingest_prompts
    from fbmem.pipelines.reference_data import prompt_set_path

    out: dict[str, Any] = {"sets": [], "prompts_new": 0}
    for p in ctx.spec.prompts:
        path = prompt_set_path(ctx.spec.prompt_set(p))
        ctx.job.ensure_ray()
        with ctx.run("ingest-prompts", {"csv": str(path)}) as run:
            written = ingest_prompts(ctx.db, ctx.cfg, path, run=run)
        out["sets"].append({"set": str(path), "new": written, "already_stored": run.metrics.get("skipped_existing", 0)})
        out["prompts_new"] += written
    return out


def stage_cluster(ctx: ScanContext) -> dict[str, Any]:
    """Cluster the prompts; a scan whose prompts are all clustered already (no new ones) keeps
    the clusters, so NeMo-C's unions and their mitigation stay those of the previous scan."""
    from fbmem.jobs.cluster import run_cluster

    where = ctx.spec.cluster.where
    unclustered = ctx.db.count("prompts", f"({where}) AND cluster_id IS NULL" if where else "cluster_id IS NULL")
    if unclustered == 0 and ctx.db.count("prompts", where) > 0:
        return {"reclustered": False, "reason": "no new prompts since the last clustering"}
    if ctx.cfg.cluster.embedding == "text_encoder":
        ctx.job.ensure_ray()
    with ctx.run("cluster", {"where": where}) as run:
        res = run_cluster(ctx.db, ctx.cfg, run=run, where=where)
    return {"reclustered": True, "silhouette": round(float(res["silhouette"]), 4), "sizes": res["sizes"]}


def stage_generate(ctx: ScanContext) -> dict[str, Any]:
    from fbmem.jobs.generate import run_generate

    ctx.job.ensure_ray()
    with ctx.run("generate", {"n": ctx.cfg.generation.n}) as run:
        counts = run_generate(ctx.db, ctx.cfg, run=run)
    return {"planned": counts.planned, "already_stored": counts.skipped, "generated": counts.written,
            "errors": counts.errors}


def stage_label(ctx: ScanContext) -> dict[str, Any]:
    from fbmem.jobs.label import run_label_job

    ctx.job.ensure_ray()
    where = ctx.spec.label_where
    with ctx.run("label", {"where": where}) as run:
        dist = run_label_job(ctx.db, ctx.cfg, run=run, where=where)
    keys = ("candidate_pairs", "pairs_scored", "generations_relabelled", "new_pairs_scored", "labels_changed")
    return {"labelled": {lab: dist.get(lab, 0) for lab in LABELS},
            **{k: run.metrics[k] for k in keys if k in run.metrics}}


def stage_nemo(ctx: ScanContext) -> dict[str, Any]:
    """Statistics (once per model and prompt set, or a statistics file), then detection and
    localization of every prompt not done yet with these settings."""
    from fbmem.jobs.model_actors import nemo_pool
    from fbmem.jobs.nemo import import_stats_csv, model_layers, prompt_set_source, read_stats, run_localize, run_stats
    from fbmem.pipelines.reference_data import statistics_path

    cfg, db, spec = ctx.cfg, ctx.db, ctx.spec
    ctx.job.ensure_ray()
    model_id = cfg.models.diffusion.model_id
    out: dict[str, Any] = {}
    if spec.nemo.stats_from:
        csv = statistics_path(spec.path(spec.nemo.stats_from) if Path(spec.path(spec.nemo.stats_from)).exists()
                              else spec.nemo.stats_from)
        source = None
        if not db.count("neuron_stats", f"model_id = {sql_literal(model_id)}"):
            with ctx.run("nemo-stats", {"from_csv": str(csv)}) as run, nemo_pool(cfg, pool_size=1) as pool:
                import_stats_csv(db, csv, model_id, run, layers=model_layers(pool, cfg))
    else:
        texts = db.read("prompts", ["text"], where=spec.nemo.stats_prompts).column(0).to_pylist()
        if len(texts) < 2:
            raise ValueError(f"NeMo statistics need at least 2 prompts matching {spec.nemo.stats_prompts!r} "
                             f"(nemo.stats_prompts in the spec), found {len(texts)}")
        source = prompt_set_source(texts)
        have = db.count("neuron_stats", f"model_id = {sql_literal(model_id)} AND stats_source = {sql_literal(source)}")
        out["stats_reused"] = bool(have)
        if not have:
            with ctx.run("nemo-stats", {"prompts": spec.nemo.stats_prompts}) as run:
                run_stats(db, cfg, None, texts, source=source, run=run)
    stats = read_stats(db, model_id, source)
    prompts = db.read("prompts", ["prompt_id", "text"])
    with ctx.run("nemo-localize", {"prompts": "all", "localize": spec.nemo.localize}) as run:
        rows = run_localize(db, cfg, None, prompts, stats, run, batched=True,
                            only_memorized=spec.nemo.localize == "memorized")
    localized = [r for r in rows if r.get("n_initial") is not None]
    out.update(prompts=len(rows), memorized=sum(bool(r.get("memorized")) for r in rows), localized=len(localized),
               criterion_reached=sum(bool(r.get("criterion_reached")) for r in localized),
               reused=run.metrics.get("reused", 0))
    return out


def stage_detect(ctx: ScanContext) -> dict[str, Any]:
    from fbmem.jobs.detect import run_detect_method

    ctx.job.ensure_ray()
    prompts = ctx.db.read("prompts", ["prompt_id", "text"])
    out: dict[str, Any] = {}
    for method in ctx.spec.detect.methods:
        with ctx.run("detect", {"method": method}) as run:
            run_detect_method(ctx.db, ctx.cfg, prompts, method, run)
        out[method] = {"scored": run.rows_out, "unet_calls": run.metrics.get("unet_calls")}
    return out


def stage_mitigate(ctx: ScanContext) -> dict[str, Any]:
    """Each method at each alpha: regenerate with its neurons off (same seeds), label, score, and
    what it cost in image quality. A method with nothing localized is reported, not an error."""
    from fbmem.jobs.mitigate import NothingToMitigate, run_mitigate

    ctx.job.ensure_ray()
    out: dict[str, Any] = {}
    for method in ctx.spec.mitigation.methods:
        for alpha in ctx.spec.mitigation.alphas:
            key = f"{method}@{alpha:g}"
            with ctx.run("mitigate", {"method": method, "alpha": alpha}) as run:
                try:
                    res = run_mitigate(ctx.db, ctx.cfg, method=method, run=run, alpha=alpha)
                except NothingToMitigate as exc:  # nothing localized for this method: say so
                    out[key] = {"not_run": one_line(str(exc))}
                    continue
            out[key] = {k: res[k] for k in ("score", "pairs", "vm_before", "vm_after") if k in res}
            quality = _quality(ctx, method, alpha)
            if quality:
                out[key]["quality"] = quality
    return out


def _quality(ctx: ScanContext, method: str, alpha: float) -> dict[str, Any] | None:
    try:
        from fbmem.jobs.quality import run_quality
    except ImportError:  # pragma: no cover - the quality job ships with fbmem
        return None
    with ctx.run("quality", {"method": method, "alpha": alpha}) as run:
        return run_quality(ctx.db, ctx.cfg, method=method, alpha=alpha, run=run)


def stage_report(ctx: ScanContext) -> dict[str, Any]:
    from fbmem.jobs.report import write_report

    if ctx.spec.outputs.report is None:
        return {"report": None}
    out = Path(ctx.spec.path(ctx.spec.outputs.report))
    index = write_report(ctx.db, out, title=f"fbmem scan {ctx.scan_id}", nemo_threshold=ctx.cfg.nemo.threshold,
                         scan_id=ctx.scan_id)
    return {"report": str(index)}


STAGE_FUNCTIONS: dict[str, Callable[[ScanContext], dict[str, Any]]] = {
    "ingest": stage_ingest, "index": stage_index, "prompts": stage_prompts, "cluster": stage_cluster,
    "generate": stage_generate, "label": stage_label, "nemo": stage_nemo, "detect": stage_detect,
    "mitigate": stage_mitigate, "report": stage_report,
}
assert tuple(STAGE_FUNCTIONS) == STAGES


# ------------------------------------------------------------------------------------- figures


def label_counts(db: Database, model_id: str, where: str) -> dict[str, int]:
    """Audited generations of `model_id` per current label (most-severe rule)."""
    t = run_query(db, f"""
        SELECT l.label, count(*) AS n FROM current_labels AS l JOIN generations AS g USING (generation_id)
        WHERE l.rule = 'most-severe' AND g.model_id = {sql_literal(model_id)} AND ({where})
        GROUP BY l.label""")
    counts = {lab: 0 for lab in LABELS}
    for r in t.to_pylist():
        counts[r["label"]] = int(r["n"])
    return counts


def previous_scan(db: Database, name: str, scan_id: str) -> str | None:
    """The latest finished scan of the same spec before `scan_id`."""
    if not db.has_table("scans"):
        return None
    rows = db.read("scans", ["scan_id", "started_at"],
                   where=f"name = {sql_literal(name)} AND status = 'done' AND scan_id <> {sql_literal(scan_id)}").to_pylist()
    rows.sort(key=lambda r: r["started_at"])
    return rows[-1]["scan_id"] if rows else None


def diff_counts(db: Database, a: str | None, b: str) -> dict[str, int]:
    if a is None:
        return {}
    t = run_named_query(db, "scan_diff", {"a": a, "b": b})
    out: dict[str, int] = {}
    for change in t.column("change").to_pylist():
        out[change] = out.get(change, 0) + 1
    return out


def scan_summary(ctx: ScanContext, ledger: ScanLedger, gates: list[Gate]) -> dict[str, Any]:
    counts = label_counts(ctx.db, ctx.cfg.models.diffusion.model_id, ctx.spec.label_where)
    total = sum(counts.values())
    prev = previous_scan(ctx.db, ctx.spec.name, ctx.scan_id)
    stages = {s: {"status": r["status"], "seconds": round(float(r.get("seconds") or 0.0), 2),
                  "counts": json.loads(r["counts_json"]) if r.get("counts_json") else None}
              for s, r in sorted(ledger.stages.items(), key=lambda kv: STAGES.index(kv[0]))}
    return {
        "scan_id": ctx.scan_id, "name": ctx.spec.name, "model_id": ctx.cfg.models.diffusion.model_id,
        "generations": total, "labels": counts,
        "shares": {lab: (counts[lab] / total if total else 0.0) for lab in LABELS},
        "stages": stages, "previous_scan": prev, "changes_since_previous": diff_counts(ctx.db, prev, ctx.scan_id),
        "gates": evaluate_gates(gates, counts),
    }


# ------------------------------------------------------------------------------------- the scan


def choose_scan_id(db: Database, spec: ScanSpec, scan_id: str | None, stale_after_s: float, new: bool) -> str:
    """The given id; else the latest unfinished scan of this spec (resumed, or taken over when
    its process is gone); else a new id `NAME-YYYYmmddTHHMMSS`."""
    if scan_id:
        return scan_id
    if not new:
        last = latest_unfinished(db, spec.name)
        if last is not None:
            return last["scan_id"]
    return f"{spec.name}-{now_utc().strftime('%Y%m%dT%H%M%S')}"


@dataclass
class ScanResult:
    scan_id: str
    how: str
    summary: dict[str, Any]
    crossed: list[dict]


def run_scan(spec: ScanSpec, db_uri: str, *, scan_id: str | None = None, new: bool = False,
             settings: dict[str, Any] | None = None, fail_on: list[str] | None = None,
             summary_json: str | None = None) -> ScanResult:
    """Run (or resume) one scan of `spec` into `db_uri`; see the module docstring.

    Raises GateCrossed after everything is written when a gate is crossed; a failed stage raises
    its own error after its status row says `failed` with the message."""
    gates = [parse_gate(g) for g in [*spec.gates, *(fail_on or [])]]  # bad gates fail before any work
    cfg = spec.to_config(settings)
    job = JobContext(cfg, db_uri)
    db = job.db
    rt = cfg.runtime
    scan_id = choose_scan_id(db, spec, scan_id, rt.stale_after_s, new)
    job.scan_id = scan_id
    ledger = ScanLedger(db, scan_id, spec.name, stale_after_s=rt.stale_after_s, heartbeat_s=rt.heartbeat_s)
    how = ledger.claim(spec.record(), spec.spec_hash(), cfg.models.diffusion.model_id, list(STAGES), list(spec.stages))
    ctx = ScanContext(spec, job, scan_id)
    print(f"[fbmem scan] {scan_id}: {how}; stages: {', '.join(spec.stages)}", flush=True)
    t0 = time.perf_counter()
    try:
        for stage in STAGES:
            if stage not in spec.stages:
                continue
            if ledger.is_done(stage):
                print(f"[fbmem scan] {stage}: done before, skipped", flush=True)
                continue
            print(f"[fbmem scan] {stage} ...", flush=True)
            ledger.start(stage)
            ctx.runs = []
            try:
                counts = STAGE_FUNCTIONS[stage](ctx)
            except BaseException as exc:
                ledger.finish(stage, run_ids=[r.run_id for r in ctx.runs], counts={},
                              failed=one_line(f"{type(exc).__name__}: {exc}"))
                raise
            ledger.finish(stage, run_ids=[r.run_id for r in ctx.runs], counts=counts,
                          rows_in=sum(r.rows_in for r in ctx.runs), rows_out=sum(r.rows_out for r in ctx.runs),
                          errors=sum(r.errors for r in ctx.runs))
        summary = scan_summary(ctx, ledger, gates)
        ledger.close(DONE, summary=summary)
    except BaseException as exc:
        ledger.close(FAILED, message=one_line(f"{type(exc).__name__}: {exc}"))
        raise
    if summary_json or spec.outputs.summary_json:
        path = Path(summary_json or spec.path(spec.outputs.summary_json))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    crossed = [g for g in summary["gates"] if g["crossed"]]
    shares = "  ".join(f"{lab}={summary['labels'][lab]} ({summary['shares'][lab]:.1%})" for lab in LABELS)
    print(f"[fbmem scan] {scan_id}: done in {time.perf_counter() - t0:.0f} s ({how}); {summary['generations']} "
          f"audited generations: {shares}; changes since {summary['previous_scan'] or '-'}: "
          f"{summary['changes_since_previous'] or 'none'}", flush=True)
    result = ScanResult(scan_id, how, summary, crossed)
    if crossed:
        raise GateCrossed("gate crossed: " + "; ".join(
            f"{g['gate']} (measured {g['measured']:.4g})" for g in crossed) + f"; scan {scan_id} wrote everything")
    return result


def scan_rows(db: Database, stale_after_s: float) -> list[dict]:
    """`fbmem scans`: every scan with its status as seen now, newest first."""
    if not db.has_table("scans"):
        return []
    rows = db.read("scans", ["scan_id", "name", "status", "started_at", "finished_at", "heartbeat_at", "host", "pid",
                             "attempts", "seconds", "summary_json", "message"]).to_pylist()
    stages: dict[str, list[dict]] = {}
    if db.has_table("scan_stages"):
        for r in db.read("scan_stages", ["scan_id", "stage", "status", "heartbeat_at", "message"]).to_pylist():
            stages.setdefault(r["scan_id"], []).append(r)
    out = []
    for r in sorted(rows, key=lambda r: r["started_at"].timestamp() if r["started_at"] else 0.0, reverse=True):
        state = status_now(r, stale_after_s)
        st = stages.get(r["scan_id"], [])
        done = sum(s["status"] == DONE for s in st)
        wanted = sum(s["status"] != "skipped" for s in st)
        failed = [s for s in st if s["status"] == FAILED]
        summary = json.loads(r["summary_json"]) if r.get("summary_json") else {}
        out.append({"scan_id": r["scan_id"], "name": r["name"], "status": state, "stages": f"{done}/{wanted}",
                    "attempts": r["attempts"], "seconds": round(float(r["seconds"] or 0), 1),
                    "generations": summary.get("generations"),
                    "vm_share": (summary.get("shares") or {}).get("VM"),
                    "started_at": r["started_at"],
                    "error": (failed[0]["message"] if failed else None) or r["message"]})
    return out
