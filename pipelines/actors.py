"""How a model stage runs as a Ray Data actor pool, shared by every pipeline and job.

Resources (pool size, CPUs, GPUs, batch size) are settings (config `ActorResources`), turned into
`map_batches` arguments here in one place; and a driver-side table is handed over in blocks of
one actor batch so that the whole pool works, not one actor.

Which node ran each model: every model actor calls `record_model_node(stage)` in its constructor.
That appends `(stage, node id)` to a small named actor of the job's driver (`ModelNodes`, one per
Ray job, no CPUs, on the driver's node, created by `actor_kwargs` when Ray is running). The
driver's `RunRecord` takes a mark when a run opens (`model_nodes_mark`) and, when it closes,
stores what was recorded since (`model_nodes_since`) as `{stage: sorted node ids}` in the run's
metrics (`model_nodes`). Without Ray, or outside a Ray actor, recording does nothing.
"""
from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fbmem.jobs.config import ActorResources

log = logging.getLogger(__name__)
MODEL_NODES_NAMESPACE = "fbmem"


def actor_kwargs(res: ActorResources) -> dict[str, Any]:
    """`map_batches` keyword arguments for an actor pool with the resources `res` (pyarrow batches).
    `res.custom` (Ray custom resources, e.g. `{"model_worker": 1}`) pins the pool to the nodes that
    offer them. Called on the driver, it also makes sure the job's `ModelNodes` exists (when Ray
    is running) so that the actors of the pool can record their node."""
    if ray.is_initialized():
        model_nodes_registry()
    return dict(
        compute=ActorPoolStrategy(size=res.pool_size),
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus or None,
        resources=dict(res.custom) or None,
        batch_size=res.batch_size,
        batch_format="pyarrow",
    )


def batch_blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """`table` cut into blocks of `rows` (an actor batch) for `ray.data.from_arrow`. One block goes
    to one actor: a table handed over whole kept a pool of several actors at one busy actor."""
    if table.num_rows == 0:
        return [table]
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


# --- which node ran each model stage ---------------------------------------------------------


class ModelNodes:
    """The `(stage, node id)` of every model actor constructed by one Ray job, in order."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def record(self, stage: str, node_id: str) -> int:
        self.entries.append((stage, node_id))
        return len(self.entries)

    def size(self) -> int:
        return len(self.entries)

    def since(self, start: int) -> list[tuple[str, str]]:
        return self.entries[start:]


# The driver keeps its handles, by (registry name, driver's node): a Ray started again in the same
# process reuses job ids but not node ids. A registry ends with its owner, the driver.
_registries: dict[tuple[str, str], Any] = {}


def _registry_name() -> str:
    return f"model-nodes-{ray.get_runtime_context().get_job_id()}"


def _find_registry() -> Any | None:
    try:
        return ray.get_actor(_registry_name(), namespace=MODEL_NODES_NAMESPACE)
    except ValueError:  # not created: nothing of this job records
        return None


def model_nodes_registry() -> Any:
    """Driver: this Ray job's `ModelNodes`, created on first use. It asks for no CPUs and is pinned
    to the driver's node (a head node of a cluster): it must not keep a GPU worker from scaling
    down, nor die with one. Its owner is the driver, so it ends with the job."""
    name, node = _registry_name(), ray.get_runtime_context().get_node_id()
    if (name, node) not in _registries:
        _registries[name, node] = (
            ray.remote(ModelNodes)
            .options(
                name=name, namespace=MODEL_NODES_NAMESPACE, get_if_exists=True, num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            )
            .remote()
        )
    return _registries[name, node]


def record_model_node(stage: str) -> None:
    """In a model actor's `__init__`: record `(stage, this node's id)` for the driver's run.
    A no-op outside a Ray actor (a test that builds the class directly) or when the driver keeps no
    registry; it never fails the actor (a warning at most)."""
    if not ray.is_initialized():
        return
    ctx = ray.get_runtime_context()
    if ctx.get_actor_id() is None:
        return
    try:
        registry = _find_registry()
        if registry is not None:
            ray.get(registry.record.remote(stage, ctx.get_node_id()), timeout=60)
    except Exception:  # bookkeeping must not stop a model from loading
        log.warning("could not record the node of stage %s", stage, exc_info=True)


def model_nodes_mark() -> int:
    """Driver, when a run opens: how many entries the job's registry holds (0 when it has none)."""
    registry = _find_registry()
    return 0 if registry is None else int(ray.get(registry.size.remote(), timeout=60))


def model_nodes_since(start: int) -> dict[str, list[str]]:
    """Driver, when a run closes: `{stage: sorted node ids}` of the model actors constructed since
    `start` (a `model_nodes_mark`)."""
    registry = _find_registry()
    if registry is None:
        return {}
    nodes: dict[str, set[str]] = {}
    for stage, node_id in ray.get(registry.since.remote(start), timeout=60):
        nodes.setdefault(stage, set()).add(node_id)
    return {stage: sorted(ids) for stage, ids in sorted(nodes.items())}
