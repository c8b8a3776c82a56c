"""Pairs/s of the batched region scorer vs the reference-style per-pair loop, same pairs, same run.

Two pair layouts, both metrics:
- distinct: pair i = (gen i, train i), no image shared (the batched path can only batch);
- candidates: each generation against k training candidates via gen_idx / train_idx (the scan's
  layout: a generation's views and statistics are computed once per chunk, not per candidate).
The loop's cost does not depend on the layout. Checks that batched and loop scores agree.

On the CPU the batched scorer takes as many pairs per call as fit in its CPU block. Like the label
job's scoring actors, the bench first makes the process keep freed memory
(jobs/runtime/cpu_allocator.py), which lets a call hold the whole chunk; that setting is process-wide, so
the per-pair loop gets it too and the ratio is about batching alone. `--default-allocator` skips
it (1 pair per call at 512 px, see region_similarity.CPU_BLOCK_BYTES); MALLOC_* variables set in
the environment are printed in the header.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/score.py [--size 512] [--pairs 32] [--threads N]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fbmem.jobs.core.region_similarity import score_pair_loop, score_pairs  # noqa: E402
from fbmem.jobs.runtime.cpu_allocator import (  # noqa: E402
    default_cpu_block_bytes,
    retain_freed_memory,
)


def smooth_images(n: int, size: int, gen: torch.Generator, channels: int = 3) -> torch.Tensor:
    """Structured random images (smooth noise at two scales), not flat colours."""
    coarse = F.interpolate(torch.rand(n, channels, size // 32, size // 32, generator=gen),
                           size=(size, size), mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.rand(n, channels, size // 4, size // 4, generator=gen),
                         size=(size, size), mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * fine).clamp(0, 1).contiguous()


def make_data(n_gen: int, n_train: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gx = smooth_images(n_gen, size, g)
    tx = smooth_images(n_train, size, g)
    tx[: min(n_gen, n_train)] = (0.5 * tx[: min(n_gen, n_train)] + 0.5 * gx[: min(n_gen, n_train)])
    gm = (smooth_images(n_gen, size, g, 1) > 0.5).float()
    tm = (smooth_images(n_train, size, g, 1) > 0.5).float()
    return gx, gm, tx, tm


def timed_pair(loop_fn, batched_fn, rounds: int):
    """Alternate loop and batched runs and keep each one's fastest round (wall, with its CPU time).

    Alternating spreads load from other processes over both sides; CPU time (all threads) is the
    steadier number when other processes share the cores."""
    best = {"loop": (float("inf"), 0.0, None), "batched": (float("inf"), 0.0, None)}
    for _ in range(rounds):
        for name, fn in (("loop", loop_fn), ("batched", batched_fn)):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if wall < best[name][0]:
                best[name] = (wall, cpu, out)
    return best["loop"], best["batched"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=8, help="candidates per generation (candidates layout)")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--metrics", default="region,masked-view")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest of each side counts")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc returning freed memory to the OS (1 pair per CPU call)")
    args = ap.parse_args()
    retained = False if args.default_allocator else retain_freed_memory()
    torch.set_num_threads(args.threads)
    print(f"size={args.size} pairs={args.pairs} candidates/gen={args.candidates} chunk={args.chunk_size} "
          f"threads={torch.get_num_threads()} device={args.device} torch={torch.__version__} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    per_call = args.chunk_size
    if args.device == "cpu":
        per_call = max(1, min(args.chunk_size, default_cpu_block_bytes() // (3 * 3 * args.size * args.size * 4)))
    print(f"pairs per batched call: {per_call} (CPU block {default_cpu_block_bytes() >> 20} MB, freed memory "
          f"{'retained' if retained else 'returned to the OS'}); malloc env: {malloc_env or 'default'}")

    n = args.pairs
    n_gen_c = max(1, n // args.candidates)
    gx, gm, tx, tm = make_data(n, n, args.size)
    cand_g = torch.arange(n) // args.candidates % n_gen_c  # generation of each pair
    cand_t = torch.arange(n)  # every pair a different training image
    layouts = {
        "distinct": {},
        "candidates": {"gen_idx": cand_g, "train_idx": cand_t},
    }
    kw = dict(device=args.device)
    block = default_cpu_block_bytes()
    for metric in args.metrics.split(","):
        # warm-up (allocator, conv algorithm choice) on a few pairs, not timed
        score_pairs(gx[:2], gm[:2], tx[:2], tm[:2], metric=metric, chunk_size=args.chunk_size, cpu_block_bytes=block, **kw)
        score_pair_loop(gx[:1], gm[:1], tx[:1], tm[:1], metric=metric, **kw)
        for name, idx in layouts.items():
            (t_loop, c_loop, ref), (t_bat, c_bat, got) = timed_pair(
                lambda: score_pair_loop(gx, gm, tx, tm, metric=metric, **idx, **kw),
                lambda: score_pairs(gx, gm, tx, tm, metric=metric, chunk_size=args.chunk_size, cpu_block_bytes=block,
                                    **idx, **kw),
                args.rounds)
            err = max((got[k] - ref[k]).abs().max().item() for k in ("full", "fg", "bg"))
            print(f"{metric:12s} {name:10s} loop {n / t_loop:6.2f} pairs/s  batched {n / t_bat:6.2f} pairs/s  "
                  f"ratio {t_loop / t_bat:5.2f}x (cpu-time ratio {c_loop / c_bat:5.2f}x)  "
                  f"max|batched-loop| {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
