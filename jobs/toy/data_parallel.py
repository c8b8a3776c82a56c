"""Run one function as N data-parallel processes on this machine (torch.distributed, gloo).

Why processes: small models on a few CPU cores scale badly with intra-op threads (a toy UNet step
was 1.1x faster with 2 threads than with 1), while N single-thread processes, each on 1/N of the
batch, with gradients averaged by DistributedDataParallel, run close to N times faster.

Why `subprocess` and not `multiprocessing.spawn`: spawn re-imports the caller's main module in
every child, so a script without an `if __name__ == "__main__":` guard recurses, and a child that
dies while starting left the parent waiting forever. Here each rank is `python -m
fbmem.jobs.toy.data_parallel DIR RANK WORLD`: it imports only the target's module, and the parent
polls every rank, stops the others as soon as one fails and raises with that rank's error.

The function is named as "module:function" and called as `function(rank, world, payload)` after
the process joined the gloo group (a file store in a private temporary folder: no port, no
network). Rank 0's return value comes back to the caller. Payload and result travel as pickles in
that folder, which only this user can read and which is deleted afterwards.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PAYLOAD = "payload.pkl"
_RESULT = "result.pkl"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _child_env() -> dict[str, str]:
    """The parent's environment, one OpenMP thread per rank, and the parent's import path (so a
    source checkout that is not installed imports the same code in every rank)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    paths = [p for p in sys.path if p] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def run_data_parallel(target: str, world: int, payload: Any, *, log_level: int = logging.INFO,
                      poll_s: float = 0.2) -> Any:
    """Call `target` ("module:function") in `world` ranks; return rank 0's result.

    Rank 0 logs at `log_level` to this process's stderr; the other ranks log warnings only, to a
    file that is quoted if they fail. Raises RuntimeError naming the first rank that failed."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if ":" not in target:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    with tempfile.TemporaryDirectory(prefix="fbmem-ddp-") as tmp:
        folder = Path(tmp)
        (folder / _PAYLOAD).write_bytes(pickle.dumps({"target": target, "payload": payload, "log_level": log_level}))
        procs: list[subprocess.Popen] = []
        errs: list[Path | None] = []
        env = _child_env()
        try:
            for rank in range(world):
                err = None if rank == 0 else folder / f"rank{rank}.log"
                errs.append(err)
                with contextlib.ExitStack() as stack:
                    sink = None if err is None else stack.enter_context(open(err, "wb"))
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "fbmem.jobs.toy.data_parallel", str(folder), str(rank), str(world)],
                        env=env, stdin=subprocess.DEVNULL, stderr=sink))
            while True:
                codes = [p.poll() for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    r = failed[0]
                    _stop(procs)
                    detail = ("its traceback is above" if errs[r] is None
                              else errs[r].read_text(errors="replace")[-3000:])
                    raise RuntimeError(f"data-parallel rank {r} of {world} failed (exit code {codes[r]}) "
                                       f"running {target}: {detail}")
                if all(c == 0 for c in codes):
                    break
                time.sleep(poll_s)
        except BaseException:
            _stop(procs)
            raise
        return pickle.loads((folder / _RESULT).read_bytes())


def _rank_main(folder: Path, rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    job = pickle.loads((folder / _PAYLOAD).read_bytes())
    logging.basicConfig(level=job["log_level"] if rank == 0 else logging.WARNING, format=_LOG_FORMAT)
    torch.set_num_threads(1)
    module, _, name = job["target"].partition(":")
    fn = getattr(importlib.import_module(module), name)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, job["payload"])
        if rank == 0:
            (folder / _RESULT).write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
