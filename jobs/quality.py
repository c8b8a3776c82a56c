"""What a mitigation costs in image quality: before vs after images -> `mitigation_quality`.

The mitigation score (SPEC section 8) counts memorized images that went away; it cannot tell
whether the images got worse. The paper reports image quality beside it (DB-CNN, Q-Align). This
job puts numbers beside every (method, alpha), overall and per prompt cluster:

- `clip_score`: prompt-image cosine of the before and the after images (means; value = after -
  before, so a negative value is alignment lost),
- `fd_clip`, `kid_clip`: Fréchet distance and KID between the before set and the after set, on
  the CLIP image embeddings every generation already holds (jobs/core/quality.py, torchmetrics'
  computations; Inception weights cannot be downloaded here),
- pyiqa metrics by name (`IQA_METRICS`: dbcnn, qalign, or one registered with
  `register_iqa_metric`), run only when pyiqa and the metric's weights are on this machine. A
  metric that cannot run gets one row with a note "skipped: ..." per (method, alpha), never a
  download and never a silent gap.

The CLIP numbers need no model: the prompts' text vectors and the generations' image vectors are
in the tables, from the same CLIP model (checked: a mismatch is an error, as a cosine between two
models' spaces means nothing). Pairs are those of the mitigation score: the same (prompt_id,
seed, sample, model) generated unmitigated and with `method` at `alpha`. Each alpha has its own
rows, so a dampening sweep (`fbmem mitigate --alpha 0,0.25,0.5`) gives a trade-off curve.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fbmem.jobs.config import Config
from fbmem.jobs.core.quality import clip_score, frechet_distance, kid
from fbmem.jobs.mitigate import same_alpha
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_list, sql_literal, stable_hash
from fbmem.storage.schema import MITIGATION_QUALITY, now_utc

log = logging.getLogger(__name__)

CLIP_METRICS = ("clip_score", "fd_clip", "kid_clip")  # computed from stored embeddings, always available
_IN_CHUNK = 1000  # ids per IN (...) filter: one filter per thousand prompts, not one giant literal


# ------------------------------------------------------------------------------ pyiqa metrics


@dataclass(frozen=True)
class IqaMetric:
    """A no-reference image-quality metric of pyiqa, run only from weights already on disk.

    pyiqa downloads missing weights on first use; fbmem never lets it (machines without network,
    and a quality number must not depend on what a download served that day). So each metric says
    which files it needs: `weights`, glob patterns under torch's hub folder (`$TORCH_HOME/hub`,
    where pyiqa and torchvision keep their checkpoints), and `hf_repos`, Hugging Face repositories
    that must be in the local hub cache.
    """

    name: str  # the name in quality.metrics and in mitigation_quality.metric
    pyiqa_name: str  # pyiqa.create_metric(pyiqa_name)
    weights: tuple[str, ...] = ()
    hf_repos: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        """What is not on this machine (file patterns, repositories); empty when all is there."""
        import torch.hub

        hub = Path(torch.hub.get_dir())
        out = [str(hub / pattern) for pattern in self.weights if not glob.glob(str(hub / pattern))]
        if self.hf_repos:
            from huggingface_hub.constants import HF_HUB_CACHE

            for repo in self.hf_repos:
                snapshots = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
                if not (snapshots.is_dir() and any(snapshots.iterdir())):
                    out.append(f"huggingface {repo} (in {HF_HUB_CACHE})")
        return out


IQA_METRICS: dict[str, IqaMetric] = {}


def register_iqa_metric(metric: IqaMetric) -> None:
    """Make `metric.name` usable in quality.metrics (the names of CLIP_METRICS are taken)."""
    if metric.name in CLIP_METRICS:
        raise ValueError(f"{metric.name!r} is a built-in CLIP metric")
    IQA_METRICS[metric.name] = metric


# The paper's two (SPEC section 8): DB-CNN (pyiqa's KonIQ-10k weights plus torchvision's VGG-16)
# and Q-Align (the q-future/one-align model from the Hugging Face hub).
register_iqa_metric(IqaMetric("dbcnn", "dbcnn", weights=("pyiqa/DBCNN_*.pth", "checkpoints/vgg16-*.pth")))
register_iqa_metric(IqaMetric("qalign", "qalign", hf_repos=("q-future/one-align",)))


def iqa_unavailable(metric: IqaMetric) -> str | None:
    """Why `metric` cannot run here ("skipped: ..."), or None when it can."""
    reasons = []
    missing = metric.missing()
    if missing:
        reasons.append(f"weights not present ({', '.join(missing)})")
    if importlib.util.find_spec("pyiqa") is None:
        reasons.append("pyiqa is not installed (pip install pyiqa)")
    return "skipped: " + "; ".join(reasons) if reasons else None


def check_metric_names(names: list[str]) -> None:
    """Unknown names are a configuration error (a typo must not read as 'skipped')."""
    unknown = [n for n in names if n not in CLIP_METRICS and n not in IQA_METRICS]
    if unknown:
        raise ValueError(f"quality.metrics: unknown metric(s) {unknown}; known: {[*CLIP_METRICS, *IQA_METRICS]} "
                         "(register a pyiqa metric with fbmem.jobs.quality.register_iqa_metric)")


class IqaScorer:
    """Ray Data actor: `generation_id` -> `score` of one pyiqa metric.

    It reads the pixels itself (by id, from the generations table), so the driver hands over ids
    and gets scores back, never images. One image per call to the metric: Q-Align takes batch 1.
    An image that cannot be decoded or scored gets NaN (left out of the means), not a failed batch.
    """

    def __init__(self, config_json: str, pyiqa_name: str, db_uri: str) -> None:
        import pyiqa

        from fbmem.pipelines.actors import record_model_node
        from fbmem.pipelines.devices import pick_device
        from fbmem.storage.database import connect

        cfg = Config.model_validate_json(config_json)
        os.environ["HF_HUB_OFFLINE"] = "1"  # the weights were found on disk: never download
        self.device = pick_device(cfg.resources.device)
        self.metric = pyiqa.create_metric(pyiqa_name, device=self.device, as_loss=False)
        self.db = connect(db_uri, cfg.storage_options)
        self.max_pixels = cfg.ingest.max_pixels
        record_model_node("quality")

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from fbmem.pipelines.images import decode_image

        ids = batch.column("generation_id").to_pylist()
        rows = self.db.read("generations", ["generation_id", "image_bytes"],
                            where=f"generation_id IN ({sql_list(ids)})").to_pylist()
        data = {r["generation_id"]: r["image_bytes"] for r in rows}
        scores = []
        for gid in ids:
            try:
                img = decode_image(data[gid], max_pixels=self.max_pixels, min_side=1)
                x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None].to(self.device)
                with torch.no_grad():
                    scores.append(float(self.metric(x).reshape(-1)[0]))
            except Exception as exc:  # noqa: BLE001 - one bad image is a NaN, not a failed batch
                log.warning("%s: generation %s not scored: %s", type(self.metric).__name__, gid, exc)
                scores.append(float("nan"))
        return pa.table({"generation_id": pa.array(ids, pa.string()), "score": pa.array(scores, pa.float64())})


def score_images(db: Database, cfg: Config, metric: IqaMetric, generation_ids: list[str]) -> dict[str, float]:
    """Scores of `metric` for these generations, computed by an actor pool (quality.resources)."""
    import ray

    from fbmem.pipelines.actors import actor_kwargs, batch_blocks

    res = cfg.quality.resources
    ids = pa.table({"generation_id": pa.array(sorted(set(generation_ids)), pa.string())})
    ds = ray.data.from_arrow(batch_blocks(ids, res.batch_size))
    ds = ds.map_batches(IqaScorer, fn_constructor_args=(cfg.to_json(), metric.pyiqa_name, db.uri), **actor_kwargs(res))
    out: dict[str, float] = {}
    for b in ds.iter_batches(batch_format="pyarrow"):
        out.update(zip(b.column("generation_id").to_pylist(), b.column("score").to_pylist()))
    return out


# ------------------------------------------------------------------------------ pairs


@dataclass
class Pairs:
    """The before/after pairs of one (method, alpha), aligned row by row."""

    prompt_id: list[str] = field(default_factory=list)
    cluster_id: list[int | None] = field(default_factory=list)
    before_id: list[str] = field(default_factory=list)
    after_id: list[str] = field(default_factory=list)
    before: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (n, d) image vectors
    after: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    text: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # NaN rows: no text vector
    embedding_model: str | None = None

    @property
    def n(self) -> int:
        return len(self.before_id)


def _matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column without nulls as an (n, d) float32 array."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), -1)


def _read_in(db: Database, table: str, columns: list[str], where: str, key: str, values: list[str]) -> pa.Table:
    """`where AND key IN (values)`, read in chunks of `_IN_CHUNK` values."""
    if not values or not db.has_table(table):
        return _empty(db, table, columns)
    parts = [db.read(table, columns, where=f"({where}) AND {key} IN ({sql_list(values[i:i + _IN_CHUNK])})")
             for i in range(0, len(values), _IN_CHUNK)]
    return pa.concat_tables(parts)


def _empty(db: Database, table: str, columns: list[str]) -> pa.Table:
    """No rows, with the columns' stored types (read nothing to learn them)."""
    if not db.has_table(table):
        return db.read(table, columns)
    schema = db.dataset(table).schema
    return pa.schema([schema.field(c) for c in columns]).empty_table()


