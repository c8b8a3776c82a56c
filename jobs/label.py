"""`fbmem label`: candidates -> lazy masks -> batched region MS-SSIM -> pair_scores -> labels.

Scoring runs as a Ray Data actor pool (`PairScorer`): each actor opens the database itself,
fetches the pixels and masks of the generations and candidates in its batch, and scores all
pairs of the batch in batched calls (jobs/core/region_similarity.py). Labels are then computed from
the stored pair scores, so the label of a generation is always reproducible from `pair_scores`
(and the reference's rule is one SQL query away: sql/paper_rule_labels.sql).

Idempotence: pair and label ids hash the ids with every setting that changes a score or a label,
so a rerun with the same settings skips generations already labelled (unless --force) and a
rerun with other settings adds rows beside the old ones instead of mixing them.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from fbmem.jobs.candidates import find_candidates
from fbmem.jobs.config import Config
from fbmem.jobs.core.label_rule import (
    LABELS,
    RULE_MOST_SEVERE,
    RULE_PAPER,
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


def labels_from_pairs(pairs: list[dict], cfg: Config, settings: dict, run_id: str, mode: str) -> list[dict]:
    """One label row per generation and rule (most-severe, the default; and the reference's)."""
    by_gen: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_gen[p["generation_id"]].append(p)
    tf, tg, tb = cfg.fbmem.thresholds
    rows = []
    ts = now_utc()
    for gen, ps in sorted(by_gen.items()):
        ps = sorted(ps, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["image_id"]))
        for rule in (RULE_MOST_SEVERE, RULE_PAPER):
            label, idx, reason = label_generation(ps, rule=rule, tau_full=tf, tau_fg=tg, tau_bg=tb)
            best = ps[idx]
            rows.append({
                "label_id": label_id(gen, rule, settings), "generation_id": gen, "prompt_id": best["prompt_id"],
                "label": label, "rule": rule, "reason": reason, "best_image_id": best["image_id"],
                "full": best["full"], "fg": best["fg"], "bg": best["bg"], "n_candidates": len(ps),
                "tau_full": tf, "tau_fg": tg, "tau_bg": tb, "beta": cfg.fbmem.beta,
                "region_metric": cfg.fbmem.region_metric, "candidates_mode": mode,
                "run_id": run_id, "labelled_at": ts,
            })
    return rows


# ------------------------------------------------------------------------------- the job


def generations_to_label(db: Database, cfg: Config, settings: dict, force: bool, where: str | None) -> pa.Table:
    gens = db.read("generations", ["generation_id", "prompt_id", "embedding"], where=where)
    gens = gens.filter(pc.is_valid(gens.column("embedding")))
    if force or not db.has_table("labels") or gens.num_rows == 0:
        return gens
    done = db.existing_keys("labels")
    keep = [label_id(g, RULE_MOST_SEVERE, settings) not in done for g in gens.column("generation_id").to_pylist()]
    return gens.filter(pa.array(keep, pa.bool_()))


def run_label_job(db: Database, cfg: Config, *, run: RunRecord, force: bool = False,
                  mode: str | None = None, k: int | None = None, where: str | None = None) -> Counter:
    """Label every generation (matching `where`) that has no label under these settings."""
    mode = mode or cfg.candidates.mode
    k = k or cfg.candidates.k
    settings = label_settings(cfg, mode, k)
    ssettings = score_settings(cfg)
    gens = generations_to_label(db, cfg, settings, force, where)
    run.rows_in = gens.num_rows
    dist: Counter = Counter()
    if gens.num_rows == 0:
        log.info("no generations to label (all labelled under these settings; --force relabels)")
        return dist
    if db.count("training_images") == 0:
        raise ValueError("training_images is empty: ingest the training corpus first")
    cands = find_candidates(db, cfg, gens, mode=mode, k=k)
    run.metrics["candidate_pairs"] = cands.num_rows
    # masks only for what is compared now (lazy masks, DESIGN.md Scale)
    run.metrics["masks_made_training"] = ensure_masks(db, cfg, "training_images", cands.column("image_id").to_pylist(), run)
    run.metrics["masks_made_generations"] = ensure_masks(db, cfg, "generations", gens.column("generation_id").to_pylist(), run)

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
    run.metrics["pairs_scored"] = len(scored)
    label_rows = labels_from_pairs(scored, cfg, settings, run.run_id, mode)
    if label_rows:
        db.upsert("labels", pa.Table.from_pylist(label_rows))
    dist.update(r["label"] for r in label_rows if r["rule"] == RULE_MOST_SEVERE)
    run.rows_out = sum(dist.values())
    for lab in LABELS:
        run.metrics[lab] = dist.get(lab, 0)
    return dist


def format_distribution(dist: Counter) -> str:
    total = sum(dist.values()) or 1
    return "  ".join(f"{lab}={dist.get(lab, 0)} ({dist.get(lab, 0) / total:.0%})" for lab in LABELS)
