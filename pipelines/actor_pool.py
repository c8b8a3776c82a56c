"""A pool of plain Ray actors that each hold one model, for stages whose work is a method call per
chunk (NeMo's prompts, clustering's text embeddings, the demo's controls) rather than a Ray Data
stream of rows.

DESIGN.md: every model runs in an actor with declared resources, on the node Ray picks. A
`ModelPool` starts `res.pool_size` actors with `res.num_cpus` / `res.num_gpus` (a stage's
`resources.<stage>` entry); the worker object, of any class, is built INSIDE each actor, so its
constructor, which loads the model and picks the device there (pipelines/devices.py), never runs
on the driver. Actors start on first use, so a job with nothing to do loads no model. Chunks go
to the next idle actor and come back, with their index, as they finish. Each actor records the
node it runs on under the pool's `name` (pipelines/actors.record_model_node: the run open on the
driver stores it as `model_nodes` in its metrics), and the pool keeps them too (`nodes`).

Errors keep their type: an exception raised by a worker's method, or by its constructor (kept
and raised at the first call: an actor whose constructor raises dies with an ActorDiedError that
has lost it), is raised again on the driver as itself, so a ValueError stays a user error.

`ModelPool.in_process(worker)` puts a worker built in this process (a model already in memory:
tests, benchmarks) behind the same interface.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fbmem.jobs.config import ActorResources


def this_node() -> str:
    """The Ray node id of this process, or "local" outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class _Host:
    """The Ray actor: builds the worker in its own process and calls its methods by name."""

    def __init__(self, stage: str, factory: Any, args: tuple, kwargs: dict) -> None:
        from fbmem.pipelines.actors import record_model_node

        self._worker, self._error = None, None
        try:
            self._worker = factory(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - raised, as itself, at the first call
            self._error = exc
            return
        record_model_node(stage)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def node_id(self) -> str:
        self._check()
        return this_node()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return getattr(self._worker, method)(*args, **kwargs)


def _get(refs: Any) -> Any:
    """ray.get, raising a remote exception as itself (its remote traceback chained)."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
            raise cause from exc
        raise


class ModelPool:
    """`res.pool_size` Ray actors, each holding `factory(*args, **kwargs)`, started on first use,
    with `res`'s CPUs, GPUs and custom resources (`res.custom` pins the pool to nodes offering them).

    `name` names the stage (`resources.<name>`, and the key of its nodes in `model_nodes`). Use as a context manager,
    or call `close()`: closing kills the actors and frees their resources for the next stage.
    """

    def __init__(self, factory: Any, args: tuple = (), res: ActorResources | None = None, *, name: str,
                 kwargs: dict | None = None) -> None:
        self.name = name
        self._factory, self._args, self._kwargs = factory, tuple(args), dict(kwargs or {})
        self._res = res or ActorResources()
        self._actors: list | None = None
        self._local: Any = None
        self.nodes: list[str] = []  # the node of each actor, once started

    @classmethod
    def in_process(cls, worker: Any, *, name: str) -> "ModelPool":
        """A pool of one worker already built in this process."""
        pool = cls(type(worker), name=name)
        pool._local = worker
        pool.nodes = [this_node()]
        return pool

    @property
    def started(self) -> bool:
        return self._local is not None or self._actors is not None

    def start(self) -> "ModelPool":
        """Start the actors (each builds its worker, i.e. loads its model) and wait until they are
        ready; a no-op once started. A worker that fails to build raises here, as itself."""
        if self.started:
            return self
        import ray

        from fbmem.pipelines.actors import model_nodes_registry

        model_nodes_registry()  # where the actors record their nodes for the driver's run
        res = self._res
        host = ray.remote(_Host).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                         resources=dict(res.custom) or None)
        self._actors = [host.remote(self.name, self._factory, self._args, self._kwargs)
                        for _ in range(res.pool_size)]
        try:
            self.nodes = _get([a.node_id.remote() for a in self._actors])
        except BaseException:
            self.close()
            raise
        return self

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`worker.method(*args, **kwargs)` on one worker (the first actor)."""
        if self._local is not None:
            return getattr(self._local, method)(*args, **kwargs)
        self.start()
        return _get(self._actors[0].call.remote(method, *args, **kwargs))

    def map(self, method: str, items: Iterable[Any], *args: Any, **kwargs: Any) -> Iterator[tuple[int, Any]]:
        """`worker.method(item, *args, **kwargs)` for each item, each on the next idle worker;
        yields (index of the item, result) as calls finish (not in order). `args` go to the
        object store once, not once per item."""
        items = list(items)
        if self._local is not None:
            for i, item in enumerate(items):
                yield i, getattr(self._local, method)(item, *args, **kwargs)
            return
        if not items:
            return
        import ray

        self.start()
        shared = [ray.put(a) for a in args]
        idle = list(reversed(self._actors))
        todo = iter(enumerate(items))
        pending: dict[Any, tuple[int, Any]] = {}
        while True:
            while idle:
                nxt = next(todo, None)
                if nxt is None:
                    break
                actor = idle.pop()
                pending[actor.call.remote(method, nxt[1], *shared, **kwargs)] = (nxt[0], actor)
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(done[0])
            idle.append(actor)
            yield i, _get(done[0])

    def close(self) -> None:
        """Kill the actors (their resources go back to Ray); an in-process worker is left alone."""
        actors, self._actors = self._actors, None
        if actors:
            import ray

            for a in actors:
                ray.kill(a)

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
