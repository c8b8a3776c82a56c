"""`fbmem toy train`: a tiny text-to-image latent diffusion model that really memorizes the toy corpus.

Why it exists: the audit (FB-Mem labels, NeMo, NeMo-C) needs a model whose memorization is known.
Trained on the toy corpus (jobs/toy/corpus.py) for a fixed number of steps on two CPU cores, this
model reproduces the planted VM images and not the NM ones (docs/TOY.md), and it is saved as an
ordinary Stable-Diffusion-layout diffusers folder (safetensors), so every job loads it with the same
`load_pipeline` code as a real model.

Recipe (docs/TOY.md, "later runs"):
1. Autoencoder (AutoencoderKL) trained as a plain autoencoder on the posterior mean, loss
   L1 + L2 + 1e-4 KL. It bounds how faithful any memorized image can look, so its reconstruction
   MS-SSIM is measured and recorded.
2. Latents of every training image (posterior mean), scaled by 1 / std as Stable Diffusion does
   (`vae.config.scaling_factor`), so the pipeline's decode path works unchanged.
3. UNet2DConditionModel, epsilon prediction, DDPM noise schedule equal to the DDIM sampling one
   (scaled_linear 0.00085..0.012, 1000 steps), cross-attention only at 8x8, 4x4 and the mid block,
   10% caption dropout (so classifier-free guidance has an unconditional branch to contrast).
   The text encoder stays frozen at its random init by default, as in Stable Diffusion: the UNet's
   `attn2.to_v` layers then carry the memorization that NeMo localizes (TOY.md).

Reproducibility: all weights come from seeded builders, and every random draw of training (data
order, noise, timesteps, caption dropout) comes from one `torch.Generator` seeded by the spec, so
the same spec, corpus and process count give the same weights. A fixed step count (never a time
cap) keeps that true on a slower machine. Training runs as data-parallel processes of one thread
each (torch.distributed, gloo): on 2 CPU cores that is 1.7x faster than one 2-thread process.

CPU note: libgomp reads OMP_WAIT_POLICY when torch is first imported. Busy-waiting threads made
2-thread training 10-30x slower when another process held a core (TOY.md), so the entry point
must set `OMP_WAIT_POLICY=PASSIVE` before importing torch; this module sets it as a default for
processes that import it first.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fbmem.jobs.toy.corpus import ToyCorpus  # noqa: E402

log = logging.getLogger(__name__)

META_NAME = "toy_train.json"
# Bump when the training code changes what a spec produces: cached models then retrain.
RECIPE_VERSION = 2
SCORE_SIDE = 192  # TOY.md's measurements: 64 px images upsampled to 192 px for 5-scale MS-SSIM
_NORM_GROUPS = 8
_SSIM_WIN = 7  # an 11-px window is a sixth of a 64 px toy image


# ------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ToyTrainSpec:
    """Sizes, steps and optimizer settings of the toy model. Defaults: docs/TOY.md's later runs."""

    seed: int = 0
    # autoencoder: channels (16, 32, 64) downsample x4 -> 4 x 16 x 16 latents for 64 px images
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 450
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    # + weight * (1 - SSIM) (pytorch-msssim, window 7 at 64 px): the audit judges memorization by
    # MS-SSIM, and the autoencoder's reconstruction bounds every score (0 = TOY.md's L1 + L2 only)
    vae_ssim_weight: float = 1.0  # FM fg region ceiling 0.797 -> 0.814, BM bg 0.891 -> 0.933 (medians)
    # UNet: `unet_attention[i]` puts cross-attention in down block i (and its mirror up block);
    # the mid block always has it. Default: none at 16x16, attention at 8x8 and 4x4.
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_heads: int = 2
    # 850: demo (colour masks, ANN candidates, 20 samples per group) FM 45% -> 75% FM, BM 15% -> 45%
    # BM, NeMo detection AUC 0.922 -> 1.000 against 650 steps; about 85 s more on 2 cores
    unet_steps: int = 850
    unet_batch: int = 64
    # Measured (frozen encoder, 1,000 steps, 16 VM generations, exact masks): 1e-3 gave VM full > 0.8
    # in 56-69% (seeds 0 / 1, 2 threads) and VM labels 10/16; 2e-3 gave 62-88% and 13-14/16, with NM
    # labels still 55-56 of 64 NM. Variance across seeds is as large as the lr effect.
    unet_lr: float = 2e-3
    warmup_steps: int = 20  # then cosine decay to 0 (both stages)
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    # text encoder (a small CLIPTextModel, CLIP tokenizer); frozen = kept at its seeded random init
    frozen_text_encoder: bool = True
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    # Prompt length in tokens (CLIP's is 77). The longest toy caption is 11 tokens; 24 makes a
    # UNet step 12% faster than 77 (cross-attention keys and values over 24 tokens, not 77).
    max_tokens: int = 24

    def __post_init__(self) -> None:
        for name in ("vae_channels", "unet_channels", "unet_attention"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("latent_channels", "vae_steps", "vae_batch", "layers_per_block", "attention_heads",
                     "unet_steps", "unet_batch", "text_width", "text_layers", "text_heads", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vae_lr", "unet_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("vae_kl_weight", "vae_ssim_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.vae_channels or not self.unet_channels:
            raise ValueError("vae_channels and unet_channels must not be empty")
        for name in ("vae_channels", "unet_channels"):
            bad = [c for c in getattr(self, name) if c < 1 or c % _NORM_GROUPS]
            if bad:
                raise ValueError(f"{name} must be positive multiples of {_NORM_GROUPS} (group norm), got {bad}")
        if len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(f"unet_attention has {len(self.unet_attention)} entries for "
                             f"{len(self.unet_channels)} UNet blocks")
        if not any(self.unet_attention):
            raise ValueError("unet_attention must put cross-attention in at least one down block "
                             "(NeMo's neurons are the down blocks' and mid block's attn2.to_v)")
        bad = [c for c, a in zip(self.unet_channels, self.unet_attention) if a and c % self.attention_heads]
        if bad or self.unet_channels[-1] % self.attention_heads:
            raise ValueError(f"attention channels {bad or [self.unet_channels[-1]]} are not divisible "
                             f"by attention_heads={self.attention_heads}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")

    def to_json(self) -> dict:
        """JSON-normal form (tuples as lists), the form compared against a cached model's record."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> ToyTrainSpec:
        """A spec from `to_json`'s form (or any subset of fields); unknown keys are an error."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ToyTrainSpec fields: {unknown}")
        return cls(**data)


# ------------------------------------------------------------------------------------------- model


def _check_corpus(corpus: ToyCorpus, spec: ToyTrainSpec) -> int:
    """The image side; the autoencoder must divide it into a whole latent grid the UNet can halve."""
    if not corpus.images:
        raise ValueError("the corpus has no training images")
    size = int(corpus.images[0].image.shape[0])
    down_vae = 2 ** (len(spec.vae_channels) - 1)
    down_unet = 2 ** (len(spec.unet_channels) - 1)
    if size % (down_vae * down_unet):
        raise ValueError(f"image size {size} is not divisible by the autoencoder's x{down_vae} and the "
                         f"UNet's x{down_unet} downsampling")
    return size


def build_toy_components(spec: ToyTrainSpec, image_size: int) -> dict:
    """Seeded untrained components: VAE, text encoder, tokenizer and DDIM scheduler from
    `build_tiny_components`, and a UNet whose cross-attention sits where `spec.unet_attention` says
    (the tiny builder's fixed layout puts it at the finest level, 2-3x slower on the CPU)."""
    from diffusers import UNet2DConditionModel

    from fbmem.pipelines.diffusion_models import TinySpec, build_tiny_components

    tiny = TinySpec(
        image_size=image_size, latent_channels=spec.latent_channels, vae_channels=spec.vae_channels,
        unet_channels=spec.unet_channels, layers_per_block=spec.layers_per_block,
        cross_attention_dim=spec.text_width, attention_head_dim=spec.attention_heads,
        text_width=spec.text_width, text_layers=spec.text_layers, text_heads=spec.text_heads,
        max_tokens=spec.max_tokens,
    )
    comps = build_tiny_components(spec.seed, tiny)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + 1)
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.unet_attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.unet_attention))
        comps["unet"] = UNet2DConditionModel(
            sample_size=image_size // 2 ** (len(spec.vae_channels) - 1),
            in_channels=spec.latent_channels, out_channels=spec.latent_channels,
            down_block_types=down, up_block_types=up, block_out_channels=spec.unet_channels,
            layers_per_block=spec.layers_per_block, cross_attention_dim=spec.text_width,
            # diffusers' historical naming: attention_head_dim is the number of heads here
            attention_head_dim=spec.attention_heads, norm_num_groups=_NORM_GROUPS,
        ).eval()
    return comps


