"""`fbmem demo` (what `make demo` runs): the whole audit, offline, on a world where memorization
is real and known.

1. the toy world: a deterministic corpus with planted VM / FM / BM / NM prompt groups
   (jobs/toy/corpus.py), written as a folder source with exact masks;
2. a tiny latent diffusion model trained on it here (jobs/toy/train.py), cached in the demo folder
   and reused while corpus and settings match;
3. the toy world's scan (jobs/toy/toy_scan.yaml, copied to OUT/scan.yaml), run by `fbmem scan`'s
   code (jobs/scan.py) with local Ray and a LanceDB folder: ingest (CLIP embeddings; the corpus's
   exact masks as given), the index, prompts, clustering of the memorized prompts, generation of N
   seeded samples per prompt, FB-Mem labels, NeMo statistics / detection / localization, both
   detectors (NeMo's and Wen et al.'s), NeMo and NeMo-C mitigation with regeneration, relabelling,
   mitigation scores and quality cost, and the HTML report; then the demo's own checks on the
   console (detector AUCs and costs, NeMo's verdicts, the all-off and random-neuron controls).
   Every model runs in a Ray actor (the pipelines' Ray Data actors; NeMo's model and the controls
   in `DiffusionWorker` actors, jobs/model_actors.py), never in this process.
Settings: the base preset (tiny) with the demo's layer `jobs/presets/demo.yaml` over it.
The tables it prints are named queries of `sql/`, runnable with `fbmem sql NAME --db OUT/db`.
Models: the trained toy diffusion model (its own text encoder is frozen and random, as SD's is
frozen), a random-weight tiny CLIP for candidates (top-20 by cosine plus the prompt's linked image;
on this corpus it gave the same labels as comparing with every training image, 10x faster) and the
weight-free colour-cluster foreground backend for generated images (pipelines/colour_segmenter.py;
SAM needs weights). Every stage is a
rerun-safe job: a second demo reuses what it finds.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from fbmem.jobs.config import Config, dotted_leaves, preset_dict, set_dotted
from fbmem.jobs.core.label_rule import LABELS, NM, VM
from fbmem.jobs.runtime.context import JobContext
from fbmem.jobs.sql_output import format_table
from fbmem.jobs.toy.corpus import ToyCorpusSpec, build_corpus, write_corpus
from fbmem.pipelines.actor_pool import ModelPool
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_list, sql_literal
from fbmem.storage.sql import run_named_query

log = logging.getLogger(__name__)

DEMO_PRESET = "demo"  # jobs/presets/demo.yaml: the demo's settings, a layer over its base preset
MEMORIZED = f"planted IN ({sql_list(label for label in LABELS if label != NM)})"
ORDINARY = f"planted = {sql_literal(NM)}"
UNMITIGATED = f"mitigation = {sql_literal('none')}"


def build_world(out: Path, spec: ToyCorpusSpec):
    """Write the toy corpus once; a marker file with the spec makes reruns skip it."""
    world = out / "world"
    marker = world / ".complete"
    corpus = build_corpus(spec)
    if not marker.exists() or marker.read_text() != repr(spec):
        write_corpus(corpus, world)
        marker.write_text(repr(spec))
    return world, corpus


def demo_config(base: Config, model_dir: Path, overrides: dict[str, object] | None = None) -> Config:
    """The demo's settings: `base` (the tiny preset, the caller's --config), then the demo's layer
    (jobs/presets/demo.yaml), the model trained here, then the caller's dotted overrides
    (`fbmem demo --set generation.n=2` must win over the demo's own choice)."""
    data = base.model_dump()
    layers = {**dotted_leaves(preset_dict(DEMO_PRESET)), "models.diffusion.model": str(model_dir), **(overrides or {})}
    for key, value in layers.items():
        set_dotted(data, key, value)
    return Config.model_validate(data)


_T0 = [time.perf_counter()]


def _step(title: str) -> None:
    """A section header with the time since the demo started (where the minutes go)."""
    print(f"\n== {title}  [{time.perf_counter() - _T0[0]:.0f} s]", flush=True)


def _sql(db: Database, name: str, **params):
    """The named query `sql/NAME.sql` (what `fbmem sql NAME` prints)."""
    return run_named_query(db, name, params)


def label_shares_by_group(db: Database) -> str:
    shares = _sql(db, "label_shares_by_group")
    return format_table(shares.select(["planted", "mitigation", "generations", *(f"share_{lab}" for lab in LABELS)]))


def detection_summary(db: Database) -> tuple[str, float]:
    """Detection score per planted group, and the AUC of VM vs NM prompts."""
    from sklearn.metrics import roc_auc_score

    rows = _sql(db, "nemo_by_prompt").to_pylist()
    vm = [r for r in rows if r["planted"] in (VM, NM)]
    y = [r["planted"] == VM for r in vm]
    auc = float(roc_auc_score(y, [r["detect_score"] for r in vm])) if 0 < sum(y) < len(y) else float("nan")
    auc_mean = float(roc_auc_score(y, [r["detect_mean"] for r in vm])) if 0 < sum(y) < len(y) else float("nan")
    table = format_table(_sql(db, "nemo_by_group").select([
        "planted", "prompts", "mean_detect_score", "min_detect_score", "max_detect_score", "mean_pairwise_score",
        "memorized"]))
    return table + f"\nAUC VM vs NM: max-of-max score {auc:.3f}, mean pairwise score {auc_mean:.3f}", auc


def nemo_outcomes(db: Database) -> str:
    """One line per localized prompt: NeMo's own verdict (criterion reached, or why not)."""
    return format_table(_sql(db, "nemo_by_prompt", localized_only=True).select([
        "planted", "prompt", "detect_score", "n_initial", "n_refined", "criterion_reached", "message"]))


def _baseline_samples(db: Database, prompt_id: str, n: int) -> list[np.ndarray] | None:
    """The prompt's stored samples 0..n-1 without mitigation, as uint8 arrays, or None if any is
    missing (then the control generates them)."""
    import io

    from PIL import Image

    rows = db.read("generations", ["sample", "image_bytes"],
                   where=f"prompt_id = {sql_literal(prompt_id)} AND {UNMITIGATED}").to_pylist()
    by_sample = {r["sample"]: r["image_bytes"] for r in rows if r["image_bytes"]}
    if any(i not in by_sample for i in range(n)):
        return None
    return [np.asarray(Image.open(io.BytesIO(by_sample[i])).convert("RGB")) for i in range(n)]


def random_neuron_control(db: Database, cfg: Config, pool: ModelPool, corpus, *, draws: int = 2,
                          seed: int = 0) -> str | None:
    """NeMo-C against chance: the VM prompts' samples with nothing off (the audited samples
    themselves, read back), with their cluster's union off, and with random neuron sets of the
    same size per layer (TOY.md: report a random-neuron control). Scored like `fbmem toy train`'s
    check (the toy world's exact masks, full MS-SSIM > tau), because random sets have no place in
    the generations table. The images are made by `pool`'s `DiffusionWorker` actors (the random
    sets are drawn here first, in the same order as ever), never in this process."""
    import random

    from fbmem.jobs.core.nemo_c import union_by_cluster
    from fbmem.jobs.mitigate import refined_sets
    from fbmem.jobs.toy.train import score_generations
    from fbmem.pipelines.generator import sample_seed

    model_id = cfg.models.diffusion.model_id
    refined = refined_sets(db, model_id)
    clusters = {r["prompt_id"]: r["cluster_id"] for r in db.read("prompts", ["prompt_id", "cluster_id"]).to_pylist()}
    unions = union_by_cluster(refined, clusters)
    rng = random.Random(seed)
    tau = cfg.fbmem.thresholds[0]
    g = cfg.generation
    widths: dict[int, int] | None = None
    cases: list[tuple[str, str, list[int], list[np.ndarray] | None]] = []  # (condition, text, seeds, images)
    jobs: list[dict] = []  # the images to make, in the order of `cases` that have none
    for p in db.read("prompts", ["prompt_id", "text", "cluster_id"], where=f"planted = {sql_literal(VM)}").to_pylist():
        union = unions.get(p["cluster_id"])
        if not union:
            continue
        if widths is None:
            widths = {l.idx: l.out_features for l in pool.call("info", cfg.nemo)["layers"]}
        seeds = [sample_seed(g.base_seed, p["prompt_id"], i) for i in range(g.n)]  # the demo's own samples
        conds = {"nothing off": None, "NeMo-C union": union}
        for k in range(draws):
            conds[f"random {k + 1}"] = {li: sorted(rng.sample(range(widths[li]), len(ns))) for li, ns in union.items()}
        for name, neurons in conds.items():
            images = _baseline_samples(db, p["prompt_id"], g.n) if neurons is None else None
            if images is None:
                jobs.append({"prompts": [p["text"]] * len(seeds), "seeds": seeds, "neurons": neurons or {},
                             "alpha": cfg.nemo.alpha, "steps": g.steps, "guidance": g.guidance, "size": g.size})
            cases.append((name, p["text"], seeds, images))
    made = dict(pool.map("generate", jobs))
    hits: dict[str, list[bool]] = {}
    j = 0
    for name, text, seeds, images in cases:
        if images is None:
            images, j = made[j], j + 1
        rows = score_generations(corpus, [(text, s, im) for s, im in zip(seeds, images)])["rows"]
        hits.setdefault(name, []).extend(r["full"] > tau for r in rows)
    if not hits:
        return None
    return ("control, VM prompts with a NeMo-C union (exact masks, full MS-SSIM > "
            f"{tau:g}): " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in hits.items()))


