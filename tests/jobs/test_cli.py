"""The command line's shared wiring: the job context, the common options, the choices, the named
queries and the shipped reference data by name (issue 11, items 3, 5 and 7).

What users type must not change: every job command keeps `--db` (env FBMEM_DB), `--preset`,
`--config`, `--set`; the choices of an option that is a setting are the config's own values.
"""
from __future__ import annotations

from pathlib import Path
from typing import get_args

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from fbmem.jobs import cli
from fbmem.jobs.cli import app
from fbmem.jobs.config import (
    CandidatesConfig,
    ClusterConfig,
    ConfigError,
    FBMemConfig,
    IngestConfig,
)
from fbmem.jobs.runtime.context import JobContext, parse_assignments
from fbmem.storage.database import connect
from fbmem.storage.sql import named_sql_dir, run_query

runner = CliRunner()
NAMED_QUERIES = sorted(p.stem for p in named_sql_dir().glob("*.sql"))


def fbmem(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def test_every_job_command_takes_the_common_options():
    import typer.main

    commands = dict(_commands(typer.main.get_command(app)))
    assert {"ingest training", "ingest generations", "ingest prompts", "index", "label", "cluster", "generate",
            "mitigate", "report", "nemo stats", "nemo detect", "nemo localize", "tables", "sql", "demo",
            "toy train", "detect", "scan", "scans", "runs"} == set(commands)
    for name, cmd in commands.items():
        opts = {o for p in cmd.params for o in p.opts}
        if name == "toy train":
            continue
        # a scan's settings are its spec's (preset, config file, settings); --set still wins
        assert ({"--set"} if name == "scan" else {"--preset", "--config", "--set"}) <= opts, name
        if name != "demo":
            db = next(p for p in cmd.params if "--db" in p.opts)
            assert db.required and db.envvar == "FBMEM_DB", name


def test_choices_come_from_the_config_and_their_owners():
    from fbmem.pipelines.generator import MITIGATIONS
    from fbmem.pipelines.sources import SourceKind

    assert get_args(cli.Masks) == get_args(IngestConfig.model_fields["masks"].annotation) == ("eager", "lazy")
    assert get_args(cli.CandidateMode) == ("ann", "exact")
    assert cli.CandidateMode == CandidatesConfig.model_fields["mode"].annotation
    assert cli.RegionMetric == FBMemConfig.model_fields["region_metric"].annotation
    assert cli.PromptEmbedding == ClusterConfig.model_fields["embedding"].annotation
    # the choices that are not settings are kept in step with the code that takes them
    assert get_args(cli.SourceKind) == get_args(SourceKind)
    assert get_args(cli.Mitigation) == MITIGATIONS
    assert get_args(cli.Method) == tuple(m for m in MITIGATIONS if m != "none")
    out = fbmem("label", "--db", "x", "--metric", "bogus", code=1)  # usage error (README: exit codes)
    assert "masked-view" in out


def test_context_layers_settings_and_opens_the_database_on_first_use(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("fbmem: {tau: 0.6, beta: 0.05}\ncluster: {k: 5}\n")
    job = JobContext.from_options(str(tmp_path / "db"), "tiny", cfg_file, ["fbmem.tau=0.7", "cluster.k=6"],
                                  {"cluster.k": 7, "fbmem.beta": None})
    # defaults < preset < file < --set < the command's flags; a flag not given (None) changes nothing
    assert job.cfg.models.clip.tiny and job.cfg.fbmem.tau == 0.7 and job.cfg.fbmem.beta == 0.05
    assert job.cfg.cluster.k == 7
    assert not (tmp_path / "db").exists()  # nothing opened yet
    with job.run("probe", {"why": "test"}) as run:
        run.rows_out = 3
    assert job.db is job.db
    rows = run_query(connect(str(tmp_path / "db")), "SELECT job, status, rows_out, args_json FROM runs").to_pylist()
    assert rows == [{"job": "probe", "status": "ok", "rows_out": 3, "args_json": '{"why": "test"}'}]


def test_assignments_are_yaml_values_and_a_missing_equals_sign_is_named():
    assert parse_assignments(["a.b=0.5", "c=null", "d=[1, 2]", "e=x=y"]) == {"a.b": 0.5, "c": None, "d": [1, 2], "e": "x=y"}
    with pytest.raises(ConfigError, match="--param expects key=value"):
        parse_assignments(["oops"], "--param")


def test_user_errors_are_one_line_with_their_exit_code(tmp_path):
    db = str(tmp_path / "db")
    out = fbmem("ingest", "prompts", "memorised-laion", "--db", db, code=2)
    assert "error: memorised-laion: no such file" in out and "memorized-laion, ordinary-laion" in out
    out = fbmem("tables", "--db", db, "--set", "fbmem.tau=3", code=1)  # config error
    assert "error: invalid config" in out and "fbmem.tau" in out
    out = fbmem("sql", "top_matches", "--db", db, "--param", "nope=1", code=2)
    assert "error: unknown --param nope" in out


@pytest.mark.parametrize("name", NAMED_QUERIES)
def test_every_named_query_runs_from_the_cli_on_an_empty_database(tmp_path, name):
    """The report's and the demo's tables are named queries too: `fbmem sql NAME` runs each."""
    out = fbmem("sql", name, "--db", str(tmp_path / "db"), "--format", "csv")
    assert out.strip(), name  # the CSV header at least


def test_report_and_demo_queries_are_named_files():
    from fbmem.jobs.report import REQUIRED_QUERIES

    assert set(REQUIRED_QUERIES) <= set(NAMED_QUERIES)
    assert {"label_shares_by_group", "nemo_by_prompt", "nemo_by_group", "one_to_many"} <= set(NAMED_QUERIES)


def test_output_formats_are_the_renderers(tmp_path):
    from fbmem.jobs.sql_output import render

    table = pa.table({"x": [1]})
    for fmt in get_args(cli.OutFormat):
        render(table, fmt, tmp_path / f"out.{fmt}")
        assert (tmp_path / f"out.{fmt}").is_file()


def test_shipped_prompt_set_by_name(tmp_path, ray_local):
    db_uri = str(tmp_path / "db")
    out = fbmem("ingest", "prompts", "memorized-laion", "--db", db_uri, "--preset", "tiny")
    assert "rows written=500" in out
    db = connect(db_uri)
    assert db.count("prompts") == 500
    args = run_query(db, "SELECT args_json FROM runs WHERE job = 'ingest-prompts'").column(0).to_pylist()
    assert len(args) == 1 and "memorized_laion_prompts.csv" in args[0]  # the resolved file is recorded


def test_shipped_sd14_statistics_by_name_refuse_another_unet(tmp_path):
    db_uri = str(tmp_path / "db")
    out = fbmem("nemo", "stats", "--db", db_uri, "--preset", "tiny", "--from-csv", "sd14", code=2)
    assert "error: the activation statistics" in out and "do not match this UNet's value layers" in out
    db = connect(db_uri)
    assert not db.has_table("neuron_stats") or db.count("neuron_stats") == 0
    runs = run_query(db, "SELECT status, args_json FROM runs WHERE job = 'nemo-stats'").to_pylist()
    assert [r["status"] for r in runs] == ["failed"] and "sd14_to_v_activation_stats.csv" in runs[0]["args_json"]
    out = fbmem("nemo", "stats", "--db", db_uri, "--preset", "tiny", "--from-csv", "sd15", code=2)
    assert "not a shipped reference name (sd14)" in out


def test_demo_settings_are_a_preset_layer(tiny_cfg, tmp_path: Path):
    from fbmem.jobs.config import preset_dict
    from fbmem.jobs.toy.demo import DEMO_PRESET, demo_config

    layer = preset_dict(DEMO_PRESET)
    cfg = demo_config(tiny_cfg, tmp_path / "model", {"cluster.k": 3})
    assert cfg.models.diffusion.model == str(tmp_path / "model") and not cfg.models.diffusion.tiny
    assert cfg.generation.n == layer["generation"]["n"] and cfg.cluster.k == 3  # the caller's override wins
    assert cfg.models.clip.tiny  # the base preset's models stay
