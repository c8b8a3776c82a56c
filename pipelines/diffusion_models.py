"""The audited text-to-image model: a diffusers Stable-Diffusion-style pipeline.

Real models load by hub id or local folder with `from_pretrained` (safetensors only, no safety
checker: the audit must see what the model makes). The tiny model is built from configs with
seeded random weights: the same UNet2DConditionModel / AutoencoderKL / CLIPTextModel classes as
Stable Diffusion, so every code path (generation, cross-attention hooks, NeMo) runs offline. The
CLIP BPE tokenizer is built from the vocabulary file open_clip ships, so nothing downloads.
"""
from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fbmem.jobs.config import DiffusionConfig

log = logging.getLogger(__name__)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> unicode map (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def offline_clip_tokenizer(model_max_length: int = 77):
    """The CLIP ViT-L/14 tokenizer (49,408 tokens), built without the network."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny text-to-image model (TOY.md's prototype is a slightly larger one)."""

    image_size: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_tokens: int = 77


def build_tiny_components(seed: int = 0, spec: TinySpec = TinySpec()) -> dict:
    """UNet, VAE, text encoder, tokenizer and DDIM scheduler with seeded random weights.

    Attention sits in every down block and the mid block, so `attn2.to_v` layers exist where
    SD 1.4 has them (down blocks + mid block), at a tiny width.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(spec.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
            block_out_channels=spec.vae_channels, layers_per_block=1, norm_num_groups=8,
            sample_size=spec.image_size,
        )
        unet = UNet2DConditionModel(
            sample_size=spec.image_size // 2 ** (len(spec.vae_channels) - 1),
            in_channels=spec.latent_channels, out_channels=spec.latent_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",) if n > 1 else ("CrossAttnDownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1) if n > 1 else ("CrossAttnUpBlock2D",),
            block_out_channels=spec.unet_channels, layers_per_block=spec.layers_per_block,
            cross_attention_dim=spec.cross_attention_dim, attention_head_dim=spec.attention_head_dim,
            norm_num_groups=8,
        )
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=spec.text_width, intermediate_size=spec.text_width * 4,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.max_tokens, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval(),
            "tokenizer": offline_clip_tokenizer(spec.max_tokens), "scheduler": scheduler}


def assemble_pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """SPEC section 9: fp16 on GPU, fp32 on CPU, unless set."""
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def load_pipeline(cfg: DiffusionConfig, device: torch.device, dtype: torch.dtype):
    """A DDIM text-to-image pipeline on `device`: the tiny one, a local folder, or a hub id."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if cfg.tiny:
        pipe = assemble_pipeline(build_tiny_components(cfg.seed))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            cfg.model, revision=cfg.revision, dtype=dtype, use_safetensors=True,
            safety_checker=None, requires_safety_checker=False,
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_text_encoder(cfg: DiffusionConfig, device: torch.device):
    """(tokenizer, text encoder) of the audited model only: clustering and NeMo statistics need
    the text side, not the UNet or the VAE."""
    if cfg.tiny:
        comps = build_tiny_components(cfg.seed)
        return comps["tokenizer"], comps["text_encoder"].to(device)
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer", revision=cfg.revision)
    enc = CLIPTextModel.from_pretrained(cfg.model, subfolder="text_encoder", revision=cfg.revision, use_safetensors=True)
    return tok, enc.to(device).eval()


def nemo_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype NeMo needs the model loaded in: float32 on a GPU under the reference's numerics
    (nemo.gpu_numerics=autocast: fp32 weights under fp16 autocast), else generation's dtype."""
    if cfg.nemo.gpu_numerics == "autocast" and torch.device(device).type == "cuda":
        return torch.float32
    return resolve_dtype(cfg.generation.dtype, torch.device(device))


def load_nemo_pipeline(cfg):
    """The configured model on the configured device in NeMo's dtype (`nemo_dtype`): the one
    loader of the NeMo jobs and the demo. `cfg` is the whole fbmem Config."""
    from fbmem.pipelines.devices import pick_device

    device = pick_device(cfg.resources.device)
    return load_pipeline(cfg.models.diffusion, device, nemo_dtype(cfg, device))
