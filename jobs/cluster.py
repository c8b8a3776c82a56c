"""`fbmem cluster`: KMeans clusters of prompts, stored as `cluster_id` on each prompt row."""
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
    (jobs/core/prompt_encoding.py: StableDiffusionPipeline.encode_prompt's rules)."""
    if cfg.cluster.embedding == "open_clip":
        return np.asarray(prompts.column("embedding").to_pylist(), dtype=np.float32)
    from fbmem.jobs.core.prompt_encoding import encode_prompts
    from fbmem.pipelines.devices import pick_device
    from fbmem.pipelines.diffusion_models import load_text_encoder

    device = pick_device(cfg.resources.device)
    tok, enc = load_text_encoder(cfg.models.diffusion, device)
    hidden = encode_prompts(tok, enc, prompts.column("text").to_pylist()).float().cpu()
    return hidden.reshape(hidden.shape[0], -1).numpy()


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
