"""`fbmem cluster`: KMeans clusters of prompts, stored as `cluster_id` on each prompt row.

The text encoder runs in Ray actors (`resources.cluster`); KMeans runs on the driver, over the
vectors of the selected prompts only (a prompt set, not the training corpus)."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from fbmem.jobs.config import Config
from fbmem.jobs.core.clustering import cluster_embeddings
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.storage.database import Database

log = logging.getLogger(__name__)


def prompt_features(cfg: Config, prompts: pa.Table) -> np.ndarray:
    """The vectors KMeans sees: text-encoder hidden states flattened (ref) or CLIP text vectors.

    The hidden states come from the one prompt encoder NeMo and generation use
    (jobs/core/prompt_encoding.py: StableDiffusionPipeline.encode_prompt's rules), computed by a
    pool of `TextEncoderWorker` actors (`resources.cluster`; the encoder loads there, never on
    the driver), `resources.cluster.batch_size` prompts per call. The driver holds the vectors of
    the prompt set being clustered (hundreds to thousands of prompts), never of the corpus.
    The CLIP vectors were stored at ingest."""
    if cfg.cluster.embedding == "open_clip":
        return np.asarray(prompts.column("embedding").to_pylist(), dtype=np.float32)
    from fbmem.jobs.model_actors import text_encoder_pool

    texts = prompts.column("text").to_pylist()
    step = cfg.resources.cluster.batch_size
    chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
    with text_encoder_pool(cfg) as pool:
        parts = dict(pool.map("features", chunks))
    return np.concatenate([parts[i] for i in range(len(chunks))])


def run_cluster(db: Database, cfg: Config, *, run: RunRecord, where: str | None = None) -> dict:
    prompts = db.read("prompts", where=where)
    run.rows_in = prompts.num_rows
    if prompts.num_rows == 0:
        raise ValueError(f"no prompts to cluster{' matching ' + where if where else ''}: ingest prompts first")
    x = prompt_features(cfg, prompts)
    labels, sil = cluster_embeddings(x, k=cfg.cluster.k, max_iter=cfg.cluster.max_iter,
                                     random_state=cfg.cluster.random_state, n_init=cfg.cluster.n_init)
    out = prompts.set_column(prompts.column_names.index("cluster_id"), "cluster_id", pa.array(labels, pa.int32()))
    out = out.set_column(out.column_names.index("cluster_run_id"), "cluster_run_id", pa.array([run.run_id] * out.num_rows))
    run.rows_out = db.upsert("prompts", out)
    sizes = np.bincount(labels, minlength=cfg.cluster.k).tolist()
    run.metrics.update(silhouette=round(sil, 4), k=cfg.cluster.k, embedding=cfg.cluster.embedding, sizes=sizes)
    return {"silhouette": sil, "sizes": sizes, "labels": labels}
