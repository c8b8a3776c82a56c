"""`run_quality` on a LanceDB whose generations and prompts carry chosen CLIP vectors.

The rows are written with `Database.upsert` (no model runs: quality reads stored embeddings), so
the answers are known: an "after" set equal to the "before" set has Fréchet distance 0 and an
unchanged CLIP score; a shifted after set is farther, the more so the larger the shift; every
(method, alpha) keeps its own rows and its own mitigation score.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from fbmem.jobs.config import load_config
from fbmem.jobs.mitigate import score_method
from fbmem.jobs.quality import (
    IQA_METRICS,
    IqaMetric,
    iqa_unavailable,
    register_iqa_metric,
    run_quality,
)
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.storage.database import connect

D = 32
SAMPLES = 4
CLUSTERS = {"p0": 0, "p1": 0, "p2": 0, "p3": 1, "p4": 1, "p5": None}  # p5 never clustered
# after-images per (method, alpha): how far each is pushed from its before-image; alpha 0.1 is
# not exact in float32 (stored as 0.10000000149) and must still be found
SHIFTS = {("nemo", 0.0): 0.0, ("nemo", 0.25): 0.3, ("nemo", 0.1): 0.8, ("nemo-c", 0.0): 0.5}
# after-labels per (method, alpha) for every pair (before: all VM): known mitigation scores
AFTER_LABEL = {("nemo", 0.0): "VM", ("nemo", 0.25): "BM", ("nemo", 0.1): "NM", ("nemo-c", 0.0): "FM"}
WEIGHT_FROM_VM = {"VM": 0.0, "BM": 1.5, "FM": 0.5, "NM": 2.0}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def vectors(rows: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.astype(np.float32).ravel()), rows.shape[1])


def gen_row(gid: str, pid: str, s: int, mitigation: str, alpha, model_id: str, clip: str) -> dict:
    return {"generation_id": gid, "prompt_id": pid, "seed": 100 + s, "sample": s, "model_id": model_id,
            "mitigation": mitigation, "alpha": alpha, "image_sha256": gid, "embedding_model": clip, "run_id": "t"}


def write_world(db, cfg, *, text_model: str | None = None) -> dict:
    """Prompts with text vectors and clusters; before generations; after generations per SHIFTS;
    labels (before VM, after per AFTER_LABEL). Returns the vectors written."""
    rng = np.random.default_rng(0)
    clip, model = cfg.models.clip.model_id, cfg.models.diffusion.model_id
    pids = sorted(CLUSTERS)
    text = unit(rng.normal(size=(len(pids), D)))
    db.upsert("prompts", pa.table({
        "prompt_id": pids, "text": [f"prompt {p}" for p in pids], "embedding": vectors(text),
        "embedding_model": [text_model or clip] * len(pids),
        "cluster_id": pa.array([CLUSTERS[p] for p in pids], pa.int32()), "run_id": ["t"] * len(pids)}))
    # images near their prompt's text vector, so CLIP scores are well above 0
    before = unit(np.repeat(text, SAMPLES, axis=0) + 0.5 * rng.normal(size=(len(pids) * SAMPLES, D)))
    direction = unit(rng.normal(size=D))
    keys = [(p, s) for p in pids for s in range(SAMPLES)]
    rows, embs, labels = [], [], []
    for (p, s), e in zip(keys, before):
        gid = f"{p}-{s}-none"
        rows.append(gen_row(gid, p, s, "none", None, model, clip))
        embs.append(e)
        labels.append({"label_id": gid, "generation_id": gid, "prompt_id": p, "label": "VM", "rule": "most-severe",
                       "run_id": "t"})
    after = {}
    for (method, alpha), shift in SHIFTS.items():
        after[(method, alpha)] = before + shift * direction  # a pure shift of the whole set
        for (p, s), e in zip(keys, after[(method, alpha)]):
            gid = f"{p}-{s}-{method}-{alpha}"
            rows.append(gen_row(gid, p, s, method, alpha, model, clip))
            embs.append(e)
            labels.append({"label_id": gid, "generation_id": gid, "prompt_id": p, "rule": "most-severe",
                           "label": AFTER_LABEL[(method, alpha)], "run_id": "t"})
    table = pa.Table.from_pylist(rows).append_column("embedding", vectors(np.stack(embs)))
    table = table.set_column(table.schema.get_field_index("alpha"), "alpha", pa.array([r["alpha"] for r in rows], pa.float32()))
    db.upsert("generations", table)
    db.upsert("labels", pa.Table.from_pylist(labels))
    return {"text": text, "before": before, "after": after, "keys": keys, "pids": pids}


@pytest.fixture()
def cfg():
    return load_config("tiny", overrides={"quality.kid_subset_size": 8, "quality.kid_subsets": 20})


def quality(db, cfg, method: str, alpha: float) -> dict:
    with RunRecord(db, "quality", cfg, args={"method": method, "alpha": alpha}) as run:
        return run_quality(db, cfg, method=method, alpha=alpha, run=run)


def rows_of(db, method: str, alpha: float) -> list[dict]:
    rows = db.read("mitigation_quality", where=f"method = '{method}'").to_pylist()
    return [r for r in rows if np.float32(r["alpha"]) == np.float32(alpha)]


def pick(rows: list[dict], metric: str, level: str = "overall", cluster=None) -> dict:
    found = [r for r in rows if r["metric"] == metric and r["level"] == level and r["cluster_id"] == cluster]
    assert len(found) == 1, (metric, level, cluster, found)
    return found[0]


def test_identical_after_images_cost_nothing(tmp_path, cfg):
    db = connect(str(tmp_path / "db"))
    world = write_world(db, cfg)
    out = quality(db, cfg, "nemo", 0.0)
    n = len(world["keys"])
    assert out["pairs"] == n
    assert out["fd_clip"] == pytest.approx(0.0, abs=1e-5)
    assert out["clip_delta"] == pytest.approx(0.0, abs=1e-6)
    assert abs(out["kid_clip"]) < 0.05  # the unbiased estimator's O(1/m) at identity
    # the CLIP score is the mean prompt-image cosine of the stored vectors
    idx = [world["pids"].index(p) for p, _ in world["keys"]]
    expected = float(np.mean(np.sum(world["text"][idx] * world["before"], axis=1)))
    assert out["clip_before"] == pytest.approx(expected, abs=1e-5)
    assert out["clip_after"] == pytest.approx(expected, abs=1e-5)
    assert out["skipped"] == {}

    rows = rows_of(db, "nemo", 0.0)
    # overall + clusters 0, 1 and the unclustered prompt (cluster NULL), three metrics each
    assert {(r["level"], r["cluster_id"]) for r in rows} == {("overall", None), ("cluster", 0), ("cluster", 1),
                                                             ("cluster", None)}
    assert len(rows) == 4 * 3
    assert pick(rows, "clip_score", "cluster", 0)["n_pairs"] == 3 * SAMPLES
    assert pick(rows, "fd_clip", "cluster", 1)["n_pairs"] == 2 * SAMPLES
    assert pick(rows, "fd_clip", "cluster", None)["n_pairs"] == SAMPLES
    for r in rows:
        if r["metric"] == "fd_clip":
            assert r["value"] == pytest.approx(0.0, abs=1e-5)
        if r["metric"] == "clip_score":
            assert r["value"] == pytest.approx(0.0, abs=1e-6)
    assert {r["model_id"] for r in rows} == {cfg.models.diffusion.model_id}
    assert db.count("runs", "job = 'quality' AND status = 'ok'") == 1


def test_alpha_sweep_keeps_alphas_apart_and_cost_grows_with_the_shift(tmp_path, cfg):
    db = connect(str(tmp_path / "db"))
    world = write_world(db, cfg)
    outs = {key: quality(db, cfg, *key) for key in SHIFTS}
    n = len(world["keys"])
    # every (method, alpha) has its own 12 rows, none overwritten by another alpha
    assert db.count("mitigation_quality") == 12 * len(SHIFTS)
    for key in SHIFTS:
        rows = rows_of(db, *key)
        assert len(rows) == 12 and {r["method"] for r in rows} == {key[0]}
        assert outs[key]["pairs"] == n
    # a pure shift of the set: FD is |shift|^2 (covariance unchanged), overall and per cluster
    for key, shift in SHIFTS.items():
        assert outs[key]["fd_clip"] == pytest.approx(shift**2, rel=1e-4, abs=1e-5)
        assert pick(rows_of(db, *key), "fd_clip", "cluster", 0)["value"] == pytest.approx(shift**2, rel=1e-4, abs=1e-5)
    nemo = [outs[("nemo", a)] for a in (0.0, 0.25, 0.1)]  # shifts 0, 0.3, 0.8
    assert [o["fd_clip"] for o in nemo] == sorted(o["fd_clip"] for o in nemo)
    assert nemo[0]["kid_clip"] < nemo[1]["kid_clip"] < nemo[2]["kid_clip"]
    # the mitigation score is kept per alpha too (sql/mitigation_score.sql groups by alpha)
    for (method, alpha), lab in AFTER_LABEL.items():
        scored = score_method(db, method, alpha)
        assert scored["pairs"] == n
        assert scored["score"] == pytest.approx(WEIGHT_FROM_VM[lab])
    with pytest.raises(ValueError, match="several alphas"):
        score_method(db, "nemo")

    # a rerun replaces this alpha's rows (same keys), leaving the other alphas alone
    again = quality(db, cfg, "nemo", 0.25)
    assert again["fd_clip"] == pytest.approx(outs[("nemo", 0.25)]["fd_clip"])
    assert db.count("mitigation_quality") == 12 * len(SHIFTS)


def test_prompts_and_generations_of_different_clip_models_are_refused(tmp_path, cfg):
    db = connect(str(tmp_path / "db"))
    write_world(db, cfg, text_model="open_clip:some-other-model")
    with pytest.raises(ValueError, match="one model's text and image vectors"):
        quality(db, cfg, "nemo", 0.0)
    assert db.count("mitigation_quality") == 0


def test_missing_weights_give_one_skipped_row_not_an_error(tmp_path, cfg, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no weights there
    register_iqa_metric(IqaMetric("fbmem-test-iqa", "dbcnn", weights=("pyiqa/NOT_HERE_*.pth",)))
    try:
        reason = iqa_unavailable(IQA_METRICS["fbmem-test-iqa"])
        assert reason.startswith("skipped: weights not present") and "NOT_HERE_" in reason
        assert "weights not present" in iqa_unavailable(IQA_METRICS["dbcnn"])
        db = connect(str(tmp_path / "db"))
        write_world(db, cfg)
        cfg2 = load_config("tiny", overrides={"quality.metrics": ["clip_score", "fd_clip", "fbmem-test-iqa", "dbcnn"]})
        out = quality(db, cfg2, "nemo", 0.25)
        assert set(out["skipped"]) == {"fbmem-test-iqa", "dbcnn"}
        assert out["fd_clip"] == pytest.approx(0.09, rel=1e-4)  # the CLIP metrics still ran
        rows = rows_of(db, "nemo", 0.25)
        for name in ("fbmem-test-iqa", "dbcnn"):
            skipped = [r for r in rows if r["metric"] == name]
            assert len(skipped) == 1  # one row per method and alpha, not per cluster or image
            r = skipped[0]
            assert r["level"] == "overall" and r["value"] is None and r["before"] is None
            assert r["note"].startswith("skipped: weights not present")
        assert not [r for r in rows if r["metric"] == "kid_clip"]  # not asked for
    finally:
        IQA_METRICS.pop("fbmem-test-iqa", None)


def test_unknown_metric_name_is_a_config_error(tmp_path):
    db = connect(str(tmp_path / "db"))
    cfg = load_config("tiny", overrides={"quality.metrics": ["clip_score", "dbcmn"]})
    with pytest.raises(ValueError, match="unknown metric"):
        quality(db, cfg, "nemo", 0.0)


def test_no_pairs_writes_nothing(tmp_path, cfg):
    db = connect(str(tmp_path / "db"))
    write_world(db, cfg)
    out = quality(db, cfg, "nemo", 0.75)  # never generated at this alpha
    assert out["pairs"] == 0 and out["rows"] == 0
    assert db.count("mitigation_quality") == 0


# ------------------------------------------------------------------------------ the CLI sweep


def test_parse_alphas():
    from fbmem.jobs.mitigate import parse_alphas

    assert parse_alphas(None) == [None]  # nemo.alpha: today's behaviour
    assert parse_alphas("0.5") == [0.5]
    assert parse_alphas("0, 0.25,0.5,0.25") == [0.0, 0.25, 0.5]
    for bad in ("0,x", "-0.5", "nan", "0,,1"):
        with pytest.raises(ValueError, match="alpha"):
            parse_alphas(bad)


def test_mitigate_refuses_a_bad_alpha_list_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from fbmem.jobs.cli import app

    result = CliRunner().invoke(app, ["mitigate", "--db", str(tmp_path / "db"), "--preset", "tiny", "--alpha", "0,oops"])
    assert result.exit_code != 0
    assert "oops" in result.output
    assert not (tmp_path / "db").exists()


@pytest.mark.slow
def test_cli_alpha_sweep_generates_scores_and_measures_each_alpha(tmp_path, ray_local):
    """`fbmem mitigate --alpha 0,0.5` on the tiny world: one real mitigation per alpha (generate
    with the tiny diffusion model, label, score) and one quality measurement each, kept apart."""
    import re

    from typer.testing import CliRunner

    from fbmem.jobs.cli import app
    from fbmem.jobs.toy.corpus import ToyCorpusSpec, build_corpus, write_corpus
    from fbmem.storage.sql import load_query, query_params, run_query

    def fbmem(*args: str) -> str:
        result = CliRunner().invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    spec = ToyCorpusSpec(vm_prompts=2, vm_copies=2, fm_prompts=0, bm_prompts=0, nm_prompts=1)
    paths = write_corpus(build_corpus(spec), tmp_path / "world")
    db_uri = str(tmp_path / "db")
    common = ["--db", db_uri, "--preset", "tiny", "--set", "generation.steps=2", "--set", "quality.kid_subset_size=2"]
    fbmem("ingest", "training", str(paths.images_dir), *common)
    fbmem("ingest", "prompts", str(paths.prompts_csv), *common)
    fbmem("generate", *common, "--n", "2")
    fbmem("label", *common, "--candidates", "exact")
    db = connect(db_uri)
    cfg = load_config("tiny")
    pids = sorted(db.read("prompts", ["prompt_id"]).column(0).to_pylist())
    db.upsert("neurons", pa.Table.from_pylist([
        {"neuron_set_id": f"set-{p}", "scope": "prompt", "prompt_id": p, "kind": "refined", "layer_idx": 0,
         "module": "layer0", "neurons": list(range(16)), "model_id": cfg.models.diffusion.model_id, "run_id": "t"}
        for p in pids]))

    out = fbmem("mitigate", *common, "--method", "nemo", "--alpha", "0,0.5")
    lines = [ln for ln in out.splitlines() if ln.startswith("nemo: mitigation score=")]
    assert len(lines) == 2
    for line, alpha in zip(lines, ("0", "0.5")):
        assert f"alpha={alpha};" in line and "clip score before=" in line and "fd_clip=" in line
        assert re.search(r"over 6 pairs", line), line  # 3 prompts x 2 samples
    # each alpha has its own generations (the recipe hashes alpha), labels, score and quality rows
    for alpha in (0.0, 0.5):
        assert db.count("generations", f"mitigation = 'nemo' AND alpha = {alpha}") == 6
        assert score_method(db, "nemo", alpha)["pairs"] == 6
        rows = rows_of(db, "nemo", alpha)
        assert {r["metric"] for r in rows} == {"clip_score", "fd_clip", "kid_clip"}
        assert pick(rows, "fd_clip")["n_pairs"] == 6
    text = load_query("mitigation_score")
    overall = [r for r in run_query(db, text, query_params(text, {})).to_pylist() if r["level"] == "overall"]
    assert sorted(r["alpha"] for r in overall) == [0.0, 0.5]
    ids = {a: set(db.read("generations", ["generation_id"], where=f"mitigation = 'nemo' AND alpha = {a}").column(0).to_pylist())
           for a in (0.0, 0.5)}
    assert not ids[0.0] & ids[0.5]
    assert db.count("runs", "job = 'quality' AND status = 'ok'") == 2
