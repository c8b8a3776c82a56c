"""Wen et al.'s memorization detector (ICLR 2024, "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models"), beside NeMo's (SPEC 6).

Why it works: classifier-free guidance moves a sample by the text-conditional part of the noise
prediction, `eps(x_t, c_p) - eps(x_t, c_empty)`. For a memorized prompt the text pulls every
starting noise towards the one training image, so that part is large from the first steps on;
for an ordinary prompt it stays small. The score needs no image and no training data: only the
two noise predictions CFG evaluates anyway, at the first sampling steps of a few seeds.

- `text_noise_norms`: the L2 norm of the text-conditional prediction per sample and step (the
  authors' `noise_pred_text.norm(p=2)` over channels and pixels, their `track_noise_norm`);
- `wen_scores`: a prompt's score, the mean of those norms over its seeds and steps (their
  det_mem_viz notebook: mean over generations, then over steps; the same mean on a full grid);
- `guided_first_steps`: the first DDIM steps of generation with CFG, as diffusers'
  StableDiffusionPipeline takes them (one UNet batch of [uncond, cond] per step, the guided
  prediction fed to the scheduler with eta 0), returning the norms of every step and the number
  of UNet evaluations.

Pure torch (and diffusers' scheduler): the actor (jobs/model_actors.DiffusionWorker.wen_detect)
builds the latents and embeddings, and the job (jobs/detect.py) writes the rows.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from fbmem.jobs.core.nemo.numerics import NATIVE, autocast_for, compute_dtype


def text_noise_norms(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """|| eps_cond - eps_uncond ||_2 over the last three dims (channels, height, width), in float32.

    [..., C, h, w] -> [...]: any leading dims (samples, steps) are kept.
    """
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"conditional {tuple(eps_cond.shape)} and unconditional {tuple(eps_uncond.shape)} "
                         "noise predictions differ in shape")
    if eps_cond.dim() < 3:
        raise ValueError(f"noise predictions need [..., C, h, w], got shape {tuple(eps_cond.shape)}")
    diff = eps_cond.float() - eps_uncond.float()
    return torch.linalg.vector_norm(diff.flatten(-3), ord=2, dim=-1)


def wen_scores(norms: torch.Tensor) -> torch.Tensor:
    """A prompt's score from its norms [P, seeds, steps]: the mean over seeds and steps -> [P].

    Non-finite norms (a UNet overflow) make the score NaN rather than a plausible number.
    """
    if norms.dim() != 3 or 0 in norms.shape:
        raise ValueError(f"norms must be [prompts, seeds, steps] with none empty, got shape {tuple(norms.shape)}")
    return norms.float().mean(dim=(1, 2))


@torch.no_grad()
def guided_first_steps(
    unet: torch.nn.Module,
    scheduler_config: Mapping,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    schedule_steps: int,
    n_steps: int,
    guidance: float,
    numerics: str = NATIVE,
) -> tuple[torch.Tensor, int]:
    """The first `n_steps` of the `schedule_steps`-step DDIM schedule, with CFG as in generation.

    latents [N, C, h, w] are x_T (DDIM's init_noise_sigma is 1); cond [N, T, D] (or [1, T, D],
    broadcast) the prompts' embeddings and uncond [1, T, D] the empty prompt's. At each step one
    UNet call evaluates the 2N rows [uncond; cond] (the pipeline's order), and the step takes
    `uncond + guidance * (cond - uncond)` (the conditional prediction alone when guidance <= 1, as
    the pipeline does without CFG). `numerics`: nemo.gpu_numerics (numerics.py), how the model
    loaded for the NeMo workers runs on a GPU; on the CPU both settings are the same.

    Returns the norms [N, n_steps] (`text_noise_norms` of each step) and the UNet evaluations
    spent: 2N per step, one per row of the UNet batch.
    """
    from diffusers import DDIMScheduler

    if not 1 <= n_steps <= schedule_steps:
        raise ValueError(f"n_steps must be in 1..{schedule_steps} (the schedule's steps), got {n_steps}")
    n = latents.shape[0]
    if cond.shape[0] == 1 and n > 1:
        cond = cond.expand(n, *cond.shape[1:])
    if cond.shape[0] != n or uncond.shape[0] != 1:
        raise ValueError(f"{cond.shape[0]} prompt embeddings and {uncond.shape[0]} empty-prompt embeddings "
                         f"for {n} latents (need {n} and 1)")
    p = next(unet.parameters())
    dtype = compute_dtype(unet, numerics)
    sched = DDIMScheduler.from_config(dict(scheduler_config))
    sched.set_timesteps(schedule_steps)
    x = latents.to(device=p.device, dtype=dtype) * sched.init_noise_sigma
    emb = torch.cat([uncond.to(device=p.device, dtype=dtype).expand(n, *uncond.shape[1:]),
                     cond.to(device=p.device, dtype=dtype)])
    norms = []
    for t in sched.timesteps[:n_steps]:
        x_in = sched.scale_model_input(torch.cat([x, x]), t)
        with autocast_for(unet, numerics):
            eps = unet(x_in, t, encoder_hidden_states=emb).sample
        eps_u, eps_c = eps.chunk(2)
        norms.append(text_noise_norms(eps_c, eps_u))
        guided = eps_u + guidance * (eps_c - eps_u) if guidance > 1.0 else eps_c
        x = sched.step(guided.to(x.dtype), t, x, eta=0.0).prev_sample
    return torch.stack(norms, dim=1), 2 * n * n_steps