def toy_model_check(model_dir: Path, corpus) -> dict:
    """`fbmem toy train`'s memorization check (jobs/toy/train.memorization_check) on the trained
    model, run next to the model in one `DiffusionWorker` actor with the demo's settings (local Ray,
    or `resources.ray_address`), never in this process."""
    from fbmem.jobs.config import load_config
    from fbmem.jobs.model_actors import nemo_pool
    from fbmem.jobs.toy.train import memorization_check

    job = JobContext(demo_config(load_config(preset="tiny"), model_dir), "")
    job.ensure_ray()
    with nemo_pool(job.cfg, pool_size=1) as pool:
        return pool.call("apply", memorization_check, corpus)


DEMO_SPEC = "toy_scan.yaml"  # jobs/toy/toy_scan.yaml: the toy world's scan spec, shipped with the demo


def write_demo_spec(out: Path) -> Path:
    """The shipped toy scan spec, copied next to the world and the model it names (relative paths)."""
    from importlib import resources

    path = Path(out) / "scan.yaml"
    path.write_text((resources.files("fbmem.jobs.toy") / DEMO_SPEC).read_text())
    return path


def first_step_wen(cfg: Config) -> Config:
    """Wen et al.'s cheap screen: the first sampling step of one seed (their paper's finding that
    it already detects), beside the defaults of their code (all steps, 4 seeds)."""
    cheap = cfg.model_copy(deep=True)
    cheap.detect.wen_steps, cheap.detect.wen_seeds = 1, 1
    return cheap


