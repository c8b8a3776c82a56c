"""The workers that hold the audited diffusion model for the jobs that are not Ray Data streams:
NeMo (statistics, detection, localization; jobs/nemo.py), Wen et al.'s detector (jobs/detect.py),
clustering's text embeddings (jobs/cluster.py), and the toy world's checks and controls (jobs/toy/).

Each is a plain class whose constructor loads its model, on the device picked there
(pipelines/devices.pick_device), and whose methods do one chunk of work and return small, CPU-only
results. The jobs run them in a `ModelPool` (pipelines/actor_pool.py) of Ray actors with the
stage's declared resources (`resources.nemo`, `resources.cluster`), so the constructor runs on the
node Ray picks: a CPU head node never loads the UNet. The driver plans what to do, hands the
chunks over, and writes the rows it builds from what comes back.

Handed a model already in memory (`pipe=` / `encoder=`), a worker loads nothing: the tests and
benchmarks run it in-process (`ModelPool.in_process`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fbmem.jobs.config import Config, DetectConfig, GenerationConfig, NemoConfig
from fbmem.jobs.core.nemo.detection import Detection
from fbmem.jobs.core.nemo.evaluator import (
    all_off_score,
    check_numerics,
    detect_prompt,
    encode_prompts,
    latent_shape,
    localize_prompt,
    parts_of,
)
from fbmem.jobs.core.nemo.hooks import deactivate, find_value_layers, value_activations
from fbmem.jobs.core.nemo.search import LocalizeResult
from fbmem.jobs.core.nemo.statistics import ActivationAccumulator, NeuronStats
from fbmem.jobs.core.prompt_encoding import encode_prompts as shared_encode_prompts
from fbmem.jobs.core.wen import guided_first_steps, wen_scores
from fbmem.pipelines.actor_pool import ModelPool


def _config(config: str | Config) -> Config:
    return config if isinstance(config, Config) else Config.model_validate_json(config)


# ============================================================================ the diffusion model


@dataclass
class LayerInfo:
    """A value layer as the driver sees it (no module): what ids and checks need."""

    idx: int
    name: str
    out_features: int


@dataclass
class PromptOutcome:
    """One prompt's NeMo result as it leaves the actor (CPU tensors and plain values only)."""

    prompt_id: str
    detection: Detection | None = None
    result: LocalizeResult | None = None  # localization; None: not memorized (or detection only)
    unet_calls: int = 0
    sets_evaluated: int = 0
    error: str | None = None  # "detect: ..." / "localize: ...": the prompt failed
    seconds: float = 0.0  # wall time of this prompt's detection in the actor (set by `detect`)


@dataclass
class WenOutcome:
    """One prompt's Wen et al. score as it leaves the actor (jobs/core/wen.py)."""

    prompt_id: str
    score: float | None = None
    norms: torch.Tensor | None = None  # [seeds, steps] text-conditional noise norms (CPU float32)
    unet_calls: int = 0  # UNet evaluations of one latent row spent on this prompt (CFG: 2 per seed and step)
    seconds: float = 0.0  # the batch's wall time in the actor, divided evenly among its prompts
    error: str | None = None  # "wen: ...": the prompt failed


def _cpu(det: Detection) -> Detection:
    return dataclasses.replace(det, m=det.m.cpu(), pairwise=det.pairwise.cpu(), retained=det.retained.cpu())


