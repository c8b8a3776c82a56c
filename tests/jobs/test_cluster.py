from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.jobs.core.clustering import cluster_embeddings
from fbmem.storage.database import connect
from fbmem.storage.sql import run_query

runner = CliRunner()


def test_kmeans_recovers_separated_groups_and_reports_silhouette():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    x = np.concatenate([c + rng.normal(size=(10, 8)) for c in centres])
    labels, sil = cluster_embeddings(x, k=3, random_state=1)
    for g in range(3):
        assert len(set(labels[g * 10:(g + 1) * 10])) == 1
    assert len(set(labels)) == 3 and sil > 0.7
    again, _ = cluster_embeddings(x, k=3, random_state=1)
    assert (again == labels).all()  # random_state fixes the result
    _, sil_noise = cluster_embeddings(rng.normal(size=(30, 8)), k=3)
    assert sil_noise < sil
    with pytest.raises(ValueError, match="k=12 clusters of 5 prompts"):
        cluster_embeddings(x[:5], k=12)


@pytest.mark.parametrize("embedding", ["text_encoder", "open_clip"])
def test_cluster_command_stores_ids_and_silhouette(tmp_path, ray_local, reference_data, embedding):
    db_uri = str(tmp_path / "db")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\n" + "\n".join([f"a red star on stripes {i}" for i in range(6)]
                                          + [f"a photo of a mountain lake number {i}" for i in range(6)]) + "\n")
    r = runner.invoke(app, ["ingest", "prompts", str(csv), "--db", db_uri, "--preset", "tiny"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["cluster", "--db", db_uri, "--preset", "tiny", "--k", "3", "--embedding", embedding],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "silhouette=" in r.output
    db = connect(db_uri)
    rows = run_query(db, "SELECT cluster_id, cluster_run_id, embedding IS NOT NULL AS has_vec FROM prompts").to_pylist()
    assert len(rows) == 12 and all(r["has_vec"] for r in rows)  # the rewrite kept the other columns
    assert {r["cluster_id"] for r in rows} <= {0, 1, 2} and len({r["cluster_id"] for r in rows}) == 3
    run = run_query(db, "SELECT metrics_json FROM runs WHERE job = 'cluster'").column(0).to_pylist()
    assert len(run) == 1 and '"silhouette"' in run[0]