def _one_model(models: pa.ChunkedArray, what: str) -> set[str]:
    found = {m for m in pc.unique(models).to_pylist() if m is not None}
    if len(found) > 1:
        raise ValueError(f"{what} hold embeddings of several CLIP models {sorted(found)}: one model's vectors are needed")
    return found


def read_pairs(db: Database, cfg: Config, *, method: str, alpha: float) -> Pairs:
    """The (before, after) generations of `method` at `alpha` for the configured diffusion model,
    paired on (prompt_id, seed, sample), with their CLIP vectors and the prompts' text vectors.

    Raises ValueError when the prompts' and the generations' vectors come from different CLIP
    models, or from another model than the configured one (models.clip).
    """
    if not db.has_table("generations"):
        return Pairs()
    model = sql_literal(cfg.models.diffusion.model_id)
    cols = ["generation_id", "prompt_id", "seed", "sample", "alpha", "embedding", "embedding_model"]
    after = db.read("generations", cols, where=f"mitigation = {sql_literal(method)} AND model_id = {model}")
    stored = after.column("alpha").to_numpy(zero_copy_only=False)
    keep = np.isfinite(stored.astype(np.float64)) & (stored.astype(np.float32) == np.float32(alpha))
    after = after.filter(pa.array(keep))
    after = after.filter(pc.is_valid(after.column("embedding")))
    if after.num_rows == 0:
        return Pairs()
    prompt_ids = sorted(set(after.column("prompt_id").to_pylist()) - {None})
    before = _read_in(db, "generations", cols, f"mitigation = 'none' AND model_id = {model}", "prompt_id", prompt_ids)
    before = before.filter(pc.is_valid(before.column("embedding")))
    keys = ["prompt_id", "seed", "sample"]
    a_idx = after.select(keys).append_column("a_idx", pa.array(np.arange(after.num_rows)))
    b_idx = before.select(keys).append_column("b_idx", pa.array(np.arange(before.num_rows)))
    joined = a_idx.join(b_idx, keys=keys, join_type="inner").sort_by([("a_idx", "ascending"), ("b_idx", "ascending")])
    if joined.num_rows == 0:
        return Pairs()
    ai, bi = joined.column("a_idx").to_numpy(), joined.column("b_idx").to_numpy()

    gen_models = _one_model(pa.chunked_array(after.column("embedding_model").chunks + before.column("embedding_model").chunks),
                            "the generations")
    want = cfg.models.clip.model_id
    if gen_models and want not in gen_models:
        raise ValueError(f"the generations hold embeddings of {sorted(gen_models)}, not the configured CLIP {want!r} "
                         "(models.clip): quality is measured on the configured model's vectors")
    prompts = _read_in(db, "prompts", ["prompt_id", "cluster_id", "embedding", "embedding_model"], "true", "prompt_id",
                       prompt_ids)
    with_text = prompts.filter(pc.is_valid(prompts.column("embedding")))
    text_models = _one_model(with_text.column("embedding_model"), "the prompts")
    if text_models and gen_models and text_models != gen_models:
        raise ValueError(f"prompts.embedding holds {sorted(text_models)} text vectors but generations.embedding holds "
                         f"{sorted(gen_models)} image vectors: a CLIP score needs one model's text and image vectors "
                         "(ingest the prompts again with the same models.clip)")

    pair_prompts = joined.column("prompt_id")
    where_prompt = pc.index_in(pair_prompts, value_set=prompts.column("prompt_id").combine_chunks())
    cluster_col = prompts.column("cluster_id").combine_chunks()
    clusters = pc.take(cluster_col, where_prompt).to_pylist() if prompts.num_rows else [None] * joined.num_rows
    img_after, img_before = _matrix(after.column("embedding"))[ai], _matrix(before.column("embedding"))[bi]
    text = np.full(img_after.shape, np.nan, np.float32)
    if with_text.num_rows:
        t = _matrix(with_text.column("embedding"))
        if t.shape[1] != img_after.shape[1]:
            raise ValueError(f"prompt vectors are {t.shape[1]}-d but image vectors {img_after.shape[1]}-d: not one CLIP model")
        at = pc.index_in(pair_prompts, value_set=with_text.column("prompt_id").combine_chunks()).to_numpy(zero_copy_only=False)
        found = ~np.isnan(at.astype(np.float64))
        text[found] = t[at[found].astype(np.int64)]
    return Pairs(
        prompt_id=pair_prompts.to_pylist(), cluster_id=clusters,
        before_id=pc.take(before.column("generation_id"), pa.array(bi)).to_pylist(),
        after_id=pc.take(after.column("generation_id"), pa.array(ai)).to_pylist(),
        before=img_before, after=img_after, text=text,
        embedding_model=next(iter(gen_models), None),
    )


