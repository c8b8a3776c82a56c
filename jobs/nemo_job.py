"""NeMo jobs (SPEC.md section 6): activation statistics, detection, neuron localization.

These functions take a loaded pipeline (or the components dict of
pipelines/diffusion_models.build_tiny_components) already on its device: model loading and the
device choice (pipelines/devices.pick_device) stay with the caller. Each writes its rows and fills
the RunRecord it is given (rows in/out, errors, metrics), like jobs/label_job.py.

- `run_stats`: activations of a prompt set -> `neuron_stats` (per-neuron mean/std).
- `import_stats_csv`: the SD 1.4 reference file -> `neuron_stats` (checked against the UNet's
  value layers when one is given).
- `run_detect`: per prompt, the noise-difference detection -> `nemo_prompts`.
- `run_localize`: per memorized prompt, initial selection + refinement -> `neurons` (one row per
  layer and kind) and `nemo_prompts` (scores, theta/k, counts, criterion, UNet calls, message).

Per-prompt work that does not need the database lives in `detect_prompt` / `localize_prompt`
(used by the benchmark and the tests). `batched=False` runs the reference's call pattern (one
candidate set per UNet call); `batched=True` evaluates nemo.refine_batch candidate sets per call
with per-sample channel masks and returns the same neuron sets (jobs/nemo_core.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from fbmem.jobs.config import Config, NemoConfig
from fbmem.jobs.nemo_core import (
    ActivationAccumulator,
    Detection,
    LocalizeResult,
    MsSsimSettings,
    NeuronSets,
    NeuronStats,
    blocking_scores,
    check_stats_layers,
    ddim_t1,
    detection,
    initial_latents,
    load_stats_csv,
    localize,
    masks_for_sets,
    n_neurons,
    noise_difference,
)
from fbmem.jobs.neuron_hooks import ValueLayer, find_value_layers, value_activations
from fbmem.jobs.run_record import RunRecord, now_utc
from fbmem.storage.database import Database

log = logging.getLogger(__name__)


# ============================================================================ model parts


@dataclass
class DiffusionParts:
    """What NeMo needs from a pipeline: the UNet, the text side, the schedule, the latent scale."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: Mapping
    vae_scale_factor: int

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def parts_of(pipe_or_components: Any) -> DiffusionParts:
    """Accept a diffusers pipeline or a components dict (unet, vae, text_encoder, tokenizer, scheduler)."""
    get = (pipe_or_components.get if isinstance(pipe_or_components, Mapping)
           else lambda k: getattr(pipe_or_components, k, None))
    missing = [k for k in ("unet", "text_encoder", "tokenizer", "scheduler") if get(k) is None]
    if missing:
        raise ValueError(f"NeMo needs a text-to-image pipeline with {', '.join(missing)}")
    vae = get("vae")
    factor = getattr(pipe_or_components, "vae_scale_factor", None)
    if factor is None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    return DiffusionParts(get("unet"), get("text_encoder"), get("tokenizer"), get("scheduler").config, int(factor))


