"""The ingest engine at two corpus sizes: does the driver stay flat, and does a rerun cost nothing?

Makes N and FACTOR x N small deterministic PNGs, ingests each into a fresh database with
`--preset tiny`, each in a fresh process with its own local Ray, then reruns the large ingest.
Prints, for each size, from this one run:
  - the driver's peak RSS (getrusage of the driver process) and the ratio large / small,
  - rows/s (the job's own seconds, Ray start included) and the steady rate between the two sizes,
  - the share of the pipeline's CPU time spent in the driver process: the driver's CPU during the
    job / (that + every process of its local Ray: workers, actors, raylet, GCS; sampled from /proc
    by this parent process, since actors exit before the job ends),
  - Lance versions and data files per 10,000 rows after the job (versions kept after the cleanup,
    and versions the job made), and commits,
  - the rerun of the finished large ingest as a share of the fresh one (the job's seconds, and the
    whole process with Python's start).

    OMP_WAIT_POLICY=PASSIVE python bench/scale.py [--n 2000] [--factor 10] [--side 48]

Linux only (/proc). The images are noise: every one is distinct, so every row is written.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve()
CLK = os.sysconf("SC_CLK_TCK")


def write_images(folder: Path, start: int, stop: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"img_{i:07d}.png")


# -------------------------------------------------------------------------------------- the child


def child(src: str, db: str, retention_s: float) -> None:
    """One ingest (or rerun) in this process: prints one JSON line with what it measured."""
    from fbmem.jobs.config import load_config
    from fbmem.jobs.ingest import ingest_images
    from fbmem.jobs.runtime.context import JobContext
    from fbmem.storage.fragments import table_stats

    cfg = load_config(preset="tiny", overrides={"engine.version_retention_s": retention_s})
    job = JobContext(cfg, db)
    t0, c0 = time.perf_counter(), time.process_time()
    with job.run("ingest-training", {"src": src}) as run:
        uri = job.db.table_uri("training_images")
        start_version = _version(uri)
        counts = ingest_images(job.db, cfg, src, target="training", kind="folder", masks="lazy", run=run)
    seconds, driver_cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = table_stats(uri, job.db.storage_options)
    data_dir = Path(uri) / "data"
    print("RESULT " + json.dumps({
        "rows_in": counts.rows_in, "written": counts.written, "skipped_shards": counts.skipped_shards,
        "seconds": seconds, "driver_cpu_s": driver_cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "commits": run.metrics.get("commits", 0), "fragments_written": run.metrics.get("fragments", 0),
        "versions_made": _version(uri) - start_version, **stats,
        "files_on_disk": len(list(data_dir.glob("*.lance"))) if data_dir.is_dir() else 0,
    }), flush=True)
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _version(uri: str) -> int:
    from fbmem.storage.fragments import open_dataset

    ds = open_dataset(uri)
    return ds.version if ds is not None else 0


# ------------------------------------------------------------------------------------- the parent


def _proc_tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of every process below `root`, from /proc."""
    stat: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            stat[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK)
        except (OSError, ValueError, IndexError):
            continue
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        for pid, (ppid, cpu) in stat.items():
            if ppid == p and pid not in out:
                out[pid] = cpu
                todo.append(pid)
    return out


