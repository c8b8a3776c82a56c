"""`write_report`: the static HTML report, rendered by a real headless Chromium (issue: fbmem report).

The database is built like tests/test_label_job.py: the planted FB-Mem cases (known labels, exact
masks) ingested and labelled through the CLI. A mitigation method ("nemo") and NeMo results are
then written with `Database.upsert` (their jobs need a diffusion model; the report only reads the
tables), with before/after labels chosen so the transition heatmap and the score are known.
Chromium opens the page from disk (`--dump-dom`): the page's own script counts the images that
decoded, so a broken relative path or an unreadable PNG fails the test.
"""
from __future__ import annotations

import csv
import hashlib
import html
import re
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.jobs.core.mitigation_score import mitigation_score
from fbmem.jobs.report import write_report
from fbmem.jobs.toy.planted import planted_test_set
from fbmem.storage.database import connect

CHROMIUM = "/usr/bin/chromium"
runner = CliRunner()

# One prompt carries HTML and matplotlib-math characters: the page must show it as text.
NASTY = '<b>bold</b> & "$5$"'
# before -> after labels of the mitigated generations, per planted case
AFTER = {
    "vm-noisy-jpeg": "NM", "empty-vm": "VM", "fm-new-background": "BM", "bm-new-object": "NM",
    "bm-same-mask": "BM", "nm-new-both": "NM", "empty-nm": "FM",
}


