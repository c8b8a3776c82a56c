"""Generation (SPEC section 9): seeded samples from the diffusion model, as a Ray Data actor.

Why per-sample latents: the mitigation score (SPEC section 8) compares the *same* (prompt, seed,
sample) before and after mitigation, and those two images are made in different runs, batches and
batch positions. So a sample's initial noise x_T is drawn from its own seed by its own CPU
`torch.Generator`, never from a generator shared by the batch: the image then depends only on the
recipe (prompt, seed, model, steps, guidance, size, mitigation), not on what ran beside it.
The noise is drawn on the CPU in float32 and only then moved/cast, so a GPU (fp16) run starts from
exactly the x_T a CPU run does.

Ids: a generated image's `generation_id` is the hash of its recipe (`recipe_id`), known before
anything runs, so a rerun skips recipes already stored; `image_id` / `image_sha256` is the hash of
the PNG bytes, the content key the mask and embedding actors use.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
from collections import defaultdict
from contextlib import AbstractContextManager
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from fbmem.jobs.config import Config
from fbmem.storage.keys import content_hash, stable_hash

MITIGATIONS = ("none", "nemo", "nemo-c")

# The recipe columns a Generator reads (what `jobs/generate.py` plans).
RECIPE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("sample", pa.int32()),
        ("mitigation", pa.string()),
        ("alpha", pa.float32()),
        ("neurons_json", pa.string()),
    ]
)

# What the Generator returns: its input recipe columns plus the image and the ids. One explicit
# schema so batches with only error rows (all-null image columns) concatenate with good ones.
GENERATED_SCHEMA = pa.schema(
    [("generation_id", pa.string())]
    + list(RECIPE_SCHEMA)
    + [
        ("model_id", pa.string()),
        ("steps", pa.int32()),
        ("guidance", pa.float32()),
        ("size", pa.int32()),
        ("image_bytes", pa.binary()),
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
    ]
)


# ------------------------------------------------------------------------------------ ids (pure)


def sample_seed(base_seed: int, prompt_id: str, sample: int) -> int:
    """The seed of sample `sample` of a prompt: 63 bits of sha256(base_seed, prompt_id, sample).

    Derived, not counted, so it does not depend on which prompts or how many samples a run
    plans; 63 bits so it fits the signed int64 `seed` column and `torch.Generator.manual_seed`.
    """
    digest = hashlib.sha256(f"{int(base_seed)}\x1f{prompt_id}\x1f{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def canonical_neurons(neurons: Mapping[Any, Sequence[Any]] | None) -> dict[int, list[int]]:
    """{layer: channels} with int keys, sorted unique channels, empty layers dropped.

    Deactivation is a set operation, so two spellings of one set must give one recipe id.
    Raises ValueError naming the offending entry.
    """
    if neurons is None:
        return {}
    if not isinstance(neurons, Mapping):
        raise ValueError(f"neurons must be a mapping layer_idx -> [channels], got {type(neurons).__name__}")
    out: dict[int, list[int]] = {}
    for layer, channels in neurons.items():
        try:
            li = int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"neurons: layer index {layer!r} is not an integer") from None
        if li < 0 or str(li) != str(layer).strip():
            raise ValueError(f"neurons: layer index {layer!r} is not a non-negative integer")
        if isinstance(channels, (str, bytes, Mapping)) or not hasattr(channels, "__iter__"):
            raise ValueError(f"neurons: layer {li}: channels must be a list of integers, got {channels!r}")
        chans = set()
        for c in channels:  # numpy integers are Integral too (sets may come from arrays)
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
                raise ValueError(f"neurons: layer {li}: channel {c!r} is not a non-negative integer")
            chans.add(int(c))
        if chans:
            out[li] = sorted(set(out.get(li, [])) | chans)
    return dict(sorted(out.items()))


def neurons_to_json(neurons: Mapping[Any, Sequence[Any]] | None) -> str:
    """Canonical JSON of a neuron set (keys are strings in JSON)."""
    return json.dumps({str(k): v for k, v in canonical_neurons(neurons).items()}, separators=(",", ":"))


def neurons_from_json(text: str | None) -> dict[int, list[int]]:
    """Parse a row's `neurons_json`; ValueError names what is wrong."""
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"neurons_json is not valid JSON: {exc}") from None
    return canonical_neurons(data)


