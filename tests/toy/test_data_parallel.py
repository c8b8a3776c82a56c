"""run_data_parallel: real gloo process groups on this machine; rank 0's result comes back, and a
failing rank stops the run with its error instead of leaving the caller waiting."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from fbmem.jobs.toy.data_parallel import run_data_parallel


def sum_of_ranks(rank: int, world: int, payload: dict) -> dict:
    """Target run in the child processes (imported there from this module)."""
    x = torch.tensor([float(rank + payload["offset"])])
    dist.all_reduce(x)
    return {"sum": float(x), "world": world, "threads": torch.get_num_threads(), "pid": os.getpid()}


def fail_on_rank_one(rank: int, world: int, payload: dict) -> None:
    if rank == 1:
        raise ValueError("rank one refuses: " + payload["why"])
    time.sleep(60)  # rank 0 would wait here: the parent must stop it when rank 1 fails


def test_ranks_all_reduce_and_rank0_result_returns() -> None:
    out = run_data_parallel("test_data_parallel:sum_of_ranks", 2, {"offset": 10})
    assert out["sum"] == 10 + 11 and out["world"] == 2
    assert out["threads"] == 1  # one torch thread per rank
    assert out["pid"] != os.getpid()


def test_failing_rank_raises_its_error_and_stops_the_others() -> None:
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*rank one refuses: bad input"):
        run_data_parallel("test_data_parallel:fail_on_rank_one", 2, {"why": "bad input"})
    assert time.perf_counter() - t0 < 50  # did not wait for rank 0's sleep


@pytest.mark.parametrize("target, world, msg", [("no_colon", 2, "module:function"), ("a:b", 0, "world")])
def test_bad_arguments_are_named(target: str, world: int, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        run_data_parallel(target, world, None)
