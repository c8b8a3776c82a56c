"""Crash safety of `fbmem scan`, measured: 10 scans of the small toy world, each killed with
SIGKILL at a seeded random moment and run again to completion, each compared with one
uninterrupted scan (every result table: same keys, no duplicate key, labels equal, scores within
1e-6). Prints one line per trial and `matched x/10`.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/chaos.py [--kills 10] [--seed 1] [--out DIR]

The harness is tests/chaos.py (shared with tests/jobs/test_scan_chaos.py, the short version that
`make test` runs). Moments are uniform over the uninterrupted scan's duration, measured first in
the same run, so the kills land in every stage.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from chaos import compare_databases, kill_and_resume, run_cli, seeded_moments, small_toy_scan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fbmem-chaos-"))
    ray_tmp = tempfile.mkdtemp(prefix="fbc", dir="/tmp")
    spec = small_toy_scan(out / "toy")
    t0 = time.monotonic()
    run_cli(["scan", str(spec), "--db", str(out / "whole")], ray_tmp, log=out / "whole.log")
    seconds = time.monotonic() - t0
    print(f"uninterrupted scan: {seconds:.0f} s", flush=True)
    moments = seeded_moments(args.seed, args.kills, 3.0, 0.95 * seconds)
    matched = 0
    for i, at in enumerate(moments):
        db = out / f"killed{i}"
        trial = kill_and_resume(["scan", str(spec), "--db", str(db)], [at], ray_tmp, out / f"killed{i}.log")
        problems = compare_databases(str(out / "whole"), str(db))
        matched += not problems
        state = "killed" if trial.killed[0] else "finished before the kill"
        print(f"trial {i + 1}: {state} at {at:.1f} s, resumed, {trial.seconds:.0f} s in all: "
              f"{'MATCH' if not problems else 'DIFFER: ' + '; '.join(problems)}", flush=True)
        shutil.rmtree(db, ignore_errors=True)
    print(f"matched {matched}/{len(moments)} (each killed scan resumed and compared with the uninterrupted one)")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