def run_child(src: Path, db: Path, retention_s: float, ray_tmp: str) -> dict:
    env = dict(os.environ, FBMEM_RAY_TMP=ray_tmp, OMP_WAIT_POLICY="PASSIVE")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE), "--child", str(src), "--db", str(db),
                             "--retention-s", str(retention_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:  # actors exit before the job ends: keep the last CPU seen of each process
        while not stop.is_set():
            for pid, cpu in _proc_tree_cpu(proc.pid).items():
                seen[pid] = max(seen.get(pid, 0.0), cpu)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"ingest of {src} failed (exit {proc.returncode}):\n{out[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["ray_cpu_s"] = sum(seen.values())
    res["process_wall_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images of the small corpus")
    ap.add_argument("--factor", type=int, default=10, help="the large corpus is factor x n images")
    ap.add_argument("--side", type=int, default=48, help="image side in pixels (>= ingest.min_side)")
    ap.add_argument("--retention-s", type=float, default=0.0,
                    help="engine.version_retention_s of the runs (0: only the latest version is kept)")
    ap.add_argument("--keep", default=None, help="keep images and databases in this folder")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--db", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.db, args.retention_s)
        return

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fbmem-scale-"))
    ray_tmp = tempfile.mkdtemp(prefix="fbs", dir="/tmp")
    try:
        n, big = args.n, args.n * args.factor
        t = time.perf_counter()
        write_images(base / "small", 0, n, args.side)
        write_images(base / "large", 0, big, args.side)
        print(f"made {n} + {big} images of {args.side}x{args.side} px in {time.perf_counter() - t:.0f} s", flush=True)
        results = {}
        for name, count in (("small", n), ("large", big)):
            db = base / f"db_{name}"
            shutil.rmtree(db, ignore_errors=True)
            results[name] = run_child(base / name, db, args.retention_s, ray_tmp)
            print(f"ingested {count} images: {results[name]['seconds']:.1f} s", flush=True)
        rerun = run_child(base / "large", base / "db_large", args.retention_s, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report(results["small"], results["large"], rerun, n, big)


def report(small: dict, large: dict, rerun: dict, n: int, big: int) -> None:
    def share(r: dict) -> float:
        return r["driver_cpu_s"] / max(r["driver_cpu_s"] + r["ray_cpu_s"], 1e-9)

    def per10k(r: dict, key: str) -> float:
        return r[key] / max(r["rows"], 1) * 10_000

    print()
    print(f"{'':34}{n:>12}{big:>12}")
    rows = [
        ("rows in table", lambda r: f"{r['rows']}"),
        ("job seconds (Ray start included)", lambda r: f"{r['seconds']:.1f}"),
        ("rows/s", lambda r: f"{r['written'] / r['seconds']:.0f}"),
        ("driver peak RSS (MB)", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("driver CPU s (during the job)", lambda r: f"{r['driver_cpu_s']:.1f}"),
        ("Ray processes CPU s", lambda r: f"{r['ray_cpu_s']:.1f}"),
        ("driver share of pipeline CPU", lambda r: f"{share(r):.1%}"),
        ("commits", lambda r: f"{r['commits']}"),
        ("fragments written", lambda r: f"{r['fragments_written']}"),
        ("versions made / 10k rows", lambda r: f"{per10k(r, 'versions_made'):.1f}"),
        ("versions kept / 10k rows", lambda r: f"{per10k(r, 'versions'):.1f}"),
        ("data files / 10k rows", lambda r: f"{per10k(r, 'data_files'):.1f}"),
        ("files on disk / 10k rows", lambda r: f"{per10k(r, 'files_on_disk'):.1f}"),
    ]
    for label, fmt in rows:
        print(f"{label:34}{fmt(small):>12}{fmt(large):>12}")
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    dt = large["seconds"] - small["seconds"]
    steady = f"{(large['written'] - small['written']) / dt:.0f} rows/s" if dt > 1 else "n/a (the runs are too short)"
    print()
    print(f"driver peak RSS ratio {big}/{n}: {ratio:.3f} (growth {large['peak_rss_mb'] - small['peak_rss_mb']:+.0f} MB; "
          f"goal <= 1.3 and < 100 MB)")
    print(f"steady rate between the two sizes: {steady}")
    print(f"rerun of the finished {big}-image ingest: {rerun['seconds']:.2f} s = "
          f"{rerun['seconds'] / large['seconds']:.1%} of the fresh job (goal <= 5%); whole process "
          f"{rerun['process_wall_s']:.1f} s = {rerun['process_wall_s'] / large['process_wall_s']:.1%} of the fresh one's "
          f"{large['process_wall_s']:.1f} s; skipped shards {rerun['skipped_shards']}, rows written {rerun['written']}")


if __name__ == "__main__":
    main()
