"""The UNet side of NeMo: a loaded pipeline's parts, its prompt encodings, noise differences,
and the evaluator that scores candidate neuron sets with batched UNet calls (per-sample channel
masks). Pure torch: the jobs in jobs/nemo.py hand it a pipeline and write what it returns.

Per-prompt work that does not need the database lives in `detect_prompt` / `localize_prompt`
(used by the benchmark and the tests). `batched=False` runs the reference's call pattern (one
candidate set per UNet call); `batched=True` evaluates nemo.refine_batch candidate sets per call
and returns the same neuron sets (search.py). Every UNet and to_v call follows nemo.gpu_numerics
(numerics.py: on a GPU, by default, fp32 weights under fp16 autocast with an fp32 x_T, as the
reference runs them).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fbmem.jobs.config import NemoConfig
from fbmem.jobs.core.nemo.detection import (
    Detection,
    MsSsimSettings,
    blocking_scores,
    ddim_t1,
    detection,
    initial_latents,
    masks_for_sets,
    noise_difference,
)
from fbmem.jobs.core.nemo.hooks import ValueLayer, find_value_layers, value_activations
from fbmem.jobs.core.nemo.numerics import NATIVE, check_weights
from fbmem.jobs.core.nemo.search import LocalizeResult, NeuronSets, localize, n_neurons
from fbmem.jobs.core.nemo.statistics import (
    ActivationAccumulator,
    NeuronStats,
    check_stats_layers,
)
from fbmem.jobs.core.prompt_encoding import encode_prompts as shared_encode_prompts

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


def encode_prompts(parts: DiffusionParts, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Text-encoder output E [N, T, D] of NeMo's prompts: jobs/core/prompt_encoding.encode_prompts
    (the one encoder clustering and generation share), refusing empty prompts."""
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"empty or non-text prompts at positions {bad[:10]}")
    return shared_encode_prompts(parts.tokenizer, parts.text_encoder, prompts, batch_size=batch_size)


def latent_shape(parts: DiffusionParts, image_size: int) -> tuple[int, int, int]:
    side = image_size // parts.vae_scale_factor
    if side < 1 or image_size % parts.vae_scale_factor:
        raise ValueError(f"image size {image_size} is not a multiple of the VAE scale factor {parts.vae_scale_factor}")
    return (int(parts.unet.config.in_channels), side, side)


def ms_settings(nemo: NemoConfig) -> MsSsimSettings:
    return MsSsimSettings(win_size=nemo.detect_win_size, n_scales=nemo.detect_scales, min_side=nemo.detect_min_side,
                          metric=nemo.detect_metric, beta=nemo.detect_beta)


def check_numerics(parts: DiffusionParts, nemo: NemoConfig) -> None:
    """Refuse, before any work, a model whose weights cannot give the configured GPU numerics."""
    for what, mod in (("UNet", parts.unet), ("text encoder", parts.text_encoder)):
        p = next(mod.parameters())
        check_weights(p.device, p.dtype, nemo.gpu_numerics, what)


# ============================================================================ evaluator


class BlockingEvaluator:
    """evaluate_many for the search: s(B) of many candidate sets in ONE batched UNet call.

    The batch holds (candidate c, retained latent i) at row c * r + i, each row with its own
    channel mask (neuron_hooks.channel_scales), so every candidate sees exactly what a separate
    `deactivate(B_c)` call on the r retained latents would see. Counts UNet calls and sets.
    """

    def __init__(self, unet: torch.nn.Module, layers: Sequence[ValueLayer], latents: torch.Tensor, t1: int,
                 cond: torch.Tensor, ref_delta: torch.Tensor, ms: MsSsimSettings, alpha: float = 0.0,
                 max_unet_batch: int | None = None, numerics: str = NATIVE) -> None:
        dev = next(unet.parameters()).device
        self.unet, self.t1, self.ms, self.alpha, self.numerics = unet, t1, ms, alpha, numerics
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
            delta = noise_difference(self.unet, x, self.t1, self.cond, scales=masks, numerics=self.numerics)
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
    check_numerics(parts, nemo)
    cond = encode_prompts(parts, [text])
    lat = initial_latents(nemo.n_latents, latent_shape(parts, image_size), seed=nemo.latent_seed)
    t1 = ddim_t1(parts.scheduler_config, nemo.schedule_steps, nemo.timestep_index)
    delta = noise_difference(parts.unet, lat, t1, cond, numerics=nemo.gpu_numerics)
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
    acts = {i: a[0] for i, a in value_activations(parts.unet, setup.cond, layers, nemo.gpu_numerics).items()}
    keep = keep.cpu()
    ev = BlockingEvaluator(parts.unet, layers, setup.latents[keep], setup.t1, setup.cond,
                           setup.delta[keep.to(setup.delta.device)], ms_settings(nemo), alpha=nemo.alpha,
                           max_unet_batch=max_unet_batch, numerics=nemo.gpu_numerics)
    res = localize(acts, stats, ev, threshold=thr, batch=nemo.refine_batch if batched else 1,
                   theta_start=nemo.theta_start, theta_step=nemo.theta_step, theta_min=nemo.theta_min,
                   k_start=nemo.k_start, stop_rule=nemo.theta_stop, k_max=nemo.k_max)
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
                           setup.delta[keep.to(setup.delta.device)], ms_settings(nemo), alpha=nemo.alpha,
                           numerics=nemo.gpu_numerics)
    return ev.one({l.idx: list(range(l.out_features)) for l in layers})


def outcome_message(res: LocalizeResult) -> str:
    """Say whether NeMo reached its criterion, and if not, why (SPEC 6: the search may give up)."""
    ini, ref = res.initial, res.refined
    if ini.mitigated:
        head = f"initial set mitigates at theta={ini.theta:g}, k={ini.k}: s(B)={ini.score:.4f} <= {res.threshold:g}"
    else:
        stop = f" (stop rule: {ini.stop})" if ini.stop else ""
        head = (f"initial search gave up at theta={ini.theta:g}, k={ini.k}{stop}: s(B)={ini.score:.4f} > "
                f"{res.threshold:g}; refined against s(B) itself")
    rs = res.refined_score
    tail = (f"criterion reached: refined s(B)={rs:.4f}" if res.criterion_reached
            else f"criterion NOT reached: refined s(B)={rs:.4f} > {res.threshold:g}")
    return f"{head}; {n_neurons(ini.sets)} -> {n_neurons(ref.sets)} neurons; {tail}"


def compute_stats(parts: DiffusionParts, prompts: Sequence[str], *, source: str, batch_size: int = 64,
                  numerics: str = NATIVE) -> NeuronStats:
    """Per-neuron activation mean/std over `prompts` (no UNet pass: to_v applied to E).

    `numerics`: nemo.gpu_numerics, so statistics and the prompts they are compared with are
    computed alike (under the reference's fp16 autocast on a GPU)."""
    layers = find_value_layers(parts.unet)
    acc = ActivationAccumulator()
    for i in range(0, len(prompts), batch_size):
        e = encode_prompts(parts, prompts[i:i + batch_size], batch_size)
        acc.update(value_activations(parts.unet, e, layers, numerics))
    res = acc.result()
    return NeuronStats({l.idx: l.name for l in layers}, {i: m for i, (m, _) in res.items()},
                       {i: s for i, (_, s) in res.items()}, source=source, n_prompts=acc.n)
