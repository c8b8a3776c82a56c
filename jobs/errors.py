"""How a command ends: the exit codes of `fbmem`, and which error gets which (issue 14, item 5).

Bad input is data (DESIGN.md): inside a job a bad image becomes an error row and the job goes on.
What stops a command prints one line on stderr that names the thing (a path, a column, a URI, a
setting) and says what to do, and exits with one of these codes (the README's table):

    0  ok
    1  usage or config: an unknown command or option, a bad option value, an unknown preset,
       an invalid setting, a config file that is missing or not YAML
    2  input: a missing or unreadable source, a manifest without its required columns, a `--db`
       that is a file or a store that cannot be reached, bad SQL, a missing table or named query
    3  the job ran to its end and recorded its rows, error rows and run, but every input failed
       (or more than `--max-error-rate` of them)
    4  internal: a bug in fbmem; the traceback is written to a file the line names, `--debug`
       (or FBMEM_LOG=DEBUG) prints it

Errors are classified by type (`classify`), so the code that raises them needs nothing of the
CLI. The storage and SQL error classes are looked up in `sys.modules`: a command that never opened
the database cannot have raised them, and `fbmem --help` stays free of LanceDB and DuckDB.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from enum import IntEnum

from fbmem.jobs.config import ConfigError

try:  # typer vendors click as typer._click (0.2x on); older typer runs on click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions


class ExitCode(IntEnum):
    OK = 0
    USAGE = 1  # the command line or the settings
    INPUT = 2  # what the command was pointed at
    INPUTS_FAILED = 3  # every input failed, or more than --max-error-rate (all recorded)
    INTERNAL = 4  # a bug
    GATE = 5  # `fbmem scan --fail-on`: a memorization gate was crossed (everything was written)


class UserError(Exception):
    """An error the user can fix, with its exit code; the message names the thing and what to do."""

    exit_code: ExitCode = ExitCode.INPUT


class InputError(UserError, ValueError):
    """Bad input found before the job's stream: a source, a `--db`, a manifest."""


class InputsFailed(UserError):
    """The job wrote what it could and recorded its run, but too many of its inputs failed."""

    exit_code = ExitCode.INPUTS_FAILED


def check_error_rate(inputs: int, errors: int, max_error_rate: float | None, *, run_id: str, db: str) -> None:
    """Raise `InputsFailed` when all of a job's `inputs` (its summary's `rows in`: read, or skipped
    as already stored) failed, or when the failed share is over `max_error_rate` (None: fail only
    when all failed). No input at all is not a failure."""
    if inputs <= 0 or errors <= 0:
        return
    share = errors / inputs
    if not (errors >= inputs if max_error_rate is None else share > max_error_rate):
        return
    what = (f"all {inputs} inputs failed" if errors >= inputs else
            f"{errors} of {inputs} inputs failed ({share:.0%} > --max-error-rate {max_error_rate:g}; "
            f"the other {inputs - errors} are stored)")
    raise InputsFailed(
        f"{what}; the reasons are in the errors table: "
        f"fbmem sql \"SELECT source_uri, reason FROM errors WHERE run_id = '{run_id}'\" --db {shlex.quote(db)}"
    )


class GateCrossed(UserError):
    """A scan finished and wrote everything, but one of its --fail-on gates was crossed."""

    exit_code = ExitCode.GATE


class ScanBusy(UserError):
    """Another process is running this scan (its heartbeat is fresh)."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class Failure:
    code: ExitCode
    message: str  # one line

    @property
    def internal(self) -> bool:
        return self.code == ExitCode.INTERNAL


def one_line(text: str) -> str:
    """A message on one line: its lines joined (after a line ending in ':' by a space, else '; ')."""
    out = ""
    for line in (part.strip() for part in str(text).splitlines()):
        if not line:
            continue
        out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    return out


def _loaded(module: str, name: str) -> tuple[type[BaseException], ...]:
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return (cls,) if isinstance(cls, type) else ()


def _message(exc: BaseException) -> str:
    return one_line(str(exc)) or type(exc).__name__


def classify(exc: BaseException) -> Failure:
    """The exit code and the one line for `exc`."""
    if isinstance(exc, click_exceptions.UsageError):
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        return Failure(ExitCode.USAGE, one_line(exc.format_message()) + hint)
    if isinstance(exc, click_exceptions.ClickException):
        return Failure(ExitCode.USAGE, one_line(exc.format_message()))
    if isinstance(exc, UserError):
        return Failure(exc.exit_code, _message(exc))
    if isinstance(exc, ConfigError):
        msg = _message(exc)
        if msg.startswith("invalid config"):
            msg += " (change it with --set KEY=VALUE, in the --config file, or pick another --preset)"
        return Failure(ExitCode.USAGE, msg)
    ray_task_error = _loaded("ray.exceptions", "RayTaskError")
    if ray_task_error and isinstance(exc, ray_task_error):
        # Raised inside a Ray task: bad input there is an error row (DESIGN.md), so what escapes
        # is a bug unless its cause is one of the named user errors.
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (UserError, ConfigError, *_input_classes(plain=False))):
            return classify(cause)
        return Failure(ExitCode.INTERNAL, _message(cause if isinstance(cause, BaseException) else exc))
    query_error = _loaded("fbmem.storage.sql", "QueryError")
    if query_error and isinstance(exc, query_error):
        msg = _message(exc)
        if not msg.startswith("fbmem sql is read-only"):
            msg = f"the SQL query failed: {msg} (fix the query; `fbmem tables` lists the tables)"
        return Failure(ExitCode.INPUT, msg)
    if isinstance(exc, _input_classes(plain=True)):
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename:
            return Failure(ExitCode.INPUT, f"{exc.filename}: {exc.strerror or exc} (check the path and its permissions)")
        return Failure(ExitCode.INPUT, _message(exc))
    return Failure(ExitCode.INTERNAL, _message(exc))


def _input_classes(*, plain: bool) -> tuple[type[BaseException], ...]:
    """The exceptions that are bad input: fbmem's named ones, and with `plain` the built-in ones
    fbmem's own checks raise (ValueError, FileNotFoundError) and the OS's (OSError)."""
    named = (
        *_loaded("fbmem.storage.database", "StorageError"),
        *_loaded("fbmem.storage.sql", "QueryError"),
        *_loaded("fbmem.pipelines.sources", "SourceError"),
        FileNotFoundError,
    )
    return (*named, ValueError, OSError) if plain else named