def detector_comparison(db: Database, variants: dict[str, tuple[str, str]]) -> str:
    """The detectors on the toy world: AUC VM vs NM, scores per planted group and cost per prompt,
    for each `variants` entry (label -> (method, settings_hash)), all measured in this run."""
    from sklearn.metrics import roc_auc_score

    planted = {r["prompt_id"]: r["planted"] for r in db.read("prompts", ["prompt_id", "planted"]).to_pylist()}
    lines, means = [], {}
    for label, (method, settings_hash) in variants.items():
        rows = _sql(db, "detector_agreement", **{f"{method}_settings": settings_hash}).to_pylist()
        scored = [(planted.get(r["prompt_id"]), r[f"{method}_score"], r[f"{method}_unet_calls"] or 0,
                   r[f"{method}_seconds"] or 0.0) for r in rows if r[f"{method}_score"] is not None]
        vm_nm = [(g == VM, sc) for g, sc, _, _ in scored if g in (VM, NM)]
        y = [v for v, _ in vm_nm]
        auc = roc_auc_score(y, [sc for _, sc in vm_nm]) if 0 < sum(y) < len(y) else float("nan")
        n = len(scored) or 1
        lines.append(f"{label}: AUC VM vs NM {auc:.3f} over {len(vm_nm)} prompts; cost "
                     f"{sum(c for *_, c, _ in scored) / n:.0f} UNet evaluations and "
                     f"{sum(t for *_, t in scored) / n:.2f} s per prompt ({len(scored)} prompts)")
        for g in LABELS:
            vals = [sc for gg, sc, _, _ in scored if gg == g]
            means.setdefault(g, {})[label] = round(sum(vals) / len(vals), 4) if vals else None
    table = format_table(pa.Table.from_pylist([{"planted": g, **{f"mean {k}": v for k, v in m.items()}}
                                               for g, m in means.items()]))
    return table + "\n" + "\n".join(lines)


