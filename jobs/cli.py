"""The `fbmem` command line: one subcommand per job, each a thin shell over a function.

Every command takes `--db` (a folder or object-store URI; env FBMEM_DB), `--preset NAME`,
`--config FILE.yaml` and `--set key=value` overrides (dotted config keys, YAML values), declared
once below as `Annotated` aliases. A command builds one `JobContext` from them (settings, the
database, Ray when the job runs actors, a row in `runs`), calls its job and prints the job's
summary; `fbmem demo` runs its jobs through the same context. The choices of an option that is a
setting are the config's own `Literal` values, so the CLI and the config accept the same words.

A command that fails prints one line on stderr and exits with a documented code (jobs/errors.py):
1 usage or config, 2 bad input, 3 all inputs failed (or over --max-error-rate), 4 internal, 5 a
scan's --fail-on gate crossed (after everything was written). The
traceback only with `--debug` (anywhere on the line) or FBMEM_LOG=DEBUG.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from typer.core import TyperGroup

# Before torch is imported anywhere: torch's busy-waiting OpenMP threads slow 10-30x when another
# process holds a core (Ray actors, a second job).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fbmem.jobs.config import CandidatesConfig, ClusterConfig, FBMemConfig, IngestConfig  # noqa: E402
from fbmem.jobs.errors import (  # noqa: E402
    ExitCode,
    InputError,
    check_error_rate,
    classify,
    click_exceptions,
)
from fbmem.jobs.runtime.context import JobContext, parse_assignments  # noqa: E402
from fbmem.pipelines.reference_data import PROMPT_SETS, STATISTICS  # noqa: E402

log = logging.getLogger("fbmem")


def _debug(ctx: typer.Context | None) -> bool:
    """`--debug` (anywhere on the command line) or FBMEM_LOG=DEBUG: print tracebacks."""
    return bool(ctx is not None and ctx.find_root().params.get("debug")) or \
        os.environ.get("FBMEM_LOG", "").upper() == "DEBUG"


def _traceback_file(exc: BaseException) -> str:
    """Write the traceback of an internal error to a file; where it went (or why it could not)."""
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    path = Path(tempfile.gettempdir()) / f"fbmem-traceback-{stamp}-{os.getpid()}.txt"
    try:
        path.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError as err:
        return f"the traceback could not be written ({err})"
    return f"the traceback is in {path}"


def _fail(exc: BaseException, ctx: typer.Context | None) -> int:
    """Print the one line of `exc` on stderr (after its traceback with --debug); its exit code."""
    failure = classify(exc)
    debug = _debug(ctx)
    if debug:
        typer.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(), err=True)
    if failure.internal:
        where = "printed above" if debug else f"{_traceback_file(exc)}; --debug prints it"
        line = (f"internal error (a bug in fbmem, not in your input): {type(exc).__name__}: "
                f"{failure.message[:500]}; {where}")
    else:
        line = f"error: {failure.message}"
    typer.secho(line, fg=typer.colors.RED, err=True)
    return int(failure.code)


# how a command asks to end (typer's own, and click's where typer still runs on click); no arguments
# at all: the help, exit 1
_EXITS = (typer.Exit, typer.Abort, *(getattr(click_exceptions, n) for n in ("Exit", "Abort") if hasattr(click_exceptions, n)))
_NO_ARGS = getattr(click_exceptions, "NoArgsIsHelpError", ())


class _Commands(TyperGroup):
    """Every command ends in one line on stderr and a documented exit code (jobs/errors.py):
    1 usage/config, 2 input, 3 inputs failed, 4 internal (its traceback goes to a file). The
    traceback is printed only with --debug (anywhere on the line) or FBMEM_LOG=DEBUG."""

    def make_context(self, info_name, args, parent=None, **extra):
        args = list(args)
        if "--debug" in args[: args.index("--") if "--" in args else len(args)]:
            # a global option, taken anywhere on the line: `fbmem sql ... --debug` as well
            args = ["--debug", *[a for a in args if a != "--debug"]]
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click_exceptions.UsageError as exc:  # the top level's own options
            if isinstance(exc, _NO_ARGS):
                exc.exit_code = ExitCode.USAGE
                raise
            raise typer.Exit(_fail(exc, None)) from None

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except _EXITS:
            raise
        except Exception as exc:  # every error ends as one line and a code
            if isinstance(exc, _NO_ARGS):  # `fbmem ingest`
                exc.exit_code = ExitCode.USAGE
                raise
            raise typer.Exit(_fail(exc, ctx)) from None


app = typer.Typer(
    cls=_Commands,
    help="fbmem: audit text-to-image diffusion models for foreground/background memorization "
    "(FB-Mem) and mitigate it (NeMo-C). Results live in LanceDB tables; query them with `fbmem sql`.",
    epilog="Exit codes: 0 ok, 1 usage or config, 2 bad input, 3 all inputs failed (or over --max-error-rate), "
    "4 internal error (its traceback goes to a file; --debug prints it), 5 a scan's --fail-on gate crossed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Print the traceback of an error, and fbmem's debug log "
                                        "(also FBMEM_LOG=DEBUG). Taken anywhere on the line.")] = False,
) -> None:
    if debug:
        logging.getLogger("fbmem").setLevel(logging.DEBUG)


ingest_app = typer.Typer(help="Ingest training images, generations or prompts.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
toy_app = typer.Typer(help="The toy world: a small diffusion model that memorizes planted groups.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
nemo_app = typer.Typer(help="NeMo: neuron statistics, memorization detection, neuron localization.", no_args_is_help=True)
app.add_typer(nemo_app, name="nemo")

ORDINARY_PROMPTS = "mem_type IS NULL AND (planted IS NULL OR planted = 'NM')"


# Choices that are settings: the config's own `Literal` types, so both accept the same words.
Masks = IngestConfig.model_fields["masks"].annotation
CandidateMode = CandidatesConfig.model_fields["mode"].annotation
RegionMetric = FBMemConfig.model_fields["region_metric"].annotation
PromptEmbedding = ClusterConfig.model_fields["embedding"].annotation
# Choices that are not settings; tests/jobs/test_cli.py checks them against their owners
# (pipelines.sources.SourceKind, pipelines.generator.MITIGATIONS), which load Ray and torch.
SourceKind = Literal["auto", "folder", "manifest", "webdataset"]
Mitigation = Literal["none", "nemo", "nemo-c"]
Method = Literal["nemo", "nemo-c"]
DetectMethod = Literal["nemo", "wen"]  # jobs.detect.METHODS
OutFormat = Literal["table", "csv", "json", "parquet"]



def _check_db(value: str) -> str:
    """`--db`: a folder (created when missing) or an object-store URI; an existing file is neither."""
    if value and "://" not in value and os.path.exists(value) and not os.path.isdir(value):
        raise InputError(f"--db {value} is a file, not a database folder: give a folder (it is created "
                         "when missing) or an object-store URI (s3://...)")
    return value


# The options every job command takes, declared once.
DbOpt = Annotated[str, typer.Option("--db", envvar="FBMEM_DB", callback=_check_db,
                                    help="Database: a folder or an object-store URI (s3://...).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Named settings: tiny (offline random-weight models) or sd14.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML config file (overrides the preset).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override one setting, e.g. --set fbmem.tau=0.7 (repeatable).")]
# Options several jobs share.
PromptsOpt = Annotated[Optional[str], typer.Option("--prompts", help="Filter on the prompts table (default: all), e.g. \"planted = 'VM'\".")]
NOpt = Annotated[Optional[int], typer.Option("--n", help="Samples per prompt (default generation.n = 5).")]
AlphaOpt = Annotated[Optional[float], typer.Option(help="Deactivation scale: 0 = off (default nemo.alpha), 0<a<1 dampening.")]
ForceOpt = Annotated[bool, typer.Option(help="Redo what was already done with these settings (relabel, search again).")]
KindOpt = Annotated[SourceKind, typer.Option(help="What SRC is (auto-detected by default).")]
MasksOpt = Annotated[Optional[Masks], typer.Option(help="eager: segment every image now; lazy: when it becomes a candidate.")]
MaxErrorRateOpt = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, help="Exit 3 when more than this share of the inputs failed (default: only when all failed); "
                           "the good rows and the error rows are written either way.")]


def _ingest_images(target: str, src: str, kind: str, job: JobContext, max_error_rate: float | None) -> None:
    from fbmem.jobs.ingest import ingest_images

    masks = job.cfg.ingest.masks  # --masks, else the setting (ingest_images starts Ray once the source is listed)
    args = {"src": src, "kind": kind, "masks": masks, "target": target, "max_error_rate": max_error_rate}
    with job.run(f"ingest-{target}", args) as run:
        counts = ingest_images(job.db, job.cfg, src, target=target, kind=kind, masks=masks, run=run)
        # everything is written; too many failed inputs end the run `failed` (with its counts) and exit 3
        check_error_rate(counts.rows_in, counts.errors, max_error_rate, run_id=run.run_id, db=job.db_uri)


@ingest_app.command("training")
def ingest_training(
    src: Annotated[str, typer.Argument(help="A folder of images, a CSV/Parquet manifest, or webdataset .tar shards.")],
    db: DbOpt, kind: KindOpt = "auto", masks: MasksOpt = None, max_error_rate: MaxErrorRateOpt = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Ingest training images: validate, CLIP-embed, mask (eager) into `training_images`."""
    _ingest_images("training", src, kind, JobContext.from_options(db, preset, config, set_, {"ingest.masks": masks}),
                   max_error_rate)