def fbmem(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def prompt_text(name: str) -> str:
    return f"prompt for {name}" + (f" {NASTY}" if name == "vm-noisy-jpeg" else "")


def _save(path: Path, arr: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(arr).save(path)
    Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(path.with_suffix(".mask.png"))


def _hex(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def add_mitigated(db, method: str = "nemo") -> dict[str, tuple[str, str]]:
    """Copies of the generations under `method` (same prompt, seed, sample, model) with the
    after-labels of AFTER; returns case name -> (before, after)."""
    gens = db.read("generations")
    names = [Path(u).stem for u in gens.column("source_uri").to_pylist()]
    new_ids = [_hex(g, method) for g in gens.column("generation_id").to_pylist()]
    mitigated = (gens.set_column(gens.schema.get_field_index("generation_id"), "generation_id", pa.array(new_ids))
                 .set_column(gens.schema.get_field_index("mitigation"), "mitigation", pa.array([method] * len(names)))
                 .set_column(gens.schema.get_field_index("alpha"), "alpha", pa.array([0.0] * len(names), pa.float32())))
    db.upsert("generations", mitigated)
    old_to_new = dict(zip(gens.column("generation_id").to_pylist(), new_ids))
    name_of = dict(zip(gens.column("generation_id").to_pylist(), names))
    labels = db.read("labels", where="rule = 'most-severe'")
    rows, pairs = [], {}
    for r in labels.to_pylist():
        name = name_of[r["generation_id"]]
        after = AFTER[name]
        pairs[name] = (r["label"], after)
        rows.append({**r, "label_id": _hex(r["label_id"], method), "generation_id": old_to_new[r["generation_id"]],
                     "label": after, "labelled_at": datetime.now(timezone.utc)})
    db.upsert("labels", pa.Table.from_pylist(rows, schema=labels.schema))
    return pairs


def add_nemo(db) -> list[dict]:
    prompts = db.read("prompts", ["prompt_id", "planted"]).to_pylist()
    rows = []
    for i, p in enumerate(sorted(prompts, key=lambda r: r["prompt_id"])):
        score = 0.9 - 0.1 * i
        rows.append({"nemo_id": _hex("nemo", p["prompt_id"]), "prompt_id": p["prompt_id"], "model_id": "tiny",
                     "detect_score": score, "n_retained": 3 if score > 0.428 else 0, "memorized": score > 0.428,
                     "criterion_reached": score > 0.6, "n_initial": 12, "n_refined": 3, "run_id": "test"})
    db.upsert("nemo_prompts", pa.Table.from_pylist(rows))
    db.upsert("neurons", pa.Table.from_pylist([
        {"neuron_set_id": _hex("set", str(layer)), "scope": "prompt", "prompt_id": rows[0]["prompt_id"],
         "kind": "refined", "layer_idx": layer, "module": f"down.{layer}.attn2.to_v", "neurons": [1, 5, 7][: layer + 1],
         "run_id": "test"} for layer in range(2)
    ]))
    return rows


@pytest.fixture(scope="module")
def labelled_db(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("report")
    cases = planted_test_set(size=192, seed=0)
    (root / "train").mkdir()
    (root / "gen").mkdir()
    prompts, manifest = root / "prompts.csv", root / "gen" / "manifest.csv"
    with prompts.open("w", newline="") as pf, manifest.open("w", newline="") as gf:
        pw, gw = csv.writer(pf), csv.writer(gf)
        pw.writerow(["prompt", "planted", "url"])
        gw.writerow(["uri", "prompt", "seed", "sample", "mask_uri"])
        for c in cases:
            _save(root / "train" / f"{c.name}.png", c.training, c.training_mask)
            _save(root / "gen" / f"{c.name}.png", c.generation, c.generation_mask)
            pw.writerow([prompt_text(c.name), c.expected, str(root / "train" / f"{c.name}.png")])
            gw.writerow([f"{c.name}.png", prompt_text(c.name), 1, 0, f"{c.name}.mask.png"])
    db_uri = str(root / "db")
    common = ["--db", db_uri, "--preset", "tiny", "--set", "fbmem.image_size=192"]
    fbmem("ingest", "training", str(root / "train"), *common)
    fbmem("ingest", "prompts", str(prompts), *common)
    fbmem("ingest", "generations", str(manifest), *common)
    fbmem("label", *common, "--candidates", "exact")
    db = connect(db_uri)
    pairs = add_mitigated(db)
    nemo = add_nemo(db)
    return root, cases, db, pairs, nemo


def render_in_chromium(index: Path, tmp: Path) -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run the report test")
    profile = tempfile.mkdtemp(prefix="chr", dir=tmp)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", index.resolve().as_uri()]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def body_attrs(dom: str) -> dict[str, str]:
    m = re.search(r"<body([^>]*)>", dom)
    assert m, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))


def test_report_renders_charts_gallery_and_sections(labelled_db, tmp_path):
    root, cases, db, pairs, nemo = labelled_db
    per_label = 4
    index = write_report(db, tmp_path / "out", title="Planted <audit>", gallery_per_label=per_label)
    assert index == tmp_path / "out" / "index.html"
    page = index.read_text()

    # sections and their content
    for key in ("runs", "labels", "one-to-many", "mitigation", "quality", "nemo", "gallery"):
        assert f'<section id="{key}">' in page
    assert "section failed" not in page
    assert "Planted &lt;audit&gt;" in page
    for job in ("ingest-training", "ingest-prompts", "ingest-generations", "label"):
        assert f"<td>{job}</td>" in page
    assert "no error rows" in page
    # escaping: the prompt with HTML characters appears only as text
    assert "<b>bold</b>" not in page
    assert html.escape(NASTY, quote=True) in page
    # the planted-group table: every planted class shows up as a row
    for lab in ("VM", "FM", "BM", "NM"):
        assert f"<td>none</td><td>{lab}</td>" in page
    # the mitigation score the page shows is the SPEC section 8 score of the pairs written
    before, after = zip(*pairs.values())
    assert f"{mitigation_score(before, after):.4g}" in page
    assert "no mitigated generations" not in page
    assert "no quality measured yet" in page  # quality rows are written by `fbmem mitigate`, not here
    assert "Neuron sets per layer" in page

    # image files beside the page, referenced relatively
    srcs = re.findall(r'<img class="([^"]*)" src="([^"]*)"', page)
    for _, src in srcs:
        assert not src.startswith(("/", "http:", "https:", "file:")), src
        assert (index.parent / src).is_file(), src
    charts = [s for cls, s in srcs if cls.startswith("chart")]
    assert len(charts) == 4  # labels, one-to-many, one heatmap (one method), NeMo
    labels_now = {}
    for b, a in pairs.values():
        labels_now[b] = labels_now.get(b, 0) + 1
        labels_now[a] = labels_now.get(a, 0) + 1
    expected_cards = sum(min(n, per_label) for n in labels_now.values())
    assert page.count('<div class="card"') == expected_cards
    thumbs = [s for cls, s in srcs if cls == "thumb"]
    assert len(thumbs) == 3 * expected_cards
    with Image.open(index.parent / thumbs[0]) as im:  # a decoded generation, not a placeholder
        assert im.size == (192, 192)
    assert "unavailable" not in page
    # VM cards come first (most severe label first)
    assert re.findall(r'<div class="card" data-label="(\w+)"', page)[0] == "VM"

    # a real browser loads every image from disk
    attrs = body_attrs(render_in_chromium(index, tmp_path))
    assert attrs.get("data-ready") == "yes", "the page's load script did not run"
    total, loaded = int(attrs["data-images-total"]), int(attrs["data-images-loaded"])
    assert loaded == total, f"broken images: {attrs.get('data-images-broken')}"
    assert total >= len(charts) + 3 * expected_cards


def test_report_rerun_replaces_stale_files(labelled_db, tmp_path):
    root, cases, db, pairs, nemo = labelled_db
    out = tmp_path / "out"
    write_report(db, out, gallery_per_label=4)
    n_before = len(list((out / "img").glob("gallery-*.png")))
    (out / "img" / "keep.txt").write_text("not ours")
    write_report(db, out, gallery_per_label=1)
    n_after = len(list((out / "img").glob("gallery-*.png")))
    assert n_after < n_before  # fewer cases: the old gallery files are gone
    assert n_after == 3 * len({lab for pair in pairs.values() for lab in pair})
    assert (out / "img" / "keep.txt").exists()


def test_empty_database_gives_no_data_sections(tmp_path):
    db = connect(str(tmp_path / "empty-db"))
    index = write_report(db, tmp_path / "out")
    page = index.read_text()
    assert "section failed" not in page
    for key in ("labels", "one-to-many", "nemo", "gallery"):
        section = page.split(f'<section id="{key}">', 1)[1].split("</section>", 1)[0]
        assert "no data yet" in section, key
    assert "no mitigated generations yet" in page
    assert "no quality measured yet" in page
    assert "<img" not in page
    attrs = body_attrs(render_in_chromium(index, tmp_path))
    assert attrs["data-images-total"] == "0" and attrs["data-images-loaded"] == "0"


def test_missing_sql_folder_is_a_clear_error(tmp_path):
    db = connect(str(tmp_path / "db"))
    with pytest.raises(FileNotFoundError, match="named SQL queries"):
        write_report(db, tmp_path / "out", sql_folder=tmp_path / "no-sql")


# ------------------------------------------------------------------------------ quality cost


SWEEP = {  # (method, alpha) -> (after-label of every pair, shift of the after set's CLIP vectors)
    ("nemo", 0.0): ("NM", 0.6), ("nemo", 0.25): ("BM", 0.3), ("nemo", 0.5): ("VM", 0.0),
    ("nemo-c", 0.0): ("NM", 0.8), ("nemo-c", 0.5): ("FM", 0.2),
}


def quality_world(db, cfg) -> None:
    """Prompts in two clusters, 3 samples each, all VM before; a dampening sweep per method whose
    after sets are the before set shifted by SWEEP's amount and labelled SWEEP's label."""
    rng = np.random.default_rng(1)
    d, pids = 16, [f"q{i}" for i in range(6)]
    clip, model = cfg.models.clip.model_id, cfg.models.diffusion.model_id

    def vecs(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), d), x

    text_arr, text = vecs(rng.normal(size=(6, d)))
    db.upsert("prompts", pa.table({"prompt_id": pids, "text": pids, "embedding": text_arr, "embedding_model": [clip] * 6,
                                   "cluster_id": pa.array([i % 2 for i in range(6)], pa.int32()), "run_id": ["t"] * 6}))
    keys = [(p, s) for p in pids for s in range(3)]
    _, before = vecs(np.repeat(text, 3, axis=0) + 0.6 * rng.normal(size=(len(keys), d)))
    shift = np.eye(d)[0]
    rows, labels, embs = [], [], []
    for method, alpha, lab, delta in [("none", None, "VM", 0.0)] + [(m, a, lab, dl) for (m, a), (lab, dl) in SWEEP.items()]:
        for (p, s), e in zip(keys, before + delta * shift):
            gid = f"{p}-{s}-{method}-{alpha}"
            rows.append({"generation_id": gid, "prompt_id": p, "seed": s, "sample": s, "model_id": model,
                         "mitigation": method, "alpha": alpha, "image_sha256": gid, "embedding_model": clip, "run_id": "t"})
            embs.append(e)
            labels.append({"label_id": gid, "generation_id": gid, "prompt_id": p, "label": lab, "rule": "most-severe",
                           "run_id": "t"})
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(embs).astype(np.float32).ravel()), d)
    table = pa.Table.from_pylist(rows).append_column("embedding", emb)
    table = table.set_column(table.schema.get_field_index("alpha"), "alpha", pa.array([r["alpha"] for r in rows], pa.float32()))
    db.upsert("generations", table)
    db.upsert("labels", pa.Table.from_pylist(labels))


