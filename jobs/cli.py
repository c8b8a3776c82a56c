"""The `fbmem` command line: one subcommand per job, each a thin shell over a function.

Every command takes `--db` (a folder or object-store URI; env FBMEM_DB), `--preset NAME`,
`--config FILE.yaml` and `--set key=value` overrides (dotted config keys, YAML values), so the
same settings object reaches every job and is recorded in `runs`.
"""
from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
import yaml

# Before torch is imported anywhere: torch's busy-waiting OpenMP threads slow 10-30x when another
# process holds a core (Ray actors, a second job).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fbmem.jobs.config import Config, ConfigError, load_config  # noqa: E402

app = typer.Typer(
    help="fbmem: audit text-to-image diffusion models for foreground/background memorization "
    "(FB-Mem) and mitigate it (NeMo-C). Results live in LanceDB tables; query them with `fbmem sql`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ingest_app = typer.Typer(help="Ingest training images, generations or prompts.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
toy_app = typer.Typer(help="The toy world: a small diffusion model that memorizes planted groups.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
nemo_app = typer.Typer(help="NeMo: neuron statistics, memorization detection, neuron localization.", no_args_is_help=True)
app.add_typer(nemo_app, name="nemo")

ORDINARY_PROMPTS = "mem_type IS NULL AND (planted IS NULL OR planted = 'NM')"

log = logging.getLogger("fbmem")

DbOpt = typer.Option(..., "--db", envvar="FBMEM_DB", help="Database: a folder or an object-store URI (s3://...).")
PresetOpt = typer.Option(None, "--preset", help="Named settings: tiny (offline random-weight models) or sd14.")
ConfigOpt = typer.Option(None, "--config", help="YAML config file (overrides the preset).")
SetOpt = typer.Option(None, "--set", help="Override one setting, e.g. --set fbmem.tau=0.7 (repeatable).")


class SourceKind(str, Enum):
    auto = "auto"
    folder = "folder"
    manifest = "manifest"
    webdataset = "webdataset"


class MaskMode(str, Enum):
    eager = "eager"
    lazy = "lazy"


class OutFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def _parse_sets(sets: list[str] | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _config(preset: str | None, config: Path | None, sets: list[str] | None, extra: dict | None = None) -> Config:
    overrides = _parse_sets(sets)
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_config(preset=preset, path=config, overrides=overrides)


def _db(uri: str, cfg: Config):
    from fbmem.storage.database import connect

    return connect(uri, cfg.storage_options)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _ingest_images(target: str, src: str, db: str, kind: SourceKind, masks: MaskMode | None,
                   preset, config, sets) -> None:
    from fbmem.jobs.runtime.ray_session import ensure_ray
    from fbmem.jobs.runtime.run_record import RunRecord
    from fbmem.jobs.ingest import ingest_images

    cfg = _config(preset, config, sets, {"ingest.masks": masks.value if masks else None})
    database = _db(db, cfg)
    ensure_ray(cfg)
    args = {"src": src, "kind": kind.value, "masks": cfg.ingest.masks, "target": target}
    with RunRecord(database, f"ingest-{target}", cfg, args=args) as run:
        ingest_images(database, cfg, src, target=target, kind=kind.value, masks=cfg.ingest.masks, run=run)


@ingest_app.command("training")
def ingest_training(
    src: str = typer.Argument(..., help="A folder of images, a CSV/Parquet manifest, or webdataset .tar shards."),
    db: str = DbOpt,
    kind: SourceKind = typer.Option(SourceKind.auto, help="What SRC is (auto-detected by default)."),
    masks: Optional[MaskMode] = typer.Option(None, help="eager: segment every image now; lazy: when it becomes a candidate."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Ingest training images: validate, CLIP-embed, mask (eager) into `training_images`."""
    _ingest_images("training", src, db, kind, masks, preset, config, set_)


@ingest_app.command("generations")
def ingest_generations(
    src: str = typer.Argument(..., help="Manifest (uri, prompt, optional seed, sample, mask_uri) or folder."),
    db: str = DbOpt,
    kind: SourceKind = typer.Option(SourceKind.auto),
    masks: Optional[MaskMode] = typer.Option(MaskMode.eager, help="Generations are few: eager by default."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Ingest images generated elsewhere into `generations` (embedded and masked)."""
    _ingest_images("generations", src, db, kind, masks, preset, config, set_)


@ingest_app.command("prompts")
def ingest_prompts(
    csv: Path = typer.Argument(..., help="Reference ';'-separated prompt set or a CSV with a 'prompt' column."),
    db: str = DbOpt,
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Ingest a prompt set with CLIP text embeddings into `prompts`."""
    from fbmem.jobs.runtime.ray_session import ensure_ray
    from fbmem.jobs.runtime.run_record import RunRecord
    from fbmem.jobs.ingest import ingest_prompts as run_ingest

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    ensure_ray(cfg)
    with RunRecord(database, "ingest-prompts", cfg, args={"csv": str(csv)}) as run:
        run_ingest(database, cfg, csv, run=run)


@app.command("index")
def index_cmd(
    db: str = DbOpt,
    force: bool = typer.Option(False, help="Build the ANN index even below index.exact_below_rows."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Build the vector index on training embeddings (settings: config `index`)."""
    from fbmem.jobs.runtime.run_record import RunRecord
    from fbmem.storage.vector_index import build_index

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    with RunRecord(database, "index", cfg, args={"force": force}) as run:
        info = build_index(database, cfg.index, force=force)
        run.rows_in = info.get("rows", 0)
        run.metrics.update(info)
        typer.echo(info.get("message", ""))


class CandidateMode(str, Enum):
    ann = "ann"
    exact = "exact"


class RegionMetric(str, Enum):
    region = "region"
    masked_view = "masked-view"


@app.command("label")
def label_cmd(
    db: str = DbOpt,
    k: Optional[int] = typer.Option(None, "--k", help="Top-k candidates per generation (default 20)."),
    tau: Optional[float] = typer.Option(None, "--tau", help="Threshold for full, fg and bg (default 0.8)."),
    tau_full: Optional[float] = typer.Option(None, "--tau-full"),
    tau_fg: Optional[float] = typer.Option(None, "--tau-fg"),
    tau_bg: Optional[float] = typer.Option(None, "--tau-bg"),
    beta: Optional[float] = typer.Option(None, "--beta", help="Degenerate-region fraction (default 0.03)."),
    candidates: Optional[CandidateMode] = typer.Option(None, "--candidates", help="ann: top-k from the index; exact: all training images."),
    metric: Optional[RegionMetric] = typer.Option(None, "--metric", help="region (default) or masked-view (the reference's)."),
    where: Optional[str] = typer.Option(None, help="Only generations matching this filter, e.g. \"mitigation = 'none'\"."),
    force: bool = typer.Option(False, help="Relabel generations already labelled under these settings."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """FB-Mem labels: candidates, lazy masks, batched region MS-SSIM, pair_scores and labels."""
    from fbmem.jobs.label import format_distribution, run_label_job
    from fbmem.jobs.runtime.ray_session import ensure_ray
    from fbmem.jobs.runtime.run_record import RunRecord

    cfg = _config(preset, config, set_, {
        "candidates.k": k, "fbmem.tau": tau, "fbmem.tau_full": tau_full, "fbmem.tau_fg": tau_fg,
        "fbmem.tau_bg": tau_bg, "fbmem.beta": beta, "candidates.mode": candidates.value if candidates else None,
        "fbmem.region_metric": metric.value if metric else None,
    })
    database = _db(db, cfg)
    ensure_ray(cfg)
    with RunRecord(database, "label", cfg, args={"force": force, "where": where}) as run:
        dist = run_label_job(database, cfg, run=run, force=force, where=where)
        typer.echo(f"labels (most-severe): {format_distribution(dist)}")


class PromptEmbedding(str, Enum):
    text_encoder = "text_encoder"
    open_clip = "open_clip"


@app.command("cluster")
def cluster_cmd(
    db: str = DbOpt,
    k: Optional[int] = typer.Option(None, "--k", help="Number of clusters (default 12)."),
    embedding: Optional[PromptEmbedding] = typer.Option(None, help="text_encoder (the model's, default) or open_clip."),
    where: Optional[str] = typer.Option(None, help="Only prompts matching this filter, e.g. \"mem_type IS NOT NULL\"."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """KMeans clusters of prompts (SPEC 5); cluster_id on each prompt, silhouette in `runs`."""
    from fbmem.jobs.cluster import run_cluster
    from fbmem.jobs.runtime.run_record import RunRecord

    cfg = _config(preset, config, set_, {"cluster.k": k, "cluster.embedding": embedding.value if embedding else None})
    database = _db(db, cfg)
    with RunRecord(database, "cluster", cfg, args={"where": where}) as run:
        out = run_cluster(database, cfg, run=run, where=where)
        typer.echo(f"silhouette={out['silhouette']:.4f} cluster sizes={out['sizes']}")


class Mitigation(str, Enum):
    none = "none"
    nemo = "nemo"
    nemo_c = "nemo-c"


@app.command("generate")
def generate_cmd(
    db: str = DbOpt,
    n: Optional[int] = typer.Option(None, "--n", help="Samples per prompt (default generation.n = 5)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Filter on the prompts table, e.g. \"planted = 'VM'\"."),
    mitigation: Mitigation = typer.Option(Mitigation.none, help="none, or regenerate with NeMo / NeMo-C neurons off."),
    alpha: Optional[float] = typer.Option(None, help="Deactivation scale (0 = off, 0<a<1 dampening; default nemo.alpha)."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Generate N seeded samples per prompt (DDIM) with embeddings and masks into `generations`."""
    from fbmem.jobs.generate import run_generate
    from fbmem.jobs.runtime.ray_session import ensure_ray
    from fbmem.jobs.runtime.run_record import RunRecord

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    ensure_ray(cfg)
    neurons = None
    if mitigation is not Mitigation.none:
        from fbmem.jobs.mitigate import neurons_for_method

        neurons = neurons_for_method(database, cfg, mitigation.value)
    with RunRecord(database, "generate", cfg, args={"n": n, "prompts": prompts, "mitigation": mitigation.value}) as run:
        run_generate(database, cfg, run=run, n=n, prompt_filter=prompts, mitigation=mitigation.value,
                     alpha=alpha if mitigation is not Mitigation.none else None, neurons_by_prompt=neurons)


class Method(str, Enum):
    nemo = "nemo"
    nemo_c = "nemo-c"


@app.command("mitigate")
def mitigate_cmd(
    db: str = DbOpt,
    method: Method = typer.Option(Method.nemo_c, help="nemo: each prompt's own neurons; nemo-c: the cluster's union."),
    alpha: Optional[float] = typer.Option(None, help="0 = off (default), 0<a<1 dampening."),
    n: Optional[int] = typer.Option(None, "--n", help="Samples per prompt (default generation.n)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Extra filter on the prompts table."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """NeMo / NeMo-C: regenerate with neurons off (same seeds), relabel, print the mitigation score."""
    from fbmem.jobs.mitigate import run_mitigate
    from fbmem.jobs.runtime.ray_session import ensure_ray
    from fbmem.jobs.runtime.run_record import RunRecord

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    ensure_ray(cfg)
    with RunRecord(database, "mitigate", cfg, args={"method": method.value, "alpha": alpha}) as run:
        out = run_mitigate(database, cfg, method=method.value, run=run, alpha=alpha, n=n, prompt_filter=prompts)
        typer.echo(f"{method.value}: mitigation score={out['score']:.4f} over {out['pairs']} pairs; "
                   f"VM before={out['vm_before']} after={out['vm_after']}")


@app.command("report")
def report_cmd(
    db: str = DbOpt,
    out: Path = typer.Option(Path("fbmem-report"), help="Folder for index.html and its images."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """A static HTML report (opens offline): runs, labels, one-to-many, mitigation, NeMo, gallery."""
    from fbmem.jobs.report import write_report

    cfg = _config(preset, config, set_)
    index = write_report(_db(db, cfg), out, nemo_threshold=cfg.nemo.threshold)
    typer.echo(f"report: {index}")


def _load_pipe(cfg: Config):
    from fbmem.pipelines.diffusion_models import load_audited_pipeline

    return load_audited_pipeline(cfg)


@nemo_app.command("stats")
def nemo_stats_cmd(
    db: str = DbOpt,
    prompts: str = typer.Option(ORDINARY_PROMPTS, "--prompts", help="Filter on the prompts table: the ordinary prompts."),
    from_csv: Optional[Path] = typer.Option(None, help="Import statistics in the SD 1.4 reference CSV format instead."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Per-neuron mean/std of |to_v| activations over ordinary prompts (or import the SD 1.4 file)."""
    from fbmem.jobs.nemo import import_stats_csv, prompt_set_source, run_stats
    from fbmem.jobs.runtime.run_record import RunRecord

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    pipe = _load_pipe(cfg)
    with RunRecord(database, "nemo-stats", cfg, args={"prompts": prompts, "from_csv": str(from_csv) if from_csv else None}) as run:
        if from_csv is not None:
            import_stats_csv(database, from_csv, cfg.models.diffusion.model_id, run, unet=pipe.unet)
        else:
            texts = database.read("prompts", ["text"], where=prompts).column(0).to_pylist()
            if len(texts) < 2:
                raise ConfigError(f"need at least 2 prompts matching {prompts!r} for statistics, found {len(texts)}")
            run_stats(database, cfg, pipe, texts, source=prompt_set_source(texts), run=run)


@nemo_app.command("detect")
def nemo_detect_cmd(
    db: str = DbOpt,
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Filter on the prompts table (default: all)."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Memorization detection from noise differences (SPEC 6); scores in `nemo_prompts`."""
    from fbmem.jobs.nemo import run_detect
    from fbmem.jobs.runtime.run_record import RunRecord

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    pipe = _load_pipe(cfg)
    rows = database.read("prompts", ["prompt_id", "text"], where=prompts)
    with RunRecord(database, "nemo-detect", cfg, args={"prompts": prompts}) as run:
        memorized = run_detect(database, cfg, pipe, rows, run)
        typer.echo(f"memorized: {memorized} of {rows.num_rows} prompts")


@nemo_app.command("localize")
def nemo_localize_cmd(
    db: str = DbOpt,
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Filter on the prompts table (default: all)."),
    sequential: bool = typer.Option(False, help="The reference's one-candidate-per-UNet-call search (same sets, slower on GPU)."),
    all_prompts: bool = typer.Option(False, "--all", help="Localize every prompt, not only those detected as memorized."),
    stats_source: Optional[str] = typer.Option(None, help="Which stored statistics to use when several exist."),
    force: bool = typer.Option(False, help="Search again for prompts already localized with these settings."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Neuron localization: initial selection and refinement (SPEC 6); sets in `neurons`."""
    from fbmem.jobs.nemo import read_stats, run_localize
    from fbmem.jobs.runtime.run_record import RunRecord

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    pipe = _load_pipe(cfg)
    stats = read_stats(database, cfg.models.diffusion.model_id, stats_source)
    rows = database.read("prompts", ["prompt_id", "text"], where=prompts)
    with RunRecord(database, "nemo-localize", cfg, args={"prompts": prompts, "sequential": sequential,
                                                         "force": force}) as run:
        out = run_localize(database, cfg, pipe, rows, stats, run, batched=not sequential,
                           only_memorized=not all_prompts, force=force)
        reached = sum(bool(r.get("criterion_reached")) for r in out)
        typer.echo(f"localized {len(out)} prompts; NeMo criterion reached for {reached}")


@toy_app.command("train")
def toy_train_cmd(
    out: Path = typer.Option(Path("fbmem-demo"), help="Demo folder: the corpus goes to OUT/world, the model to OUT/model."),
    check: bool = typer.Option(True, help="Generate for every prompt and print how much it memorized."),
) -> None:
    """Train (or reuse) the toy latent diffusion model on the toy corpus, on the CPU."""
    from fbmem.jobs.toy.demo import build_world
    from fbmem.jobs.toy.corpus import ToyCorpusSpec
    from fbmem.jobs.toy.train import ToyTrainSpec, ensure_toy_model, format_memorization, memorization_check

    _, corpus = build_world(out, ToyCorpusSpec())
    model_dir = ensure_toy_model(out / "model", corpus, ToyTrainSpec())
    typer.echo(f"toy model: {model_dir}")
    if check:
        import torch

        from fbmem.jobs.config import DiffusionConfig
        from fbmem.pipelines.diffusion_models import load_pipeline

        pipe = load_pipeline(DiffusionConfig(model=str(model_dir)), torch.device("cpu"), torch.float32)
        typer.echo(format_memorization(memorization_check(pipe, corpus)))


@app.command("tables")
def tables_cmd(
    db: str = DbOpt,
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Row counts of every table."""
    from fbmem.storage.schema import TABLES

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    width = max(len(t) for t in TABLES)
    for name in TABLES:
        n = database.count(name) if database.has_table(name) else None
        typer.echo(f"{name:<{width}}  {'-' if n is None else n}")


@app.command("sql")
def sql_cmd(
    query: str = typer.Argument(..., help="A SQL string, a .sql file, or a named query (e.g. one_to_many)."),
    db: str = DbOpt,
    fmt: OutFormat = typer.Option(OutFormat.table, "--format", help="Output format."),
    out: Optional[Path] = typer.Option(None, help="Write the result to this file (required for parquet)."),
    param: Optional[list[str]] = typer.Option(None, "--param", help="Query parameter k=v, used as $k (repeatable)."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run SQL over the tables (DuckDB; every table is a view)."""
    from fbmem.jobs.sql_output import render
    from fbmem.storage.sql import load_query, query_params, run_query

    cfg = _config(preset, config, set_)
    database = _db(db, cfg)
    text = load_query(query)
    params = query_params(text, _parse_params(param))
    result = run_query(database, text, params)
    if result is None:
        return
    rendered = render(result, fmt.value, out)
    if rendered is not None:
        typer.echo(rendered)


def _parse_params(items: list[str] | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--param expects k=v, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("fbmem-demo"), help="Demo folder (database, images)."),
    preset: str = typer.Option("tiny", "--preset"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """The embedded default: build a small world offline and run the jobs on it with local Ray."""
    from fbmem.jobs.toy.demo import run_demo

    cfg = _config(preset, config, set_)
    run_demo(cfg, out, overrides=_parse_sets(set_))  # --set wins over the demo's own settings


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("FBMEM_LOG", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from fbmem.storage.database import StorageError

    try:
        app()
    except (ConfigError, StorageError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
