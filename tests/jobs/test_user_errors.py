"""Every error a user can cause ends as one line on stderr that names the thing and what to do,
with a documented exit code (jobs/errors.py; issue 14, item 5): 1 usage/config, 2 input, 3 all
inputs failed (or over --max-error-rate), 4 internal. Tracebacks only with --debug."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray.data  # noqa: F401 - here, not first inside CliRunner: its log handler keeps the stderr of its import
from bad_inputs import write_good_images
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.jobs.config import ConfigError
from fbmem.jobs.core.gates import GateError
from fbmem.jobs.errors import (
    ExitCode,
    GateCrossed,
    InputError,
    InputsFailed,
    ScanBusy,
    check_error_rate,
    classify,
    one_line,
)
from fbmem.storage.database import StorageError, connect
from fbmem.storage.sql import QueryError, run_query

runner = CliRunner()


def fails(*args: str, code: int) -> str:
    """Run `fbmem ARGS` in-process; check the exit code and that stderr is one line, no traceback.
    Returns that line."""
    result = runner.invoke(app, list(args), catch_exceptions=False, prog_name="fbmem")
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def bad_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"bad_{i:02d}.jpg").write_text(f"caption {i}, not a JPEG\n")


def run_rows(db_uri: str, job: str) -> list[dict]:
    return run_query(connect(db_uri), f"SELECT run_id, status, rows_out, errors, message FROM runs "
                                      f"WHERE job = '{job}'").to_pylist()


# ------------------------------------------------------------------------------ the mapping


def test_exit_codes_are_the_documented_ones():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5]
    assert classify(ConfigError("unknown preset 'x'")).code == ExitCode.USAGE
    assert classify(GateCrossed("VM > 0.01")).code == ExitCode.GATE == 5  # a scan's --fail-on
    assert classify(ScanBusy("scan x is running")).code == ExitCode.USAGE
    assert classify(GateError("gate 'x'")).code == ExitCode.USAGE
    for exc in (InputError("x"), StorageError("x"), QueryError("x"), FileNotFoundError("x"), ValueError("x"),
                PermissionError(13, "Permission denied", "/x")):
        assert classify(exc).code == ExitCode.INPUT, exc
    assert classify(InputsFailed("x")).code == ExitCode.INPUTS_FAILED
    for exc in (RuntimeError("x"), KeyError("x"), TypeError("x"), AttributeError("x"), ZeroDivisionError()):
        assert classify(exc).code == ExitCode.INTERNAL, exc


def test_a_multi_line_message_becomes_one_line():
    assert one_line("invalid config (defaults):\n  fbmem.tau: too big\n  cluster.k: too small\n") == \
        "invalid config (defaults): fbmem.tau: too big; cluster.k: too small"


def test_error_rate_rule():
    check_error_rate(0, 0, None, run_id="r", db="d")  # no input is no failure
    check_error_rate(2, 1, None, run_id="r", db="d")  # one failed, one was already stored
    check_error_rate(10, 9, None, run_id="r", db="d")  # default: only when every input failed
    with pytest.raises(InputsFailed, match="all 10 inputs failed"):
        check_error_rate(10, 10, None, run_id="r", db="d")
    with pytest.raises(InputsFailed, match=r"4 of 10 inputs failed \(40% > --max-error-rate 0.3"):
        check_error_rate(10, 4, 0.3, run_id="r", db="d")
    check_error_rate(10, 3, 0.3, run_id="r", db="d")  # at the rate is not over it
    check_error_rate(10, 10, 1.0, run_id="r", db="d")  # 1 accepts anything


# ------------------------------------------------------------------- 1: usage and settings


def test_bad_config_value_exits_1(tmp_path):
    line = fails("tables", "--db", str(tmp_path / "db"), "--set", "fbmem.tau=2", code=1)
    assert line.startswith("error: invalid config") and "fbmem.tau" in line and "--set" in line


def test_unknown_preset_exits_1(tmp_path):
    line = fails("tables", "--db", str(tmp_path / "db"), "--preset", "nope", code=1)
    assert "unknown preset 'nope'" in line and "tiny" in line  # names the known ones


def test_missing_config_file_exits_1(tmp_path):
    line = fails("tables", "--db", str(tmp_path / "db"), "--config", str(tmp_path / "no.yaml"), code=1)
    assert "config file not found" in line and "no.yaml" in line


def test_click_usage_errors_exit_1_in_one_line(tmp_path):
    line = fails("label", "--db", "x", "--metric", "bogus", code=1)
    assert "--metric" in line and "masked-view" in line and "fbmem label --help" in line
    line = fails("nosuch", code=1)
    assert "No such command 'nosuch'" in line
    line = fails("ingest", "training", str(tmp_path), "--db", "x", "--max-error-rate", "2", code=1)
    assert "--max-error-rate" in line


# ---------------------------------------------------------------------------------- 2: input


def test_db_that_is_a_file_exits_2(tmp_path):
    f = tmp_path / "db.txt"
    f.write_text("not a database")
    line = fails("tables", "--db", str(f), code=2)
    assert f"--db {f} is a file" in line and "give a folder" in line


def test_unreachable_store_exits_2(tmp_path):
    opts = ('storage_options={endpoint: "http://127.0.0.1:1", allow_http: "true", region: us-east-1, '
            'aws_access_key_id: x, aws_secret_access_key: y}')
    line = fails("tables", "--db", "s3://bucket/db", "--set", opts, code=2)
    assert "127.0.0.1:1" in line


def test_sql_syntax_error_exits_2(tmp_path):
    line = fails("sql", "SELEC 1", "--db", str(tmp_path / "db"), code=2)
    assert "SELEC" in line and "fix the query" in line


def test_missing_source_exits_2(tmp_path):
    missing = tmp_path / "nothere"
    line = fails("ingest", "training", str(missing), "--db", str(tmp_path / "db"), "--preset", "tiny", code=2)
    assert f"source not found: {missing}" in line and "give a folder" in line


def test_manifest_without_uri_column_exits_2(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,caption\na.jpg,a cat\n")
    line = fails("ingest", "training", str(manifest), "--db", str(tmp_path / "db"), "--preset", "tiny", code=2)
    assert f"manifest {manifest} has no required column 'uri'" in line and "add a 'uri' column" in line


# ------------------------------------------------------------------------------- 4: internal


def test_internal_error_exits_4_with_the_traceback_in_a_file(tmp_path, monkeypatch):
    from fbmem.storage import vector_index

    def broken(*args, **kwargs):
        raise RuntimeError("boom in build_index")

    monkeypatch.setattr(vector_index, "update_index", broken)  # what `fbmem index` calls
    monkeypatch.delenv("FBMEM_LOG", raising=False)
    line = fails("index", "--db", str(tmp_path / "db"), code=4)
    assert line.startswith("internal error (a bug in fbmem") and "RuntimeError: boom in build_index" in line
    assert "--debug" in line
    path = re.search(r"the traceback is in (\S+);", line).group(1)
    assert "Traceback" in Path(path).read_text() and "def broken" not in line
    Path(path).unlink()
    # with --debug (anywhere on the line) the traceback is printed, the code is the same
    result = runner.invoke(app, ["index", "--db", str(tmp_path / "db"), "--debug"])
    assert result.exit_code == 4 and "Traceback" in result.stderr and "boom in build_index" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("internal error")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FBMEM_LOG", raising=False)
    result = runner.invoke(app, ["--debug", "sql", "SELEC 1", "--db", str(tmp_path / "db")])
    assert result.exit_code == 2 and "Traceback" in result.stderr and "QueryError" in result.stderr
    monkeypatch.setenv("FBMEM_LOG", "DEBUG")
    result = runner.invoke(app, ["sql", "SELEC 1", "--db", str(tmp_path / "db")])
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_the_installed_command_exits_with_the_codes(tmp_path):
    """The real process: sys.exit codes, stderr one line (no Ray, no model: a few seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FBMEM_LOG", "FBMEM_DB")}
    f = tmp_path / "db.txt"
    f.write_text("")
    cmd = [sys.executable, "-m", "fbmem.jobs.cli"]
    for args, code in ((["tables", "--db", str(f)], 2), (["tables", "--db", str(f), "--bogus"], 1),
                       (["sql", "SELEC 1", "--db", str(tmp_path / "db")], 2)):
        proc = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=120, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr


# ------------------------------------------------------------------- 3: inputs that all failed


def test_folder_of_only_bad_files_exits_3_after_writing_every_error_row(tmp_path, ray_local):
    folder, db_uri = tmp_path / "bad", str(tmp_path / "db")
    bad_files(folder, 10)
    line = fails("ingest", "training", str(folder), "--db", db_uri, "--preset", "tiny", code=3)
    assert "all 10 inputs failed" in line and "FROM errors WHERE run_id" in line
    [run] = run_rows(db_uri, "ingest-training")
    assert run["status"] == "failed" and run["errors"] == 10 and run["rows_out"] == 0
    assert "all 10 inputs failed" in run["message"]
    errors = run_query(connect(db_uri), f"SELECT source_uri FROM errors WHERE run_id = '{run['run_id']}'")
    assert sorted(Path(u).name for u in errors.column(0).to_pylist()) == [f"bad_{i:02d}.jpg" for i in range(10)]


def test_max_error_rate(tmp_path, ray_local):
    over, under = tmp_path / "over", tmp_path / "under"
    bad_files(over, 4)
    write_good_images(over, 6, seed=1)
    bad_files(under, 2)
    write_good_images(under, 8, seed=2)
    db_uri = str(tmp_path / "db")
    line = fails("ingest", "training", str(over), "--db", db_uri, "--preset", "tiny", "--max-error-rate", "0.3", code=3)
    assert "4 of 10 inputs failed (40% > --max-error-rate 0.3" in line and "the other 6 are stored" in line
    assert connect(db_uri).count("training_images") == 6
    result = runner.invoke(app, ["ingest", "training", str(under), "--db", db_uri, "--preset", "tiny",
                                 "--max-error-rate", "0.3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rows written=8" in result.stdout and "errors=2" in result.stdout
    assert [r["status"] for r in sorted(run_rows(db_uri, "ingest-training"), key=lambda r: r["rows_out"])] == \
        ["failed", "ok"]
