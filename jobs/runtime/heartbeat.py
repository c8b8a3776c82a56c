"""Liveness of long jobs and scans: a heartbeat thread, and the rule that turns a silent `running`
row into `aborted`.

A job killed with kill -9 (or whose node is lost) cannot close its own rows, so every running row
carries the time of its last heartbeat, the host and the process id. Readers decide: a `running`
row is `aborted` when its heartbeat is older than `runtime.stale_after_s`, or, on the same host,
at once when its process is gone (a crashed cron run is then taken over by the next one without
waiting). Nothing else is needed from the store: a heartbeat is an ordinary upsert.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime

log = logging.getLogger(__name__)

RUNNING = "running"
ABORTED = "aborted"


def this_host() -> str:
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: os.kill said it exists


def effective_status(status: str, heartbeat_at: datetime | None, host: str | None, pid: int | None,
                     *, now: datetime, stale_after_s: float, local_host: str | None = None) -> str:
    """`status`, except that a `running` row whose owner is gone reads `aborted`.

    Gone: no heartbeat for `stale_after_s` (a row without any heartbeat, written by an fbmem that
    had none, is judged by the same rule on its absence: aborted), or on this host its process is
    dead."""
    if status != RUNNING:
        return status
    if host is not None and pid is not None and host == (local_host or this_host()) and pid != os.getpid():
        if not process_alive(int(pid)):
            return ABORTED
    if heartbeat_at is None:
        return ABORTED
    return ABORTED if (now - heartbeat_at).total_seconds() > stale_after_s else RUNNING


class Heartbeat:
    """Calls `beat` every `interval_s` on a daemon thread until stopped (a context manager).

    A failed beat is logged and retried at the next interval: the work matters more than its
    bookkeeping, and a missed beat only makes the row look older."""

    def __init__(self, beat: Callable[[], None], interval_s: float, name: str = "fbmem-heartbeat") -> None:
        self.beat, self.interval_s, self.name = beat, interval_s, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # a beat never overlaps the owner's final write

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.beat()
                except Exception:  # noqa: BLE001 - see the class docstring
                    log.warning("%s: heartbeat failed", self.name, exc_info=True)

    def start(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and wait for a beat in progress, so a later write is the last word."""
        self._stop.set()
        with self._lock:
            pass
        if self._thread is not None:
            self._thread.join(timeout=60)

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