# ------------------------------------------------------------------------------------------- data


def corpus_hash(corpus: ToyCorpus) -> str:
    """sha256 over every training image's name, caption, pixels and mask, in corpus order."""
    h = hashlib.sha256()
    for r in corpus.images:
        h.update(r.image_name.encode())
        h.update(b"\0" + r.caption.encode() + b"\0")
        h.update(np.ascontiguousarray(r.image).tobytes())
        h.update(np.ascontiguousarray(r.mask, dtype=np.float32).tobytes())
    return h.hexdigest()


def _images_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 -> float [N,3,H,W] in [-1, 1] (the VAE's range)."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0).contiguous()


def _unique_images(corpus: ToyCorpus) -> tuple[list[np.ndarray], list[int]]:
    """Distinct images and, per corpus image, its index among them (VM copies share one)."""
    index: dict[bytes, int] = {}
    uniq: list[np.ndarray] = []
    of: list[int] = []
    for r in corpus.images:
        key = hashlib.sha256(np.ascontiguousarray(r.image).tobytes()).digest()
        if key not in index:
            index[key] = len(uniq)
            uniq.append(r.image)
        of.append(index[key])
    return uniq, of


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless seeded epochs of a random permutation, cut into batches (wrapping across epochs)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while buf.numel() < batch:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch]
        buf = buf[batch:]


