"""Lazy masks of training images go to `training_masks`, never rewriting `training_images` rows
(issue 12, item 1): the label job segments each candidate once, the rows (pixels, vectors) stay
in the data files they were ingested into, and the labels equal those of an eager-mask database.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.jobs.toy.planted import planted_test_set
from fbmem.storage.database import connect
from fbmem.storage.masks import training_ids_without_mask, training_masks_for
from fbmem.storage.sql import run_query

runner = CliRunner()


def fbmem(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def _lance_state(db, name: str) -> dict:
    """What a rewrite of rows would change: the data files of the current version and their bytes."""
    ds = db.dataset(name)
    files = sorted(f.path for frag in ds.get_fragments() for f in frag.data_files())
    root = Path(db.table_uri(name))
    data_bytes = sum(p.stat().st_size for p in (root / "data").rglob("*") if p.is_file())
    total_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"version": ds.version, "files": files, "data_bytes": data_bytes, "total_bytes": total_bytes}


def _dir_bytes(db, name: str) -> int:
    root = Path(db.table_uri(name))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """The planted cases, training images WITHOUT masks (so lazy masking must segment them),
    generations with their exact masks given; one database ingested lazily, one eagerly."""
    root = tmp_path_factory.mktemp("lazy")
    cases = planted_test_set(size=192, seed=0)
    (root / "train").mkdir()
    (root / "gen").mkdir()
    prompts, gen_manifest = root / "prompts.csv", root / "gen" / "manifest.csv"
    with prompts.open("w", newline="") as pf, gen_manifest.open("w", newline="") as gf:
        pw, gw = csv.writer(pf), csv.writer(gf)
        pw.writerow(["prompt", "planted", "url"])
        gw.writerow(["uri", "prompt", "seed", "sample", "mask_uri"])
        for c in cases:
            _png(root / "train" / f"{c.name}.png", c.training)
            _png(root / "gen" / f"{c.name}.png", c.generation)
            Image.fromarray((c.generation_mask * 255).astype(np.uint8), mode="L").save(root / "gen" / f"{c.name}.mask.png")
            prompt = f"prompt for {c.name}"
            pw.writerow([prompt, c.expected, str(root / "train" / f"{c.name}.png")])
            gw.writerow([f"{c.name}.png", prompt, 1, 0, f"{c.name}.mask.png"])
    common = ["--preset", "tiny", "--set", "fbmem.image_size=192"]
    dbs = {}
    for masks in ("lazy", "eager"):
        uri = str(root / f"db_{masks}")
        fbmem("ingest", "training", str(root / "train"), "--db", uri, "--masks", masks, *common)
        fbmem("ingest", "prompts", str(prompts), "--db", uri, *common)
        fbmem("ingest", "generations", str(gen_manifest), "--db", uri, *common)
        dbs[masks] = uri
    return cases, dbs, common


def _labels(db) -> dict[str, dict]:
    rows = run_query(db, "SELECT g.source_uri, l.label, l.full, l.fg, l.bg, l.best_image_id FROM labels l "
                         "JOIN generations g USING (generation_id) WHERE l.rule = 'most-severe'").to_pylist()
    return {Path(r["source_uri"]).stem: r for r in rows}


def _last_metrics(db) -> dict:
    runs = run_query(db, "SELECT metrics_json FROM runs WHERE job = 'label' ORDER BY started_at DESC LIMIT 1")
    return json.loads(runs.column(0)[0].as_py())


def test_lazy_masks_go_to_their_own_table_and_label_like_eager(world):
    cases, dbs, common = world
    lazy = connect(dbs["lazy"])
    n = len(cases)
    assert lazy.count("training_images") == n
    assert lazy.count("training_images", "mask_png IS NOT NULL") == 0  # nothing segmented at ingest
    before = _lance_state(lazy, "training_images")

    fbmem("label", "--db", dbs["lazy"], *common, "--candidates", "exact")
    after = _lance_state(lazy, "training_images")
    print(f"\ntraining_images before masks: {before['total_bytes']} B ({before['data_bytes']} B data, "
          f"{len(before['files'])} files, v{before['version']}); after: {after['total_bytes']} B "
          f"({after['data_bytes']} B data, {len(after['files'])} files, v{after['version']}); "
          f"training_masks: {_dir_bytes(lazy, 'training_masks')} B")
    assert after == before  # no row rewritten: same version, same data files, same bytes

    segmented = set(run_query(lazy, "SELECT DISTINCT image_id FROM pair_scores").column(0).to_pylist())
    assert segmented  # exact candidates: every training image of the corpus
    masks = lazy.read("training_masks")
    assert masks.num_rows == len(segmented) == _last_metrics(lazy)["masks_made_training"]
    assert set(masks.column("image_id").to_pylist()) == segmented
    assert masks.column("run_id").null_count == 0 and masks.column("mask_png").null_count == 0
    assert training_ids_without_mask(lazy, segmented) == []

    # a rerun segments nothing and leaves both tables as they are
    fbmem("label", "--db", dbs["lazy"], *common, "--candidates", "exact", "--force")
    assert _last_metrics(lazy)["masks_made_training"] == 0
    assert lazy.count("training_masks") == len(segmented)
    assert _lance_state(lazy, "training_images") == before

    # the same masks as eager ingest, read through the one reader; and the same labels
    eager = connect(dbs["eager"])
    fbmem("label", "--db", dbs["eager"], *common, "--candidates", "exact")
    assert eager.count("training_masks") == 0  # eager masks are in the rows: nothing to segment
    ids = sorted(segmented)
    got, want = training_masks_for(lazy, ids, chunk=2), training_masks_for(eager, ids, chunk=2)
    assert set(got) == set(want) == segmented
    assert {i: m[0] for i, m in got.items()} == {i: m[0] for i, m in want.items()}
    lab_lazy, lab_eager = _labels(lazy), _labels(eager)
    assert set(lab_lazy) == {c.name for c in cases}
    for name, r in lab_eager.items():
        assert lab_lazy[name]["label"] == r["label"], name
        assert lab_lazy[name]["best_image_id"] == r["best_image_id"], name
        for m in ("full", "fg", "bg"):
            assert lab_lazy[name][m] == pytest.approx(r[m], abs=1e-6), (name, m)


def test_reader_prefers_the_own_row_and_reads_in_chunks(tmp_path):
    import pyarrow as pa

    from fbmem.storage.schema import now_utc

    db = connect(str(tmp_path / "db"))
    ids = [f"i{k}" for k in range(5)]
    db.upsert("training_images", pa.table({
        "image_id": ids, "image_sha256": ids, "embedding": pa.array([[0.0, 1.0]] * 5, pa.list_(pa.float32(), 2)),
        "mask_png": [b"own0", None, None, b"own3", None], "fg_fraction": [0.5, None, None, 0.25, None],
        "mask_model": ["given", None, None, "given", None], "run_id": ["r"] * 5,
    }))
    assert training_ids_without_mask(db, ids + ["unknown"], chunk=2) == ["i1", "i2", "i4"]
    db.upsert("training_masks", pa.table({
        "image_id": ["i0", "i1", "i2"], "mask_png": [b"late0", b"late1", b"late2"],
        "fg_fraction": [0.1, 0.2, 0.3], "mask_model": ["sam"] * 3, "run_id": ["r2"] * 3,
        "created_at": [now_utc()] * 3,
    }))
    got = training_masks_for(db, ids + ["unknown"], chunk=2)
    assert set(got) == {"i0", "i1", "i2", "i3"}
    assert got["i0"] == (b"own0", 0.5, "given")  # the own row wins
    assert got["i1"][0] == b"late1" and got["i1"][2] == "sam"
    assert got["i3"] == (b"own3", 0.25, "given")
    assert training_ids_without_mask(db, ids, chunk=2) == ["i4"]
    assert training_masks_for(db, []) == {}
    assert os.path.isdir(db.table_uri("training_masks"))