@ingest_app.command("generations")
def ingest_generations(
    src: Annotated[str, typer.Argument(help="Manifest (uri, prompt, optional seed, sample, mask_uri) or folder.")],
    db: DbOpt, kind: KindOpt = "auto", masks: MasksOpt = "eager", max_error_rate: MaxErrorRateOpt = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Ingest images generated elsewhere into `generations` (embedded and masked; eager by default: they are few)."""
    _ingest_images("generations", src, kind, JobContext.from_options(db, preset, config, set_, {"ingest.masks": masks}),
                   max_error_rate)


@ingest_app.command("prompts")
def ingest_prompts(
    csv: Annotated[str, typer.Argument(help="A ';'-separated reference prompt set, a CSV with a 'prompt' column, "
                                            f"or a shipped set by name: {', '.join(PROMPT_SETS)}.")],
    db: DbOpt, preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Ingest a prompt set with CLIP text embeddings into `prompts`."""
    from fbmem.jobs.ingest import ingest_prompts as run_ingest
    from fbmem.pipelines.reference_data import prompt_set_path

    path = prompt_set_path(csv)
    job = JobContext.from_options(db, preset, config, set_)
    job.ensure_ray()
    with job.run("ingest-prompts", {"csv": str(path)}) as run:
        run_ingest(job.db, job.cfg, path, run=run)


@app.command("index")
def index_cmd(
    db: DbOpt,
    force: Annotated[bool, typer.Option(help="Rebuild the ANN index now (also below index.exact_below_rows).")] = False,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Build or update the vector index on training embeddings (settings: config `index`): new rows are
    added to an existing index while they stay under index.max_unindexed_share, else it is rebuilt."""
    from fbmem.storage.vector_index import build_index, update_index

    job = JobContext.from_options(db, preset, config, set_)
    with job.run("index", {"force": force}) as run:
        info = build_index(job.db, job.cfg.index, force=True) if force else update_index(job.db, job.cfg.index)
        run.rows_in = info.get("rows", 0)
        run.metrics.update(info)
        typer.echo(info.get("message", ""))


@app.command("label")
def label_cmd(
    db: DbOpt,
    k: Annotated[Optional[int], typer.Option("--k", help="Top-k candidates per generation (default 20).")] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", help="Threshold for full, fg and bg (default 0.8).")] = None,
    tau_full: Annotated[Optional[float], typer.Option("--tau-full")] = None,
    tau_fg: Annotated[Optional[float], typer.Option("--tau-fg")] = None,
    tau_bg: Annotated[Optional[float], typer.Option("--tau-bg")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help="Degenerate-region fraction (default 0.03).")] = None,
    candidates: Annotated[Optional[CandidateMode], typer.Option(
        "--candidates", help="ann: top-k from the index; exact: all training images.")] = None,
    metric: Annotated[Optional[RegionMetric], typer.Option(
        "--metric", help="region (default) or masked-view (the reference's).")] = None,
    where: Annotated[Optional[str], typer.Option(help="Only generations matching this filter, e.g. \"mitigation = 'none'\".")] = None,
    force: ForceOpt = False,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """FB-Mem labels: candidates, lazy masks, batched region MS-SSIM, pair_scores and labels."""
    from fbmem.jobs.label import format_distribution, run_label_job

    job = JobContext.from_options(db, preset, config, set_, {
        "candidates.k": k, "fbmem.tau": tau, "fbmem.tau_full": tau_full, "fbmem.tau_fg": tau_fg,
        "fbmem.tau_bg": tau_bg, "fbmem.beta": beta, "candidates.mode": candidates, "fbmem.region_metric": metric,
    })
    job.ensure_ray()
    with job.run("label", {"force": force, "where": where}) as run:
        dist = run_label_job(job.db, job.cfg, run=run, force=force, where=where)
        typer.echo(f"labels (most-severe): {format_distribution(dist)}")


@app.command("cluster")
def cluster_cmd(
    db: DbOpt,
    k: Annotated[Optional[int], typer.Option("--k", help="Number of clusters (default 12).")] = None,
    embedding: Annotated[Optional[PromptEmbedding], typer.Option(
        help="text_encoder (the model's, default) or open_clip.")] = None,
    where: Annotated[Optional[str], typer.Option(help="Only prompts matching this filter, e.g. \"mem_type IS NOT NULL\".")] = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """KMeans clusters of prompts (SPEC 5); cluster_id on each prompt, silhouette in `runs`."""
    from fbmem.jobs.cluster import run_cluster

    job = JobContext.from_options(db, preset, config, set_, {"cluster.k": k, "cluster.embedding": embedding})
    if job.cfg.cluster.embedding == "text_encoder":
        job.ensure_ray()  # the text encoder runs in actors (resources.cluster); open_clip vectors are stored
    with job.run("cluster", {"where": where}) as run:
        out = run_cluster(job.db, job.cfg, run=run, where=where)
        typer.echo(f"silhouette={out['silhouette']:.4f} cluster sizes={out['sizes']}")


@app.command("generate")
def generate_cmd(
    db: DbOpt, n: NOpt = None, prompts: PromptsOpt = None,
    mitigation: Annotated[Mitigation, typer.Option(help="none, or regenerate with NeMo / NeMo-C neurons off.")] = "none",
    alpha: AlphaOpt = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Generate N seeded samples per prompt (DDIM) with embeddings and masks into `generations`."""
    from fbmem.jobs.generate import run_generate
    from fbmem.jobs.mitigate import neurons_for_method

    job = JobContext.from_options(db, preset, config, set_)
    job.ensure_ray()
    mitigated = mitigation != "none"
    neurons = neurons_for_method(job.db, job.cfg, mitigation) if mitigated else None
    with job.run("generate", {"n": n, "prompts": prompts, "mitigation": mitigation}) as run:
        run_generate(job.db, job.cfg, run=run, n=n, prompt_filter=prompts, mitigation=mitigation,
                     alpha=alpha if mitigated else None, neurons_by_prompt=neurons)


@app.command("mitigate")
def mitigate_cmd(
    db: DbOpt,
    method: Annotated[Method, typer.Option(help="nemo: each prompt's own neurons; nemo-c: the cluster's union.")] = "nemo-c",
    alpha: Annotated[Optional[str], typer.Option(
        help="Deactivation scale: 0 = off (default nemo.alpha), 0<a<1 dampening. A comma list (0,0.25,0.5) "
             "is a dampening sweep: one mitigation per alpha, each with its score and quality cost.")] = None,
    n: NOpt = None, prompts: PromptsOpt = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """NeMo / NeMo-C: regenerate with neurons off (same seeds), relabel, print the mitigation score and
    what it cost in image quality (CLIP score before/after, Frechet distance; `mitigation_quality`)."""
    from fbmem.jobs.mitigate import parse_alphas, run_mitigate
    from fbmem.jobs.quality import run_quality

    try:
        alphas = parse_alphas(alpha)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--alpha") from exc
    job = JobContext.from_options(db, preset, config, set_)
    job.ensure_ray()

    def num(v: object) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    for a in alphas:
        with job.run("mitigate", {"method": method, "alpha": a}) as run:
            out = run_mitigate(job.db, job.cfg, method=method, run=run, alpha=a, n=n, prompt_filter=prompts)
        with job.run("quality", {"method": method, "alpha": out["alpha"]}) as run:
            q = run_quality(job.db, job.cfg, method=method, alpha=out["alpha"], run=run)
        skipped = f"; skipped: {', '.join(sorted(q['skipped']))} (no weights or no pyiqa)" if q["skipped"] else ""
        typer.echo(f"{method}: mitigation score={out['score']:.4f} over {out['pairs']} pairs; "
                   f"VM before={out['vm_before']} after={out['vm_after']}; alpha={out['alpha']:g}; "
                   f"clip score before={num(q['clip_before'])} after={num(q['clip_after'])}; "
                   f"fd_clip={num(q['fd_clip'])}{skipped}")


@app.command("report")
def report_cmd(
    db: DbOpt,
    out: Annotated[Path, typer.Option(help="Folder for index.html and its images.")] = Path("fbmem-report"),
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """A static HTML report (opens offline): runs, labels, one-to-many, mitigation, NeMo, gallery."""
    from fbmem.jobs.report import write_report

    job = JobContext.from_options(db, preset, config, set_)
    typer.echo(f"report: {write_report(job.db, out, nemo_threshold=job.cfg.nemo.threshold)}")


@nemo_app.command("stats")
def nemo_stats_cmd(
    db: DbOpt,
    prompts: Annotated[str, typer.Option("--prompts", help="Filter on the prompts table: the ordinary prompts.")] = ORDINARY_PROMPTS,
    from_csv: Annotated[Optional[str], typer.Option(
        help="Import statistics in the SD 1.4 reference format instead: a file, or the shipped "
             f"{', '.join(STATISTICS)} by name.")] = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Per-neuron mean/std of |to_v| activations over ordinary prompts (or import the SD 1.4 file)."""
    from fbmem.jobs.nemo import import_stats_csv, model_layers, nemo_model, prompt_set_source, run_stats
    from fbmem.pipelines.reference_data import statistics_path

    csv = statistics_path(from_csv) if from_csv is not None else None
    job = JobContext.from_options(db, preset, config, set_)
    job.ensure_ray()  # the model runs in actors (resources.nemo), not here
    with job.run("nemo-stats", {"prompts": prompts, "from_csv": str(csv) if csv else None}) as run:
        if csv is not None:
            with nemo_model(job.cfg) as pool:  # the file must fit the model's value layers
                layers = model_layers(pool, job.cfg)
            import_stats_csv(job.db, csv, job.cfg.models.diffusion.model_id, run, layers=layers)
            return
        texts = job.db.read("prompts", ["text"], where=prompts).column(0).to_pylist()
        if len(texts) < 2:
            raise ValueError(f"need at least 2 prompts matching {prompts!r} for statistics, found {len(texts)}")
        run_stats(job.db, job.cfg, None, texts, source=prompt_set_source(texts), run=run)


@nemo_app.command("detect")
def nemo_detect_cmd(
    db: DbOpt, prompts: PromptsOpt = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Memorization detection from noise differences (SPEC 6); scores in `nemo_prompts`."""
    from fbmem.jobs.nemo import run_detect

    job = JobContext.from_options(db, preset, config, set_)
    job.ensure_ray()  # the model runs in actors (resources.nemo), not here
    rows = job.db.read("prompts", ["prompt_id", "text"], where=prompts)
    with job.run("nemo-detect", {"prompts": prompts}) as run:
        memorized = run_detect(job.db, job.cfg, None, rows, run)
        typer.echo(f"memorized: {memorized} of {rows.num_rows} prompts")


@app.command("detect")
def detect_cmd(
    db: DbOpt,
    method: Annotated[DetectMethod, typer.Option(
        help="nemo: NeMo's noise-difference score (as `fbmem nemo detect`); wen: Wen et al.'s text-conditional "
             "noise magnitude (settings detect.wen_steps, detect.wen_seeds).")],
    prompts: PromptsOpt = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Per-prompt memorization scores of a detector into `detections` (with UNet evaluations and
    seconds per prompt); compare detectors with `fbmem sql detector_agreement` / `detector_groups`."""
    from fbmem.jobs.detect import format_summary, run_detect_method

    job = JobContext.from_options(db, preset, config, set_)
    rows = job.db.read("prompts", ["prompt_id", "text"], where=prompts)
    job.ensure_ray()  # the model runs in actors (resources.nemo), not here
    with job.run(f"detect-{method}", {"method": method, "prompts": prompts}) as run:
        typer.echo(format_summary(run_detect_method(job.db, job.cfg, rows, method, run)))


@nemo_app.command("localize")
def nemo_localize_cmd(
    db: DbOpt, prompts: PromptsOpt = None,
    sequential: Annotated[bool, typer.Option(help="The reference's one-candidate-per-UNet-call search (same sets, slower on GPU).")] = False,
    all_prompts: Annotated[bool, typer.Option("--all", help="Localize every prompt, not only those detected as memorized.")] = False,
    stats_source: Annotated[Optional[str], typer.Option(help="Which stored statistics to use when several exist.")] = None,
    force: ForceOpt = False,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Neuron localization: initial selection and refinement (SPEC 6); sets in `neurons`."""
    from fbmem.jobs.nemo import read_stats, run_localize

    job = JobContext.from_options(db, preset, config, set_)
    job.ensure_ray()  # the model runs in actors (resources.nemo), not here
    stats = read_stats(job.db, job.cfg.models.diffusion.model_id, stats_source)
    rows = job.db.read("prompts", ["prompt_id", "text"], where=prompts)
    with job.run("nemo-localize", {"prompts": prompts, "sequential": sequential, "force": force}) as run:
        out = run_localize(job.db, job.cfg, None, rows, stats, run, batched=not sequential,
                           only_memorized=not all_prompts, force=force)
        reached = sum(bool(r.get("criterion_reached")) for r in out)
        typer.echo(f"localized {len(out)} prompts; NeMo criterion reached for {reached}")


@toy_app.command("train")
def toy_train_cmd(
    out: Annotated[Path, typer.Option(help="Demo folder: the corpus goes to OUT/world, the model to OUT/model.")] = Path("fbmem-demo"),
    check: Annotated[bool, typer.Option(help="Generate for every prompt and print how much it memorized.")] = True,
) -> None:
    """Train (or reuse) the toy latent diffusion model on the toy corpus, on the CPU."""
    from fbmem.jobs.toy.corpus import ToyCorpusSpec
    from fbmem.jobs.toy.demo import build_world, toy_model_check
    from fbmem.jobs.toy.train import ToyTrainSpec, ensure_toy_model, format_memorization

    _, corpus = build_world(out, ToyCorpusSpec())
    model_dir = ensure_toy_model(out / "model", corpus, ToyTrainSpec())
    typer.echo(f"toy model: {model_dir}")
    if check:  # generates in a Ray actor that loads the model (the demo's settings), not here
        typer.echo(format_memorization(toy_model_check(model_dir, corpus)))


@app.command("tables")
def tables_cmd(db: DbOpt, preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Row counts of every table."""
    from fbmem.storage.schema import TABLES

    database = JobContext.from_options(db, preset, config, set_).db
    width = max(len(t) for t in TABLES)
    for name in TABLES:
        n = database.count(name) if database.has_table(name) else None
        typer.echo(f"{name:<{width}}  {'-' if n is None else n}")


@app.command("sql")
def sql_cmd(
    query: Annotated[str, typer.Argument(help="A SQL string, a .sql file, or a named query (e.g. one_to_many).")],
    db: DbOpt,
    fmt: Annotated[OutFormat, typer.Option("--format", help="Output format.")] = "table",
    out: Annotated[Optional[Path], typer.Option(help="Write the result to this file (required for parquet).")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="Query parameter k=v, used as $k (repeatable).")] = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Run read-only SQL over the tables (DuckDB; every table is a view; no file access: export with
    --format and --out). Named queries: the sql/ folder."""
    from fbmem.jobs.sql_output import render
    from fbmem.storage.sql import load_query, query_params, run_query

    job = JobContext.from_options(db, preset, config, set_)
    text = load_query(query)
    result = run_query(job.db, text, query_params(text, parse_assignments(param, "--param")))
    rendered = None if result is None else render(result, fmt, out)
    if rendered is not None:
        typer.echo(rendered)


@app.command("scan")
def scan_cmd(
    spec: Annotated[Path, typer.Argument(help="The scan spec (YAML): sources, model, prompt sets, stages, outputs.")],
    db: DbOpt,
    scan_id: Annotated[Optional[str], typer.Option(
        "--scan-id", help="Run or resume this scan (default: resume the spec's last unfinished scan, else a new one).")] = None,
    new: Annotated[bool, typer.Option("--new", help="Start a new scan even when the last one did not finish.")] = False,
    fail_on: Annotated[Optional[list[str]], typer.Option(
        "--fail-on", help="Gate, e.g. \"VM > 0.01\" (a share) or \"VM+FM > 0\" (a count): exit 5 when crossed, "
                          "after everything is written (repeatable).")] = None,
    summary_json: Annotated[Optional[Path], typer.Option(help="Write the scan's figures to this JSON file.")] = None,
    set_: SetOpt = None,
) -> None:
    """Run a scheduled scan: ingest, index, prompts, cluster, generate, label, NeMo, detect, mitigate,
    report, with a ledger (`scans`, `scan_stages`, `scan_shards`): reruns skip done stages."""
    from fbmem.jobs.scan import run_scan
    from fbmem.jobs.scan_spec import load_scan_spec

    loaded = load_scan_spec(spec)
    run_scan(loaded, db, scan_id=scan_id, new=new, settings=parse_assignments(set_), fail_on=list(fail_on or []),
             summary_json=str(summary_json) if summary_json else None)


@app.command("scans")
def scans_cmd(db: DbOpt, fmt: Annotated[OutFormat, typer.Option("--format", help="Output format.")] = "table",
              preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The scans: status (a silent `running` one reads `aborted`), stages done, attempts, seconds, VM share, error."""
    import pyarrow as pa

    from fbmem.jobs.scan import scan_rows
    from fbmem.jobs.sql_output import render

    job = JobContext.from_options(db, preset, config, set_)
    rows = scan_rows(job.db, job.cfg.runtime.stale_after_s)
    if not rows:
        typer.echo("no scans yet")
        return
    typer.echo(render(pa.Table.from_pylist(rows), fmt, None))


@app.command("runs")
def runs_cmd(db: DbOpt, limit: Annotated[int, typer.Option(help="The newest N runs.")] = 50,
             fmt: Annotated[OutFormat, typer.Option("--format", help="Output format.")] = "table",
             preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The job runs, newest first: status (a silent `running` one reads `aborted`), counts, seconds, scan, error."""
    import pyarrow as pa

    from fbmem.jobs.runtime.scan_ledger import status_now
    from fbmem.jobs.sql_output import render

    job = JobContext.from_options(db, preset, config, set_)
    if not job.db.has_table("runs"):
        typer.echo("no runs yet")
        return
    rows = job.db.read("runs", ["run_id", "job", "status", "started_at", "rows_in", "rows_out", "errors", "seconds",
                                "heartbeat_at", "host", "pid", "scan_id", "message"]).to_pylist()
    rows.sort(key=lambda r: r["started_at"].timestamp() if r["started_at"] else 0.0, reverse=True)
    out = [{"job": r["job"], "status": status_now(r, job.cfg.runtime.stale_after_s), "rows_in": r["rows_in"],
            "rows_out": r["rows_out"], "errors": r["errors"], "seconds": round(float(r["seconds"] or 0), 1),
            "started_at": r["started_at"], "scan_id": r["scan_id"], "run_id": r["run_id"], "error": r["message"]}
           for r in rows[:limit]]
    typer.echo(render(pa.Table.from_pylist(out), fmt, None))


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Demo folder (database, images).")] = Path("fbmem-demo"),
    preset: PresetOpt = "tiny", config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """The embedded default: build a small world offline and run the jobs on it with local Ray."""
    from fbmem.jobs.toy.demo import run_demo

    # the base settings; the demo lays its own (jobs/presets/demo.yaml) over them, then --set
    base = JobContext.from_options(str(out / "db"), preset, config, set_).cfg
    run_demo(base, out, overrides=parse_assignments(set_))


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("FBMEM_LOG", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    app()


if __name__ == "__main__":
    main()