class DiffusionWorker:
    """The audited diffusion model (`models.diffusion`) in NeMo's dtype
    (pipelines/diffusion_models.load_nemo_pipeline: fp32 on a GPU under nemo.gpu_numerics=autocast).

    The NeMo settings and image size come with each call (the job's own settings decide its
    results and its ids); the constructor's config only says which model to load, and where.
    """

    def __init__(self, config: str | Config, pipe: Any = None) -> None:
        cfg = _config(config)
        self.model_id = cfg.models.diffusion.model_id
        if pipe is None:
            from fbmem.pipelines.diffusion_models import load_nemo_pipeline

            pipe = load_nemo_pipeline(cfg)  # picks the device here, in the actor
        self.pipe = pipe
        self.parts = parts_of(pipe)

    def info(self, nemo: NemoConfig) -> dict:
        """The model's value layers, device and dtype; refuses weights that cannot give `nemo`'s numerics."""
        check_numerics(self.parts, nemo)
        p = next(self.parts.unet.parameters())
        return {"model_id": self.model_id, "device": str(p.device), "dtype": str(p.dtype),
                "layers": [LayerInfo(l.idx, l.name, l.out_features) for l in find_value_layers(self.parts.unet)]}

    def activation_sums(self, texts: Sequence[str], nemo: NemoConfig) -> ActivationAccumulator:
        """Per-neuron sums of |to_v| activations of one batch of prompts (one encoder batch, as
        evaluator.compute_stats makes them): the driver adds the batches up in order."""
        layers = find_value_layers(self.parts.unet)
        acc = ActivationAccumulator()
        e = encode_prompts(self.parts, list(texts), max(1, len(texts)))
        acc.update(value_activations(self.parts.unet, e, layers, nemo.gpu_numerics))
        return acc

    def detect(self, rows: Sequence[Mapping], nemo: NemoConfig, image_size: int) -> list[PromptOutcome]:
        """Detection of each prompt row (prompt_id, text); a prompt that fails is an outcome with `error`."""
        out = []
        for r in rows:
            t0 = time.perf_counter()
            try:
                setup = detect_prompt(self.parts, r["text"], nemo, image_size)
            except Exception as exc:  # noqa: BLE001 - one bad prompt is an error row, not a failed job
                out.append(PromptOutcome(r["prompt_id"], error=f"detect: {exc}"))
                continue
            det = _cpu(setup.detection)  # on the CPU: the device's work is done when timed
            out.append(PromptOutcome(r["prompt_id"], detection=det, unet_calls=1, seconds=time.perf_counter() - t0))
        return out

    def wen_detect(self, rows: Sequence[Mapping], detect: DetectConfig, generation: GenerationConfig,
                   numerics: str) -> list[WenOutcome]:
        """Wen et al.'s score of each prompt row (prompt_id, text): the first `detect.wen_steps`
        steps of generation's DDIM schedule (generation.steps, guidance, size) from `detect.wen_seeds`
        seeds per prompt, every prompt x seed of the batch in one UNet call per step (jobs/core/wen.py).

        Seed s of a prompt is pipelines.generator.sample_seed(detect.wen_seed, prompt_id, s) and its
        x_T is drawn as generation draws it (initial_latents), so with wen_seed equal to
        generation.base_seed the scored trajectories are those of the generated samples. An empty
        prompt, or a batch that fails, gives outcomes with `error`; the others are still scored.
        """
        from fbmem.pipelines.generator import initial_latents, sample_seed

        t0 = time.perf_counter()
        out: dict[int, WenOutcome] = {}
        good = []
        for i, r in enumerate(rows):
            if not isinstance(r.get("text"), str) or not r["text"].strip():
                out[i] = WenOutcome(r["prompt_id"], error="wen: empty or non-text prompt")
            else:
                good.append(i)
        if good:
            n_seeds, n_steps = detect.wen_seeds, min(detect.wen_steps, generation.steps)
            try:
                channels, side, _ = latent_shape(self.parts, generation.size)
                seeds = [sample_seed(detect.wen_seed, rows[i]["prompt_id"], s) for i in good for s in range(n_seeds)]
                latents = initial_latents(seeds, channels=channels, latent_side=side)
                cond = encode_prompts(self.parts, [rows[i]["text"] for i in good]).repeat_interleave(n_seeds, dim=0)
                uncond = shared_encode_prompts(self.parts.tokenizer, self.parts.text_encoder, [""])
                norms, evals = guided_first_steps(
                    self.parts.unet, self.parts.scheduler_config, latents, cond, uncond,
                    schedule_steps=generation.steps, n_steps=n_steps, guidance=generation.guidance, numerics=numerics)
                norms = norms.cpu().reshape(len(good), n_seeds, n_steps)
                scores = wen_scores(norms).tolist()
            except Exception as exc:  # noqa: BLE001 - the batch's prompts are error rows, not a failed job
                for i in good:
                    out[i] = WenOutcome(rows[i]["prompt_id"], error=f"wen: {exc}")
            else:
                each = (time.perf_counter() - t0) / len(good)
                for j, i in enumerate(good):
                    out[i] = WenOutcome(rows[i]["prompt_id"], score=scores[j], norms=norms[j].clone(),
                                        unet_calls=evals // len(good), seconds=each)
        return [out[i] for i in range(len(rows))]

    def localize(self, rows: Sequence[Mapping], stats: NeuronStats, nemo: NemoConfig, image_size: int, *,
                 batched: bool = True, only_memorized: bool = True,
                 max_unet_batch: int | None = None) -> list[PromptOutcome]:
        """Detection, then the initial search and refinement, of each prompt row (jobs/nemo.run_localize)."""
        out = []
        for r in rows:
            try:
                setup = detect_prompt(self.parts, r["text"], nemo, image_size)
                det = setup.detection
                keep_all = None if (only_memorized or det.memorized) else torch.ones_like(det.retained)
                loc = localize_prompt(self.parts, r["text"], stats, nemo, image_size, batched=batched,
                                      retained=keep_all, setup=setup, max_unet_batch=max_unet_batch)
            except Exception as exc:  # noqa: BLE001
                out.append(PromptOutcome(r["prompt_id"], error=f"localize: {exc}"))
                continue
            out.append(PromptOutcome(r["prompt_id"], detection=_cpu(det), result=loc.result,
                                     unet_calls=loc.unet_calls, sets_evaluated=loc.sets_evaluated))
        return out

    def all_off_score(self, text: str, nemo: NemoConfig, image_size: int) -> float:
        """evaluator.all_off_score: s(B) with every value neuron off (the demo's reachability control)."""
        return all_off_score(self.parts, text, nemo, image_size)

    def generate(self, job: Mapping) -> np.ndarray:
        """Images [N, size, size, 3] float in [0, 1] of `job` (prompts, seeds, steps, guidance, size)
        with `job["neurons"]` ({layer: [channels]}, may be empty) scaled by `job["alpha"]`, as
        pipelines.generator.generate_images makes them: for neuron sets that have no place in the
        `generations` table (the demo's random-neuron control)."""
        from fbmem.pipelines.generator import generate_images

        kw = dict(steps=job["steps"], guidance=job["guidance"], size=job["size"])
        neurons = job.get("neurons") or {}
        if not neurons:
            return generate_images(self.pipe, job["prompts"], job["seeds"], **kw)
        with deactivate(self.pipe.unet, neurons, alpha=job["alpha"]):
            return generate_images(self.pipe, job["prompts"], job["seeds"], **kw)

    def apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(pipeline, *args, **kwargs)` next to the model (a module-level function; its result
        must be CPU-only): the toy model's memorization check."""
        return fn(self.pipe, *args, **kwargs)


def nemo_pool(cfg: Config, *, pool_size: int | None = None) -> ModelPool:
    """A pool of `DiffusionWorker` actors with `resources.nemo` (not started until used)."""
    res = cfg.resources.nemo if pool_size is None else cfg.resources.nemo.model_copy(update={"pool_size": pool_size})
    return ModelPool(DiffusionWorker, (cfg.to_json(),), res, name="nemo")


# ============================================================================ the text encoder


class TextEncoderWorker:
    """The audited model's tokenizer and text encoder only (pipelines/diffusion_models.load_text_encoder):
    clustering's prompt vectors, by the one prompt encoder (jobs/core/prompt_encoding.py)."""

    def __init__(self, config: str | Config, encoder: tuple[Any, torch.nn.Module] | None = None) -> None:
        cfg = _config(config)
        if encoder is None:
            from fbmem.pipelines.devices import pick_device
            from fbmem.pipelines.diffusion_models import load_text_encoder

            encoder = load_text_encoder(cfg.models.diffusion, pick_device(cfg.resources.device))
        self.tokenizer, self.text_encoder = encoder

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """Text-encoder hidden states of one batch of prompts, flattened: [N, T * D] float32."""
        hidden = shared_encode_prompts(self.tokenizer, self.text_encoder, list(texts), batch_size=max(1, len(texts)))
        hidden = hidden.float().cpu()
        return hidden.reshape(hidden.shape[0], -1).numpy()


def text_encoder_pool(cfg: Config) -> ModelPool:
    """A pool of `TextEncoderWorker` actors with `resources.cluster` (not started until used)."""
    return ModelPool(TextEncoderWorker, (cfg.to_json(),), cfg.resources.cluster, name="cluster")
