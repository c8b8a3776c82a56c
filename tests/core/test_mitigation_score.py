from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fbmem.jobs.core.mitigation_score import (
    LABELS,
    WEIGHTS,
    mitigation_score,
    transition_counts,
    transition_matrix,
)
from fbmem.storage.database import connect
from fbmem.storage.sql import load_query, query_params, run_query

SQL = Path(__file__).resolve().parents[2] / "sql" / "mitigation_score.sql"


def test_matrix_is_the_published_one():
    rows = {
        "VM": (0, 1.5, 0.5, 2), "BM": (-1.5, 0, -0.5, 0.5),
        "FM": (-0.5, 1, 0, 1.5), "NM": (-2, -0.5, -1.5, 0),
    }
    for b, ws in rows.items():
        for a, w in zip(("VM", "BM", "FM", "NM"), ws):
            assert WEIGHTS[(b, a)] == w


def test_score_on_constructed_pairs():
    assert mitigation_score(["VM", "VM"], ["NM", "VM"]) == pytest.approx(1.0)
    assert mitigation_score(["VM", "FM", "NM"], ["BM", "NM", "VM"]) == pytest.approx((1.5 + 1.5 - 2.0) / 3)
    assert mitigation_score(["BM"] * 4, ["BM"] * 4) == 0.0
    assert math.isnan(mitigation_score([], []))
    assert transition_matrix(["VM", "VM", "NM"], ["NM", "NM", "NM"])[0] == [0, 0, 0, 2]
    with pytest.raises(ValueError, match="pair them"):
        mitigation_score(["VM"], [])
    with pytest.raises(ValueError, match="unknown labels"):
        transition_counts(["XX"], ["VM"])


def test_every_transition_once_averages_to_the_matrix_mean():
    pairs = list(itertools.product(LABELS, LABELS))
    before, after = zip(*pairs)
    assert mitigation_score(before, after) == pytest.approx(np.mean(list(WEIGHTS.values())))


def test_sql_twin_matches_python(tmp_path):
    rng = np.random.default_rng(0)
    db = connect(str(tmp_path / "db"))
    prompts = [f"p{i}" for i in range(6)]
    clusters = {p: i % 2 for i, p in enumerate(prompts)}
    gens, labels, expected = [], [], {"nemo": ([], []), "nemo-c": ([], [])}
    per_cluster: dict[tuple[str, int], tuple[list, list]] = {}
    for p in prompts:
        for sample in range(3):
            before = str(rng.choice(LABELS))
            gens.append({"generation_id": f"{p}-{sample}-none", "prompt_id": p, "seed": 7 + sample, "sample": sample,
                         "mitigation": "none", "model_id": "m", "image_sha256": "x", "run_id": "r"})
            labels.append({"label_id": f"{p}-{sample}-none", "generation_id": f"{p}-{sample}-none", "label": before,
                           "rule": "most-severe", "run_id": "r"})
            for method in ("nemo", "nemo-c"):
                after = str(rng.choice(LABELS))
                gid = f"{p}-{sample}-{method}"
                gens.append({"generation_id": gid, "prompt_id": p, "seed": 7 + sample, "sample": sample,
                             "mitigation": method, "model_id": "m", "image_sha256": "x", "run_id": "r"})
                labels.append({"label_id": gid, "generation_id": gid, "label": after, "rule": "most-severe", "run_id": "r"})
                expected[method][0].append(before)
                expected[method][1].append(after)
                b, a = per_cluster.setdefault((method, clusters[p]), ([], []))
                b.append(before)
                a.append(after)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6 * 4, np.float32)), 4)
    db.upsert("prompts", pa.table({"prompt_id": prompts, "text": prompts, "embedding": emb,
                                   "cluster_id": pa.array([clusters[p] for p in prompts], pa.int32()), "run_id": ["r"] * 6}))
    db.upsert("generations", pa.Table.from_pylist(gens))
    db.upsert("labels", pa.Table.from_pylist(labels))
    text = load_query(str(SQL))
    rows = run_query(db, text, query_params(text, {})).to_pylist()
    for r in rows:
        if r["level"] == "overall":
            b, a = expected[r["method"]]
        else:
            b, a = per_cluster[(r["method"], r["cluster_id"])]
        assert r["pairs"] == len(b)
        assert r["mitigation_score"] == pytest.approx(mitigation_score(b, a), abs=1e-4)
        m = transition_matrix(b, a)
        at = {lab: i for i, lab in enumerate(LABELS)}
        assert r["vm_to_nm"] == m[at["VM"]][at["NM"]] and r["nm_to_vm"] == m[at["NM"]][at["VM"]]
        assert r["fm_to_bm"] == m[at["FM"]][at["BM"]]
        assert r["vm_before"] == b.count("VM") and r["vm_after"] == a.count("VM")
    assert {(r["method"], r["level"], r["cluster_id"]) for r in rows} == {
        (m, lvl, c) for m in ("nemo", "nemo-c") for lvl, c in (("overall", None), ("cluster", 0), ("cluster", 1))}