def _optimizer(params, lr: float, steps: int, warmup: int):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return opt, get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(warmup, steps // 2),
                                                num_training_steps=steps)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads for the block only (training sets them; the caller's are restored)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------- training


class _AutoencoderPass(torch.nn.Module):
    """Encode to the posterior, decode its mean: one module call, so DistributedDataParallel can
    hook the whole autoencoder step (it syncs gradients of what runs inside `forward`)."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.vae.encode(x).latent_dist
        return self.vae.decode(post.mean).sample, post.kl()


def _data_parallel(module: torch.nn.Module, world: int) -> torch.nn.Module:
    """`module` itself on one process, else wrapped in DistributedDataParallel (gloo, CPU): every
    rank then steps with the gradient averaged over all ranks' shares of the batch."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)


def _batch_mean(value: torch.Tensor, world: int) -> float:
    """A loss over the whole batch: each rank's loss is the mean over its equal share."""
    value = value.detach()
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return float(value)


def _share(n: int, rank: int, world: int) -> slice:
    """This rank's rows of a batch of n (n is a multiple of world, checked by train_toy_model)."""
    k = n // world
    return slice(rank * k, (rank + 1) * k)


def _train_vae(vae, images: torch.Tensor, rows: torch.Tensor, spec: ToyTrainSpec, gen: torch.Generator,
               log_every: int, rank: int = 0, world: int = 1) -> list[float]:
    """Plain autoencoder on the posterior mean: L1 + L2 + kl_weight * KL (+ ssim_weight * (1 - SSIM)).
    Returns the per-step reconstruction loss (L1 + L2) over the whole batch.

    Batches are drawn over the corpus as given (`rows`: corpus image -> distinct image), VM
    copies included, as an autoencoder trained on a real crawl sees its duplicates: the
    duplicated images get the most faithful reconstructions, and those bound how verbatim a
    memorized generation can look. Every rank draws the whole batch from the same generator and
    trains on its share, so the draws do not depend on the number of processes."""
    from pytorch_msssim import ssim

    vae.train()
    step_fn = _data_parallel(_AutoencoderPass(vae), world)
    opt, sched = _optimizer(vae.parameters(), spec.vae_lr, spec.vae_steps, spec.warmup_steps)
    order = _batches(rows.numel(), spec.vae_batch, gen)
    mine = _share(spec.vae_batch, rank, world)
    losses: list[float] = []
    for step in range(spec.vae_steps):
        x = images[rows[next(order)[mine]]]
        rec, kl = step_fn(x)
        recon = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = recon + spec.vae_kl_weight * kl.mean()
        if spec.vae_ssim_weight:
            s = ssim((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2, data_range=1.0, win_size=_SSIM_WIN)
            loss = loss + spec.vae_ssim_weight * (1 - s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        losses.append(_batch_mean(recon, world))
        if log_every and (step + 1) % log_every == 0:
            log.info("autoencoder step %d/%d recon loss %.4f", step + 1, spec.vae_steps, losses[-1])
    vae.eval()
    return losses


@torch.no_grad()
def _encode_means(vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def _tensor_to_u8(x: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] [N,3,H,W] -> uint8 HxWx3 arrays (the form the region scorer resizes)."""
    return list(x.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())


@torch.no_grad()
def _reconstruction_ms_ssim(vae, images: torch.Tensor, latents: torch.Tensor, masks: Sequence[np.ndarray]) -> list[float]:
    """MS-SSIM at SCORE_SIDE px of each image against its reconstruction: the ceiling of any
    memorized generation's full-image score."""
    from pytorch_msssim import ms_ssim

    from fbmem.jobs.core.region_similarity import prepare_batch

    rec = torch.cat([vae.decode(latents[i:i + 32]).sample for i in range(0, len(latents), 32)])
    xa, _ = prepare_batch(_tensor_to_u8(images), list(masks), SCORE_SIDE)
    xb, _ = prepare_batch(_tensor_to_u8(rec), list(masks), SCORE_SIDE)
    return [float(v) for v in ms_ssim(xa, xb, data_range=1.0, size_average=False)]


def _train_unet(unet, text_encoder, latents: torch.Tensor, caption_of: torch.Tensor, cond: torch.Tensor,
                spec: ToyTrainSpec, noise_sched, gen: torch.Generator, log_every: int, rank: int = 0,
                world: int = 1) -> list[float]:
    """Epsilon-prediction training. `cond` holds the conditioning of each distinct caption with
    the empty caption last: embeddings [K+1, T, D] for a frozen encoder, token ids [K+1, T] when
    the encoder trains with the UNet. Caption dropout swaps a sample's caption for the empty one."""
    unet.train()
    params = list(unet.parameters())
    if not spec.frozen_text_encoder:
        text_encoder.train()
        params += list(text_encoder.parameters())
    net = _data_parallel(unet, world)  # a trained text encoder runs with world 1 (train_toy_model checks)
    opt, sched = _optimizer(params, spec.unet_lr, spec.unet_steps, spec.warmup_steps)
    order = _batches(latents.shape[0], spec.unet_batch, gen)
    mine = _share(spec.unet_batch, rank, world)
    empty = cond.shape[0] - 1
    n_t = noise_sched.config.num_train_timesteps
    losses: list[float] = []
    for step in range(spec.unet_steps):
        idx = next(order)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_t, (x0.shape[0],), generator=gen)
        drop = torch.rand(x0.shape[0], generator=gen) < spec.caption_dropout
        which = torch.where(drop, torch.full_like(idx, empty), caption_of[idx])
        x0, noise, t, which = x0[mine], noise[mine], t[mine], which[mine]
        states = cond[which] if spec.frozen_text_encoder else text_encoder(cond[which])[0]
        pred = net(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        sched.step()
        losses.append(_batch_mean(loss, world))
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log.info("unet step %d/%d loss %.4f (mean of last %d)", step + 1, spec.unet_steps,
                     sum(recent) / len(recent), len(recent))
    unet.eval()
    text_encoder.eval()
    return losses


def _conditioning(tokenizer, text_encoder, captions: list[str], frozen: bool) -> torch.Tensor:
    """Per distinct caption (then the empty caption, the unconditional branch): the frozen
    encoder's last hidden states, or token ids for a trained encoder. Padded to max length, as the
    pipeline encodes prompts at sampling time."""
    texts = captions + [""]
    if frozen:
        from fbmem.jobs.core.prompt_encoding import encode_prompts

        return encode_prompts(tokenizer, text_encoder, texts).float().cpu()
    tok = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return tok.input_ids


def _summary(losses: list[float], k: int = 50) -> dict:
    k = max(1, min(k, len(losses) // 2 or 1))
    return {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])), "window": k}


def _train_and_save(rank: int, world: int, corpus: ToyCorpus, spec: ToyTrainSpec, out_dir: Path,
                    log_every: int) -> dict | None:
    """One rank's whole training run: every rank builds the same seeded components, draws the same
    random numbers and trains on its share of each batch; rank 0 saves the pipeline and returns
    what the record needs (the other ranks return None)."""
    from diffusers import DDPMScheduler

    from fbmem.pipelines.diffusion_models import assemble_pipeline

    size = _check_corpus(corpus, spec)
    t_start, c_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    with _threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        comps = build_toy_components(spec, size)
        vae, unet, text, tok = comps["vae"], comps["unet"], comps["text_encoder"], comps["tokenizer"]
        text.requires_grad_(not spec.frozen_text_encoder)

        uniq, uniq_of = _unique_images(corpus)
        images = _images_tensor(uniq)
        rows = torch.tensor(uniq_of)
        t0 = time.perf_counter()
        vae_losses = _train_vae(vae, images, rows, spec, gen, log_every, rank, world)
        timings["autoencoder_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        vae.requires_grad_(False)
        means = _encode_means(vae, images)
        latents = means[rows]  # one row per training image, VM copies included
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        latents = latents * scaling
        captions = sorted({r.caption for r in corpus.images})
        caption_of = torch.tensor([captions.index(r.caption) for r in corpus.images])
        cond = _conditioning(tok, text, captions, spec.frozen_text_encoder)
        timings["latents_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        noise_sched = DDPMScheduler.from_config(comps["scheduler"].config)
        unet_losses = _train_unet(unet, text, latents, caption_of, cond, spec, noise_sched, gen, log_every,
                                  rank, world)
        timings["unet_s"] = time.perf_counter() - t0
        if rank:
            return None

        t0 = time.perf_counter()
        first: dict[int, object] = {}
        for r, u in zip(corpus.images, uniq_of):
            first.setdefault(u, r)
        recon = _reconstruction_ms_ssim(vae, images, means, [first[u].mask for u in range(len(uniq))])
        recon_groups = [first[u].planted for u in range(len(uniq))]
        text.requires_grad_(False)
        unet.requires_grad_(False)
        assemble_pipeline(comps).save_pretrained(out_dir, safe_serialization=True)
        timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return {
        "timings": timings,
        # CPU seconds of rank 0 (one thread): unlike wall time, not inflated by other processes
        # holding the cores
        "cpu_s_rank0": time.process_time() - c_start,
        "distinct_images": len(uniq), "captions": len(captions), "image_size": size,
        "scaling_factor": scaling,
        "parameters": {k: int(sum(p.numel() for p in comps[k].parameters())) for k in ("vae", "unet", "text_encoder")},
        "value_layers": _value_layer_names(unet),
        "recon": recon, "recon_groups": recon_groups,
        "vae_losses": vae_losses, "unet_losses": unet_losses,
    }


def train_rank(rank: int, world: int, payload: dict) -> dict | None:
    """One data-parallel rank of `train_toy_model` (run by fbmem.jobs.toy.data_parallel)."""
    return _train_and_save(rank, world, payload["corpus"], payload["spec"], Path(payload["out_dir"]),
                           payload["log_every"])


def train_toy_model(out_dir: Path, corpus: ToyCorpus, spec: ToyTrainSpec = ToyTrainSpec(), *,
                    log_every: int = 50, processes: int = 2) -> Path:
    """Train the autoencoder, then the UNet, on `corpus`; save a StableDiffusionPipeline folder
    (safetensors) plus `toy_train.json` (spec, corpus hash, losses, timings) in `out_dir`.

    `processes` data-parallel ranks (torch.distributed, gloo) of one torch thread each share every
    batch. Why processes and not threads: at these sizes (1.7 M parameters, 16 x 16 latents) a
    second intra-op thread made a UNet step only 1.1x faster on 2 cores, while two single-thread
    processes on half batches each ran 64 samples in 0.30 s against 0.54 s (bench/toy_train.py).
    The same spec, corpus and process count give identical weights; another count sums the
    gradient in another order, so its weights differ slightly (and the cache retrains).
    The record is written last and removed first, so a folder with a record is a complete model.
    Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    _check_corpus(corpus, spec)
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    for name in ("vae_batch", "unet_batch"):
        if getattr(spec, name) % processes:
            raise ValueError(f"{name}={getattr(spec, name)} is not divisible by processes={processes}: "
                             "each process trains on an equal share of every batch")
    if processes > 1 and not spec.frozen_text_encoder:
        raise ValueError("a trained text encoder (frozen_text_encoder=False) needs processes=1")
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log.warning("OMP_WAIT_POLICY is not PASSIVE: torch threads busy-wait and training may run "
                    "10-30x slower when another process holds a core (set it before importing torch)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_NAME).unlink(missing_ok=True)
    t_start = time.perf_counter()
    if processes == 1:
        res = _train_and_save(0, 1, corpus, spec, out_dir, log_every)
    else:
        log.info("training with %d data-parallel processes (1 torch thread each)", processes)
        from fbmem.jobs.toy.data_parallel import run_data_parallel

        res = run_data_parallel("fbmem.jobs.toy.train:train_rank", processes,
                                {"corpus": corpus, "spec": spec, "out_dir": str(out_dir), "log_every": log_every},
                                log_level=log.getEffectiveLevel())
    timings = dict(res["timings"], total_s=time.perf_counter() - t_start)
    recon, recon_groups = res["recon"], res["recon_groups"]
    vae_losses, unet_losses = res["vae_losses"], res["unet_losses"]
    record = {
        "recipe_version": RECIPE_VERSION,
        "spec": spec.to_json(),
        "processes": processes,  # gradient summation order: another count gives other weights
        "corpus_sha256": corpus_hash(corpus),
        "corpus": {"images": len(corpus.images), "distinct_images": res["distinct_images"],
                   "prompts": len(corpus.prompts), "captions": res["captions"], "image_size": res["image_size"]},
        "scaling_factor": res["scaling_factor"],
        "parameters": res["parameters"],
        "value_layers": res["value_layers"],
        "reconstruction_ms_ssim": {
            "mean": float(np.mean(recon)), "min": float(np.min(recon)), "side": SCORE_SIDE,
            "by_group": {g: float(np.mean([v for v, h in zip(recon, recon_groups) if h == g]))
                         for g in dict.fromkeys(recon_groups)},
        },
        "autoencoder_loss": _summary(vae_losses),
        "unet_loss": _summary(unet_losses),
        "losses": {"autoencoder": vae_losses, "unet": unet_losses},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "cpu_s_rank0": round(res["cpu_s_rank0"], 2),
        "versions": _versions(),
    }
    (out_dir / META_NAME).write_text(json.dumps(record, indent=1))
    log.info("toy model saved in %s: %.0f s (autoencoder %.0f s, UNet %.0f s, %d processes), reconstruction "
             "MS-SSIM %.3f, UNet loss %.4f -> %.4f", out_dir, timings["total_s"], timings["autoencoder_s"],
             timings["unet_s"], processes, record["reconstruction_ms_ssim"]["mean"], record["unet_loss"]["first"],
             record["unet_loss"]["last"])
    return out_dir


def _value_layer_names(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if n.endswith("attn2.to_v")
            and (n.startswith("down_blocks.") or n.startswith("mid_block."))]


def _versions() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------- cache


def read_record(out_dir: Path) -> dict | None:
    """The training record of a saved toy model, or None when there is none (or it is unreadable)."""
    path = Path(out_dir) / META_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def cached_model_matches(out_dir: Path, corpus: ToyCorpus, spec: ToyTrainSpec,
                         processes: int = 2) -> tuple[bool, str]:
    """(reusable, why): a cached model is reused only for the same recipe, spec, corpus content and
    process count (the count changes float summation order, hence the weights)."""
    out_dir = Path(out_dir)
    rec = read_record(out_dir)
    if rec is None:
        return False, "no training record"
    if not (out_dir / "model_index.json").exists():
        return False, "no saved pipeline"
    if rec.get("recipe_version") != RECIPE_VERSION:
        return False, f"recipe version {rec.get('recipe_version')} != {RECIPE_VERSION}"
    if rec.get("spec") != spec.to_json():
        return False, "training spec changed"
    if rec.get("corpus_sha256") != corpus_hash(corpus):
        return False, "corpus changed"
    if rec.get("processes") != processes:
        return False, f"trained with {rec.get('processes')} processes, asked for {processes}"
    return True, "spec and corpus match"


def ensure_toy_model(out_dir: Path, corpus: ToyCorpus, spec: ToyTrainSpec = ToyTrainSpec(), *,
                     log_every: int = 50, processes: int = 2) -> Path:
    """The trained toy model in `out_dir`: reused when its record matches, else (re)trained."""
    out_dir = Path(out_dir)
    ok, why = cached_model_matches(out_dir, corpus, spec, processes)
    if ok:
        log.info("reusing the toy model in %s (%s)", out_dir, why)
        return out_dir
    log.info("training the toy model in %s (%s)", out_dir, why)
    if out_dir.exists():
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)  # no stale weights under a new record
    return train_toy_model(out_dir, corpus, spec, log_every=log_every, processes=processes)


# -------------------------------------------------------------------------------- memorization check


def _u8(image: np.ndarray) -> np.ndarray:
    """float [0,1] -> uint8, rounded like diffusers' numpy_to_pil and the generation PNGs."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def score_generations(corpus: ToyCorpus, generations: Sequence[tuple[str, int, np.ndarray]], *,
                      side: int = SCORE_SIDE, tau: float = 0.8) -> dict:
    """Score generations (prompt, seed, image HxWx3 float [0,1] or uint8) against their prompt's
    own training images: full MS-SSIM and the region-metric foreground/background scores
    (`score_pairs`), at `side` px, and the FB-Mem label (most severe pair, tau for all three).

    Generations have no mask of their own; each pair uses the training image's exact mask for
    both images, i.e. it asks "is the training object's area (or the rest) reproduced here?".
    That is right for FM (one object at one place) and close for BM (objects jitter by ~3%).
    Returns {"groups": {planted: summary}, "rows": [per generation]}; per generation, full / fg /
    bg are maxima over the group's distinct training images.
    """
    from fbmem.jobs.core.label_rule import generation_label
    from fbmem.jobs.core.region_similarity import prepare_batch, score_pairs

    by_text = {p.text: p for p in corpus.prompts}
    rows: list[dict] = []
    for prompt, seed, image in generations:
        if prompt not in by_text:
            raise ValueError(f"prompt {prompt!r} is not a prompt of this corpus")
        p = by_text[prompt]
        seen: set[bytes] = set()
        train = []
        for name in p.linked:
            r = corpus.image(name)
            key = hashlib.sha256(np.ascontiguousarray(r.image).tobytes()).digest()
            if key not in seen:  # VM copies are one image
                seen.add(key)
                train.append(r)
        gen_u8 = image if image.dtype == np.uint8 else _u8(image)
        gx, gm = prepare_batch([gen_u8] * len(train), [r.mask for r in train], side)
        tx, tm = prepare_batch([r.image for r in train], [r.mask for r in train], side)
        s = score_pairs(gx, gm, tx, tm, metric="region")
        pairs = [{"full": float(f), "fg": float(g), "bg": float(b)} for f, g, b in zip(s["full"], s["fg"], s["bg"])]
        label, idx, _ = generation_label(pairs, tau_full=tau, tau_fg=tau, tau_bg=tau)
        rows.append({
            "prompt": prompt, "planted": p.planted, "group_id": p.group_id, "seed": int(seed),
            "full": max(q["full"] for q in pairs), "fg": max(q["fg"] for q in pairs),
            "bg": max(q["bg"] for q in pairs), "label": label, "closest": train[idx].image_name,
        })
    groups: dict[str, dict] = {}
    for planted in dict.fromkeys(r["planted"] for r in rows):
        g = [r for r in rows if r["planted"] == planted]
        full = np.array([r["full"] for r in g])
        groups[planted] = {
            "prompts": len({r["prompt"] for r in g}),
            "generations": len(g),
            "full_over_tau": float((full > tau).mean()),
            "full_median": float(np.median(full)),
            "fg_median": float(np.median([r["fg"] for r in g])),
            "bg_median": float(np.median([r["bg"] for r in g])),
            "labels": {lab: sum(r["label"] == lab for r in g) for lab in ("VM", "FM", "BM", "NM")},
        }
    return {"groups": groups, "rows": rows}


def memorization_check(pipe, corpus: ToyCorpus, *, groups: Sequence[str] = ("VM", "FM", "BM", "NM"),
                       seeds: Sequence[int] = (0, 1, 2, 3), steps: int = 50, guidance: float = 6.0,
                       batch_size: int = 16, side: int = SCORE_SIDE, tau: float = 0.8) -> dict:
    """Generate for every prompt of `groups` (DDIM, eta 0, one image per seed) and score each
    generation against its own prompt's training images (see `score_generations`).

    What to expect from a model that memorized: VM mostly full > 0.8, NM low; FM high foreground,
    BM high background. Adds "settings" and "generate_s" / "score_s" timings to the result.
    """
    from fbmem.pipelines.generator import generate_images

    jobs = [(p.text, int(s)) for p in corpus.prompts if p.planted in groups for s in seeds]
    if not jobs:
        raise ValueError(f"no prompts of groups {list(groups)} in the corpus")
    size = int(corpus.images[0].image.shape[0])
    t0 = time.perf_counter()
    gens: list[tuple[str, int, np.ndarray]] = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        imgs = generate_images(pipe, [j[0] for j in chunk], [j[1] for j in chunk], steps=steps,
                               guidance=guidance, size=size)
        gens += [(p, s, im) for (p, s), im in zip(chunk, imgs)]
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = score_generations(corpus, gens, side=side, tau=tau)
    out["settings"] = {"seeds": list(seeds), "steps": steps, "guidance": guidance, "side": side, "tau": tau,
                       "metric": "region", "scheduler": "ddim", "eta": 0.0}
    out["generate_s"] = round(t_gen, 2)
    out["score_s"] = round(time.perf_counter() - t0, 2)
    return out


def format_memorization(result: dict) -> str:
    """A small table of `memorization_check`'s per-group summary, for the demo to print."""
    tau = result.get("settings", {}).get("tau", 0.8)
    head = f"{'group':<6}{'gens':>6}{f'full>{tau}':>10}{'full med':>10}{'fg med':>9}{'bg med':>9}   labels"
    lines = [head]
    for planted, g in result["groups"].items():
        labels = " ".join(f"{k}:{v}" for k, v in g["labels"].items())
        lines.append(f"{planted:<6}{g['generations']:>6}{g['full_over_tau']:>10.0%}{g['full_median']:>10.3f}"
                     f"{g['fg_median']:>9.3f}{g['bg_median']:>9.3f}   {labels}")
    return "\n".join(lines)
