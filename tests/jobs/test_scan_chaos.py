"""Crash safety of `fbmem scan` (issue: scheduled, crash-safe audits): kill -9 the scan at seeded
random moments, run it again until it completes, and compare every result table with an
uninterrupted scan: the same keys, no duplicate key, the same labels, scores within 1e-6.

The long version is bench/chaos.py (10 kills, prints how many of 10 matched); this one kills one
scan three times in a row (each rerun resumes the previous attempt's scan) on the small toy world
of tests/chaos.py, with every stage on: ingest, index, prompts, cluster, generate, label, NeMo
(every prompt localized, so mitigation has neurons), both detectors, mitigation, report.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from chaos import compare_databases, kill_and_resume, run_cli, seeded_moments, small_toy_scan

from fbmem.storage.database import connect

pytestmark = pytest.mark.slow


def test_a_scan_killed_three_times_then_resumed_equals_an_uninterrupted_scan(tmp_path: Path) -> None:
    spec = small_toy_scan(tmp_path / "toy")
    ray_tmp = tempfile.mkdtemp(prefix="fbc", dir="/tmp")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    t0 = time.monotonic()
    run_cli(["scan", str(spec), "--db", str(whole)], ray_tmp, log=tmp_path / "whole.log")
    seconds = time.monotonic() - t0

    # moments spread over the uninterrupted scan's duration (the first seconds are Python and Ray
    # starting); each attempt starts from where the previous one was killed
    moments = seeded_moments(20261129, 3, 5.0, 0.8 * seconds)
    trial = kill_and_resume(["scan", str(spec), "--db", str(killed)], moments, ray_tmp, tmp_path / "killed.log")
    assert any(trial.killed), f"every attempt finished before its kill ({moments}): nothing was tested"

    problems = compare_databases(str(whole), str(killed))
    assert problems == [], "\n".join(problems)

    db = connect(str(killed))
    scans = db.read("scans").to_pylist()
    assert len(scans) == 1, "every rerun resumed the killed scan instead of starting another"
    scan = scans[0]
    assert scan["status"] == "done" and scan["attempts"] == trial.attempts
    stages = db.read("scan_stages", where=f"scan_id = '{scan['scan_id']}'").to_pylist()
    assert {s["status"] for s in stages} == {"done"}
    # the killed attempts' runs were left `running`; they read `aborted` now (their process is gone)
    out = run_cli(["runs", "--db", str(killed), "--limit", "500", "--format", "json"], ray_tmp)
    statuses = {r["status"] for r in json.loads(out)}
    assert "running" not in statuses
    if sum(trial.killed):
        assert "aborted" in statuses