def recipe_id(
    model_id: str,
    prompt_id: str,
    seed: int,
    sample: int,
    mitigation: str,
    alpha: float | None,
    steps: int,
    guidance: float,
    size: int,
    *,
    neurons_json: str | None = None,
) -> str:
    """generation_id of an image made here: sha256 of everything that decides its pixels.

    The neuron set is part of a mitigated recipe: generating again with another set is another
    image, not a rerun to skip. alpha is rounded to float32 (how it is stored) so a value read
    back from the table gives the same id. Unmitigated recipes hash alpha and neurons as null.
    """
    if mitigation not in MITIGATIONS:
        raise ValueError(f"mitigation must be one of {MITIGATIONS}, got {mitigation!r}")
    mitigated = mitigation != "none"
    recipe = {
        "model": model_id,
        "prompt_id": prompt_id,
        "seed": int(seed),
        "sample": int(sample),
        "mitigation": mitigation,
        "alpha": float(np.float32(alpha)) if mitigated and alpha is not None else None,
        "neurons": json.dumps(neurons_from_json(neurons_json), sort_keys=True) if mitigated else None,
        "steps": int(steps),
        "guidance": float(np.float32(guidance)),
        "size": int(size),
        "scheduler": "ddim",
    }
    return stable_hash(recipe)


# ---------------------------------------------------------------------------- generation (pure)


def initial_latents(seeds: Sequence[int], *, channels: int, latent_side: int) -> torch.Tensor:
    """[N, C, h, w] float32 on the CPU; row i depends on seeds[i] only (its own generator)."""
    rows = [
        torch.randn((1, channels, latent_side, latent_side), generator=torch.Generator("cpu").manual_seed(int(s)),
                    dtype=torch.float32)
        for s in seeds
    ]
    return torch.cat(rows, dim=0)