# ------------------------------------------------------------------------------ metrics


def _groups(pairs: Pairs) -> list[tuple[str, int | None, np.ndarray]]:
    """(level, cluster_id, row indices): overall, then one per cluster when any prompt has one
    (prompts never clustered are the cluster NULL, as in sql/mitigation_score.sql)."""
    out: list[tuple[str, int | None, np.ndarray]] = [("overall", None, np.arange(pairs.n))]
    if any(c is not None for c in pairs.cluster_id):
        cid = np.array([-1 if c is None else c for c in pairs.cluster_id], dtype=np.int64)
        known = np.array([c is not None for c in pairs.cluster_id])
        for c in sorted(set(cid[known].tolist())):
            out.append(("cluster", int(c), np.flatnonzero(known & (cid == c))))
        if not known.all():
            out.append(("cluster", None, np.flatnonzero(~known)))
    return out


def _mean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def quality_rows(pairs: Pairs, cfg: Config, *, metrics: list[str],
                 image_scores: dict[str, dict[str, float]] | None = None,
                 skipped: dict[str, str] | None = None) -> list[dict]:
    """The metric rows (without ids) of one (method, alpha): for each group of `_groups`, each
    CLIP metric of `metrics` and each pyiqa metric with `image_scores` ({metric: {generation_id:
    score}}); one overall row with the note for each `skipped` metric."""
    q = cfg.quality
    image_scores, skipped = image_scores or {}, skipped or {}
    cs_before = clip_score(pairs.text, pairs.before) if pairs.n else np.zeros(0)
    cs_after = clip_score(pairs.text, pairs.after) if pairs.n else np.zeros(0)
    per_image = {}
    for name, scores in image_scores.items():
        b = np.array([scores.get(g, np.nan) for g in pairs.before_id], np.float64)
        a = np.array([scores.get(g, np.nan) for g in pairs.after_id], np.float64)
        per_image[name] = (np.where(np.isfinite(b), b, np.nan), np.where(np.isfinite(a), a, np.nan))
    rows: list[dict] = []

    def row(metric: str, level: str, cluster: int | None, n: int, **values: object) -> None:
        rows.append({"metric": metric, "level": level, "cluster_id": cluster, "n_pairs": n, "before": None,
                     "after": None, "value": None, "value_std": None, "note": None, **values})

    for level, cluster, idx in _groups(pairs):
        n = len(idx)
        for name in metrics:
            if name == "clip_score":
                ok = idx[np.isfinite(cs_before[idx]) & np.isfinite(cs_after[idx])]
                if len(ok) == 0:
                    row(name, level, cluster, 0, note="no prompt text vectors for these pairs")
                    continue
                b, a = float(cs_before[ok].mean()), float(cs_after[ok].mean())
                row(name, level, cluster, len(ok), before=b, after=a, value=a - b)
            elif name in ("fd_clip", "kid_clip"):
                if n < 2:
                    row(name, level, cluster, n, note="a set distance needs at least 2 pairs")
                elif name == "fd_clip":
                    row(name, level, cluster, n, value=frechet_distance(pairs.before[idx], pairs.after[idx]))
                else:
                    mean, std = kid(pairs.before[idx], pairs.after[idx], subset_size=q.kid_subset_size,
                                    subsets=q.kid_subsets, seed=q.seed)
                    row(name, level, cluster, n, value=mean, value_std=std,
                        note=f"subset size {min(q.kid_subset_size, n)}" if n < q.kid_subset_size else None)
            elif name in per_image:
                b_all, a_all = per_image[name]
                ok = idx[np.isfinite(b_all[idx]) & np.isfinite(a_all[idx])]
                b, a = _mean(b_all[ok]), _mean(a_all[ok])
                if b is None or a is None:
                    row(name, level, cluster, 0, note="no image could be scored")
                else:
                    row(name, level, cluster, len(ok), before=b, after=a, value=a - b)
            elif name in skipped and level == "overall":
                row(name, level, cluster, n, note=skipped[name])
    return rows


