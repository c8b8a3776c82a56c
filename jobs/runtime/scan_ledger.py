"""The ledger of a scan: its row in `scans` and one row per stage in `scan_stages`.

A scan is a sequence of stages (jobs/scan.py); each stage is `pending`, `running`, `done`,
`failed` or `skipped` (not in the spec's stages), with its counts, times and the `runs` of every
attempt. A rerun of the same scan id skips the `done` stages; a stage cut off by a crash is
`running` with a stale heartbeat (read as `aborted`, jobs/runtime/heartbeat.py) and runs again:
every stage is a rerun-safe job that skips its own done work (shards, keys, labels), so running a
stage twice equals running it once.

The scan's process writes one heartbeat for the scan row and its current stage row. Two processes
must not run one scan at once: `claim` refuses a scan whose owner is alive (fresh heartbeat, or on
this host a live process) and takes over one whose owner is gone.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

from fbmem.jobs.errors import ScanBusy
from fbmem.jobs.runtime.heartbeat import ABORTED, RUNNING, Heartbeat, effective_status, this_host
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_literal, stable_hash
from fbmem.storage.schema import SCAN_STAGES, SCANS, now_utc

PENDING, DONE, FAILED, SKIPPED = "pending", "done", "failed", "skipped"


def stage_row_id(scan_id: str, stage: str) -> str:
    return stable_hash(scan_id, stage)


def read_scan(db: Database, scan_id: str) -> dict | None:
    if not db.has_table("scans"):
        return None
    rows = db.read("scans", where=f"scan_id = {sql_literal(scan_id)}").to_pylist()
    return rows[0] if rows else None


def read_stages(db: Database, scan_id: str) -> dict[str, dict]:
    if not db.has_table("scan_stages"):
        return {}
    rows = db.read("scan_stages", where=f"scan_id = {sql_literal(scan_id)}").to_pylist()
    return {r["stage"]: r for r in rows}


def status_now(row: dict, stale_after_s: float, now: datetime | None = None) -> str:
    """A row's status as a reader should see it (`running` rows of dead owners: `aborted`)."""
    return effective_status(row["status"], row.get("heartbeat_at"), row.get("host"), row.get("pid"),
                            now=now or now_utc(), stale_after_s=stale_after_s)


def latest_unfinished(db: Database, name: str) -> dict | None:
    """The most recent scan of spec `name` that did not finish (failed, aborted or running)."""
    if not db.has_table("scans"):
        return None
    rows = db.read("scans", ["scan_id", "status", "started_at"],
                   where=f"name = {sql_literal(name)} AND status <> 'done'").to_pylist()
    rows.sort(key=lambda r: r["started_at"] or datetime.min.replace(tzinfo=now_utc().tzinfo))
    return rows[-1] if rows else None