@torch.no_grad()
def encode_prompts(parts: DiffusionParts, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Text-encoder output E [N, T, D] as StableDiffusionPipeline.encode_prompt computes it."""
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"empty or non-text prompts at positions {bad[:10]}")
    tok, enc = parts.tokenizer, parts.text_encoder
    dev = next(enc.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tok(list(prompts[i:i + batch_size]), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt")
        mask = ids.attention_mask.to(dev) if getattr(enc.config, "use_attention_mask", False) else None
        out.append(enc(ids.input_ids.to(dev), attention_mask=mask)[0])
    return torch.cat(out)


def latent_shape(parts: DiffusionParts, image_size: int) -> tuple[int, int, int]:
    side = image_size // parts.vae_scale_factor
    if side < 1 or image_size % parts.vae_scale_factor:
        raise ValueError(f"image size {image_size} is not a multiple of the VAE scale factor {parts.vae_scale_factor}")
    return (int(parts.unet.config.in_channels), side, side)


def ms_settings(nemo: NemoConfig) -> MsSsimSettings:
    return MsSsimSettings(win_size=nemo.detect_win_size, n_scales=nemo.detect_scales, min_side=nemo.detect_min_side)


# ============================================================================ evaluator


class BlockingEvaluator:
    """evaluate_many for the search: s(B) of many candidate sets in ONE batched UNet call.

    The batch holds (candidate c, retained latent i) at row c * r + i, each row with its own
    channel mask (neuron_hooks.channel_scales), so every candidate sees exactly what a separate
    `deactivate(B_c)` call on the r retained latents would see. Counts UNet calls and sets.
    """

    def __init__(self, unet: torch.nn.Module, layers: Sequence[ValueLayer], latents: torch.Tensor, t1: int,
                 cond: torch.Tensor, ref_delta: torch.Tensor, ms: MsSsimSettings, alpha: float = 0.0,
                 max_unet_batch: int | None = None) -> None:
        dev = next(unet.parameters()).device
        self.unet, self.t1, self.ms, self.alpha = unet, t1, ms, alpha
        self.latents, self.cond, self.ref = latents.to(dev), cond.to(dev), ref_delta.to(dev)
        self.widths = {l.idx: l.out_features for l in layers}
        # None: all candidates in one UNet call. A cap (GPU memory) splits a call into several,
        # each counted as a sequential UNet call.
        self.max_unet_batch = max_unet_batch
        self.unet_calls = 0
        self.sets_evaluated = 0

    def _sets_per_call(self) -> int:
        if not self.max_unet_batch:
            return 1 << 30
        return max(1, self.max_unet_batch // self.latents.shape[0])

    def __call__(self, sets: list[NeuronSets]) -> list[float]:
        out: list[float] = []
        r = self.latents.shape[0]
        step = self._sets_per_call()
        for start in range(0, len(sets), step):
            chunk = sets[start:start + step]
            x = self.latents.repeat(len(chunk), 1, 1, 1)
            masks = masks_for_sets(chunk, self.widths, repeat=r, alpha=self.alpha)
            delta = noise_difference(self.unet, x, self.t1, self.cond, scales=masks)
            self.unet_calls += 1
            self.sets_evaluated += len(chunk)
            out += blocking_scores(self.ref, delta, ms=self.ms).tolist()
        return out

    def one(self, s: NeuronSets) -> float:
        return self([s])[0]


# ============================================================================ per prompt


@dataclass
class PromptSetup:
    """What detection leaves for localization: embeddings, latents, deltas and t_1."""

    cond: torch.Tensor  # [1, T, D]
    latents: torch.Tensor  # [n, C, h, w] CPU
    delta: torch.Tensor  # [n, C, h, w] in [0, 1], on the UNet's device
    t1: int
    detection: Detection


def detect_prompt(parts: DiffusionParts, text: str, nemo: NemoConfig, image_size: int) -> PromptSetup:
    """Noise differences of n latents for one prompt (one UNet call) and their detection scores."""
    cond = encode_prompts(parts, [text])
    lat = initial_latents(nemo.n_latents, latent_shape(parts, image_size), seed=nemo.latent_seed)
    t1 = ddim_t1(parts.scheduler_config, nemo.schedule_steps, nemo.timestep_index)
    delta = noise_difference(parts.unet, lat, t1, cond)
    det = detection(delta, threshold=nemo.threshold, ms=ms_settings(nemo))
    return PromptSetup(cond, lat, delta, t1, det)


@dataclass
class PromptLocalization:
    setup: PromptSetup
    result: LocalizeResult | None  # None when the prompt is not memorized
    unet_calls: int  # sequential UNet calls for this prompt, detection included
    sets_evaluated: int
    seconds: float


def localize_prompt(
    parts: DiffusionParts,
    text: str,
    stats: NeuronStats,
    nemo: NemoConfig,
    image_size: int,
    *,
    batched: bool = True,
    retained: torch.Tensor | None = None,
    threshold: float | None = None,
    setup: PromptSetup | None = None,
    max_unet_batch: int | None = None,
) -> PromptLocalization:
    """Detection, then (if memorized) the initial search and the refinement for one prompt.

    `retained` (bool [n]) and `threshold` override detection's choice and nemo.threshold: the
    benchmark and tests use them to run a non-trivial search on random-weight models.
    """
    t0 = time.perf_counter()
    layers = find_value_layers(parts.unet)
    check_stats_layers(stats, layers)
    setup = setup or detect_prompt(parts, text, nemo, image_size)
    keep = setup.detection.retained if retained is None else retained.bool()
    thr = nemo.threshold if threshold is None else threshold
    if not bool(keep.any()):
        return PromptLocalization(setup, None, 1, 0, time.perf_counter() - t0)
    acts = {i: a[0] for i, a in value_activations(parts.unet, setup.cond, layers).items()}
    keep = keep.cpu()
    ev = BlockingEvaluator(parts.unet, layers, setup.latents[keep], setup.t1, setup.cond,
                           setup.delta[keep.to(setup.delta.device)], ms_settings(nemo), alpha=nemo.alpha,
                           max_unet_batch=max_unet_batch)
    res = localize(acts, stats, ev, threshold=thr, batch=nemo.refine_batch if batched else 1,
                   theta_start=nemo.theta_start, theta_step=nemo.theta_step, theta_min=nemo.theta_min,
                   k_start=nemo.k_start)
    return PromptLocalization(setup, res, 1 + ev.unet_calls, ev.sets_evaluated, time.perf_counter() - t0)


def all_off_score(parts: DiffusionParts, text: str, nemo: NemoConfig, image_size: int) -> float:
    """s(B) with EVERY value neuron deactivated, over the prompt's retained latents (all latents
    when detection retains none): the lowest blocking score any neuron set can reach, up to the
    layers' interplay. When it stays above nemo.threshold, NeMo's criterion is out of reach for
    this model, whatever the search does; a report should say so rather than blame the search."""
    setup = detect_prompt(parts, text, nemo, image_size)
    keep = setup.detection.retained.cpu()
    if not bool(keep.any()):
        keep = torch.ones_like(keep)
    layers = find_value_layers(parts.unet)
    ev = BlockingEvaluator(parts.unet, layers, setup.latents[keep], setup.t1, setup.cond,
                           setup.delta[keep.to(setup.delta.device)], ms_settings(nemo), alpha=nemo.alpha)
    return ev.one({l.idx: list(range(l.out_features)) for l in layers})


def outcome_message(res: LocalizeResult) -> str:
    """Say whether NeMo reached its criterion, and if not, why (SPEC 6: the search may give up)."""
    ini, ref = res.initial, res.refined
    if ini.mitigated:
        head = f"initial set mitigates at theta={ini.theta:g}, k={ini.k}: s(B)={ini.score:.4f} <= {res.threshold:g}"
    else:
        head = (f"initial search gave up at theta={ini.theta:g}, k={ini.k}: s(B)={ini.score:.4f} > {res.threshold:g}; "
                f"refined against s(B) itself")
    rs = res.refined_score
    tail = (f"criterion reached: refined s(B)={rs:.4f}" if res.criterion_reached
            else f"criterion NOT reached: refined s(B)={rs:.4f} > {res.threshold:g}")
    return f"{head}; {n_neurons(ini.sets)} -> {n_neurons(ref.sets)} neurons; {tail}"


# ============================================================================ ids and rows


def _hash(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(json.dumps(p, sort_keys=True, default=str) for p in parts).encode()).hexdigest()


def nemo_settings(cfg: Config) -> dict:
    """Every setting that changes a detection or localization result (refine_batch does not)."""
    s = cfg.nemo.model_dump()
    s.pop("refine_batch", None)
    s["image_size"] = cfg.generation.size
    return s


def nemo_id(model_id: str, prompt_id: str, cfg: Config) -> str:
    return _hash("nemo", model_id, prompt_id, nemo_settings(cfg))


def stat_id(model_id: str, source: str, layer_idx: int, neuron: int) -> str:
    return _hash("stat", model_id, source, layer_idx, neuron)


def neuron_set_id(model_id: str, prompt_id: str, kind: str, layer_idx: int, cfg: Config, stats_source: str) -> str:
    return _hash("neurons", "prompt", model_id, prompt_id, kind, layer_idx, nemo_settings(cfg), stats_source)


def prompt_set_source(prompts: Sequence[str]) -> str:
    """A stats_source naming a prompt set by content, so stats of different sets never mix."""
    return "prompts:" + hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _q(v: str) -> str:
    return "'" + str(v).replace("'", "''") + "'"


def _prompt_rows(prompts: pa.Table | Sequence[Mapping]) -> list[dict]:
    rows = prompts.to_pylist() if isinstance(prompts, pa.Table) else [dict(r) for r in prompts]
    for r in rows:
        if "prompt_id" not in r or "text" not in r:
            raise ValueError("prompt rows need `prompt_id` and `text` columns")
    return rows


def _error_row(run: RunRecord, stage: str, prompt_id: str, reason: str) -> dict:
    from fbmem.pipelines.ingest import error_id

    return {"error_id": error_id(run.job, stage, prompt_id), "job": run.job, "stage": stage,
            "source_uri": f"prompt:{prompt_id}", "source_id": prompt_id, "reason": reason,
            "run_id": run.run_id, "created_at": now_utc()}


# ============================================================================ statistics jobs


def stats_rows(stats: NeuronStats, model_id: str, run_id: str) -> pa.Table:
    rows = []
    for li in sorted(stats.mean):
        mean, std = stats.mean[li].tolist(), stats.std[li].tolist()
        for j in range(len(mean)):
            rows.append({"stat_id": stat_id(model_id, stats.source, li, j), "model_id": model_id,
                         "stats_source": stats.source, "layer_idx": li, "module": stats.modules[li], "neuron": j,
                         "mean_abs_act": mean[j], "std_abs_act": std[j], "n_prompts": stats.n_prompts,
                         "run_id": run_id})
    return pa.Table.from_pylist(rows)


def compute_stats(parts: DiffusionParts, prompts: Sequence[str], *, source: str, batch_size: int = 64) -> NeuronStats:
    """Per-neuron activation mean/std over `prompts` (no UNet pass: to_v applied to E)."""
    layers = find_value_layers(parts.unet)
    acc = ActivationAccumulator()
    for i in range(0, len(prompts), batch_size):
        e = encode_prompts(parts, prompts[i:i + batch_size], batch_size)
        acc.update(value_activations(parts.unet, e, layers))
    res = acc.result()
    return NeuronStats({l.idx: l.name for l in layers}, {i: m for i, (m, _) in res.items()},
                       {i: s for i, (_, s) in res.items()}, source=source, n_prompts=acc.n)


def run_stats(db: Database, cfg: Config, pipe: Any, prompts: Sequence[str], *, source: str,
              run: RunRecord, batch_size: int = 64) -> NeuronStats:
    """Compute and store `neuron_stats` for the loaded model over `prompts` (SPEC 6 statistics)."""
    prompts = [p for p in prompts]
    run.rows_in = len(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        run.errors += len(bad)
        run.metrics["skipped_empty_prompts"] = len(bad)
        skip = set(bad)
        prompts = [p for i, p in enumerate(prompts) if i not in skip]
    stats = compute_stats(parts_of(pipe), prompts, source=source, batch_size=batch_size)
    run.rows_out = db.upsert("neuron_stats", stats_rows(stats, cfg.models.diffusion.model_id, run.run_id))
    run.metrics.update(layers=len(stats.mean), neurons=sum(stats.sizes().values()), n_prompts=stats.n_prompts,
                       stats_source=source)
    return stats


def import_stats_csv(db: Database, path: str | Path, model_id: str, run: RunRecord,
                     unet: torch.nn.Module | None = None) -> NeuronStats:
    """Store a statistics file (the SD 1.4 reference format); with `unet`, check it fits its layers."""
    stats = load_stats_csv(path)
    if unet is not None:
        check_stats_layers(stats, find_value_layers(unet))
    run.rows_in = sum(stats.sizes().values())
    run.rows_out = db.upsert("neuron_stats", stats_rows(stats, model_id, run.run_id))
    run.metrics.update(layers=len(stats.mean), neurons=run.rows_in, stats_source=stats.source)
    return stats


def read_stats(db: Database, model_id: str, source: str | None = None) -> NeuronStats:
    """Statistics stored for `model_id` (and `source`; required when several sources exist)."""
    where = f"model_id = {_q(model_id)}" + (f" AND stats_source = {_q(source)}" if source else "")
    t = db.read("neuron_stats", ["stats_source", "layer_idx", "module", "neuron", "mean_abs_act", "std_abs_act",
                                 "n_prompts"], where=where)
    if t.num_rows == 0:
        raise ValueError(f"no neuron statistics stored for model {model_id!r}"
                         + (f" from {source!r}" if source else "") + ": run the stats job or import a file first")
    sources = sorted(set(t.column("stats_source").to_pylist()))
    if len(sources) > 1:
        raise ValueError(f"model {model_id!r} has statistics from several sources {sources}: name one")
    rows = sorted(t.to_pylist(), key=lambda r: (r["layer_idx"], r["neuron"]))
    modules: dict[int, str] = {}
    vals: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        modules[r["layer_idx"]] = r["module"]
        vals.setdefault(r["layer_idx"], []).append((r["mean_abs_act"], r["std_abs_act"]))
    mean = {i: torch.tensor([m for m, _ in v], dtype=torch.float32) for i, v in vals.items()}
    std = {i: torch.tensor([s for _, s in v], dtype=torch.float32) for i, v in vals.items()}
    return NeuronStats(modules, mean, std, source=sources[0], n_prompts=rows[0]["n_prompts"])


# ============================================================================ detection / localization jobs


def _detect_row(cfg: Config, model_id: str, prompt_id: str, det: Detection, run_id: str) -> dict:
    return {"nemo_id": nemo_id(model_id, prompt_id, cfg), "prompt_id": prompt_id, "model_id": model_id,
            "detect_score": det.score, "detect_mean": det.mean, "n_retained": int(det.retained.sum()),
            "memorized": det.memorized, "run_id": run_id}


def run_detect(db: Database, cfg: Config, pipe: Any, prompts: pa.Table | Sequence[Mapping], run: RunRecord) -> int:
    """Detection for each prompt row (prompt_id, text) -> `nemo_prompts`. Returns memorized count."""
    parts = parts_of(pipe)
    model_id = cfg.models.diffusion.model_id
    rows = _prompt_rows(prompts)
    run.rows_in = len(rows)
    out, errors, memorized = [], [], 0
    for r in rows:
        try:
            setup = detect_prompt(parts, r["text"], cfg.nemo, cfg.generation.size)
        except Exception as exc:  # noqa: BLE001 - one bad prompt is an error row, not a failed job
            log.warning("detect %s: %s", r["prompt_id"], exc)
            errors.append(_error_row(run, "detect", r["prompt_id"], f"detect: {exc}"))
            continue
        row = _detect_row(cfg, model_id, r["prompt_id"], setup.detection, run.run_id)
        row["message"] = "memorized" if row["memorized"] else "not memorized: no sample's m_i above the threshold"
        row["unet_calls"] = 1
        memorized += int(row["memorized"])
        out.append(row)
    if out:
        db.upsert("nemo_prompts", pa.Table.from_pylist(_keep_localization(db, out)))
    if errors:
        db.upsert("errors", pa.Table.from_pylist(errors))
    run.rows_out, run.errors = len(out), run.errors + len(errors)
    run.metrics.update(memorized=memorized, not_memorized=len(out) - memorized)
    return memorized


_DETECT_FIELDS = ("nemo_id", "prompt_id", "model_id", "detect_score", "detect_mean", "n_retained", "memorized",
                  "run_id")


def _keep_localization(db: Database, rows: list[dict]) -> list[dict]:
    """Detection rows merged over stored ones, so rerunning detection keeps localization results.

    Same nemo_id means same settings, hence the same detection; only the detection columns are
    rewritten.
    """
    if not db.has_table("nemo_prompts"):
        return rows
    ids = ", ".join(_q(r["nemo_id"]) for r in rows)
    old = {r["nemo_id"]: r for r in db.read("nemo_prompts", where=f"nemo_id IN ({ids})").to_pylist()}
    out = []
    for r in rows:
        prev = old.get(r["nemo_id"])
        if prev is None or prev.get("refined_score") is None:
            out.append(r)
        else:
            out.append({**prev, **{k: r[k] for k in _DETECT_FIELDS}})
    return out


def neuron_rows(cfg: Config, model_id: str, prompt_id: str, kind: str, sets: NeuronSets, score: float | None,
                layers: Sequence[ValueLayer], stats_source: str, run_id: str) -> list[dict]:
    """One `neurons` row per value layer (empty lists included, so unions see every layer)."""
    return [{"neuron_set_id": neuron_set_id(model_id, prompt_id, kind, l.idx, cfg, stats_source), "scope": "prompt",
             "prompt_id": prompt_id, "cluster_id": None, "kind": kind, "layer_idx": l.idx, "module": l.name,
             "neurons": [int(j) for j in sets.get(l.idx, [])], "score": score, "model_id": model_id,
             "run_id": run_id} for l in layers]


def stored_localization(db: Database, cfg: Config, model_id: str, prompt_id: str, layers: Sequence[ValueLayer],
                        stats_source: str, only_memorized: bool) -> dict | None:
    """The prompt's `nemo_prompts` row from an earlier run with these settings, if it still holds:
    a prompt detection did not flag (localizing only flagged ones), or a localized prompt whose
    initial and refined neuron rows for this statistics source were written by the same run."""
    from fbmem.jobs.candidates import sql_list

    nid = nemo_id(model_id, prompt_id, cfg)
    if not db.has_table("nemo_prompts"):
        return None
    rows = db.read("nemo_prompts", where=f"nemo_id = '{nid}'").to_pylist()
    if not rows:
        return None
    row = rows[0]
    if row["n_initial"] is None:
        return row if only_memorized and row["memorized"] is False else None
    ids = [neuron_set_id(model_id, prompt_id, kind, l.idx, cfg, stats_source)
           for kind in ("initial", "refined") for l in layers]
    got = db.read("neurons", ["run_id"], where=f"neuron_set_id IN ({sql_list(ids)})") if db.has_table("neurons") else None
    if got is None or got.num_rows != len(ids) or set(got.column("run_id").to_pylist()) != {row["run_id"]}:
        return None
    return row


def run_localize(db: Database, cfg: Config, pipe: Any, prompts: pa.Table | Sequence[Mapping], stats: NeuronStats,
                 run: RunRecord, batched: bool = True, only_memorized: bool = True,
                 max_unet_batch: int | None = None, force: bool = False) -> list[dict]:
    """Detection + localization per prompt row -> `neurons` and `nemo_prompts`; returns the nemo rows.

    Prompts that detection does not call memorized get a nemo_prompts row saying so and no neurons
    (unless only_memorized=False, which localizes every prompt against all its latents). The stats
    must fit this UNet's value layers (checked before any prompt runs). `max_unet_batch` caps the
    samples of one UNet forward (GPU memory); a capped call counts as several sequential calls.
    A prompt already localized with the same model, settings and statistics is reused (its stored
    row is returned) unless `force`: the search is the costly part of a rerun.
    """
    parts = parts_of(pipe)
    layers = find_value_layers(parts.unet)
    check_stats_layers(stats, layers)
    model_id = cfg.models.diffusion.model_id
    rows = _prompt_rows(prompts)
    run.rows_in = len(rows)
    out, errors = [], []
    calls = sets_eval = localized = reached = reused = 0
    for r in rows:
        pid = r["prompt_id"]
        old = None if force else stored_localization(db, cfg, model_id, pid, layers, stats.source, only_memorized)
        if old is not None:
            reused += 1
            localized += int(old["n_initial"] is not None)
            reached += int(bool(old["criterion_reached"]))
            out.append(old)
            continue
        try:
            setup = detect_prompt(parts, r["text"], cfg.nemo, cfg.generation.size)
            keep_all = None if (only_memorized or setup.detection.memorized) else torch.ones_like(setup.detection.retained)
            loc = localize_prompt(parts, r["text"], stats, cfg.nemo, cfg.generation.size, batched=batched,
                                  retained=keep_all, setup=setup, max_unet_batch=max_unet_batch)
        except Exception as exc:  # noqa: BLE001
            log.warning("localize %s: %s", pid, exc)
            errors.append(_error_row(run, "localize", pid, f"localize: {exc}"))
            continue
        row = _detect_row(cfg, model_id, pid, setup.detection, run.run_id)
        row["unet_calls"] = loc.unet_calls
        calls += loc.unet_calls
        sets_eval += loc.sets_evaluated
        if loc.result is None:
            row["message"] = "not memorized: no sample's m_i above the threshold; nothing to localize"
        else:
            res = loc.result
            localized += 1
            reached += int(res.criterion_reached)
            row.update(initial_score=res.initial.score, refined_score=res.refined_score, theta=res.initial.theta,
                       k=res.initial.k, n_initial=n_neurons(res.initial.sets), n_refined=n_neurons(res.refined.sets),
                       criterion_reached=res.criterion_reached, message=outcome_message(res))
            nrows = (neuron_rows(cfg, model_id, pid, "initial", res.initial.sets, res.initial.score, layers,
                                 stats.source, run.run_id)
                     + neuron_rows(cfg, model_id, pid, "refined", res.refined.sets, res.refined_score, layers,
                                   stats.source, run.run_id))
            db.upsert("neurons", pa.Table.from_pylist(nrows))
        out.append(row)
        db.upsert("nemo_prompts", pa.Table.from_pylist([row]))  # per prompt: a killed run keeps what it did
    if errors:
        db.upsert("errors", pa.Table.from_pylist(errors))
    run.rows_out, run.errors = len(out), run.errors + len(errors)
    run.metrics.update(localized=localized, criterion_reached=reached, unet_calls=calls, sets_evaluated=sets_eval,
                       batched=batched, stats_source=stats.source, reused=reused)
    return out
