"""One job context for every command of the CLI and for the demo.

Every job starts the same way: the settings (defaults < preset < YAML file < `--set` < the
command's own flags), the database they name, Ray when the job runs actors, and a row in `runs`
around the work. `JobContext` is that preamble, written once: a command (or a step of `fbmem
demo`) builds one, calls its job and prints the job's summary; what it does not ask for (the
database, Ray) is never started. It holds no model: every model runs in a Ray actor with the
stage's declared resources (DESIGN.md), so the driver, which may sit on a CPU head node, loads
none.

Imports of storage and Ray happen on first use, so `fbmem --help` stays fast.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fbmem.jobs.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from fbmem.jobs.runtime.run_record import RunRecord
    from fbmem.storage.database import Database


def parse_assignments(items: Iterable[str] | None, flag: str = "--set") -> dict[str, Any]:
    """`key=value` strings into a dict; values are YAML (`0.7` a float, `null` None, `[1, 2]` a list)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


@dataclass
class JobContext:
    """The settings of one job and what they open: the database (connected on first use), Ray,
    and a `runs` record per job."""

    cfg: Config
    db_uri: str
    scan_id: str | None = None  # set by `fbmem scan`: every run it opens is a stage of that scan
    _db: Database | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_options(
        cls,
        db_uri: str,
        preset: str | None = None,
        config: str | Path | None = None,
        sets: Iterable[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> "JobContext":
        """The CLI's layers: defaults < `preset` < `config` file < `sets` (`key=value` strings) <
        `extra`, the command's own flags by dotted key (a None value is a flag not given)."""
        overrides = parse_assignments(sets)
        overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
        return cls(load_config(preset=preset, path=config, overrides=overrides), str(db_uri))

    @property
    def db(self) -> Database:
        if self._db is None:
            from fbmem.storage.database import connect

            self._db = connect(self.db_uri, self.cfg.storage_options)
        return self._db

    def ensure_ray(self) -> None:
        """Start (or join, with `resources.ray_address`) Ray: for jobs that run actors."""
        from fbmem.jobs.runtime.ray_session import ensure_ray

        ensure_ray(self.cfg)

    def run(self, job: str, args: Mapping[str, Any] | None = None) -> RunRecord:
        """The `runs` row of one job, as a context manager: `with ctx.run("label", {...}) as run:`.
        It records the settings and `args`, and prints the summary line when the job ends."""
        from fbmem.jobs.runtime.run_record import RunRecord

        return RunRecord(self.db, job, self.cfg, args=dict(args or {}), scan_id=self.scan_id)
