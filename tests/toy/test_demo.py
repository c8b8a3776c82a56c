"""`fbmem demo` end to end on a small toy world and a briefly trained model (slow, run in CI).

What it checks: every stage runs and writes its tables, the printed summary carries the numbers
the demo promises (label shares per planted group, detection AUC, NeMo verdicts or their absence,
mitigation per method), the report is written, the caller's --set overrides win over the demo's
own settings, and a second run reuses the model and the generations instead of redoing them.
The tiny model memorizes nothing in 12 steps; the label shares themselves are not asserted.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fbmem.jobs.toy.corpus import ToyCorpusSpec
from fbmem.jobs.toy.demo import demo_config, run_demo
from fbmem.jobs.toy.train import ToyTrainSpec
from fbmem.storage.database import connect
from fbmem.storage.sql import run_query

pytestmark = pytest.mark.slow

CORPUS = ToyCorpusSpec(vm_prompts=2, vm_copies=3, fm_prompts=2, fm_copies=3, bm_prompts=2, bm_copies=3,
                       nm_prompts=4, seed=3)
TRAIN = ToyTrainSpec(vae_steps=8, vae_batch=4, unet_steps=12, unet_batch=8, warmup_steps=2)
OVERRIDES = {"generation.n": 2, "generation.steps": 4, "nemo.n_latents": 3, "cluster.k": 2,
             "candidates.k": 4}


def test_overrides_win_over_the_demo_settings(tiny_cfg, tmp_path: Path) -> None:
    cfg = demo_config(tiny_cfg, tmp_path, {"generation.n": 2, "fbmem.edge_band": 0})
    assert cfg.generation.n == 2 and cfg.fbmem.edge_band == 0
    assert cfg.models.segmenter.backend == "colour" and cfg.generation.steps == 50  # demo's own
    assert demo_config(tiny_cfg, tmp_path).generation.n == 5


def test_demo_runs_every_stage_and_a_rerun_reuses_its_work(tiny_cfg, tmp_path: Path, ray_local, capsys) -> None:
    out = tmp_path / "demo"
    run_demo(tiny_cfg, out, overrides=OVERRIDES, corpus_spec=CORPUS, train_spec=TRAIN)
    text = capsys.readouterr().out

    assert "label shares per planted group" in text
    assert "AUC VM vs NM" in text
    for method in ("nemo", "nemo-c"):
        assert f"{method}: mitigation score" in text or f"{method}: not run" in text
    assert (out / "report" / "index.html").is_file()
    assert list((out / "report").rglob("*.png"))

    db = connect(str(out / "db"))
    n_prompts = CORPUS.n_prompts
    gens = run_query(db, "SELECT count(*) AS n FROM generations WHERE mitigation = 'none'").column("n")[0].as_py()
    assert gens == n_prompts * OVERRIDES["generation.n"]
    shares = run_query(db, """
        SELECT p.planted, count(*) AS n FROM current_labels l JOIN generations g USING (generation_id)
        JOIN prompts p ON p.prompt_id = g.prompt_id
        WHERE l.rule = 'most-severe' AND g.mitigation = 'none' GROUP BY 1""").to_pylist()
    assert {r["planted"]: r["n"] for r in shares} == {"VM": 4, "FM": 4, "BM": 4, "NM": 8}
    assert run_query(db, "SELECT count(*) AS n FROM nemo_prompts").column("n")[0].as_py() == n_prompts
    # every generation was compared with the training image its prompt names (SPEC 3: linked
    # candidates), whatever the ANN index returned
    unlinked = run_query(db, """
        SELECT g.generation_id FROM generations g JOIN prompts p ON p.prompt_id = g.prompt_id
        JOIN training_images t ON t.image_id = p.linked_id
        WHERE g.mitigation = 'none' AND NOT EXISTS (
            SELECT 1 FROM pair_scores s WHERE s.generation_id = g.generation_id AND s.image_id = t.image_id)""")
    linked = run_query(db, """
        SELECT count(*) AS n FROM prompts p JOIN training_images t ON t.image_id = p.linked_id""")
    assert linked.column("n")[0].as_py() == n_prompts and unlinked.num_rows == 0
    for planted in ("VM", "FM", "BM", "NM"):
        assert f"\n{planted} " in text  # one row per planted group in the printed shares

    weights = out / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    run_demo(tiny_cfg, out, overrides=OVERRIDES, corpus_spec=CORPUS, train_spec=TRAIN)
    again = capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before  # the model was reused, not retrained
    assert "label shares per planted group" in again and "AUC VM vs NM" in again  # still reports
    runs = run_query(db, """SELECT metrics_json FROM runs WHERE job = 'nemo-localize' AND status = 'ok'
                            ORDER BY started_at""").column(0).to_pylist()
    first, second = (json.loads(m) for m in runs[-2:])
    assert first["reused"] == 0 and second["reused"] == n_prompts and second["unet_calls"] == 0
    assert second["localized"] == first["localized"]  # the NeMo search was not run again
    assert run_query(db, "SELECT count(*) AS n FROM generations WHERE mitigation = 'none'").column("n")[0].as_py() == gens
