"""Toy model training: one process with N torch threads vs N data-parallel single-thread processes.

Both run the same UNet training step of the default toy spec (16 x 16 latents, frozen-encoder
conditioning of shape [B, 77, 64]) on the full batch; the data-parallel run gives each rank 1/N of
it and averages gradients with DistributedDataParallel (gloo), as `train_toy_model` does. Median
seconds per step over `--steps` after 2 warm-up steps, and the ratio, measured in the same run.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/toy_train.py [--steps 12] [--processes 2]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fbmem.jobs.toy.data_parallel import run_data_parallel  # noqa: E402
from fbmem.jobs.toy.train import ToyTrainSpec, build_toy_components  # noqa: E402


def step_times(rank: int, world: int, payload: dict) -> list[float]:
    """Seconds per UNet training step on this rank's share of the batch (world 1: in-process)."""
    spec = ToyTrainSpec()
    unet = build_toy_components(spec, 64)["unet"].train()
    net = unet
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    b = payload["batch"] // world
    x = torch.randn(b, spec.latent_channels, 16, 16, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    c = torch.randn(b, spec.max_tokens, spec.text_width, generator=g)
    out = []
    for _ in range(payload["steps"] + 2):
        t0 = time.perf_counter()
        loss = F.mse_loss(net(x, t, encoder_hidden_states=c).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    batch = ToyTrainSpec().unet_batch
    payload = {"batch": batch, "steps": args.steps}
    torch.set_num_threads(args.processes)
    threads = statistics.median(step_times(0, 1, payload))
    ranks = statistics.median(run_data_parallel("bench.toy_train:step_times", args.processes, payload))
    print(f"UNet step, batch {batch}: 1 process x {args.processes} threads {threads:.3f} s; "
          f"{args.processes} processes x 1 thread {ranks:.3f} s; speed-up {threads / ranks:.2f}x")


if __name__ == "__main__":
    main()