def generate_images(
    pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float, size: int
) -> np.ndarray:
    """Images [N, size, size, 3] float32 in [0, 1], one per (prompt, seed), DDIM, eta 0.

    With eta 0 the DDIM sampler adds no noise after x_T, so the image is a function of
    (prompt, x_T) alone; batch composition only changes floating-point summation order.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    scale = pipe.vae_scale_factor
    if size % 8 or size % scale:
        raise ValueError(f"generation.size {size} must be a multiple of 8 and of the VAE scale {scale}")
    device = pipe.unet.device
    latents = initial_latents(seeds, channels=pipe.unet.config.in_channels, latent_side=size // scale)
    out = pipe(
        prompt=list(prompts), height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
        latents=latents.to(device=device, dtype=pipe.unet.dtype), eta=0.0, output_type="np",
    )
    return np.asarray(out.images, dtype=np.float32)


def encode_png(image: np.ndarray) -> bytes:
    """float [0,1] HxWx3 -> RGB PNG bytes (rounded like diffusers' numpy_to_pil)."""
    arr = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _row_problem(row: dict) -> str | None:
    """Why a recipe row cannot be generated, or None."""
    prompt = row.get("prompt")
    if prompt is None or not str(prompt).strip():
        return "empty prompt"
    if row.get("seed") is None or row.get("sample") is None:
        return "seed and sample are required"
    mitigation = row.get("mitigation") or "none"
    if mitigation not in MITIGATIONS:
        return f"mitigation must be one of {MITIGATIONS}, got {mitigation!r}"
    if mitigation == "none" and row.get("neurons_json") is not None:
        return "an unmitigated row (mitigation 'none') must not carry neurons_json"
    alpha = row.get("alpha")
    if mitigation != "none" and (alpha is None or not math.isfinite(alpha) or alpha < 0):
        return f"a mitigated row needs a finite alpha >= 0, got {alpha!r}"
    return None


# ------------------------------------------------------------------------------------- actor


class Generator:
    """Ray Data actor (batch_format="pyarrow"): recipe rows -> generated images.

    Input columns: prompt_id, prompt, seed, sample, mitigation, alpha, neurons_json (null, or
    JSON {layer_idx: [channels]} for mitigated rows). Output: GENERATED_SCHEMA. Rows of a batch
    are grouped by (neuron set, alpha) and each group runs in one pipeline call, under
    `deactivate` when it has neurons (both guidance branches share the UNet batch, so the
    channel hook covers both). A row that fails gets `error` ("generate: ...") and no image;
    when a group's call fails, its rows are retried one at a time so only the culprit fails
    (safe: a sample's image does not depend on its batch).

    `deactivate(unet, neurons, alpha=...)` is the context manager that switches neurons off (the
    NeMo hooks of jobs/core/nemo/hooks.py, handed in by the generate job): the actor only applies
    what the job chose, so pipelines need not know NeMo.
    """

    def __init__(self, config_json: str, deactivate: Callable[..., AbstractContextManager] | None = None) -> None:
        from fbmem.pipelines.devices import pick_device
        from fbmem.pipelines.diffusion_models import load_pipeline, resolve_dtype

        cfg = Config.model_validate_json(config_json)
        self.gen = cfg.generation
        self.model_id = cfg.models.diffusion.model_id
        self.device = pick_device(cfg.resources.device)
        self.dtype = resolve_dtype(self.gen.dtype, self.device)
        self.pipe = load_pipeline(cfg.models.diffusion, self.device, self.dtype)
        self.deactivate = deactivate
        from fbmem.pipelines.actors import record_model_node  # imports Ray: only in actors
        record_model_node("generate")

    def _run(self, prompts: list[str], seeds: list[int], neurons: dict[int, list[int]], alpha: float | None):
        kw = dict(steps=self.gen.steps, guidance=self.gen.guidance, size=self.gen.size)
        if not neurons:
            return generate_images(self.pipe, prompts, seeds, **kw)
        if self.deactivate is None:
            raise ValueError("generate: rows name neurons to deactivate but the generator was given no hook")
        with self.deactivate(self.pipe.unet, neurons, alpha=float(alpha)):
            return generate_images(self.pipe, prompts, seeds, **kw)

    def _run_group(self, rows: list[dict], idx: list[int], neurons, alpha) -> dict[int, np.ndarray | str]:
        """index -> image, or index -> error message."""
        prompts = [rows[i]["prompt"] for i in idx]
        seeds = [rows[i]["seed"] for i in idx]
        try:
            images = self._run(prompts, seeds, neurons, alpha)
            return {i: images[j] for j, i in enumerate(idx)}
        except Exception as exc:  # noqa: BLE001 - isolate the failing row below
            if len(idx) == 1:
                detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                return {idx[0]: f"generate: {detail}"}
        out: dict[int, np.ndarray | str] = {}
        for i in idx:
            out.update(self._run_group(rows, [i], neurons, alpha))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results: dict[int, np.ndarray | str] = {}
        groups: dict[tuple, list[int]] = defaultdict(list)
        parsed: dict[tuple, dict[int, list[int]]] = {}
        for i, row in enumerate(rows):
            row["mitigation"] = row.get("mitigation") or "none"
            problem = _row_problem(row)
            if problem is None:
                try:
                    neurons = neurons_from_json(row.get("neurons_json")) if row["mitigation"] != "none" else {}
                except ValueError as exc:
                    problem = str(exc)
            if problem is not None:
                results[i] = f"generate: {problem}"
                continue
            key = (json.dumps(neurons, sort_keys=True), float(row["alpha"]) if neurons else None)
            parsed[key] = neurons
            groups[key].append(i)
        for key, idx in groups.items():
            results.update(self._run_group(rows, idx, parsed[key], key[1]))
        return self._to_table(rows, results)

    def _generation_id(self, row: dict) -> str:
        """The recipe id; a row too broken to have one (it is an error row) gets a hash of its
        raw fields instead, so its error row still has a stable key."""
        g = self.gen
        try:
            return recipe_id(self.model_id, row.get("prompt_id"), row["seed"], row["sample"], row["mitigation"],
                             row.get("alpha"), g.steps, g.guidance, g.size, neurons_json=row.get("neurons_json"))
        except (ValueError, TypeError, KeyError):
            raw = {k: row.get(k) for k in RECIPE_SCHEMA.names}
            return stable_hash([self.model_id, raw])

    def _to_table(self, rows: list[dict], results: dict[int, np.ndarray | str]) -> pa.Table:
        g = self.gen
        out = []
        for i, row in enumerate(rows):
            res = results[i]
            rec = {name: row.get(name) for name in RECIPE_SCHEMA.names}
            rec.update(model_id=self.model_id, steps=g.steps, guidance=g.guidance, size=g.size,
                       image_bytes=None, image_id=None, width=None, height=None, error=None, generation_id=None)
            rec["generation_id"] = self._generation_id(row)
            if isinstance(res, str):
                rec["error"] = res
            else:
                data = encode_png(res)
                rec.update(image_bytes=data, image_id=content_hash(data),
                           width=int(res.shape[1]), height=int(res.shape[0]))
            out.append(rec)
        return pa.Table.from_pylist(out, schema=GENERATED_SCHEMA)
