"""How NeMo runs the UNet on a GPU (SPEC.md section 6, "Numerics on a GPU"): `nemo.gpu_numerics`.

- `autocast` *(ref, default)*: fp32 UNet (and text-encoder) weights, every UNet and to_v call under
  `torch.autocast("cuda", dtype=torch.float16)`, x_T in fp32, so `delta = eps - x_T` subtracts an
  fp32 x_T from the fp16 prediction (in fp32). The activation statistic is averaged over tokens in
  fp16, as the reference's hook output is. The model must be loaded in float32 for this.
- `native`: the UNet runs in its weights' own dtype and x_T is cast to it: with the default GPU
  load (fp16, SPEC 9) that is pure fp16, which gives different noise differences.

Autocast is a CUDA-only part of the reference; on the CPU both settings run the weights as they
are (fp32 there), so they give identical results.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

AUTOCAST = "autocast"
NATIVE = "native"
GpuNumerics = Literal["autocast", "native"]
NUMERICS = (AUTOCAST, NATIVE)


def uses_autocast(device: torch.device, numerics: str) -> bool:
    """Whether calls on `device` run under fp16 autocast for this setting."""
    if numerics not in NUMERICS:
        raise ValueError(f"nemo.gpu_numerics must be one of {NUMERICS}, got {numerics!r}")
    return numerics == AUTOCAST and torch.device(device).type == "cuda"


def check_weights(device: torch.device, dtype: torch.dtype, numerics: str, what: str = "UNet") -> None:
    """The reference's GPU numerics need fp32 weights: fp16 weights cannot be turned back into them."""
    if uses_autocast(device, numerics) and dtype != torch.float32:
        raise ValueError(
            f"nemo.gpu_numerics='autocast' (the reference's: fp32 weights under fp16 autocast, fp32 x_T) "
            f"needs the model loaded in float32 on the GPU, but its {what} is {str(dtype).replace('torch.', '')}: "
            "load it in float32 (fbmem.pipelines.diffusion_models.load_nemo_pipeline does), or set nemo.gpu_numerics=native "
            "to run the loaded weights as they are (not the reference's numerics)"
        )


def compute_dtype(module: torch.nn.Module, numerics: str) -> torch.dtype:
    """The dtype inputs (x_T, text embeddings) are given to `module`: fp32 under autocast, else the weights'."""
    p = next(module.parameters())
    check_weights(p.device, p.dtype, numerics)
    return torch.float32 if uses_autocast(p.device, numerics) else p.dtype


@contextlib.contextmanager
def autocast_for(module: torch.nn.Module, numerics: str) -> Iterator[bool]:
    """fp16 autocast around calls of `module` when the setting asks for it on its (CUDA) device."""
    p = next(module.parameters())
    if uses_autocast(p.device, numerics):
        check_weights(p.device, p.dtype, numerics)
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            yield True
    else:
        yield False
