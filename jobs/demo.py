"""`fbmem demo`: the embedded default, offline, on one machine.

Builds the toy world (a deterministic corpus with planted memorization groups, see
jobs/toy_corpus.py), ingests its training images and prompts with local Ray into a LanceDB folder,
then prints what SQL says about the tables. Later stages (generation, FB-Mem labels, NeMo-C)
extend this as they land; every stage is a rerun-safe job, so a second demo reuses what exists.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from fbmem.jobs.config import Config
from fbmem.jobs.ray_session import ensure_ray
from fbmem.jobs.run_record import RunRecord
from fbmem.jobs.sql_output import format_table
from fbmem.jobs.toy_corpus import ToyCorpusSpec, build_corpus, write_corpus
from fbmem.storage.database import connect
from fbmem.storage.sql import run_query

log = logging.getLogger(__name__)


def build_world(out: Path, spec: ToyCorpusSpec):
    """Write the toy corpus once; a marker file makes reruns skip it."""
    world = out / "world"
    marker = world / ".complete"
    corpus = build_corpus(spec)
    if not marker.exists():
        paths = write_corpus(corpus, world)
        marker.write_text(repr(spec))
    else:
        paths = None
    return world, corpus, paths


def run_demo(cfg: Config, out: Path) -> None:
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ToyCorpusSpec()
    world, corpus, _ = build_world(out, spec)
    print(f"toy world: {len(corpus.images)} training images, {len(corpus.prompts)} prompts in {world}")
    db = connect(str(out / "db"), cfg.storage_options)
    ensure_ray(cfg)

    from fbmem.pipelines.ingest import ingest_images
    from fbmem.pipelines.prompt_ingest import ingest_prompts

    with RunRecord(db, "ingest-training", cfg, args={"src": str(world / "images")}) as run:
        ingest_images(db, cfg, str(world / "images"), target="training", kind="folder", masks="lazy", run=run)
    with RunRecord(db, "ingest-prompts", cfg, args={"csv": str(world / "prompts.csv")}) as run:
        ingest_prompts(db, cfg, world / "prompts.csv", run=run)

    print("\nTables:")
    for name in ("training_images", "prompts", "errors", "runs"):
        print(f"  {name:<16} {db.count(name)}")
    print("\nPrompts per planted group (SQL):")
    print(format_table(run_query(db, "SELECT planted, count(*) AS prompts FROM prompts GROUP BY planted ORDER BY planted")))
    print("\nTraining images by mask source and foreground size (SQL):")
    print(format_table(run_query(
        db,
        "SELECT mask_model, count(*) AS images, round(avg(fg_fraction), 3) AS mean_fg_fraction "
        "FROM training_images GROUP BY mask_model ORDER BY mask_model",
    )))
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; database: {out / 'db'}")
