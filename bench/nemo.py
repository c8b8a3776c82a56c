"""NeMo localization: batched speculative search vs the reference's one-candidate-per-call search.

Same tiny random model, same prompts, same statistics, in one run. For each prompt both searches
run the whole localization (detection pass, initial (theta, k) search, refinement) and must return
identical neuron sets; the table gives sequential UNet calls (the latency that matters on a GPU,
where a call on 64 candidate sets x n latents costs about what a call on one does), candidate sets
evaluated (the total compute: speculation evaluates sets it then throws away), and wall and CPU
time on this machine (CPU time, all threads, is the steadier one when other processes share the
cores).

A random-weight model memorizes nothing, so every latent is kept as "retained" and two regimes
are run:
- `default`: the SPEC threshold 0.428, which blocking neurons of a random model never reaches:
  the initial search gives up after 16 sets at theta = 1.25, k = 15, and the refinement runs
  against that set's own s(B) (the path NeMo takes when it cannot mitigate).
- `calibrated`: a threshold halfway between s(B) of the 7th and the last (theta, k) set, so the
  initial search stops part-way and the refinement drops some neurons and keeps others.

The value projections are scaled by --value-scale (default 8). With NeMo's MS-SSIM (torchmetrics
1.3.2's, SPEC 6) blocking any set of the plain random model moves s(B) by ~1e-3 in all, so its
decisions crowd within the ~1e-6 by which a UNet's float results depend on the batch size, and a
batched decision can land on the other side of the threshold than the sequential one (search.py's
docstring); louder value neurons spread s(B) ~10x wider. --value-scale 1 runs the plain model.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/nemo.py [--prompts 4] [--latents 4]
       [--batches 64,8] [--threads N] [--value-scale 8]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import time  # noqa: E402

import torch  # noqa: E402

from fbmem.jobs.config import NemoConfig  # noqa: E402
from fbmem.jobs.core.nemo.evaluator import (
    BlockingEvaluator,
    compute_stats,
    detect_prompt,
    localize_prompt,
    ms_settings,
    parts_of,
)
from fbmem.jobs.core.nemo.hooks import find_value_layers, value_activations  # noqa: E402
from fbmem.jobs.core.nemo.search import (  # noqa: E402
    n_neurons,
    select_neurons,
    set_key,
    theta_k_schedule,
)
from fbmem.pipelines.diffusion_models import TinySpec, build_tiny_components  # noqa: E402

STATS_PROMPTS = [f"a {c} {s} on {b}" for c in ("red", "blue", "green", "yellow")
                 for s in ("star", "circle", "square") for b in ("stripes", "dots", "checker")]
PROMPTS = ["a red star on stripes 3", "a photo of a blue ring", "a green hexagon on a grid",
           "a yellow cross on waves 7", "a purple diamond on dots", "an orange square on noise"]
IMAGE_SIZE = 64


def calibrated_threshold(parts, stats, text: str, nemo: NemoConfig) -> float:
    setup = detect_prompt(parts, text, nemo, IMAGE_SIZE)
    layers = find_value_layers(parts.unet)
    ev = BlockingEvaluator(parts.unet, layers, setup.latents, setup.t1, setup.cond, setup.delta, ms_settings(nemo))
    acts = {i: a[0] for i, a in value_activations(parts.unet, setup.cond, layers).items()}
    vals = ev([select_neurons(acts, stats, th, k) for th, k in theta_k_schedule()])
    return (vals[6] + vals[-1]) / 2


def run_one(parts, stats, text: str, nemo: NemoConfig, threshold: float, batched: bool):
    keep = torch.ones(nemo.n_latents, dtype=torch.bool)
    t0, c0 = time.perf_counter(), time.process_time()
    loc = localize_prompt(parts, text, stats, nemo, IMAGE_SIZE, batched=batched, retained=keep, threshold=threshold)
    return loc, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--latents", type=int, default=4, help="n latents (SPEC: 10)")
    ap.add_argument("--batches", default="64,8", help="candidate sets per batched call (nemo.refine_batch)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--value-scale", type=float, default=8.0, help="scale of the value projections (1: plain model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    comps = build_tiny_components(seed=0, spec=TinySpec())
    with torch.no_grad():
        for layer in find_value_layers(comps["unet"]):
            layer.module.weight.mul_(args.value_scale)
    parts = parts_of(comps)
    stats = compute_stats(parts, STATS_PROMPTS, source="bench")
    layers = find_value_layers(parts.unet)
    print(f"tiny UNet: {len(layers)} value layers, {sum(l.out_features for l in layers)} neurons; "
          f"{args.latents} latents; value scale {args.value_scale:g}; torch threads {torch.get_num_threads()}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; device cpu")
    hdr = (f"{'regime':10s} {'prompt':28s} {'mode':8s} {'calls':>6s} {'sets':>6s} {'wall s':>7s} "
           f"{'theta':>5s} {'k':>3s} {'init':>5s} {'final':>5s} {'decis':>5s} {'drops':>5s}  same")
    print(hdr)
    print("-" * len(hdr))
    totals: dict[tuple[str, str], list[float]] = {}
    all_same = True
    for regime in ("default", "calibrated"):
        for text in PROMPTS[: args.prompts]:
            base = NemoConfig(n_latents=args.latents)
            thr = base.threshold if regime == "default" else calibrated_threshold(parts, stats, text, base)
            ref, ref_wall, ref_cpu = run_one(parts, stats, text, base, thr, batched=False)
            rows = [("seq", ref, ref_wall, ref_cpu)]
            for b in batches:
                cfg = NemoConfig(n_latents=args.latents, refine_batch=b)
                loc, wall, cpu = run_one(parts, stats, text, cfg, thr, batched=True)
                rows.append((f"b={b}", loc, wall, cpu))
            for mode, loc, wall, cpu in rows:
                r = loc.result
                same = (set_key(r.initial.sets) == set_key(ref.result.initial.sets)
                        and set_key(r.refined.sets) == set_key(ref.result.refined.sets))
                all_same &= same
                t = totals.setdefault((regime, mode), [0, 0, 0.0, 0.0])
                t[0] += loc.unet_calls
                t[1] += loc.sets_evaluated
                t[2] += wall
                t[3] += cpu
                print(f"{regime:10s} {text[:28]:28s} {mode:8s} {loc.unet_calls:6d} {loc.sets_evaluated:6d} "
                      f"{wall:7.2f} {r.initial.theta:5.2f} {r.initial.k:3d} {n_neurons(r.initial.sets):5d} "
                      f"{n_neurons(r.refined.sets):5d} {r.refined.decisions:5d} {r.refined.drops:5d}  {same}")
    print()
    print(f"{'regime':10s} {'mode':8s} {'UNet calls':>10s} {'calls ratio':>11s} {'sets':>6s} {'sets ratio':>10s} "
          f"{'wall s':>7s} {'wall ratio':>10s} {'cpu s':>7s} {'cpu ratio':>9s}   (ratio = one-at-a-time / this)")
    for regime in ("default", "calibrated"):
        c0, s0, w0, u0 = totals[(regime, "seq")]
        for mode in ["seq"] + [f"b={b}" for b in batches]:
            c, s, w, u = totals[(regime, mode)]
            print(f"{regime:10s} {mode:8s} {c:10.0f} {c0 / c:10.1f}x {s:6.0f} {s0 / s:9.2f}x {w:7.2f} {w0 / w:9.2f}x "
                  f"{u:7.2f} {u0 / u:8.2f}x")
    print(f"\nidentical neuron sets (initial and refined) in every run: {all_same}")


if __name__ == "__main__":
    main()
