"""How a model stage runs as a Ray Data actor pool, shared by every pipeline and job.

Resources (pool size, CPUs, GPUs, batch size) are settings (config `ActorResources`), turned into
`map_batches` arguments here in one place; and a driver-side table is handed over in blocks of
one actor batch so that the whole pool works, not one actor.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
from ray.data import ActorPoolStrategy

from fbmem.jobs.config import ActorResources


def actor_kwargs(res: ActorResources) -> dict[str, Any]:
    """`map_batches` keyword arguments for an actor pool with the resources `res` (pyarrow batches)."""
    return dict(
        compute=ActorPoolStrategy(size=res.pool_size),
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus or None,
        batch_size=res.batch_size,
        batch_format="pyarrow",
    )


def batch_blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """`table` cut into blocks of `rows` (an actor batch) for `ray.data.from_arrow`. One block goes
    to one actor: a table handed over whole kept a pool of several actors at one busy actor."""
    if table.num_rows == 0:
        return [table]
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]
