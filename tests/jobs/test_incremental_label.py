"""Incremental scans: labelled generations are compared with the training images added since.

The world is the planted scoring set (jobs/toy/planted.py) with its exact masks, ingested through
the CLI as in test_label.py. A first scan labels every generation; then a training image that is a
pixel copy of the NM generation is ingested, as a new shard would be, and the second scan must
turn that label into VM by scoring pairs with the new image only.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from fbmem.jobs.candidates import CANDIDATE_SCHEMA, within_top_k
from fbmem.jobs.cli import app
from fbmem.jobs.config import load_config
from fbmem.jobs.label import fold_labels, label_settings, labels_from_pairs, run_label_job
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.jobs.toy.planted import planted_test_set
from fbmem.storage.database import connect

runner = CliRunner()
K = 2  # below the 7 training images, so a new image enters only some generations' top-k
PLANTED = "nm-new-both"  # its generation has no copy in the first corpus


def fbmem(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _save(path: Path, arr: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(arr).save(path)
    Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(path.with_suffix(".mask.png"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("incremental")
    cases = planted_test_set(size=192, seed=0)
    for d in ("train", "gen", "train2"):
        (root / d).mkdir()
    with (root / "prompts.csv").open("w", newline="") as pf, (root / "gen" / "manifest.csv").open("w", newline="") as gf:
        pw, gw = csv.writer(pf), csv.writer(gf)
        pw.writerow(["prompt", "planted", "url"])
        gw.writerow(["uri", "prompt", "seed", "sample", "mask_uri"])
        for c in cases:
            _save(root / "train" / f"{c.name}.png", c.training, c.training_mask)
            _save(root / "gen" / f"{c.name}.png", c.generation, c.generation_mask)
            pw.writerow([f"prompt for {c.name}", c.expected, str(root / "train" / f"{c.name}.png")])
            gw.writerow([f"{c.name}.png", f"prompt for {c.name}", 1, 0, f"{c.name}.mask.png"])
    db_uri = str(root / "db")
    common = ["--db", db_uri, "--preset", "tiny"]
    fbmem("ingest", "training", str(root / "train"), *common)
    fbmem("ingest", "prompts", str(root / "prompts.csv"), *common)
    fbmem("ingest", "generations", str(root / "gen" / "manifest.csv"), *common)
    db = connect(db_uri)
    gens = {Path(r["source_uri"]).stem: r["generation_id"]
            for r in db.read("generations", ["generation_id", "source_uri"]).to_pylist()}
    cfgs = {mode: load_config(preset="tiny", overrides={"candidates.mode": mode, "candidates.k": K})
            for mode in ("ann", "exact")}

    # scan a: first labels in both candidate modes
    runs_a = {}
    for mode, cfg in cfgs.items():
        with RunRecord(db, "label", cfg, scan_id="scan-a") as run:
            run_label_job(db, cfg, run=run)
        runs_a[mode] = run
    before = {
        "pairs": {r["pair_id"]: r for r in db.read("pair_scores").to_pylist()},
        "labels": {r["label_id"]: r for r in db.read("labels").to_pylist()},
    }
    # a new shard: a pixel copy of the NM generation, with its mask
    shutil.copy(root / "gen" / f"{PLANTED}.png", root / "train2" / "planted-copy.png")
    shutil.copy(root / "gen" / f"{PLANTED}.mask.png", root / "train2" / "planted-copy.mask.png")
    fbmem("ingest", "training", str(root / "train2"), *common)
    new_image = db.read("training_images", ["image_id"], where="source_uri LIKE '%planted-copy%'").column(0)[0].as_py()
    return {"db": db, "cfgs": cfgs, "gens": gens, "runs_a": runs_a, "before": before, "new_image": new_image}


def _labels(db, cfg, mode: str, rule: str = "most-severe") -> dict[str, dict]:
    where = f"rule = '{rule}' AND candidates_mode = '{mode}'"
    return {r["generation_id"]: r for r in db.read("labels", where=where).to_pylist()}


def _entering_top_k(db, gens: dict[str, str], new_image: str, old_pairs: dict) -> set[str]:
    """Generations whose top-k (stored ann distances) the new image enters: computed here from the
    embeddings, independently of the job."""
    emb = {r["generation_id"]: np.asarray(r["embedding"], np.float64)
           for r in db.read("generations", ["generation_id", "embedding"]).to_pylist()}
    img = np.asarray(db.read("training_images", ["embedding"], where=f"image_id = '{new_image}'").column(0)[0].as_py())
    out = set()
    for g in gens.values():
        stored = sorted({(p["image_id"], p["distance"]) for p in old_pairs.values()
                         if p["generation_id"] == g and p["distance"] is not None}, key=lambda t: t[1])
        d_new = 1.0 - float(emb[g] @ img) / (np.linalg.norm(emb[g]) * np.linalg.norm(img))
        bound = stored[K - 1][1] if len(stored) >= K else np.inf
        assert abs(d_new - bound) > 1e-5, "a tie at the bound: pick another K"
        if d_new <= bound:
            out.add(g)
    return out


def test_second_scan_relabels_against_the_new_image_only(world):
    db, cfg, gens, new_image = world["db"], world["cfgs"]["ann"], world["gens"], world["new_image"]
    before, run_a = world["before"], world["runs_a"]["ann"]
    planted = gens[PLANTED]
    first = _labels(db, cfg, "ann")
    assert first[planted]["label"] == "NM" and first[planted]["run_id"] == run_a.run_id
    ingested = db.read("training_images", ["ingested_at"], where=f"image_id = '{new_image}'").column(0)[0].as_py()
    assert ingested > first[planted]["labelled_at"]
    expected = _entering_top_k(db, gens, new_image, before["pairs"])
    assert planted in expected and len(expected) < len(gens), expected  # some generations are not touched

    with RunRecord(db, "label", cfg, scan_id="scan-b") as run_b:
        run_label_job(db, cfg, run=run_b)
    after = _labels(db, cfg, "ann")
    # the planted generation: NM -> VM, pointing at the new image, recorded as a change of scan b
    assert after[planted]["label"] == "VM" and after[planted]["best_image_id"] == new_image
    assert after[planted]["run_id"] == run_b.run_id and after[planted]["label_id"] == first[planted]["label_id"]
    assert after[planted]["n_candidates"] == first[planted]["n_candidates"] + 1
    changes = db.read("label_changes", where=f"run_id = '{run_b.run_id}'").to_pylist()
    assert {(c["generation_id"], c["rule"], c["previous_label"], c["label"], c["scan_id"]) for c in changes} == {
        (planted, "most-severe", "NM", "VM", "scan-b"), (planted, "paper-best-average", "NM", "VM", "scan-b")}
    # scan a's first labels were recorded too, with no previous label
    firsts = db.read("label_changes", where=f"run_id = '{run_a.run_id}'").to_pylist()
    assert len(firsts) == 2 * len(gens) and all(c["previous_label"] is None and c["scan_id"] == "scan-a" for c in firsts)

    # no pair scored before was scored again; every new pair is with the new image
    pairs = {r["pair_id"]: r for r in db.read("pair_scores").to_pylist()}
    for pid, old in before["pairs"].items():
        assert pairs[pid] == old
    new_pairs = [r for pid, r in pairs.items() if pid not in before["pairs"]]
    assert new_pairs and all(r["image_id"] == new_image and r["run_id"] == run_b.run_id for r in new_pairs)
    assert {r["generation_id"] for r in new_pairs} == expected
    assert run_b.metrics["new_pairs_scored"] == run_b.metrics["pairs_scored"] == len(new_pairs)
    assert run_b.metrics["generations_relabelled"] == len(expected)
    assert run_b.metrics["labels_changed"] == 1
    # generations the new image does not reach keep their label rows as they were
    for g in set(gens.values()) - expected:
        assert after[g] == first[g]
    for g in expected - {planted}:
        assert after[g]["label"] == first[g]["label"] and after[g]["run_id"] == run_b.run_id

    # scan c, nothing new: nothing searched, scored or written, also for the generations scan b
    # compared with the new image without keeping it (their labels still carry scan a's watermark)
    with RunRecord(db, "label", cfg, scan_id="scan-c") as run_c:
        run_label_job(db, cfg, run=run_c)
    assert run_c.metrics["pairs_scored"] == 0 and run_c.metrics["generations_relabelled"] == 0
    assert run_c.metrics["incremental_windows"] == 0 and run_c.rows_in == 0
    assert db.count("label_changes", f"run_id = '{run_c.run_id}'") == 0
    assert _labels(db, cfg, "ann") == after

    # a full relabel (--force) gives the same labels, at the cost of every pair
    with RunRecord(db, "label", cfg) as run_full:
        run_label_job(db, cfg, run=run_full, force=True)
    full = _labels(db, cfg, "ann")
    assert {g: r["label"] for g, r in full.items()} == {g: r["label"] for g, r in after.items()}
    assert full[planted]["best_image_id"] == new_image
    assert run_full.metrics["labels_changed"] == 0  # nothing differs from the incremental labels
    print(f"\nincremental scan scored {run_b.metrics['pairs_scored']} pairs; "
          f"a full relabel scored {run_full.metrics['pairs_scored']}")
    assert run_b.metrics["pairs_scored"] < run_full.metrics["pairs_scored"]


def test_exact_mode_compares_every_labelled_generation_with_every_new_image(world):
    db, cfg, gens, new_image = world["db"], world["cfgs"]["exact"], world["gens"], world["new_image"]
    first = _labels(db, cfg, "exact")
    assert first[gens[PLANTED]]["label"] == "NM"
    pairs_before = {r["pair_id"]: r for r in db.read("pair_scores").to_pylist()}
    # pairs with the new image scored by the ann run (same score settings) are read, not scored again
    stored_new = {r["generation_id"] for r in pairs_before.values() if r["image_id"] == new_image}
    with RunRecord(db, "label", cfg, scan_id="scan-b") as run:
        run_label_job(db, cfg, run=run)
    after = _labels(db, cfg, "exact")
    assert after[gens[PLANTED]]["label"] == "VM" and after[gens[PLANTED]]["best_image_id"] == new_image
    assert run.metrics["generations_relabelled"] == len(gens)
    assert run.metrics["new_pairs_scored"] == len(gens) - len(stored_new)
    assert run.metrics["new_pairs_already_stored"] == len(stored_new)
    for g, row in after.items():
        assert row["n_candidates"] == first[g]["n_candidates"] + 1
        if g != gens[PLANTED]:
            assert row["label"] == first[g]["label"]
    pairs = {r["pair_id"]: r for r in db.read("pair_scores").to_pylist()}
    for pid, old in pairs_before.items():
        assert pairs[pid] == old
    assert all(r["image_id"] == new_image for pid, r in pairs.items() if pid not in pairs_before)
    changed = db.read("label_changes", where=f"run_id = '{run.run_id}' AND rule = 'most-severe'").to_pylist()
    assert [(c["generation_id"], c["previous_label"], c["label"]) for c in changed] == [(gens[PLANTED], "NM", "VM")]


# ------------------------------------------------------------------------------- pure parts


def test_within_top_k_keeps_what_a_full_rescan_would_hold():
    ann = pa.table({
        "generation_id": ["a", "a", "a", "b", "c"], "image_id": ["n1", "n2", "n3", "n1", "n1"],
        "prompt_id": ["p"] * 5, "candidate_source": ["ann"] * 5, "rank": pa.array([1, 2, 3, 1, 1], pa.int32()),
        "distance": pa.array([0.05, 0.25, 0.4, 0.5, 0.9], pa.float32()),
    }).cast(CANDIDATE_SCHEMA)
    stored = {"a": [0.1, 0.2, 0.3], "b": [0.2, 0.5], "c": [0.3]}  # c has fewer than k stored pairs
    out = within_top_k(ann, stored, k=3)
    got = {(r["generation_id"], r["image_id"]): r["rank"] for r in out.to_pylist()}
    # a: 0.05 and 0.25 beat the 3rd stored distance (0.3), 0.4 does not; b: 0.5 ties its bound (kept)
    assert got == {("a", "n1"): 1, ("a", "n2"): 4, ("b", "n1"): 2, ("c", "n1"): 2}


def test_fold_labels_equals_labelling_all_pairs_at_once(tiny_cfg):
    """The label from (previous deciding pair + new pairs) is the label from every pair."""
    rng = np.random.default_rng(3)
    settings = label_settings(tiny_cfg, "ann", K)
    for trial in range(200):
        n_old, n_new = int(rng.integers(1, 6)), int(rng.integers(1, 4))

        def pair(i: int) -> dict:
            full, fg, bg = (float(x) for x in rng.uniform(0.5, 1.0, 3))
            return {"generation_id": "g", "image_id": f"img{i:02d}", "prompt_id": "p", "rank": i + 1,
                    "full": full, "fg": fg, "bg": bg}

        old = [pair(i) for i in range(n_old)]
        new = [pair(i) for i in range(n_old, n_old + n_new)]
        prev = labels_from_pairs(old, tiny_cfg, settings, "run-a", "ann")
        folded = fold_labels(prev, new, tiny_cfg, settings, "run-b", "ann", prev[0]["labelled_at"])
        whole = labels_from_pairs(old + new, tiny_cfg, settings, "run-b", "ann")
        for f, w in zip(folded, whole):
            assert (f["rule"], f["label"], f["best_image_id"], f["n_candidates"]) == \
                   (w["rule"], w["label"], w["best_image_id"], w["n_candidates"]), trial