@dataclass
class ScanLedger:
    """The rows of one scan, written by the one process that runs it."""

    db: Database
    scan_id: str
    name: str
    stale_after_s: float
    heartbeat_s: float
    stages: dict[str, dict] = field(default_factory=dict)
    row: dict = field(default_factory=dict)
    current: str | None = None
    _t0: float = field(default_factory=time.perf_counter)
    _heartbeat: Heartbeat | None = None

    # ------------------------------------------------------------------ the scan row
    def claim(self, spec: dict[str, Any], spec_hash: str, model_id: str | None, order: list[str],
              wanted: list[str]) -> str:
        """Open (or take over) the scan; returns how: "new", "resumed" or "taken over".

        Raises ScanBusy when its owner is alive. Stages of `order` not in `wanted` are `skipped`;
        stages not done are (re)set to `pending`; done stages keep their rows."""
        old = read_scan(self.db, self.scan_id)
        how = "new"
        if old is not None:
            state = status_now(old, self.stale_after_s)
            if state == RUNNING:
                age = (now_utc() - old["heartbeat_at"]).total_seconds() if old.get("heartbeat_at") else None
                raise ScanBusy(
                    f"scan {self.scan_id} is running in process {old.get('pid')} on {old.get('host')} "
                    f"(heartbeat {age:.0f} s ago; it is taken over once silent for {self.stale_after_s:g} s, "
                    "runtime.stale_after_s)" if age is not None else f"scan {self.scan_id} is running")
            if old.get("spec_hash") and old["spec_hash"] != spec_hash:
                raise ScanBusy(f"scan {self.scan_id} was started with another spec (hash {old['spec_hash']}); "
                               "a scan id names one spec: give a new --scan-id")
            how = "taken over" if state == ABORTED else "resumed"
        self.row = {
            "scan_id": self.scan_id, "name": self.name, "status": RUNNING, "spec_json": json.dumps(spec, sort_keys=True),
            "spec_hash": spec_hash, "model_id": model_id,
            "started_at": (old or {}).get("started_at") or now_utc(), "finished_at": None,
            "heartbeat_at": now_utc(), "host": this_host(), "pid": os.getpid(),
            "attempts": int((old or {}).get("attempts") or 0) + 1, "seconds": float((old or {}).get("seconds") or 0.0),
            "summary_json": None, "message": None,
        }
        self._seconds_before = self.row["seconds"]
        self._write_scan()
        self.stages = read_stages(self.db, self.scan_id)
        rows = []
        for i, stage in enumerate(order):
            prev = self.stages.get(stage)
            if prev is not None and prev["status"] == DONE:
                continue
            status = PENDING if stage in wanted else SKIPPED
            prev_state = status_now(prev, self.stale_after_s) if prev else None
            rows.append(self._stage_row(stage, i, status, prev, message=(
                f"attempt {prev_state}: {prev.get('message') or ''}".strip() if prev_state in (ABORTED, FAILED) else None)))
        self._write_stages(rows)
        self._heartbeat = Heartbeat(self._beat, self.heartbeat_s, name=f"heartbeat {self.scan_id}").start()
        return how

    def _write_scan(self) -> None:
        self.db.upsert("scans", pa.Table.from_pylist([self.row], schema=SCANS))

    def _stage_row(self, stage: str, ordinal: int, status: str, prev: dict | None, **over: Any) -> dict:
        row = {
            "stage_row_id": stage_row_id(self.scan_id, stage), "scan_id": self.scan_id, "stage": stage,
            "ordinal": ordinal, "status": status, "started_at": None, "finished_at": None, "heartbeat_at": None,
            "seconds": (prev or {}).get("seconds"), "rows_in": None, "rows_out": None, "errors": None,
            "counts_json": None, "run_ids": list((prev or {}).get("run_ids") or []), "message": None,
        }
        row.update(over)
        return row

    def _write_stages(self, rows: list[dict]) -> None:
        if rows:
            self.db.upsert("scan_stages", pa.Table.from_pylist(rows, schema=SCAN_STAGES))
            for r in rows:
                self.stages[r["stage"]] = r

    def _beat(self) -> None:
        now = now_utc()
        self.row.update(heartbeat_at=now, seconds=self._seconds_before + time.perf_counter() - self._t0)
        self._write_scan()
        if self.current is not None:
            row = dict(self.stages[self.current], heartbeat_at=now)
            self._write_stages([row])

    # ------------------------------------------------------------------ stages
    def is_done(self, stage: str) -> bool:
        return self.stages.get(stage, {}).get("status") == DONE

    def start(self, stage: str) -> None:
        prev = self.stages.get(stage)
        row = dict(prev or self._stage_row(stage, -1, PENDING, None))
        row.update(status=RUNNING, started_at=now_utc(), heartbeat_at=now_utc(), finished_at=None, message=None)
        self._stage_t0 = time.perf_counter()
        self._seconds_prev = float(row.get("seconds") or 0.0)
        self._write_stages([row])
        self.current = stage

    def finish(self, stage: str, *, run_ids: list[str], counts: dict[str, Any], rows_in: int = 0,
               rows_out: int = 0, errors: int = 0, failed: str | None = None) -> None:
        row = dict(self.stages[stage])
        row.update(status=FAILED if failed else DONE, finished_at=now_utc(), heartbeat_at=now_utc(),
                   seconds=self._seconds_prev + time.perf_counter() - self._stage_t0,
                   rows_in=rows_in, rows_out=rows_out, errors=errors,
                   counts_json=json.dumps(counts, sort_keys=True, default=str),
                   run_ids=sorted(set(row.get("run_ids") or []) | set(run_ids)), message=failed)
        self.current = None
        self._write_stages([row])

    # ------------------------------------------------------------------ the end
    def close(self, status: str, *, summary: dict[str, Any] | None = None, message: str | None = None) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.row.update(status=status, finished_at=now_utc(), heartbeat_at=now_utc(), message=message,
                        seconds=self._seconds_before + time.perf_counter() - self._t0,
                        summary_json=json.dumps(summary, sort_keys=True, default=str) if summary else None)
        self._write_scan()