def test_report_shows_the_quality_tradeoff_chart(tmp_path):
    from fbmem.jobs.config import load_config
    from fbmem.jobs.quality import IQA_METRICS, run_quality
    from fbmem.jobs.runtime.run_record import RunRecord

    cfg = load_config("tiny", overrides={"quality.metrics": ["clip_score", "fd_clip", "kid_clip", "dbcnn"],
                                         "quality.kid_subset_size": 4, "quality.kid_subsets": 5})
    assert "dbcnn" in IQA_METRICS
    db = connect(str(tmp_path / "db"))
    quality_world(db, cfg)
    for method, alpha in SWEEP:
        with RunRecord(db, "quality", cfg) as run:
            run_quality(db, cfg, method=method, alpha=alpha, run=run)
    index = write_report(db, tmp_path / "out")
    page = index.read_text()
    section = page.split('<section id="quality">', 1)[1].split("</section>", 1)[0]
    assert "section failed" not in page
    assert 'src="img/chart-quality-tradeoff.png"' in section
    # one overall row per (method, alpha), with its own mitigation score beside the quality numbers
    table = section.split("<table>", 1)[1].split("</table>", 1)[0]
    head = re.findall(r"<th>([^<]*)</th>", table)
    assert head[:5] == ["method", "alpha", "mitigation_score", "score_pairs", "quality_pairs"]
    assert {"clip_before", "clip_after", "clip_delta", "fd_clip", "kid_clip"} <= set(head)
    body = [re.findall(r"<td[^>]*>([^<]*)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert len(body) == len(SWEEP)
    at = {h: i for i, h in enumerate(head)}
    weight = {"NM": 2.0, "BM": 1.5, "FM": 0.5, "VM": 0.0}
    for cells in body:
        lab, delta = SWEEP[(cells[at["method"]], float(cells[at["alpha"]]))]
        assert float(cells[at["mitigation_score"]]) == pytest.approx(weight[lab])
        assert float(cells[at["fd_clip"]]) == pytest.approx(delta**2, rel=1e-3, abs=1e-4)
    # the pyiqa metric without weights is listed as skipped, once per (method, alpha)
    assert "Metrics not computed" in section and section.count("skipped: weights not present") == len(SWEEP)
    assert "Per prompt cluster" in section
    # the chart, like the other charts, loads in a real browser from disk
    attrs = body_attrs(render_in_chromium(index, tmp_path))
    assert attrs.get("data-ready") == "yes"
    assert int(attrs["data-images-loaded"]) == int(attrs["data-images-total"]) >= 1 + len(SWEEP)  # + heatmaps
    assert "chart-quality-tradeoff.png" not in attrs.get("data-images-broken", "")
    with Image.open(index.parent / "img" / "chart-quality-tradeoff.png") as im:
        assert im.size[0] > im.size[1] > 200  # two panels side by side


def test_report_shows_both_detectors_and_the_scan_with_what_changed(tmp_path):
    """Detector scores per planted group (AUC of each method, VM vs NM), and a scan's stages with
    the changes since the previous scan of its spec, written as the jobs write them."""
    import json as _json

    import pyarrow as pa

    from fbmem.storage.schema import DETECTIONS, LABEL_CHANGES, SCAN_STAGES, SCANS, now_utc

    db = connect(str(tmp_path / "db"))
    groups = {"p-vm1": "VM", "p-vm2": "VM", "p-nm1": "NM", "p-nm2": "NM", "p-fm": "FM"}
    db.upsert("prompts", pa.table({"prompt_id": list(groups), "text": [f"prompt {p}" for p in groups],
                                   "planted": list(groups.values()), "run_id": ["t"] * len(groups),
                                   "embedding": pa.array([[1.0, 0.0]] * len(groups), pa.list_(pa.float32(), 2))}))
    # nemo separates VM from NM perfectly; wen ranks one NM above one VM (AUC 0.75)
    scores = {"nemo": {"p-vm1": 0.9, "p-vm2": 0.8, "p-nm1": 0.2, "p-nm2": 0.1, "p-fm": 0.5},
              "wen": {"p-vm1": 3.0, "p-vm2": 1.0, "p-nm1": 2.0, "p-nm2": 0.5, "p-fm": 1.5}}
    rows = [{"detection_id": f"{m}-{p}", "prompt_id": p, "method": m, "model_id": "toy", "score": s,
             "settings_hash": m, "unet_calls": 10 if m == "nemo" else 80, "seconds": 0.1, "run_id": "t",
             "created_at": now_utc()} for m, by in scores.items() for p, s in by.items()]
    # a second setting of Wen's, run later (its first step, one seed): reversed on the NM prompts (AUC 1.0)
    first = {"p-vm1": 2.0, "p-vm2": 1.8, "p-nm1": 0.5, "p-nm2": 0.7, "p-fm": 1.0}
    rows += [{"detection_id": f"wen1-{p}", "prompt_id": p, "method": "wen", "model_id": "toy", "score": sc,
              "settings_hash": "wen-first", "settings_json": _json.dumps({"steps": 1, "seeds": 1}), "unet_calls": 2,
              "seconds": 0.01, "run_id": "t2", "created_at": now_utc()} for p, sc in first.items()]
    db.upsert("detections", pa.Table.from_pylist(rows, schema=DETECTIONS))
    t0 = now_utc()
    scans = [{"scan_id": sid, "name": "weekly", "status": "done", "model_id": "toy", "started_at": t0.replace(hour=h),
              "finished_at": t0.replace(hour=h, minute=30), "attempts": 1} for sid, h in (("w-1", 1), ("w-2", 2))]
    db.upsert("scans", pa.Table.from_pylist(scans, schema=SCANS))
    db.upsert("scan_stages", pa.Table.from_pylist([
        {"stage_row_id": f"w-2-{st}", "scan_id": "w-2", "stage": st, "ordinal": i, "status": "done", "seconds": 1.5,
         "counts_json": _json.dumps({"shards_new": 1}), "run_ids": ["r"]} for i, st in enumerate(["ingest", "label"])],
        schema=SCAN_STAGES))
    db.upsert("generations", pa.table({"generation_id": ["g1"], "prompt_id": ["p-nm1"], "run_id": ["t"], "image_sha256": ["x"],
                                       "embedding": pa.array([[1.0, 0.0]], pa.list_(pa.float32(), 2))}))
    db.upsert("label_changes", pa.Table.from_pylist([
        {"change_id": "c1", "label_id": "l1", "generation_id": "g1", "rule": "most-severe", "label": "NM",
         "previous_label": None, "run_id": "t", "scan_id": "w-1", "changed_at": t0.replace(hour=1, minute=10)},
        {"change_id": "c2", "label_id": "l1", "generation_id": "g1", "rule": "most-severe", "label": "VM",
         "previous_label": "NM", "run_id": "t", "scan_id": "w-2", "changed_at": t0.replace(hour=2, minute=10)},
    ], schema=LABEL_CHANGES))

    index = write_report(db, tmp_path / "out", scan_id="w-2")
    page = index.read_text()
    assert "section failed" not in page
    det = page.split('<section id="detectors">', 1)[1].split("</section>", 1)[0]
    assert 'src="img/chart-detectors.png"' in det
    summary = det.split("<table>", 1)[1].split("</table>", 1)[0]
    head = re.findall(r"<th>([^<]*)</th>", summary)
    body = {cells[0]: cells for cells in (re.findall(r"<td[^>]*>([^<]*)</td>", tr)
                                          for tr in re.findall(r"<tr>(.*?)</tr>", summary)[1:])}
    assert set(body) == {"nemo", "wen", "wen (1 steps, 1 seeds)"}  # one row per detector setting
    auc = head.index("auc_vm_vs_nm")
    assert float(body["nemo"][auc]) == pytest.approx(1.0) and float(body["wen"][auc]) == pytest.approx(0.75)
    assert float(body["wen (1 steps, 1 seeds)"][auc]) == pytest.approx(1.0)
    assert float(body["wen (1 steps, 1 seeds)"][head.index("unet_evals_per_prompt")]) == pytest.approx(2.0)
    scan = page.split('<section id="scan">', 1)[1].split("</section>", 1)[0]
    assert "w-2" in scan and "ingest" in scan and "label" in scan
    assert "What changed since w-1" in scan and "label changed" in scan
    attrs = body_attrs(render_in_chromium(index, tmp_path))
    assert attrs.get("data-ready") == "yes"
    assert int(attrs["data-images-loaded"]) == int(attrs["data-images-total"]) >= 1
    assert "chart-detectors.png" not in attrs.get("data-images-broken", "")
