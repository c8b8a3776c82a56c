"""The one prompt encoder: clustering (SPEC 5), NeMo (SPEC 6) and the toy model's training
conditioning embed a prompt the way generation does, i.e. as diffusers'
`StableDiffusionPipeline.encode_prompt` (no clip_skip, no LoRA scale) does:

- tokens padded to the tokenizer's max length and truncated there;
- the attention mask is passed only when the text encoder's config says `use_attention_mask`
  (CLIP's does not: SD's padded positions are attended to, which changes their hidden states);
- the text encoder's last hidden state, in the encoder's dtype, on the encoder's device.

Pure torch (jobs.core): the pipelines layer may not import jobs, and needs no encoder of its own.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str], *,
                   batch_size: int = 64) -> torch.Tensor:
    """Text-encoder last hidden states [N, T, D] as StableDiffusionPipeline.encode_prompt computes them.

    The empty prompt is allowed (it is the unconditional branch); anything not a string is an error.
    """
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; not at positions {bad[:10]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dev = next(text_encoder.parameters()).device
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    out = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(dev) if use_mask else None
        out.append(text_encoder(tok.input_ids.to(dev), attention_mask=mask)[0])
    if not out:
        p = next(text_encoder.parameters())
        return torch.empty(0, tokenizer.model_max_length, text_encoder.config.hidden_size, dtype=p.dtype, device=dev)
    return torch.cat(out)
