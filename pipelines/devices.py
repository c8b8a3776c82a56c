"""Where a model runs, decided where it runs.

`pick_device` is called inside actor constructors, never on the driver: the driver may sit on a
CPU-only head node while the actor lands on a GPU worker (and Ray hides GPUs from actors that did
not ask for one through CUDA_VISIBLE_DEVICES), so only the actor's own process can tell.
"""
from __future__ import annotations

import torch

DEVICE_SETTINGS = ("auto", "cpu", "cuda")


def pick_device(setting: str = "auto") -> torch.device:
    """`auto`: CUDA when this process sees a GPU, else CPU; `cuda` insists and fails loudly."""
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"resources.device must be one of {DEVICE_SETTINGS}, got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if setting == "cuda" and not has_cuda:
        raise RuntimeError(
            "resources.device is 'cuda' but this process sees no CUDA GPU "
            "(torch.cuda.is_available() is False). Give the actor pool num_gpus > 0, "
            "or set resources.device to 'auto' or 'cpu'."
        )
    return torch.device("cuda") if has_cuda else torch.device("cpu")