def quality_summary(db: Database) -> str:
    """What each mitigation cost in image quality (overall): CLIP score before/after, FD and KID."""
    rows = [r for r in _sql(db, "mitigation_quality").to_pylist() if r["level"] == "overall"]
    out: dict[tuple, dict] = {}
    for r in rows:
        out.setdefault((r["method"], r["alpha"]), {})[r["metric"]] = r
    lines = []
    for (method, alpha), m in sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0)):
        clip, fd, kid = m.get("clip_score"), m.get("fd_clip"), m.get("kid_clip")
        parts = [f"{method} (alpha {alpha or 0:g}):"]
        if clip:
            parts.append(f"CLIP score {clip['before']:.4f} -> {clip['after']:.4f} over {clip['n_pairs']} pairs")
        if fd:
            parts.append(f"FD(CLIP) {fd['value']:.4g}")
        if kid:
            parts.append(f"KID(CLIP) {kid['value']:.4g}")
        lines.append(" ".join(parts))
    return "\n".join(lines) or "no mitigation quality measured"


def run_demo(cfg: Config, out: Path, *, overrides: dict[str, object] | None = None,
             corpus_spec: ToyCorpusSpec | None = None, train_spec=None) -> None:
    """The whole demo into `out`: the toy world and its model, then the shipped toy scan
    (jobs/toy/toy_scan.yaml, run by `fbmem scan`'s code with the demo's settings), then what the
    demo adds to the scan's report on the console: both detectors, NeMo's verdicts and its
    controls. `cfg` is the base (`fbmem demo`'s --preset and --config), the demo's settings go
    over it (`demo_config`), then `overrides` (--set). The specs default to the real toy world and
    model; tests pass small ones."""
    from fbmem.jobs.model_actors import nemo_pool
    from fbmem.jobs.scan import run_scan
    from fbmem.jobs.scan_spec import load_scan_spec
    from fbmem.jobs.toy.train import ToyTrainSpec, ensure_toy_model

    t0 = _T0[0] = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    _step("toy world")
    world, corpus = build_world(out, corpus_spec or ToyCorpusSpec())
    print(f"{len(corpus.images)} training images, {len(corpus.prompts)} prompts "
          f"(groups: {', '.join(f'{g} {sum(p.planted == g for p in corpus.prompts)}' for g in LABELS)})")

    _step("toy diffusion model (trained here on the CPU; reused when cached)")
    t = time.perf_counter()
    model_dir = ensure_toy_model(out / "model", corpus, train_spec or ToyTrainSpec())
    print(f"model: {model_dir} ({time.perf_counter() - t:.0f} s)")

    _step("fbmem scan: ingest, index, prompts, cluster, generate, label, NeMo, detectors, mitigation, report")
    spec = load_scan_spec(write_demo_spec(out))
    # the demo's settings exactly (base < demo layer < model < --set), as the scan's settings
    settings = dotted_leaves(demo_config(cfg, model_dir, overrides).model_dump())
    result = run_scan(spec, str(out / "db"), settings=settings)
    job = JobContext(demo_config(cfg, model_dir, overrides), str(out / "db"))
    cfg, db = job.cfg, job.db
    stages = result.summary["stages"]
    for stage, st in stages.items():
        print(f"  {stage:<9} {st['status']:<8} {st['seconds']:>7.1f} s  {json.dumps(st['counts'], default=str)[:160]}")

    _step("FB-Mem labels")
    print("labels: " + "  ".join(f"{lab}={result.summary['labels'][lab]} ({result.summary['shares'][lab]:.0%})"
                                 for lab in LABELS))

    _step("NeMo: detection and localization")
    table, auc = detection_summary(db)
    print(table)
    localized = [r for r in _sql(db, "nemo_by_prompt", localized_only=True).to_pylist()]
    reached = sum(bool(r.get("criterion_reached")) for r in localized)
    print(f"localized {len(localized)} detected prompts; NeMo criterion reached for {reached}, "
          f"not reached (search gave up, set kept) for {len(localized) - reached}")
    print(nemo_outcomes(db))
    job.ensure_ray()
    if localized and reached < len(localized):
        # Is the criterion reachable at all? Switch every value neuron off for each prompt.
        with nemo_pool(cfg) as pool:
            floor = [score for _, score in pool.map("all_off_score", [r["prompt"] for r in localized],
                                                    cfg.nemo, cfg.generation.size)]
        print(f"control: with ALL value neurons off, s(B) is {min(floor):.3f}-{max(floor):.3f} for these prompts "
              f"(criterion: <= {cfg.nemo.threshold:g}); "
              + ("the criterion is out of reach in this model at t_1, whatever neurons are chosen"
                 if min(floor) > cfg.nemo.threshold else "so the criterion is reachable for some"))

    _step("detectors: NeMo's and Wen et al.'s, side by side")
    from fbmem.jobs.detect import method_settings, run_detect_method
    from fbmem.jobs.nemo import detection_settings_hash

    cheap = first_step_wen(cfg)
    with job.run("detect", {"method": "wen", "variant": "first step, one seed"}) as run:
        run_detect_method(db, cheap, db.read("prompts", ["prompt_id", "text"]), "wen", run)
    variants = {"nemo": ("nemo", detection_settings_hash("nemo", method_settings(cfg, "nemo"))),
                f"wen ({cfg.detect.wen_steps} steps, {cfg.detect.wen_seeds} seeds)":
                    ("wen", detection_settings_hash("wen", method_settings(cfg, "wen"))),
                "wen (first step, 1 seed)": ("wen", detection_settings_hash("wen", method_settings(cheap, "wen")))}
    print(detector_comparison(db, variants))

    mitigation = stages.get("mitigate", {}).get("counts") or {}
    for key, r in mitigation.items():
        method = key.split("@")[0]
        _step(f"mitigation: {key}")
        if "not_run" in r:
            print(f"{method}: not run: {r['not_run']}")
            continue
        print(f"{method}: mitigation score {r['score']:.3f} over {r['pairs']} pairs; "
              f"VM before {r['vm_before']}, after {r['vm_after']}")
    _step("quality cost of mitigation (CLIP score, FD and KID on CLIP embeddings)")
    print(quality_summary(db))

    if any("not_run" not in r for k, r in mitigation.items() if k.startswith("nemo-c")):
        _step("control: NeMo-C's neurons against random neurons")
        with nemo_pool(cfg) as pool:
            line = random_neuron_control(db, cfg, pool, corpus)
        if line:
            print(line)

    _step("label shares per planted group (before and after mitigation)")
    print(label_shares_by_group(db))
    _step("one-to-many: distinct training images matched per prompt (top 8)")
    print(format_table(_sql(db, "one_to_many").slice(0, 8).select(
        ["prompt", "planted", "generations", "distinct_vm_images", "distinct_fm_images", "distinct_bm_images"])))

    _step("report")
    from fbmem.jobs.report import write_report

    # the scan's report, written again with what the demo added (Wen's first-step variant)
    index = write_report(db, Path(spec.path(spec.outputs.report or "report")), title=f"fbmem scan {result.scan_id}",
                         nemo_threshold=cfg.nemo.threshold, scan_id=result.scan_id)
    print(f"report: {index}")
    print(f"scan: {result.scan_id} ({result.how}); `fbmem scans --db {out / 'db'}` lists the scans")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; database: {out / 'db'}")
