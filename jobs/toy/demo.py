"""`fbmem demo` (what `make demo` runs): the whole audit, offline, on a world where memorization
is real and known.

1. the toy world: a deterministic corpus with planted VM / FM / BM / NM prompt groups
   (jobs/toy/corpus.py), written as a folder source with exact masks;
2. a tiny latent diffusion model trained on it here (jobs/toy/train.py), cached in the demo folder
   and reused while corpus and settings match;
3. the jobs, each through the CLI's job context (jobs/runtime/context.py: settings, database,
   Ray, a `runs` row), with local Ray and a LanceDB folder: ingest (CLIP embeddings; the corpus's
   exact masks as given), prompts, clustering of the memorized prompts, generation of N seeded
   samples per prompt, FB-Mem labels, NeMo statistics / detection / localization, NeMo and NeMo-C mitigation
   with regeneration and relabelling, the mitigation scores, and the HTML report. Every model
   runs in a Ray actor (the pipelines' Ray Data actors; NeMo's model and the controls in
   `DiffusionWorker` actors, jobs/model_actors.py), never in this process.
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

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fbmem.jobs.config import Config, preset_dict, set_dotted
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


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings mapping as dotted keys of its leaves (`{"a": {"b": 1}}` -> `{"a.b": 1}`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def demo_config(base: Config, model_dir: Path, overrides: dict[str, object] | None = None) -> Config:
    """The demo's settings: `base` (the tiny preset, the caller's --config), then the demo's layer
    (jobs/presets/demo.yaml), the model trained here, then the caller's dotted overrides
    (`fbmem demo --set generation.n=2` must win over the demo's own choice)."""
    data = base.model_dump()
    layers = {**_dotted(preset_dict(DEMO_PRESET)), "models.diffusion.model": str(model_dir), **(overrides or {})}
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


def run_demo(cfg: Config, out: Path, *, overrides: dict[str, object] | None = None,
             corpus_spec: ToyCorpusSpec | None = None, train_spec=None) -> None:
    """The whole demo into `out`: `cfg` is the base (`fbmem demo`'s --preset and --config), the
    demo's settings go over it (`demo_config`), then `overrides` (--set). The specs default to the
    real toy world and model; tests pass small ones."""
    from fbmem.jobs.cluster import run_cluster
    from fbmem.jobs.generate import run_generate
    from fbmem.jobs.ingest import ingest_images, ingest_prompts
    from fbmem.jobs.label import format_distribution, run_label_job
    from fbmem.jobs.mitigate import run_mitigate
    from fbmem.jobs.model_actors import nemo_pool
    from fbmem.jobs.nemo import prompt_set_source, read_stats, run_localize, run_stats
    from fbmem.jobs.report import write_report
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

    _step("start Ray")
    job = JobContext(demo_config(cfg, model_dir, overrides), str(out / "db"))
    cfg, db = job.cfg, job.db
    job.ensure_ray()

    _step("ingest training images and prompts")
    images, prompts_csv = world / "images", world / "prompts.csv"
    with job.run("ingest-training", {"src": str(images)}) as run:
        ingest_images(db, cfg, str(images), target="training", kind="folder", masks="lazy", run=run)
    with job.run("ingest-prompts", {"csv": str(prompts_csv)}) as run:
        ingest_prompts(db, cfg, prompts_csv, run=run)

    _step("cluster the memorized prompts (NeMo-C)")
    with job.run("cluster", {"where": MEMORIZED}) as run:
        res = run_cluster(db, cfg, run=run, where=MEMORIZED)
    print(f"silhouette {res['silhouette']:.3f}, cluster sizes {res['sizes']}")

    _step(f"generate {cfg.generation.n} samples per prompt")
    with job.run("generate", {"n": cfg.generation.n}) as run:
        run_generate(db, cfg, run=run)

    _step("FB-Mem labels")
    with job.run("label", {"where": UNMITIGATED}) as run:
        dist = run_label_job(db, cfg, run=run, where=UNMITIGATED)
    print(f"labels: {format_distribution(dist)}")

    _step("NeMo: statistics, detection, localization")
    model_id = cfg.models.diffusion.model_id
    ordinary = db.read("prompts", ["text"], where=ORDINARY).column(0).to_pylist()
    source = prompt_set_source(ordinary)
    have = db.count("neuron_stats", f"model_id = {sql_literal(model_id)} AND stats_source = {sql_literal(source)}")
    with job.run("nemo-stats", {"prompts": ORDINARY}) as run:
        if not have:
            run_stats(db, cfg, None, ordinary, source=source, run=run)  # on its own actors
    stats = read_stats(db, model_id, source)
    prompts = db.read("prompts", ["prompt_id", "text"])
    # The model's actors (resources.nemo) for localization and the control after it; started on
    # first use, so a rerun that reuses every result and needs no control starts none.
    with nemo_pool(cfg) as pool:
        with job.run("nemo-localize", {"prompts": "all"}) as run:
            nemo_rows = run_localize(db, cfg, pool, prompts, stats, run, batched=True, only_memorized=True)
        table, auc = detection_summary(db)
        print(table)
        localized = [r for r in nemo_rows if r.get("n_initial") is not None]
        reached = sum(bool(r.get("criterion_reached")) for r in localized)
        print(f"localized {len(localized)} detected prompts; NeMo criterion reached for {reached}, "
              f"not reached (search gave up, set kept) for {len(localized) - reached}")
        print(nemo_outcomes(db))
        if localized and reached < len(localized):
            # Is the criterion reachable at all? Switch every value neuron off for each prompt.
            texts = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("text").to_pylist()))
            floor = [score for _, score in pool.map("all_off_score", [texts[r["prompt_id"]] for r in localized],
                                                    cfg.nemo, cfg.generation.size)]
            print(f"control: with ALL value neurons off, s(B) is {min(floor):.3f}-{max(floor):.3f} for these prompts "
                  f"(criterion: <= {cfg.nemo.threshold:g}); "
                  + ("the criterion is out of reach in this model at t_1, whatever neurons are chosen"
                     if min(floor) > cfg.nemo.threshold else "so the criterion is reachable for some"))

    results = {}
    for method in ("nemo", "nemo-c"):
        _step(f"mitigation: {method}")
        with job.run("mitigate", {"method": method}) as run:
            try:
                results[method] = run_mitigate(db, cfg, method=method, run=run)
            except ValueError as exc:  # e.g. nothing localized: say so, keep going
                print(f"{method}: not run: {exc}")
                continue
        r = results[method]
        print(f"{method}: mitigation score {r['score']:.3f} over {r['pairs']} pairs; "
              f"VM before {r['vm_before']}, after {r['vm_after']}")

    if "nemo-c" in results:
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
    index = write_report(db, out / "report", title="fbmem demo: toy world", nemo_threshold=cfg.nemo.threshold)
    print(f"report: {index}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; database: {out / 'db'}")