def quality_id(method: str, alpha: float, level: str, cluster_id: int | None, metric: str, model_id: str) -> str:
    """The row key: alpha hashed as float32 (how it is stored), as recipe_id does."""
    return stable_hash("mitigation_quality", method, float(np.float32(alpha)), level, cluster_id, metric, model_id)


def run_quality(db: Database, cfg: Config, *, method: str, alpha: float | None = None, run: RunRecord) -> dict:
    """Quality of `method` at `alpha` (default nemo.alpha) before vs after, overall and per
    cluster, into `mitigation_quality` (replacing this method and alpha's earlier rows).

    Returns a summary: pairs, clip_before, clip_after, clip_delta, fd_clip, kid_clip (overall;
    None where not computed), skipped ({metric: note}) and rows written.
    """
    alpha = cfg.nemo.alpha if alpha is None else float(alpha)
    names = list(dict.fromkeys(cfg.quality.metrics))
    check_metric_names(names)
    model_id = cfg.models.diffusion.model_id
    pairs = read_pairs(db, cfg, method=method, alpha=alpha)
    summary: dict = {"method": method, "alpha": alpha, "pairs": pairs.n, "clip_before": None, "clip_after": None,
                     "clip_delta": None, "fd_clip": None, "kid_clip": None, "skipped": {}, "rows": 0}
    run.rows_in += pairs.n
    if pairs.n == 0:
        log.warning("quality: no before/after pairs for %s at alpha %g: nothing to measure", method, alpha)
        run.metrics.update(method=method, alpha=alpha, quality_pairs=0)
        return summary
    image_scores: dict[str, dict[str, float]] = {}
    for name in names:
        if name in CLIP_METRICS:
            continue
        reason = iqa_unavailable(IQA_METRICS[name])
        if reason:
            log.warning("quality metric %s %s", name, reason)
            summary["skipped"][name] = reason
        else:
            image_scores[name] = score_images(db, cfg, IQA_METRICS[name], pairs.before_id + pairs.after_id)
    rows = quality_rows(pairs, cfg, metrics=names, image_scores=image_scores, skipped=summary["skipped"])
    now = now_utc()
    for r in rows:
        r.update(quality_id=quality_id(method, alpha, r["level"], r["cluster_id"], r["metric"], model_id),
                 method=method, alpha=alpha, model_id=model_id, run_id=run.run_id, computed_at=now)
    db.upsert("mitigation_quality", pa.Table.from_pylist(rows, schema=MITIGATION_QUALITY))
    _drop_stale(db, method, alpha, model_id, {r["quality_id"] for r in rows})
    for r in rows:
        if r["level"] != "overall":
            continue
        if r["metric"] == "clip_score":
            summary.update(clip_before=r["before"], clip_after=r["after"], clip_delta=r["value"])
        elif r["metric"] in ("fd_clip", "kid_clip"):
            summary[r["metric"]] = r["value"]
    summary["rows"] = len(rows)
    run.rows_out += len(rows)
    run.metrics.update({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                        for k, v in summary.items() if k not in ("rows", "pairs")})
    run.metrics["quality_pairs"] = pairs.n
    return summary


def _drop_stale(db: Database, method: str, alpha: float, model_id: str, keep: set[str]) -> None:
    """Remove this (method, alpha, model)'s rows the new run did not write (e.g. a cluster that no
    longer exists after clustering again), so the table says only what the last run measured."""
    old = db.read("mitigation_quality", ["quality_id", "alpha"],
                  where=f"method = {sql_literal(method)} AND model_id = {sql_literal(model_id)}").to_pylist()
    stale = [r["quality_id"] for r in old if same_alpha(r["alpha"], alpha) and r["quality_id"] not in keep]
    for i in range(0, len(stale), _IN_CHUNK):
        db.delete("mitigation_quality", f"quality_id IN ({sql_list(stale[i:i + _IN_CHUNK])})")
