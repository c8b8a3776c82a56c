"""`fbmem label`: candidates -> lazy masks -> batched region MS-SSIM -> pair_scores -> labels.

Scoring runs as a Ray Data actor pool (`PairScorer`): each actor opens the database itself,
fetches the pixels and masks of the generations and candidates in its batch, and scores all
pairs of the batch in batched calls (jobs/core/region_similarity.py). Labels are then computed from
the stored pair scores, so the label of a generation is always reproducible from `pair_scores`
(and the reference's rule is one SQL query away: sql/paper_rule_labels.sql).

Idempotence: pair and label ids hash the ids with every setting that changes a score or a label,
so a rerun with the same settings skips generations already labelled (unless --force) and a
rerun with other settings adds rows beside the old ones instead of mixing them.

Incremental scans (DESIGN.md, "Scans are incremental in both directions"): a rerun also compares
the generations labelled before with the training images ingested since, and only with those
(`run_label_job`, `incremental_candidates`); a label that a new image changes is rewritten in
place, and every label set or changed leaves a `label_changes` row (`write_labels`), so what
changed between two scans is a query (sql/scan_diff.sql).
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from fbmem.jobs.candidates import (
    CANDIDATE_SCHEMA,
    find_candidates,
    select_in,
    stored_distances,
)
from fbmem.jobs.config import Config
from fbmem.jobs.core.label_rule import (
    LABELS,
    RULE_MOST_SEVERE,
    RULE_PAPER,
    RULES,
    label_generation,
    pair_labels,
)
from fbmem.jobs.core.region_similarity import prepare_batch, score_pairs
from fbmem.jobs.lazy_masks import ensure_masks
from fbmem.jobs.runtime.cpu_allocator import (
    default_cpu_block_bytes,
    retain_freed_memory,
)
from fbmem.jobs.runtime.run_record import RunRecord, now_utc
from fbmem.jobs.runtime.stream import ErrorSource, drain
from fbmem.pipelines.actors import actor_kwargs, batch_blocks
from fbmem.storage.database import Database, connect
from fbmem.storage.keys import sql_list, stable_hash
from fbmem.storage.masks import training_masks_for
from fbmem.storage.schema import LABELS as LABELS_SCHEMA
from fbmem.storage.schema import PAIR_SCORES as PAIR_SCORES_SCHEMA

log = logging.getLogger(__name__)


def score_settings(cfg: Config) -> dict:
    f = cfg.fbmem
    out = {"metric": f.region_metric, "S": f.image_size, "beta": f.beta, "win": f.win_size,
           "sigma": f.win_sigma, "weights": list(f.ms_weights), "small": f.small_images}
    if f.edge_band:  # only when set, so pair ids scored under SPEC settings stay what they were
        out["edge_band"] = f.edge_band
    return out


def label_settings(cfg: Config, mode: str, k: int) -> dict:
    return {**score_settings(cfg), "taus": list(cfg.fbmem.thresholds), "candidates": mode, "k": k}


def pair_id(generation_id: str, image_id: str, settings: dict) -> str:
    return stable_hash(generation_id, image_id, settings)


def label_id(generation_id: str, rule: str, settings: dict) -> str:
    return stable_hash(generation_id, rule, settings)


# ------------------------------------------------------------------------------- scoring actor


def _decode_rgb(row: dict, max_pixels: int, min_side: int):
    from fbmem.pipelines.images import decode_image, read_uri

    data = row.get("image_bytes")
    if data is None:
        data = read_uri(row["source_uri"], timeout_s=30.0)
    return decode_image(data, max_pixels=max_pixels, min_side=min_side)


def _mask_or_empty(row: dict, size: tuple[int, int]) -> np.ndarray:
    """No mask means no foreground: the beta rule then scores fg and bg with the full image."""
    from fbmem.pipelines.masks import decode_mask_png

    if row.get("mask_png") is None:
        return np.zeros((size[1], size[0]), np.float32)
    return decode_mask_png(row["mask_png"])


class PairScorer:
    """Ray Data actor: candidate pairs -> scored pairs (batch_format="pyarrow")."""

    def __init__(self, config_json: str, db_uri: str) -> None:
        from fbmem.pipelines.devices import pick_device

        self.cfg = Config.model_validate_json(config_json)
        self.db = connect(db_uri, self.cfg.storage_options)
        self.device = pick_device(self.cfg.resources.device)
        self.settings = score_settings(self.cfg)
        if self.device.type == "cpu":
            retain_freed_memory()  # this actor lives for the whole scan: whole chunks per call

    def _load(self, table: str, key: str, ids: list[str]) -> dict[str, tuple]:
        if table == "training_images":  # own row's mask, else training_masks (storage/masks.py)
            rows = self.db.read(table, [key, "image_bytes", "source_uri"], where=f"{key} IN ({sql_list(ids)})")
            masks = training_masks_for(self.db, ids)
            rows = rows.append_column("mask_png", pa.array(
                [masks[i][0] if i in masks else None for i in rows.column(key).to_pylist()], pa.large_binary()))
        else:
            rows = self.db.read(table, [key, "image_bytes", "source_uri", "mask_png"], where=f"{key} IN ({sql_list(ids)})")
        out = {}
        for r in rows.to_pylist():
            try:
                img = _decode_rgb(r, self.cfg.ingest.max_pixels, self.cfg.ingest.min_side)
                out[r[key]] = (img, _mask_or_empty(r, img.size))
            except Exception as exc:  # noqa: BLE001 - one unreadable image fails only its pairs
                out[r[key]] = exc
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        f = self.cfg.fbmem
        pairs = batch.to_pylist()
        gens = self._load("generations", "generation_id", sorted({p["generation_id"] for p in pairs}))
        imgs = self._load("training_images", "image_id", sorted({p["image_id"] for p in pairs}))
        gen_keys = [g for g, v in gens.items() if not isinstance(v, Exception)]
        img_keys = [i for i, v in imgs.items() if not isinstance(v, Exception)]
        gpos = {g: i for i, g in enumerate(gen_keys)}
        ipos = {g: i for i, g in enumerate(img_keys)}
        ok = [p for p in pairs if p["generation_id"] in gpos and p["image_id"] in ipos]
        out = []
        if ok:
            prep = dict(small_images=f.small_images, win_size=f.win_size, weights=f.ms_weights, metric=f.region_metric)
            gx, gm = prepare_batch([gens[g][0] for g in gen_keys], [gens[g][1] for g in gen_keys], f.image_size, **prep)
            tx, tm = prepare_batch([imgs[i][0] for i in img_keys], [imgs[i][1] for i in img_keys], f.image_size, **prep)
            res = score_pairs(
                gx.to(self.device), gm.to(self.device), tx.to(self.device), tm.to(self.device),
                gen_idx=torch.tensor([gpos[p["generation_id"]] for p in ok]),
                train_idx=torch.tensor([ipos[p["image_id"]] for p in ok]),
                metric=f.region_metric, beta=f.beta, win_size=f.win_size, win_sigma=f.win_sigma,
                weights=f.ms_weights, chunk_size=f.chunk_pairs, small_images=f.small_images,
                edge_band=f.edge_band, cpu_block_bytes=default_cpu_block_bytes(),
            )
            tf, tg, tb = f.thresholds
            labels, fired = pair_labels(res["full"].numpy(), res["fg"].numpy(), res["bg"].numpy(),
                                        tau_full=tf, tau_fg=tg, tau_bg=tb)
            for j, p in enumerate(ok):
                out.append({**p, "full": float(res["full"][j]), "fg": float(res["fg"][j]), "bg": float(res["bg"][j]),
                            "fg_area": float(res["fg_area"][j]), "bg_area": float(res["bg_area"][j]),
                            "pair_label": str(labels[j]), "pair_rule": str(fired[j]), "error": None})
        for p in pairs:
            if p["generation_id"] in gpos and p["image_id"] in ipos:
                continue
            why = gens.get(p["generation_id"]) if p["generation_id"] not in gpos else imgs.get(p["image_id"])
            what = "generation" if p["generation_id"] not in gpos else "training image"
            reason = f"score: {what} unusable: {why}" if why is not None else f"score: {what} not found"
            out.append({**p, "full": None, "fg": None, "bg": None, "fg_area": None, "bg_area": None,
                        "pair_label": None, "pair_rule": None, "error": reason})
        return pa.Table.from_pylist(out, schema=_SCORED_SCHEMA)


_SCORED_SCHEMA = pa.schema(
    [("generation_id", pa.string()), ("image_id", pa.string()), ("prompt_id", pa.string()),
     ("candidate_source", pa.string()), ("rank", pa.int32()), ("distance", pa.float32()),
     ("full", pa.float32()), ("fg", pa.float32()), ("bg", pa.float32()), ("fg_area", pa.float32()),
     ("bg_area", pa.float32()), ("pair_label", pa.string()), ("pair_rule", pa.string()), ("error", pa.string())]
)


def _pair_uris(bad: pa.Table) -> list[str]:
    """The input of a pair that could not be scored: generation|training image."""
    return [f"{g}|{i}" for g, i in zip(bad.column("generation_id").to_pylist(), bad.column("image_id").to_pylist())]


PAIR_ERRORS = ErrorSource(stage="score", source_uri=_pair_uris, source_id="generation_id")


# ------------------------------------------------------------------------------- labels (pure)


def _sorted_pairs(ps: list[dict]) -> list[dict]:
    return sorted(ps, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["image_id"]))


def _label_row(gen: str, rule: str, settings: dict, cfg: Config, mode: str, run_id: str, ts: datetime,
               best: dict, label: str, reason: str, n: int) -> dict:
    tf, tg, tb = cfg.fbmem.thresholds
    return {
        "label_id": label_id(gen, rule, settings), "generation_id": gen, "prompt_id": best["prompt_id"],
        "label": label, "rule": rule, "reason": reason, "best_image_id": best["image_id"],
        "full": best["full"], "fg": best["fg"], "bg": best["bg"], "n_candidates": n,
        "tau_full": tf, "tau_fg": tg, "tau_bg": tb, "beta": cfg.fbmem.beta,
        "region_metric": cfg.fbmem.region_metric, "candidates_mode": mode,
        "run_id": run_id, "labelled_at": ts,
    }


def labels_from_pairs(pairs: list[dict], cfg: Config, settings: dict, run_id: str, mode: str,
                      labelled_at: datetime | None = None) -> list[dict]:
    """One label row per generation and rule (most-severe, the default; and the reference's).

    `labelled_at` is the generation's watermark for incremental scans: every training image
    ingested at or before it was in the corpus it was compared with (the job passes the time it
    started reading the corpus; now when None).
    """
    by_gen: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_gen[p["generation_id"]].append(p)
    tf, tg, tb = cfg.fbmem.thresholds
    rows = []
    ts = labelled_at or now_utc()
    for gen, ps in sorted(by_gen.items()):
        ps = _sorted_pairs(ps)
        for rule in (RULE_MOST_SEVERE, RULE_PAPER):
            label, idx, reason = label_generation(ps, rule=rule, tau_full=tf, tau_fg=tg, tau_bg=tb)
            rows.append(_label_row(gen, rule, settings, cfg, mode, run_id, ts, ps[idx], label, reason, len(ps)))
    return rows


def fold_labels(previous: list[dict], new_pairs: list[dict], cfg: Config, settings: dict, run_id: str,
                mode: str, labelled_at: datetime) -> list[dict]:
    """Labels of generations compared with new training images: each rule applied to the pair that
    decided its previous label followed by the new pairs.

    Both rules pick one pair by a total order (most-severe: severity, then mean of fg and bg;
    paper: 0.5*fg + 0.5*bg), so the winner over old and new pairs is the winner between the old
    winner and the new pairs: the label is the one a relabel from every stored pair of the same
    candidates would give, without reading those pairs back. (Reading them would also be wrong:
    pair ids do not depend on the candidate mode or k, so `pair_scores` mixes pairs of every
    candidate set scored under the same score settings.) On an exact tie the old winner stays.
    `previous`: label rows (both rules) of the generations in `new_pairs`; generations without
    new pairs get no row.
    """
    prev = {(r["generation_id"], r["rule"]): r for r in previous}
    by_gen: dict[str, list[dict]] = defaultdict(list)
    for p in new_pairs:
        by_gen[p["generation_id"]].append(p)
    tf, tg, tb = cfg.fbmem.thresholds
    rows = []
    for gen, ps in sorted(by_gen.items()):
        ps = _sorted_pairs(ps)
        for rule in (RULE_MOST_SEVERE, RULE_PAPER):
            old = prev.get((gen, rule))
            seed = []
            if old is not None and None not in (old["full"], old["fg"], old["bg"]):
                seed = [{"generation_id": gen, "image_id": old["best_image_id"], "prompt_id": old["prompt_id"],
                         "full": old["full"], "fg": old["fg"], "bg": old["bg"]}]
            cands = seed + ps
            label, idx, reason = label_generation(cands, rule=rule, tau_full=tf, tau_fg=tg, tau_bg=tb)
            n_old = int(old["n_candidates"] or 0) if old is not None else 0
            if seed:
                reason += (f" [incremental: pair 0 decided the previous label ({old['label']}, "
                           f"{old['best_image_id']}), pairs 1-{len(ps)} are new]")
            rows.append(_label_row(gen, rule, settings, cfg, mode, run_id, labelled_at, cands[idx], label, reason,
                                   n_old + len(ps)))
    return rows


def label_change_rows(rows: list[dict], previous: Mapping[str, str | None], run: RunRecord) -> list[dict]:
    """A `label_changes` row for each label row that is new or differs from `previous` (label_id ->
    the label stored before, None or absent for a first label)."""
    scan_id = getattr(run, "scan_id", None)
    ts = now_utc()
    out = []
    for r in rows:
        before = previous.get(r["label_id"])
        if before is not None and before == r["label"]:
            continue
        # within a scan, a transition is one row however often the scan is resumed (a label run
        # killed between writing its changes and its labels writes the same change again)
        key = ("scan", scan_id) if scan_id is not None else ("run", run.run_id)
        out.append({"change_id": stable_hash(r["label_id"], before, r["label"], *key), "label_id": r["label_id"],
                    "generation_id": r["generation_id"], "rule": r["rule"], "label": r["label"],
                    "previous_label": before, "best_image_id": r["best_image_id"], "run_id": run.run_id,
                    "scan_id": scan_id, "changed_at": ts})
    return out


# ------------------------------------------------------------------------------- the job

_LABEL_COLUMNS = [f.name for f in LABELS_SCHEMA]
_PAIR_COLUMNS = [f.name for f in PAIR_SCORES_SCHEMA]


def write_labels(db: Database, rows: list[dict], previous: Mapping[str, str | None], run: RunRecord) -> list[dict]:
    """The one place labels are written: upsert `rows` and record what changed in `label_changes`.

    Changes are written first: a crash between the two writes leaves a change row for a label not
    written yet, which the rerun writes again (scan_diff takes the latest per generation), rather
    than a label whose change is lost. Returns the change rows.
    """
    changes = label_change_rows(rows, previous, run)
    if changes:
        db.upsert("label_changes", pa.Table.from_pylist(changes))
    if rows:
        db.upsert("labels", pa.Table.from_pylist(rows))
    return changes


def label_state(db: Database, generation_ids: list[str], settings: dict) -> pa.Table:
    """The stored label rows (both rules) of these generations under these settings: one DuckDB
    scan of `labels` joined with their label ids, never the table's key set."""
    ids = [label_id(g, rule, settings) for g in generation_ids for rule in RULES]
    return select_in(db, "labels", "label_id", ids, _LABEL_COLUMNS)


def _labelled_ids(state: pa.Table) -> pa.Array:
    """Generations with a row for every rule (one missing: labelled again from scratch)."""
    if state.num_rows == 0:
        return pa.array([], pa.string())
    ids = [set(state.filter(pc.equal(state.column("rule"), rule)).column("generation_id").to_pylist()) for rule in RULES]
    return pa.array(sorted(set.intersection(*ids)), pa.string())


def generations_to_label(db: Database, cfg: Config, settings: dict, force: bool, where: str | None) -> pa.Table:
    """Generations (matching `where`, with an embedding) with no label under these settings; all with `force`."""
    gens = _read_generations(db, where)
    if force or gens.num_rows == 0:
        return gens
    done = _labelled_ids(label_state(db, gens.column("generation_id").to_pylist(), settings))
    return gens.filter(pc.invert(pc.is_in(gens.column("generation_id"), value_set=done)))


def _read_generations(db: Database, where: str | None) -> pa.Table:
    gens = db.read("generations", ["generation_id", "prompt_id", "embedding"], where=where)
    return gens.filter(pc.is_valid(gens.column("embedding")))


def ts_literal(ts: datetime) -> str:
    """A timestamp literal for Lance filters on the UTC timestamp columns (microseconds kept)."""
    return f"timestamp '{ts.astimezone(timezone.utc).strftime('%Y-%m-%d %H:%M:%S.%f')}'"


def new_rows_window(since: datetime | None, until: datetime) -> str:
    """The training rows ingested after a label's watermark and up to this run's start."""
    upto = f"ingested_at <= {ts_literal(until)}"
    if since is None:  # a label row without a watermark: compare with everything up to now
        return f"(ingested_at IS NULL OR {upto})"
    return f"ingested_at > {ts_literal(since)} AND {upto}"


COVERAGE_KEY = "label_coverage"


def coverage_record(settings: dict, where: str | None, until: datetime) -> dict:
    """What a finished label run compared: every labelled generation matching `where` (under these
    label settings) with every training row ingested up to `until`. Kept in its `runs` row."""
    return {"settings": stable_hash(settings), "where": where, "until": until.astimezone(timezone.utc).isoformat()}


def covered_until(db: Database, settings: dict, where: str | None) -> datetime | None:
    """The latest `until` of the label runs that finished (`ok`) under these settings and covered
    the generations of `where` (their own `where` was the same, or none).

    This is the second watermark of a labelled generation: the later of its label's
    `labelled_at` and this. A generation compared with new rows of which none entered its top-k
    keeps its label row (and run_id) as it was, yet is not searched again for those rows.
    """
    if not db.has_table("runs"):
        return None
    rows = db.read("runs", ["metrics_json"], where=f"status = 'ok' AND metrics_json LIKE '%{COVERAGE_KEY}%'")
    want = stable_hash(settings)
    best = None
    for text in rows.column("metrics_json").to_pylist():
        cov = json.loads(text or "{}").get(COVERAGE_KEY)
        if not cov or cov.get("settings") != want or cov.get("where") not in (None, where):
            continue
        until = datetime.fromisoformat(cov["until"])
        best = until if best is None or until > best else best
    return best


def incremental_candidates(db: Database, cfg: Config, gens: pa.Table, state: pa.Table, *, mode: str, k: int,
                           until: datetime, covered: datetime | None = None) -> tuple[pa.Table, dict]:
    """Candidates of labelled generations among the training rows ingested since each was compared.

    A generation's watermark is the later of its label's `labelled_at` and `covered` (see
    `covered_until`); generations are grouped by it (one value per label run that wrote or
    covered them, so few groups), and a group whose window holds no row costs one count. In `ann`
    mode a new row is kept only if it would enter the generation's top-k beside the pairs stored
    for it (`candidates.within_top_k`); exact mode keeps every new row; linked rows among the new
    ones are always kept. Returns the candidates and figures for the run record.
    """
    ms = state.filter(pc.equal(state.column("rule"), RULE_MOST_SEVERE))
    ms = ms.filter(pc.is_in(ms.column("generation_id"), value_set=gens.column("generation_id").combine_chunks()))
    marks: dict[datetime | None, list[str]] = defaultdict(list)
    for g, t in zip(ms.column("generation_id").to_pylist(), ms.column("labelled_at").to_pylist()):
        if covered is not None and (t is None or t < covered):
            t = covered
        marks[t].append(g)
    windows = []
    for since in sorted(marks, key=lambda t: (t is not None, t)):
        where = new_rows_window(since, until)
        new_rows = db.count("training_images", where)
        if new_rows == 0:
            continue
        ids = pa.array(marks[since], pa.string())
        windows.append((where, new_rows, gens.filter(pc.is_in(gens.column("generation_id"), value_set=ids))))
    figures = {"incremental_windows": len(windows), "incremental_new_rows": sum(w[1] for w in windows),
               "incremental_generations": sum(w[2].num_rows for w in windows)}
    if not windows:
        return CANDIDATE_SCHEMA.empty_table(), figures
    stored = None
    if mode != "exact":
        stored = stored_distances(db, [g for w in windows for g in w[2].column("generation_id").to_pylist()], k)
    parts = [find_candidates(db, cfg, g, mode=mode, k=k, where=where, stored=stored) for where, _, g in windows]
    return pa.concat_tables(parts), figures


def _score(db: Database, cfg: Config, cands: pa.Table, run: RunRecord, ssettings: dict) -> list[dict]:
    """Score candidate pairs in the PairScorer actor pool; write them to `pair_scores` as they
    come (errors to `errors`); return the scored rows."""
    if cands.num_rows == 0:
        return []
    res = cfg.resources.score
    ds = ray.data.from_arrow(batch_blocks(cands, res.batch_size)).map_batches(
        PairScorer, fn_constructor_args=(cfg.to_json(), db.uri), **actor_kwargs(res)
    )
    scored: list[dict] = []

    def pair_rows(good: pa.Table) -> pa.Table:
        rows = good.to_pylist()
        for r in rows:
            r.update(pair_id=pair_id(r["generation_id"], r["image_id"], ssettings),
                     region_metric=cfg.fbmem.region_metric, image_size=cfg.fbmem.image_size, run_id=run.run_id)
        scored.extend(rows)
        return pa.Table.from_pylist(rows)

    drain(ds.iter_batches(batch_size=1024, batch_format="pyarrow"), db=db, table="pair_scores", run=run,
          desc="score pairs", unit="pair", rows=pair_rows, errors=PAIR_ERRORS, total=cands.num_rows)
    return scored


def run_label_job(db: Database, cfg: Config, *, run: RunRecord, force: bool = False,
                  mode: str | None = None, k: int | None = None, where: str | None = None,
                  incremental: bool = True) -> Counter:
    """Label every generation (matching `where`) that has no label under these settings, and, with
    `incremental`, compare the labelled ones with the training images ingested since.

    Two paths share one scoring pass:
    - new generations (all of them with `force`): candidates among every training image,
      `labels_from_pairs`;
    - labelled generations: candidates among the rows ingested after their label's `labelled_at`
      (`incremental_candidates`). A candidate pair already in `pair_scores` (scored by a run of
      other candidate settings, or by a run killed before it wrote labels) is taken from there;
      the others are scored. A generation with new pairs gets its label row rewritten
      (`fold_labels`: same label_id, this run's run_id and labelled_at).

    Watermarks. `labelled_at` is the time this run started reading the corpus (`snapshot`), so
    a row ingested later is left to the next run (the windows stop there too). A generation whose
    window held new rows of which none would enter its top-k keeps its label row untouched: its
    label, run_id and labelled_at did not change, and rewriting them would make every scan
    rewrite every label. Its watermark moves all the same, through a second one kept per run: a
    run that finishes records in its `runs` row that it compared every labelled generation of
    `where` up to `snapshot` (`coverage_record`), and the next run starts each generation's
    window at the later of its `labelled_at` and the latest such record (`covered_until`). So a
    rerun with nothing new searches nothing. A run that fails records nothing: the next run
    searches its windows again, which scores nothing twice (pairs already stored are read) and
    rejects again what was rejected (the top-k bound only falls as pairs are added).
    Caveats: a row's `ingested_at` is stamped by the ingest worker before its commit, so a label
    run concurrent with an ingest may miss rows stamped before its start and committed after its
    search; and two label runs of the same settings should not overlap. Scans run ingest before
    label, one stage at a time.

    Every label written (first labels and rewritten ones) goes through `write_labels`, which
    records new or changed labels in `label_changes` with the run's scan_id.
    Metrics: candidate_pairs, pairs_scored (both paths); new_candidate_pairs, new_pairs_scored,
    new_pairs_already_stored, generations_relabelled, incremental_windows / _new_rows /
    _generations (the incremental path); labels_changed (most-severe labels that differ from the
    label they replace). Returns the distribution (most-severe rule) of the labels written.
    """
    mode = mode or cfg.candidates.mode
    k = k or cfg.candidates.k
    settings = label_settings(cfg, mode, k)
    ssettings = score_settings(cfg)
    snapshot = now_utc()  # before the corpus is read: the watermark of every label this run writes
    gens = _read_generations(db, where)
    state = label_state(db, gens.column("generation_id").to_pylist(), settings) if gens.num_rows else None
    if state is None or force:
        todo, labelled = gens, gens.slice(0, 0)
    else:
        done = pc.is_in(gens.column("generation_id"), value_set=_labelled_ids(state))
        todo, labelled = gens.filter(pc.invert(done)), gens.filter(done)
    dist: Counter = Counter()
    run.rows_in = todo.num_rows
    if todo.num_rows and db.count("training_images") == 0:
        raise ValueError("training_images is empty: ingest the training corpus first")

    inc = CANDIDATE_SCHEMA.empty_table()
    if incremental and labelled.num_rows:
        inc, figures = incremental_candidates(db, cfg, labelled, state, mode=mode, k=k, until=snapshot,
                                              covered=covered_until(db, settings, where))
        run.metrics.update(figures)
        run.rows_in += figures["incremental_generations"]
    if todo.num_rows == 0 and inc.num_rows == 0:
        log.info("no generations to label and no new training images for the labelled ones "
                 "(--force relabels)")
        run.metrics.update(pairs_scored=0, new_pairs_scored=0, generations_relabelled=0, labels_changed=0)
        if incremental or force:
            run.metrics[COVERAGE_KEY] = coverage_record(settings, where, snapshot)
        return dist

    # incremental pairs already scored (other candidate settings, or a killed run) are not scored again
    inc_ids = [pair_id(g, i, ssettings) for g, i in zip(inc.column("generation_id").to_pylist(),
                                                         inc.column("image_id").to_pylist())]
    stored_pairs = select_in(db, "pair_scores", "pair_id", inc_ids, _PAIR_COLUMNS).to_pylist() if inc_ids else []
    have = {r["pair_id"] for r in stored_pairs}
    to_score = inc.filter(pa.array([p not in have for p in inc_ids], pa.bool_())) if inc_ids else inc
    cands = find_candidates(db, cfg, todo, mode=mode, k=k) if todo.num_rows else CANDIDATE_SCHEMA.empty_table()
    run.metrics["candidate_pairs"] = cands.num_rows + inc.num_rows
    run.metrics["new_candidate_pairs"] = inc.num_rows
    run.metrics["new_pairs_already_stored"] = len(stored_pairs)
    work = pa.concat_tables([cands, to_score])
    # masks only for what is compared now (lazy masks, DESIGN.md Scale)
    run.metrics["masks_made_training"] = ensure_masks(db, cfg, "training_images", work.column("image_id").to_pylist(), run)
    run.metrics["masks_made_generations"] = ensure_masks(
        db, cfg, "generations", sorted(set(work.column("generation_id").to_pylist())), run)

    scored = _score(db, cfg, work, run, ssettings)
    run.metrics["pairs_scored"] = len(scored)
    new_gen = set(todo.column("generation_id").to_pylist())
    first = [p for p in scored if p["generation_id"] in new_gen]
    again = [p for p in scored if p["generation_id"] not in new_gen]
    run.metrics["new_pairs_scored"] = len(again)
    label_rows = labels_from_pairs(first, cfg, settings, run.run_id, mode, labelled_at=snapshot)
    relabel = again + stored_pairs
    regen = sorted({p["generation_id"] for p in relabel})
    prev_rows = state.filter(pc.is_in(state.column("generation_id"), value_set=pa.array(regen, pa.string()))).to_pylist() \
        if regen else []
    label_rows += fold_labels(prev_rows, relabel, cfg, settings, run.run_id, mode, snapshot)
    run.metrics["generations_relabelled"] = len(regen)
    previous: dict[str, str] = {}
    if state is not None and label_rows:  # what each row written replaces (first labels: nothing)
        before = state.filter(pc.is_in(state.column("label_id"), value_set=pa.array([r["label_id"] for r in label_rows])))
        previous = dict(zip(before.column("label_id").to_pylist(), before.column("label").to_pylist()))
    changes = write_labels(db, label_rows, previous, run)
    run.metrics["labels_changed"] = sum(1 for c in changes if c["rule"] == RULE_MOST_SEVERE and c["previous_label"] is not None)
    dist.update(r["label"] for r in label_rows if r["rule"] == RULE_MOST_SEVERE)
    run.rows_out = sum(dist.values())
    for lab in LABELS:
        run.metrics[lab] = dist.get(lab, 0)
    if incremental or force:  # every labelled generation of `where` was compared up to the snapshot
        run.metrics[COVERAGE_KEY] = coverage_record(settings, where, snapshot)
    return dist


def format_distribution(dist: Counter) -> str:
    total = sum(dist.values()) or 1
    return "  ".join(f"{lab}={dist.get(lab, 0)} ({dist.get(lab, 0) / total:.0%})" for lab in LABELS)
