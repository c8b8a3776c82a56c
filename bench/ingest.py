"""Images/s of the Ray Data embedding pipeline vs a bare PyTorch loop, same model, same cores.

Both paths do the same work per image: read the file, decode and validate it, CLIP-preprocess,
embed. The bare loop is the research-code way (one process, torch using every core); the
pipeline is fbmem's (`pipelines/ingest.build_image_stream`: Ray tasks decode, an actor pool
embeds). The model defaults to ViT-B-32 with random weights (a realistic compute cost; no weights
are downloaded). Prints both rates and their ratio, measured in this run.

    OMP_WAIT_POLICY=PASSIVE python bench/ingest.py [--n 256] [--model ViT-B-32] [--cpus 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def write_images(folder: Path, n: int, side: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        f = rng.uniform(1, 8, size=3)
        img = np.stack([np.sin(2 * np.pi * (f[c] * xx + rng.random() * yy)) for c in range(3)], -1)
        arr = ((img + 1) * 127.5 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
        p = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def bare_loop(paths: list[Path], cfg, batch_size: int) -> float:
    from fbmem.pipelines.clip_embedder import embed_images, load_clip
    from fbmem.pipelines.images import decode_image

    torch.set_num_threads(cfg.resources.ray_num_cpus)
    model, preprocess, _ = load_clip(cfg.models.clip, torch.device("cpu"))
    t0 = time.perf_counter()
    done = 0
    for i in range(0, len(paths), batch_size):
        imgs = [
            decode_image(p.read_bytes(), max_pixels=cfg.ingest.max_pixels, min_side=cfg.ingest.min_side)
            for p in paths[i : i + batch_size]
        ]
        done += len(embed_images(model, preprocess, imgs, torch.device("cpu")))
    return done / (time.perf_counter() - t0)


def ray_seconds(folder: Path, cfg, n: int) -> float:
    """Wall time of the whole pipeline over `folder` (actor start and model load included)."""
    from fbmem.jobs.ingest import RowCounter
    from fbmem.jobs.runtime.ray_session import ensure_ray
    from fbmem.pipelines.ingest import build_image_stream
    from fbmem.pipelines.sources import open_source

    ensure_ray(cfg)
    t0 = time.perf_counter()
    stream = build_image_stream(open_source(str(folder), kind="folder"), cfg, set(), RowCounter.remote(), "lazy")
    done = sum(b.num_rows for b in stream.iter_batches(batch_size=256, batch_format="pyarrow"))
    assert done == n, (done, n)
    return time.perf_counter() - t0


def ray_pipeline(small: Path, n_small: int, full: Path, n_full: int, cfg) -> float:
    """Steady-state images/s: the difference of two runs (n_full and n_small images) cancels the
    one-off costs (actor start, model load) that the bare loop does not pay inside its clock."""
    import ray

    t_small = ray_seconds(small, cfg, n_small)
    t_full = ray_seconds(full, cfg, n_full)
    ray.shutdown()
    return (n_full - n_small) / max(t_full - t_small, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pool", type=int, default=None, help="embedding actors (default: --cpus)")
    args = ap.parse_args()

    from fbmem.jobs.config import load_config

    pool = args.pool or args.cpus
    # leave a core's worth for the source and decode tasks (0.25 each): a fixed-size pool whose
    # actors cannot all be placed waits forever
    per_actor = max(0.25, (args.cpus - 1.0) / pool)
    cfg = load_config(overrides={
        "models.clip.model_name": args.model, "models.clip.pretrained": None, "models.clip.tiny": False,
        "resources.device": "cpu", "resources.ray_num_cpus": args.cpus, "resources.decode_num_cpus": 0.25,
        "resources.embed": {"num_cpus": per_actor, "pool_size": pool, "batch_size": args.batch_size},
    })
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp) / "imgs", args.n, args.side)
        n_small = max(args.batch_size, args.n // 4)
        write_images(Path(tmp) / "small", n_small, args.side, seed=1)
        loop_rate = bare_loop(paths, cfg, args.batch_size)
        ray_rate = ray_pipeline(Path(tmp) / "small", n_small, Path(tmp) / "imgs", args.n, cfg)
    print(f"model={args.model} (random weights) images={args.n} side={args.side} cpus={args.cpus} "
          f"actors={pool}x{per_actor:.2f}cpu batch={args.batch_size}")
    print(f"bare PyTorch loop : {loop_rate:8.1f} images/s")
    print(f"Ray Data pipeline : {ray_rate:8.1f} images/s")
    print(f"ratio pipeline/loop: {ray_rate / loop_rate:.2f}x")


if __name__ == "__main__":
    main()
