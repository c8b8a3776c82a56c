"""One row in `runs` per job, and the summary line users read at the end.

A run is opened before work starts (status `running`) so a killed job leaves a trace, and
closed with counts, seconds and status. While it runs it writes a heartbeat (its row again, with
the counts so far) every `runtime.heartbeat_s`: a row left `running` by a killed process reads
`aborted` once its heartbeat is stale (jobs/runtime/heartbeat.py), and `fbmem runs` shows it so. The same counts make the printed summary line, so the
table and the console never disagree.

When Ray is running, a closed run's metrics also say which nodes ran its model actors:
`model_nodes: {stage: sorted Ray node ids}` (recorded by the actors, see pipelines/actors.py).
A process without Ray pays nothing for this: Ray is not even imported.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

from fbmem.jobs.config import Config
from fbmem.jobs.runtime.heartbeat import Heartbeat, this_host
from fbmem.storage.database import Database
from fbmem.storage.schema import now_utc

log = logging.getLogger(__name__)


def _ray_running() -> bool:
    """Ray initialised in this process, found without importing it."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _nodes_mark() -> int:
    """Where a run's entries start in the job's model-node registry (0 without Ray)."""
    if not _ray_running():
        return 0
    try:
        from fbmem.pipelines.actors import model_nodes_mark

        return model_nodes_mark()
    except Exception:  # bookkeeping; the run itself matters more
        log.warning("could not read the model-node registry", exc_info=True)
        return 0


def _nodes_since(start: int) -> dict[str, list[str]]:
    """`{stage: sorted node ids}` of the model actors constructed since `start` ({} without Ray)."""
    if not _ray_running():
        return {}
    try:
        from fbmem.pipelines.actors import model_nodes_since

        return model_nodes_since(start)
    except Exception:  # as above
        log.warning("could not read the model-node registry", exc_info=True)
        return {}


def new_run_id(job: str) -> str:
    return f"{job}-{now_utc().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


@dataclass
class RunRecord:
    db: Database
    job: str
    cfg: Config
    args: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    rows_in: int = 0
    rows_out: int = 0
    errors: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    started_at: datetime | None = None
    scan_id: str | None = None  # the scan this job is a stage of (jobs/scan.py)
    _nodes_from: int = field(default=0, init=False, repr=False)
    _heartbeat: Heartbeat | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_id = self.run_id or new_run_id(self.job)

    def _row(self, status: str, message: str | None, finished: bool) -> pa.Table:
        return pa.table(
            {
                "run_id": [self.run_id],
                "job": [self.job],
                "status": [status],
                "started_at": [self.started_at],
                "finished_at": [now_utc() if finished else None],
                "rows_in": [self.rows_in],
                "rows_out": [self.rows_out],
                "errors": [self.errors],
                "seconds": [time.perf_counter() - self.started],
                "config_json": [self.cfg.to_record_json()],
                "args_json": [json.dumps(self.args, default=str, sort_keys=True)],
                "metrics_json": [json.dumps(self.metrics, default=str, sort_keys=True)],
                "message": [message],
                "scan_id": [self.scan_id],
                "heartbeat_at": [now_utc()],
                "host": [this_host()],
                "pid": [os.getpid()],
            }
        )

    def __enter__(self) -> "RunRecord":
        self.started = time.perf_counter()
        self.started_at = now_utc()
        self._nodes_from = _nodes_mark()
        self.db.upsert("runs", self._row("running", None, finished=False))
        self._heartbeat = Heartbeat(lambda: self.db.upsert("runs", self._row("running", None, finished=False)),
                                    self.cfg.runtime.heartbeat_s, name=f"heartbeat {self.run_id}").start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        nodes = _nodes_since(self._nodes_from)
        if nodes:
            self.metrics["model_nodes"] = nodes
        if exc is None:
            self.db.upsert("runs", self._row("ok", None, finished=True))
            print(self.summary("ok"), flush=True)
        else:
            msg = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            try:
                self.db.upsert("runs", self._row("failed", msg, finished=True))
            except Exception:  # the original error matters more than the bookkeeping
                log.exception("could not record the failed run")
            print(self.summary("failed"), flush=True)
        return False

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def summary(self, status: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.metrics.items() if isinstance(v, (int, float, str)))
        return (
            f"[fbmem {self.job}] {status}: rows in={self.rows_in} rows written={self.rows_out} "
            f"errors={self.errors} seconds={self.seconds:.1f} run_id={self.run_id}{extra}"
        )
