"""Heartbeats and `aborted` (jobs/runtime/heartbeat.py): a silent `running` row is aborted, on
this host at once when its process is gone; a heartbeat thread really writes."""
from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

from fbmem.jobs.config import load_config
from fbmem.jobs.runtime.heartbeat import Heartbeat, effective_status, this_host
from fbmem.jobs.runtime.run_record import RunRecord
from fbmem.storage.database import connect
from fbmem.storage.schema import now_utc


def test_running_with_a_fresh_heartbeat_stays_running_and_a_stale_one_is_aborted() -> None:
    now = now_utc()
    fresh = effective_status("running", now - timedelta(seconds=5), "elsewhere", 1, now=now, stale_after_s=60)
    stale = effective_status("running", now - timedelta(seconds=61), "elsewhere", 1, now=now, stale_after_s=60)
    assert (fresh, stale) == ("running", "aborted")
    assert effective_status("running", None, None, None, now=now, stale_after_s=60) == "aborted"
    assert effective_status("ok", now - timedelta(days=9), None, None, now=now, stale_after_s=60) == "ok"


def test_on_this_host_a_dead_process_is_aborted_at_once_and_a_live_one_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = now_utc()
        assert effective_status("running", now, this_host(), child.pid, now=now, stale_after_s=600) == "running"
    finally:
        child.kill()
        child.wait()
    assert effective_status("running", now, this_host(), child.pid, now=now, stale_after_s=600) == "aborted"


def test_the_heartbeat_thread_beats_until_stopped() -> None:
    beats: list[float] = []
    with Heartbeat(lambda: beats.append(time.monotonic()), 0.05):
        time.sleep(0.4)
    n = len(beats)
    time.sleep(0.2)
    assert n >= 3 and len(beats) == n


def test_a_run_writes_heartbeats_while_it_runs(tmp_path) -> None:
    cfg = load_config(preset="tiny", overrides={"runtime.heartbeat_s": 0.1})
    db = connect(str(tmp_path / "db"))
    with RunRecord(db, "probe", cfg) as run:
        first = db.read("runs").to_pylist()[0]
        time.sleep(0.6)
        run.rows_in = 7
        time.sleep(0.4)
        mid = db.read("runs").to_pylist()[0]
    assert first["status"] == mid["status"] == "running"
    assert mid["heartbeat_at"] > first["heartbeat_at"] and mid["rows_in"] == 7  # counts so far
    last = db.read("runs").to_pylist()[0]
    assert last["status"] == "ok" and last["pid"] is not None and last["host"] == this_host()
